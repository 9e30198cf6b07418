"""validate(): impossible jobs are refused before anything is allocated, naming the field and the fix."""

import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from qwen2_dist.cli.train import conf_dir
from qwen2_dist.config import BatchSchedule, JobConfig, advisories, inductor_options, register_configs, validate
from qwen2_dist.errors import UserError


# The default run_dir (runs/default, under the current directory) may hold a run's checkpoints, which the checks
# of what starts a run depend on: the jobs here use one that holds none, unless they name their own. Under the
# temporary directory, which any user can write (validate refuses a run_dir that cannot be made: under /, only
# root could).
NO_RUN = os.path.join(tempfile.gettempdir(), "qwen2-dist-tests-no-run", "run")


def job(*overrides: str) -> JobConfig:
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=[f"run_dir={NO_RUN}", *overrides]))


def test_cache_limit_takes_sizes_for_remote_sources_only(tmp_path):
    validate(job("data.path=s3://bucket/shards", "data.cache_limit=1.5TB"), world_size=1)
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError, match=r"data.cache_limit is set, but data.sources\[1\].path=.* read in place"):
        validate(job(f"data.sources=[{{path: s3://b/a}}, {{path: {tmp_path}}}]", "data.cache_limit=500gb"), 1)


def test_a_batch_rampup_sizes_each_step_and_describes_its_stages():
    t = job("train.global_batch_size=16", "train.batch_rampup=[[4,2],[8,5]]").train
    schedule = BatchSchedule.of(t)
    assert [schedule.at(step) for step in range(1, 8)] == [4, 4, 8, 8, 8, 16, 16]
    assert schedule.sizes() == [4, 8, 16]
    assert schedule.describe() == "4 for steps 1-2, 8 for steps 3-5, 16 from step 6 on"
    from qwen2_dist.cli.train import ramp_note  # the layout's grad_accum_steps is the last batch's: said with it

    assert ramp_note(job("train.global_batch_size=16", "train.batch_rampup=[[4,2],[8,5]]")).endswith(
        "global batches of 4 for steps 1-2, 8 for steps 3-5, 16 from step 6 on") and ramp_note(job()) == ""
    assert validate(job("train.global_batch_size=16", "train.batch_rampup=[[8,2]]"), 2)["grad_accum_steps"] == 2
    assert BatchSchedule.of(job().train) == BatchSchedule(8) and BatchSchedule(8).at(1) == 8


def test_eval_datasets_of_another_seq_len_or_tokenizer_are_refused_before_launch(tmp_path):
    """The launchers' check (check_saved) reads each eval dataset's summary: another sample length, another tokenizer
    than the embedded corpus's, or no summary at all is one line naming eval.datasets[i] and what fixes it."""
    import json

    from qwen2_dist.config import check_saved
    from tests.datasets import make_dataset

    wiki = make_dataset(tmp_path / "wiki", 4, 16)
    with pytest.raises(UserError, match=r"eval.datasets\[0\].path=.*wiki: its samples hold 17 tokens, "
                                        r"train.seq_len=32 needs 33; prepare it again with qwen2-prepare seq_len=32"):
        check_saved(job("train.seq_len=32", f"eval.datasets=[{{path: {wiki}, split: train}}]"))
    summary_path = os.path.join(wiki, "prepare_summary.json")
    with open(summary_path) as f:
        summary = json.load(f)
    with open(summary_path, "w") as f:
        json.dump({**summary, "tokenizer": "gpt2", "vocab_size": 50257}, f)
    with pytest.raises(UserError, match=r"eval.datasets\[0\].path=.*wiki: prepared with tokenizer gpt2 \(50257 "
                                        r"tokens\), the embedded corpus trained on with the Qwen2 tokenizer"):
        check_saved(job("train.seq_len=16", f"eval.datasets=[{{path: {wiki}, split: train}}]"))
    with pytest.raises(UserError, match=r"eval.datasets\[0\].path=/tmp: "):
        check_saved(job("train.seq_len=16", "eval.datasets=[{path: /tmp, split: train}]"))


@pytest.mark.parametrize("key, value", [("datasets", "[{path: /tmp}]"), ("tasks", "[{path: /tmp/a.jsonl}]"),
                                        ("at_start", "true")])
def test_eval_datasets_and_tasks_that_nothing_evaluates_are_named(key, value):
    assert any(f"eval.{key} is set, but eval.interval=0 evaluates nothing" in advice
               for advice in advisories(job(f"eval.{key}={value}", "eval.interval=0"), None))
    assert not advisories(job(f"eval.{key}={value}"), None)


def test_default_job_is_valid_and_derives_accumulation():
    layout = validate(job(), world_size=1)
    assert layout == {"dp_replicate": 1, "dp_shard": 1, "tp": 1, "grad_accum_steps": 2}
    assert validate(job("train.global_batch_size=16"), world_size=2)["grad_accum_steps"] == 2


@pytest.mark.parametrize("overrides, world_size, field", [
    (["train.steps=0"], 1, "train.steps"),
    (["train.micro_batch_size=-1"], 1, "train.micro_batch_size"),
    (["optim.lr=-0.1"], 1, "optim.lr"),
    (["optim.warmup_steps=1000", "train.steps=10"], 1, "optim.warmup_steps"),
    (["optim.min_lr_ratio=2"], 1, "optim.min_lr_ratio"),
    (["optim.schedule=step"], 1, "optim.schedule"),
    (["data.cache_limit=10pb"], 1, "data.cache_limit='10pb': give a positive size"),
    (["data.cache_limit=0.5"], 1, "data.cache_limit='0.5': give a positive size"),
    (["data.cache_limit=100gb"], 1, "data.cache_limit is set, but no remote source is"),
    (["optim.decay_steps=200", "train.steps=150"], 1, "optim.decay_steps=200: must lie in [1, train.steps"),
    (["optim.decay_steps=10", "optim.schedule=constant"], 1, "optim.schedule=constant, which never decays"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"], 1, "train.global_batch_size"),
    (["train.global_batch_size=8", "train.micro_batch_size=4"], 3, "train.global_batch_size"),
    (["train.batch_rampup=[[4,10],[6,20]]"], 1, "the global batch 6 is not divisible by train.micro_batch_size x "
     "data-parallel size = 4 x 1; make each stage's batch a multiple of 4"),
    (["train.batch_rampup=[[4,10]]", "train.global_batch_size=16"], 2, "the global batch 4 is not divisible by "
     "train.micro_batch_size x data-parallel size = 4 x 2"),
    (["train.batch_rampup=[4,10]"], 1, "the stage 4 is not a pair of positive integers; give it as [[BATCH, "
     "LAST_STEP], ...]"),
    (["train.batch_rampup=[[4,10.5]]"], 1, "the stage [4, 10.5] is not a pair"),
    (["train.batch_rampup=[[4,0]]"], 1, "the stage [4, 0] is not a pair of positive integers"),
    (["train.batch_rampup=[[4,20],[4,10]]"], 1, "the stages' last steps must increase (stage [4, 10] ends at step 10"),
    (["train.batch_rampup=[[4,150]]"], 1, "train.batch_rampup ends at step 150, not before train.steps=150"),
    (["train.batch_rampup=[[16,10]]"], 1, "the global batch would shrink from 16 to 8; a ramp-up grows, stage by "
     "stage, up to train.global_batch_size=8"),
    (["train.batch_rampup=[[8,10],[4,20]]", "train.global_batch_size=16"], 1, "the global batch would shrink from 8 "
     "to 4"),
    (["optim.in_backward=true", "train.grad_clip=0", "train.global_batch_size=4", "train.batch_rampup=[[4,10]]"], 1,
     "it needs no train.batch_rampup (got [[4, 10]]) (or set optim.in_backward=false)"),
    (["parallel.dp_shard=3"], 4, "parallel.dp_replicate x dp_shard x tp"),
    (["parallel.dp_replicate=3"], 4, "parallel.dp_replicate"),
    (["parallel.tp=3"], 3, "parallel.tp"),
    (["model.num_attention_heads=5"], 1, "num_attention_heads"),
    (["model.name=qwen2-3b"], 1, "unknown size"),
    (["model.attention=fast"], 1, "model.attention"),
    (["model.loss=fused"], 1, "model.loss"),
    (["model.loss=chunked", "parallel.tp=2"], 2, "model.loss=chunked"),
    (["model.loss_chunk_tokens=0"], 1, "model.loss_chunk_tokens"),
    (["model.z_loss=-1e-4"], 1, "model.z_loss=-0.0001: must be a number from 0 (off) to below 1"),
    (["model.z_loss=1e-4", "model.loss=liger"], 1, "model.z_loss=0.0001 is not computed by model.loss=liger"),
    (["model.kernels=triton"], 1, "model.kernels"),
    (["model.kernels=liger", "parallel.compile=true"], 1, "model.kernels=liger with parallel.compile=true"),
    (["model.fuse_projections=true", "parallel.tp=2"], 2, "model.fuse_projections"),
    (["model.fuse_projections=qkv", "parallel.tp=2"], 2, "model.fuse_projections=qkv needs parallel.tp=1"),
    (["model.fuse_projections=attention"], 1, "model.fuse_projections='attention': choose false, true"),
    (["model.float8=true", "parallel.tp=2"], 2, "model.float8"),
    (["optim.impl=bnb"], 1, "optim.impl"),
    (["optim.in_backward=true", "train.grad_clip=0", "train.global_batch_size=4", "optim.fused=false"], 1,
     "it needs optim.fused=auto or true (got false) (or set optim.in_backward=false)"),
    (["optim.impl=apex"], 2, "optim.impl=apex runs in one process only (got 2)"),
    (["model.kernels=liger", "parallel.tp=2"], 2, "model.kernels=liger needs parallel.tp=1 (got 2)"),
    (["model.kernels=apex", "parallel.tp=2"], 2, "model.kernels=apex needs parallel.tp=1 (got 2)"),
    (["optim.lr=nan"], 1, "optim.lr=nan: must be a finite number"),
    (["train.grad_clip=nan"], 1, "train.grad_clip=nan: must be a finite number"),
    (["train.pg_timeout_minutes=inf"], 1, "train.pg_timeout_minutes=inf: must be a finite number"),
    (["train.pg_timeout_minutes=1e30"], 1, "train.pg_timeout_minutes=1e+30: at most 1e+07"),
    (["model.rope_theta=-inf"], 1, "model.rope_theta=-inf: must be a finite number"),
    (["data.sources=[{path: s3://b/a, weight: inf}]"], 1, "data.sources[0].weight=inf: must be a finite number"),
    (["optim.impl=apex", "optim.fused=false"], 1, "optim.fused=False chooses torch's AdamW kernel; apex's FusedAdam"),
    (["data.path=/nonexistent/shards"], 1, "data.path"),
    (["data.sources=[{path: /nonexistent/a, weight: 1}]"], 1, "data.sources[0].path"),
    (["data.sources=[{path: s3://b/a, weight: 0}]"], 1, "data.sources[0].weight"),
    (["data.sources=[{path: s3://b/a, weight: 1}, {path: s3://b/c}, {path: 's3://b/a/', weight: 2}]"], 1,
     "data.sources[2].path=s3://b/a/: the same data as data.sources[0]"),
    (["data.sources=[{path: /tmp, name: t}, {path: /tmp/../tmp/, name: u}]"], 1,
     "data.sources[1].path=/tmp/../tmp/: the same data as data.sources[0]"),
    (["data.path=s3://b/a", "data.sources=[{path: s3://b/c}]"], 1, "data.path and data.sources"),
    (["eval.samples=0"], 1, "eval.samples"),
    (["eval.datasets=[{path: /tmp, split: test}]"], 1, "eval.datasets[0].split='test': choose val (its held-out "
     "samples) or train"),
    (["eval.datasets=[{path: /nonexistent/wiki}]"], 1, "eval.datasets[0].path=/nonexistent/wiki: no such directory"),
    (["eval.datasets=[{path: /tmp, name: 'a b'}]"], 1, "eval.datasets[0].name='a b': use letters, digits"),
    (["eval.datasets=[{path: /tmp, name: w}, {path: /, name: w}]"], 1, "eval.datasets[1] would be logged as "
     "eval_loss/w, as eval.datasets[0] is: give it another eval.datasets[1].name"),
    (["data.sources=[{path: s3://b/web}, {path: s3://b/code}]", "eval.datasets=[{path: /tmp, name: web}]"], 1,
     "eval.datasets[0] would be logged as eval_loss/web, as a source of data.sources is"),
    (["data.synthetic=true", "eval.datasets=[{path: /tmp}]"], 1, "eval.datasets is set, but data.synthetic=true"),
    (["data.path=/tmp", "eval.datasets=[{path: /tmp/}]"], 1, "eval.datasets[0].path=/tmp/: the same data as data.path"),
    (["eval.datasets=[{path: /tmp, name: a}, {path: /tmp/../tmp, name: b}]"], 1, "eval.datasets[1].path=/tmp/../tmp: "
     "the same data as eval.datasets[0].path"),
    (["eval.tasks=[{path: /nonexistent/hellaswag.jsonl}]"], 1, "eval.tasks[0].path=/nonexistent/hellaswag.jsonl: "
     "cannot read it"),
    (["eval.tasks=[{path: /tmp/a.jsonl}, {path: /b/a.jsonl}]"], 1, "eval.tasks[1] would be logged as task_acc/a, as "
     "eval.tasks[0] is: give it another eval.tasks[1].name"),
    (["eval.tasks=[{path: /tmp/a.jsonl, name: 'a b'}]"], 1, "eval.tasks[0].name='a b': use letters, digits"),
    (["eval.tasks=[{path: /tmp/a.jsonl, limit: 0}]"], 1, "eval.tasks[0].limit=0: must be positive"),
    (["data.synthetic=true", "eval.tasks=[{path: /tmp/a.jsonl}]"], 1, "eval.tasks is set, but data.synthetic=true"),
    (["data.synthetic=true", "data.document_masking=true"], 1, "data.synthetic=true trains on random tokens"),
    (["data.synthetic=true", "data.eod_mask_loss=true"], 1, "data.eod_mask_loss is set too"),
    (["data.embedded_max_tokens=100"], 1, "data.embedded_max_tokens=100: the embedded corpus needs at least 258"),
    (["checkpoint.resume=/nonexistent/ckpt"], 1, "checkpoint.resume"),
    (["model.init_from_hf=/nonexistent/hf"], 1, "model.init_from_hf"),
    (["model.init_from_checkpoint=/nonexistent/ckpt"], 1, "model.init_from_checkpoint"),
    (["model.init_from_hf=/", "model.init_from_checkpoint=/"], 1, "both set"),
    (["train.seq_len=100000"], 1, "train.seq_len"),
    (["train.device=tpu"], 1, "train.device"),
    (["train.grad_clip=-1"], 1, "train.grad_clip"),
    (["train.gc_interval=-1"], 1, "train.gc_interval=-1: must be >= 0 (0: Python's automatic garbage collection)"),
    (["optim.beta2=1.5"], 1, "optim.beta2=1.5: must lie in [0, 1)"),
    (["optim.beta1=-0.1"], 1, "optim.beta1=-0.1"),
    (["optim.eps=0"], 1, "optim.eps=0.0"),
    (["optim.weight_decay=-0.1"], 1, "optim.weight_decay=-0.1"),
    (["train.nonfinite=ignore"], 1, "train.nonfinite"),
    (["logging.profile_steps=5:2"], 1, "logging.profile_steps"),
    (["logging.profile_steps='1:\u00b2'"], 1, "logging.profile_steps='1:\u00b2': use START:END"),
    (["logging.profile_steps=2:10", "train.steps=4", "optim.warmup_steps=0"], 1,
     "ends after the run's last step (train.steps=4; END is the first step not profiled): use an END <= 5"),
    (["seed=-1"], 1, "seed=-1: must be a non-negative integer"),
    (["model.vocab_size=1000"], 1, "model.vocab_size=1000: the embedded corpus holds ids of the Qwen2 tokenizer"),
    ([], 0, "0 processes: a job needs at least one"),
    (["model.num_attention_heads=0"], 1, "num_attention_heads must be positive, got 0"),
    (["model.num_key_value_heads=0"], 1, "num_key_value_heads must be positive, got 0"),
    (["model.hidden_size=0"], 1, "hidden_size must be positive, got 0"),
    (["model.num_attention_heads=-4"], 1, "num_attention_heads must be positive, got -4"),
    (["model.rope_theta=0"], 1, "rope_theta must be a positive finite number, got 0"),
    (["logging.wandb_mode=cloud"], 1, "logging.wandb_mode"),
    (["logging.peak_tflops=0"], 1, "logging.peak_tflops=0.0: must be positive"),
    (["checkpoint.async_save=maybe"], 1, "checkpoint.async_save"),
    (["checkpoint.async_save=2"], 1, "checkpoint.async_save=2: choose auto, true or false"),
    (["checkpoint.async_save=1.0"], 1, "checkpoint.async_save=1.0: choose auto, true or false"),
    (["optim.fused=1.0"], 1, "optim.fused=1.0: choose auto, true or false"),
    (["model.fuse_projections=1.0"], 1, "model.fuse_projections=1.0: choose false, true"),
    (["optim.overlap=true", "optim.fused=0"], 1,
     "it needs optim.fused=auto or true (got false) (or set optim.overlap=false)"),
    (["checkpoint.keep_every=4", "checkpoint.interval=3"], 1,
     "checkpoint.keep_every=4 is not a multiple of checkpoint.interval=3: only steps divisible by both (every 12)"),
    (["run_dir=''"], 1, "run_dir is empty"),
    (["checkpoint.keep_last=0"], 1, "keep_last"),
    (["train.stop_at=-1"], 1, "train.stop_at"),
    (["train.steps=30", "train.stop_at=31"], 1, "train.stop_at=31: must lie in [0, train.steps=30]"),
    (["parallel.tp=4"], 4, "num_key_value_heads 2"),
    (["parallel.tp=2", "model.intermediate_size=383"], 2, "intermediate_size 383"),
    (["parallel.tp=2", "model.vocab_size=151935"], 2, "vocab_size 151935"),
    (["parallel.tp=2", "train.seq_len=33"], 2, "train.seq_len=33"),
    (["parallel.tp=0"], 1, "parallel.tp"),
    (["parallel.dp_shard=0"], 1, "parallel.dp_shard"),
    (["parallel.activation_checkpointing=some"], 1, "parallel.activation_checkpointing"),
    (["parallel.ac_every=0"], 1, "parallel.ac_every"),
    (["parallel.compile=maybe"], 1, "parallel.compile"),
    (["parallel.reshard_after_forward=sometimes"], 1, "parallel.reshard_after_forward"),
    (["+parallel.compile_options.max_autotun=true"], 1, "parallel.compile_options.max_autotun: this torch's Inductor "
                                                        "has no setting 'max_autotun'; did you mean max_autotune"),
    (["+parallel.compile_options.triton.cudagraph=true"], 1, "parallel.compile_options.triton.cudagraph:"),
    (["parallel.cpu_offload=true"], 1, "parallel.cpu_offload"),
    (["parallel.cpu_offload=true", "train.device=cpu"], 2, "parallel.cpu_offload"),
])
def test_invalid_jobs_are_refused(overrides, world_size, field):
    with pytest.raises(UserError) as err:
        validate(job(*overrides), world_size)
    message = str(err.value)
    assert field in message
    assert "\n" not in message


def test_a_run_dir_that_cannot_be_a_writable_directory_is_refused_before_launch(tmp_path, monkeypatch):
    """A file, a path under a file, or a directory this user cannot write: refused by validate (the launchers'
    check, and every worker before it logs), not a traceback in every rank where it first makes run_dir/logs."""
    (tmp_path / "notes.txt").write_text("")
    for run_dir, why in ((tmp_path / "notes.txt", "is a file, not a directory"),
                         (tmp_path / "notes.txt" / "run", f"lies under the file {tmp_path / 'notes.txt'}")):
        with pytest.raises(UserError, match=rf"^run_dir={re.escape(str(run_dir))}: {re.escape(why)}; give the run "
                                            "a directory this user can write$"):
            validate(job(f"run_dir={run_dir}"), 1)
    validate(job(f"run_dir={tmp_path / 'new' / 'run'}"), 1)  # made by the job, under a writable directory
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(tmp_path) and access(path, mode))
    with pytest.raises(UserError, match=rf"{re.escape(str(tmp_path))} cannot be written by this user"):
        validate(job(f"run_dir={tmp_path / 'new' / 'run'}"), 1)
    validate(job(f"run_dir={tmp_path / 'new' / 'run'}"), 1, files=False)  # qwen2-estimate reads no file system


def test_a_data_cache_dir_that_cannot_be_written_is_refused_where_the_job_needs_it(tmp_path):
    """The embedded corpus and remote shards are cached there; a file was refused after the launch, by every rank,
    in a message naming qwen2-prepare's output=."""
    (tmp_path / "notes.txt").write_text("")
    bad = f"data.cache_dir={tmp_path / 'notes.txt' / 'cache'}"
    with pytest.raises(UserError, match=r"^data.cache_dir=.*notes.txt/cache: lies under the file .*; it caches the "
                                        r"embedded corpus \(no data.path\); set data.cache_dir to a directory"):
        validate(job(bad), 1)
    with pytest.raises(UserError, match=r"it caches the shards of data.path=s3://b/shards;"):
        validate(job(bad, "data.path=s3://b/shards"), 1)
    from tests.datasets import make_dataset

    local = make_dataset(tmp_path / "ds", 8, 16)
    with pytest.raises(UserError, match=r"it caches the shards of eval.datasets\[0\].path=s3://b/wiki;"):
        validate(job(bad, f"data.path={local}", "eval.datasets=[{path: s3://b/wiki}]"), 1)
    validate(job(bad, f"data.path={local}"), 1)  # local shards, read in place: no cache
    validate(job(bad, "data.synthetic=true"), 1)
    validate(job(bad), 1, files=False)


def test_a_checkpoint_the_job_names_must_be_committed_and_the_newest_committed_one_is_suggested(tmp_path):
    # Refused before launch (the launchers' precheck runs validate): in the workers it would fail on every rank,
    # and torchrun would restart them.
    steps = tmp_path / "run" / "checkpoints"
    for step, committed in ((2, True), (4, True), (6, False)):  # step 6: a save cut short, no metadata.json
        (steps / f"step_{step:08d}").mkdir(parents=True)
        if committed:
            (steps / f"step_{step:08d}" / "metadata.json").write_text("{}")
    newest = steps / "step_00000004"
    for key in ("checkpoint.resume", "model.init_from_checkpoint"):
        validate(job(f"{key}={newest}"), world_size=1)
        for path in (tmp_path / "run", steps):
            with pytest.raises(UserError, match=rf"^{key}={re.escape(str(path))}: not a committed checkpoint \(no "
                                                rf"metadata.json\); the newest committed one under it is "
                                                rf"{re.escape(str(newest))}; point {key} at a step_\* directory"):
                validate(job(f"{key}={path}"), world_size=1)
        with pytest.raises(UserError, match=r"not a committed checkpoint \(no metadata.json\); point"):
            validate(job(f"{key}={steps / 'step_00000006'}"), world_size=1)
    # Both: the checkpoint's weights start the run, and the init would be ignored silently.
    with pytest.raises(UserError, match=r"checkpoint.resume=.*step_00000004 and model.init_from_checkpoint are both "
                                        r"set: .* drop one"):
        validate(job(f"checkpoint.resume={newest}", f"model.init_from_checkpoint={newest}"), world_size=1)


def test_a_run_with_checkpoints_of_its_own_is_not_refused_for_a_starting_point_gone_since(tmp_path):
    """checkpoint.resume=PATH of another run, model.init_from_hf and model.init_from_checkpoint start a run; its
    restarts resume its own checkpoints and never read them again. Deleted since (scratch cleaned, the other run's
    retention), every restart and requeue was refused with "no such directory"."""
    gone = tmp_path / "gone" / "step_00000004"
    starts = [f"checkpoint.resume={gone}", f"model.init_from_hf={gone}", f"model.init_from_checkpoint={gone}"]
    for start in starts:
        with pytest.raises(UserError, match=rf"{re.escape(start)}: no such (checkpoint )?directory"):
            validate(job(f"run_dir={tmp_path / 'run'}", start), world_size=1)
    own = tmp_path / "run" / "checkpoints" / "step_00000002"
    own.mkdir(parents=True)
    (own / "metadata.json").write_text("{}")
    for start in starts:
        validate(job(f"run_dir={tmp_path / 'run'}", start), world_size=1)
        # checkpoint.resume=none moves the run's checkpoints aside and starts from what it names: still checked.
        if not start.startswith("checkpoint.resume"):
            with pytest.raises(UserError, match=rf"{re.escape(start)}: no such directory"):
                validate(job(f"run_dir={tmp_path / 'run'}", start, "checkpoint.resume=none"), world_size=1)
    with pytest.raises(UserError, match=r"checkpoint.resume=.*: no such checkpoint directory"):  # a rollback target
        validate(job(f"run_dir={tmp_path / 'run'}", f"checkpoint.resume={own.parent / 'step_00000001'}"), 1)
    # A keyword misspelt (None for none: a fresh start meant) would resume the newest as a gone starting point does.
    for value in ("None", "NONE", "latest", "Auto"):
        with pytest.raises(UserError, match=rf"checkpoint.resume={value}: the keywords are auto .* and none"):
            validate(job(f"run_dir={tmp_path / 'run'}", f"checkpoint.resume={value}"), world_size=1)


def test_a_sweep_is_refused_with_several_processes():
    """A Hydra sweep runs its points in turn in one process; under torchrun with several, the first point's end ended
    the process (exit 0), the other points untrained."""
    from qwen2_dist.cli.train import check_sweep_processes

    with pytest.raises(UserError, match=r"qwen2-train -m .* this job has 2 processes: only the first point"):
        check_sweep_processes(["-m", "optim.lr=1e-3,3e-3", "run_dir=runs/lr${optim.lr}"], 2)
    check_sweep_processes(["--multirun", "optim.lr=1e-3,3e-3"], 1)
    check_sweep_processes(["optim.lr=1e-3"], 2)
    env = dict(os.environ, QWEN2_CHECK_ONLY="2")  # as the launchers check a job of 2 processes before torchrun
    result = subprocess.run([sys.executable, "-m", "qwen2_dist.cli.train", "-m", "optim.lr=1e-3,3e-3"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "only the first point would train" in result.stderr, result.stderr[-2000:]


def test_parallel_layouts_resolve():
    assert validate(job("parallel.tp=2", "train.micro_batch_size=2"), world_size=4) == {
        "dp_replicate": 1, "dp_shard": 2, "tp": 2, "grad_accum_steps": 2}
    assert validate(job("parallel.dp_replicate=2", "train.micro_batch_size=1"), world_size=4) == {
        "dp_replicate": 2, "dp_shard": 2, "tp": 1, "grad_accum_steps": 2}
    for value in ("true", "false", "auto"):
        validate(job(f"parallel.compile={value}", "parallel.activation_checkpointing=selective"), world_size=1)


def test_config_interpolation_cannot_execute_code(tmp_path):
    from qwen2_dist.cli.train import _precheck

    marker = tmp_path / "pwned"
    for override in (f"run_dir=${{python:open('{marker}','w')}}",
                     f"run_dir=${{eval:__import__('os').system('touch {marker}')}}"):
        with pytest.raises(UserError, match="bad override"):
            _precheck([override])
    assert not marker.exists()


def test_the_one_line_check_leaves_hydra_s_flags_and_their_values_to_hydra():
    """-c job, -cn NAME, -cp DIR: the flag was dropped and its value composed as an override ("Error parsing
    override 'job'"), so qwen2-train -c job and the launchers' check exited 2."""
    from qwen2_dist.cli.train import _precheck

    for argv in (["-c", "job"], ["-cn", "config"], ["--cfg", "job"], ["-m", "seed=1,2"], ["model=tiny", "-c", "job"]):
        assert _precheck(argv) is None, argv
    assert _precheck(["model=tiny", "hydra.job.chdir=false"]).model.name == "tiny"


def test_a_run_without_hydra_flags_trains_on_the_config_it_checked_and_hydras_own_run_takes_the_rest(monkeypatch):
    """qwen2-train composes its overrides once for the one-line check; with no Hydra flag or Hydra setting among
    them that config is the job's (hydra.main composed it twice more, about 1 s of CPU in every process of every
    launch). A Hydra flag or setting still goes through hydra.main."""
    from qwen2_dist.cli import train

    trained, hydra_runs = [], []
    monkeypatch.setattr(train, "_entry", lambda cfg: trained.append(cfg))
    monkeypatch.setattr(train.hydra, "main", lambda **kwargs: lambda task: lambda: hydra_runs.append(kwargs))
    monkeypatch.delenv("QWEN2_CHECK_ONLY", raising=False)
    for argv, via_hydra in [(["model=tiny", "train.steps=3", "run_dir=/nonexistent/r"], False),
                            (["model=tiny", "run_dir=/nonexistent/r", "hydra.job.chdir=false"], True),
                            (["model=tiny", "run_dir=/nonexistent/r", "+hydra.job.env_set.A=1"], True),
                            (["model=tiny", "run_dir=/nonexistent/r", "--cfg", "job"], True)]:
        trained.clear(), hydra_runs.clear()
        monkeypatch.setattr(sys, "argv", ["qwen2-train", *argv])
        train.main()
        assert (len(hydra_runs), len(trained)) == ((1, 0) if via_hydra else (0, 1)), argv
    monkeypatch.setattr(sys, "argv", ["qwen2-train", "model=tiny", "train.steps=3", "run_dir=/nonexistent/r"])
    train.main()
    (cfg,) = trained
    assert train.to_job(cfg) == train.compose_job(sys.argv[1:]) and cfg.train.steps == 3


@pytest.mark.parametrize("override, expected", [
    # Hydra adds any key given with + or ++, unchecked: the job would run with the setting ignored.
    ("+train.newkey=1", "train.newkey: no such setting; did you mean"),
    ("++train.stepz=3", "train.stepz: no such setting; did you mean train.steps"),
    ("+newtop=1", "newtop: no such setting (a +newtop=... override adds a key that nothing reads"),
    # Keys Hydra refuses itself, now with the closest ones.
    ("optimm.lr=1", "Could not override 'optimm.lr': no such setting; did you mean optim.lr"),
    ("train.lr=1", "did you mean optim.lr"),
    # Another trainer's name for a setting, which no spelling of ours is close to (it was offered min_lr_ratio).
    ("+optim.learning_rate=1e-3", "optim.learning_rate: no such setting; did you mean optim.lr or"),
    ("train.max_steps=10", "no such setting; did you mean train.steps or"),
    ("parallel.compile_options.max_autotune=true", "an Inductor setting is added with "
                                                   "+parallel.compile_options.max_autotune=VALUE"),
    # A config group's options; a value that does not fit its field (Hydra's reason is in the exception's cause).
    ("model=qwen2_1.5b", "model=qwen2_1.5b: no such model in "),
    ("optim.lr=abc", "Error merging override optim.lr=abc: Value 'abc' of type 'str' could not be converted to Float"),
    ("+data.sources=[{path: /x, wieght: 1}]", "Key 'wieght' not in 'DataSource'"),
    # An existing key whose value is refused inside: not "no such setting" (what Hydra's first line alone said).
    ("data.sources=[{path: /x, wieght: 1}]", "Could not override 'data.sources': Key 'wieght' not in 'DataSource'; "
                                             "did you mean weight?"),
    ("data.sources=[{path: /x, extra: 1}]", "Key 'extra' not in 'DataSource' (its keys: path, weight, name)"),
    # Values Hydra's grammar reads as syntax (a ~ the shell did not expand, an =, an open bracket): quoting fixes them.
    ("run_dir=~/x", "Hydra could not parse the override; quote a value that holds characters such as ~ = , [ ] { } "
                    "as KEY='VALUE'"),
    ("run_dir=a=b", "mismatched input '=' expecting <EOF>: Hydra could not parse the override; quote a value"),
    ("run_dir=runs/${hydra:job.name}", "HydraConfig was not set: a ${hydra:...} value exists only inside Hydra's run"),
    # A ??? of conf/ left unset (conf/data/mixture.yaml's paths): the key and the override that sets it.
    ("data=mixture", "data.sources[0].path has no value; set it with data.sources.0.path=VALUE"),
])
def test_a_bad_key_or_value_is_refused_in_one_line_with_the_fix(override, expected):
    from qwen2_dist.cli.train import compose_job

    with pytest.raises(UserError) as caught:
        compose_job([override])
    message = str(caught.value)
    assert message.startswith(f"bad override in {override!r}: ") and expected in message, message
    assert "\n" not in message
    if override.startswith("model="):
        assert message.endswith("choose one of debug, qwen2-0.5b, qwen2-1.5b, qwen2-72b, qwen2-7b, tiny"), message


def test_a_quoted_boolean_is_the_boolean():
    """optim.fused, checkpoint.async_save and model.fuse_projections also take a string (auto, qkv, mlp), so a
    quoted 'false' arrives as text, and 0 as an integer: each taken as False (bool('false') would have been True)."""
    from qwen2_dist.cli.train import compose_job

    cfg = compose_job(["optim.fused='false'", "checkpoint.async_save='TRUE'", "model.fuse_projections='false'"])
    validate(cfg, 1)
    assert (cfg.optim.fused, cfg.checkpoint.async_save, cfg.model.fuse_projections) == (False, True, False)
    # 1 and 0, as a boolean setting such as optim.overlap takes them (0 was let through as on by `is False` checks)
    cfg = compose_job(["optim.fused=0", "checkpoint.async_save=1", "model.fuse_projections=1"])
    validate(cfg, 1)
    assert [type(v) for v in (cfg.optim.fused, cfg.checkpoint.async_save, cfg.model.fuse_projections)] == [bool] * 3
    assert (cfg.optim.fused, cfg.checkpoint.async_save, cfg.model.fuse_projections) == (False, True, True)


def test_a_run_dir_named_by_the_time_is_refused():
    """Every process, and every restart, resolves ${now:} again: ranks would disagree and restarts start over."""
    from qwen2_dist.cli.train import compose_job

    with pytest.raises(UserError, match=r"run_dir=runs/\$\{now:%m%d-%H%M\}: .* use a fixed name"):
        compose_job(["run_dir=runs/${now:%m%d-%H%M}"])
    assert compose_job(["run_dir=runs/${oc.env:HOME}"]).run_dir == f"runs/{os.environ['HOME']}"


def test_each_point_of_a_sweep_needs_a_run_dir_of_its_own(tmp_path):
    from qwen2_dist.cli.train import check_sweep_point

    seen: set[str] = set()
    with pytest.raises(UserError, match=r"every point of the sweep would train in run_dir=runs/x; .*lr\$\{optim.lr\}"):
        check_sweep_point("runs/x", "runs/x", seen)
    check_sweep_point("runs/lr${optim.lr}", str(tmp_path / "lr0.001"), seen)
    check_sweep_point("runs/lr${optim.lr}", str(tmp_path / "lr0.002"), seen)
    with pytest.raises(UserError, match=r"this point's run_dir=.*lr0.001 is an earlier point's"):
        check_sweep_point("runs/s${seed}", str(tmp_path / "lr0.001"), seen)


def test_a_sweeps_points_are_checked_before_the_first_trains(monkeypatch):
    """Each point composed and checked as it would be, before Hydra starts the sweep (which writes its record and
    trains the first point): a run_dir that names no swept key, or a bad value of a later point, is refused then."""
    from qwen2_dist.cli import train
    from qwen2_dist.cli.train import check_sweep_points

    with pytest.raises(UserError, match=r"^qwen2-train -m: the sweep's points optim\.lr=0\.001 and optim\.lr=0\.002 "
                                        r"would both train in run_dir=runs/s0; give each point its own"):
        check_sweep_points(["-m", "optim.lr=1e-3,2e-3", "run_dir=runs/s${seed}"])
    with pytest.raises(UserError, match=r"^qwen2-train -m: the sweep's point train\.steps=1 seed=0: "
                                        r"optim\.warmup_steps=5: must lie in \[0, train\.steps=1\]"):
        check_sweep_points(["--multirun", "train.steps=100,1", "optim.warmup_steps=5", "seed=range(0,2)",
                            "run_dir=runs/t${train.steps}-s${seed}"])
    with pytest.raises(UserError, match=r"^qwen2-train -m: the sweep's point model=tinyy: bad override .*tinyy"):
        check_sweep_points(["-m", "model=tiny,tinyy", "run_dir=runs/${model.name}"])
    # A swept run_dir (run_dir=a,b): each point's own, though it names no swept key, once every point was seen.
    monkeypatch.setattr(train, "_sweep_expanded", False)
    check_sweep_points(["-m", "run_dir=runs/a,runs/b"])
    assert train._sweep_expanded
    train.check_sweep_point("runs/a", "runs/a", set(), expanded=True)
    # Points of their own; and what it leaves to Hydra and to each point's own check (check_sweep_point).
    for argv in (["-m", "optim.lr=1e-3,2e-3", "seed=range(0,2)", "run_dir=runs/lr${optim.lr}-s${seed}"],
                 ["model=tiny"], ["-m", "-cn", "config", "optim.lr=1e-3,2e-3"],
                 ["-m", "hydra/sweeper=basic", "optim.lr=1e-3,2e-3"], ["-m", "optim.lr=interval(0,1)"],
                 ["-m", "optim.lr=1e-3,2e-3", "run_dir=runs/${hydra:job.num}"]):
        check_sweep_points(argv)


def test_keys_that_may_be_added_still_are_and_unknown_ones_inside_a_list_are_found():
    from qwen2_dist.cli.train import compose_job, to_job
    from qwen2_dist.config import check_known_keys

    job = compose_job(["+parallel.compile_options.max_autotune=true",
                       "+parallel.compile_options.triton.cudagraphs=false"])
    assert job.parallel.compile_options == {"max_autotune": True, "triton": {"cudagraphs": False}}
    with pytest.raises(UserError, match=r"^data\.sources\[1\]\.wieght: no such setting; did you mean "
                                        r"data\.sources\[1\]\.weight\?"):
        check_known_keys({"data": {"sources": [{"path": "/a", "weight": 1.0}, {"path": "/b", "wieght": 1.0}]}})
    # The path of a Hydra launch with flags (multirun), which skips compose_job: run() converts with to_job.
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["+eval.sample=4"])
    with pytest.raises(UserError, match=r"^eval\.sample: no such setting; did you mean eval\.samples"):
        to_job(cfg)


@pytest.mark.parametrize("version, fails", [("2.11.0", False), ("2.12.0", True), ("2.13.0", True),
                                             ("2.13.1+cu130", True), ("2.14.0", False), ("2.14.1", False)])
def test_the_recompute_compile_refusal_covers_the_torch_versions_measured_to_fail(monkeypatch, version, fails):
    import importlib.metadata

    from qwen2_dist.config import ParallelConfig, compile_fails_with_recompute_under_tp

    monkeypatch.setattr(importlib.metadata, "version", lambda name: version)
    assert compile_fails_with_recompute_under_tp(ParallelConfig(tp=2, activation_checkpointing="full")) == fails
    assert compile_fails_with_recompute_under_tp(ParallelConfig(tp=2, activation_checkpointing="selective")) == fails
    assert not compile_fails_with_recompute_under_tp(ParallelConfig(tp=2, activation_checkpointing="op"))
    assert not compile_fails_with_recompute_under_tp(ParallelConfig(tp=1, activation_checkpointing="full"))


def test_compiling_recomputed_tensor_parallel_blocks_is_refused_where_torch_cannot():
    from qwen2_dist.config import compile_fails_with_recompute_under_tp
    from qwen2_dist.parallel.parallelize import compile_enabled

    overrides = ["parallel.tp=2", "parallel.activation_checkpointing=full"]
    explicit, auto = job(*overrides, "parallel.compile=true"), job(*overrides)
    if compile_fails_with_recompute_under_tp(explicit.parallel):  # torch 2.12 and 2.13 (CI: 2.13.0)
        with pytest.raises(UserError, match="cannot compile a tensor-parallel block recomputed whole"):
            validate(explicit, world_size=2)
        assert not compile_enabled(auto.parallel, "cuda")  # auto runs such blocks eager
    else:
        validate(explicit, world_size=2)
        assert compile_enabled(auto.parallel, "cuda")
    assert compile_enabled(job("parallel.tp=2", "parallel.activation_checkpointing=op").parallel, "cuda")


def test_compile_options_of_the_wrong_type_are_refused_before_launch_and_booleans_taken_as_written():
    """torch.compile checks each Inductor setting's type at the first compile, on every rank, after the launch
    (`+parallel.compile_options.max_autotune=1`: RuntimeError "Unexpected type of attr max_autotune, got int should
    be bool"): checked here as it checks it, with 1/0 and a quoted 'true' taken as booleans."""
    from qwen2_dist.cli.train import compose_job

    def options(*overrides):
        return inductor_options(compose_job(list(overrides)).parallel)

    assert options("+parallel.compile_options.max_autotune=1", "+parallel.compile_options.triton.cudagraphs='false'",
                   "+parallel.compile_options.compile_threads=4") == {
        "max_autotune": True, "triton.cudagraphs": False, "compile_threads": 4}
    for value, shown in (("2", "2"), ("yes", "'yes'"), ("1.5", "1.5")):
        with pytest.raises(UserError, match=rf"^parallel\.compile_options\.max_autotune={shown}: this torch's "
                                            r"Inductor takes a bool there \(its default: False\)$"):
            options(f"+parallel.compile_options.max_autotune={value}")
    with pytest.raises(UserError, match=r"compile_options\.epilogue_fusion='x'"):
        validate(job("+parallel.compile_options.epilogue_fusion=x"), 1, files=False)  # in the launchers' check


def test_compile_options_reach_every_compiled_block_and_the_loss(monkeypatch):
    """parallel.compile_options, nested keys joined with dots, go to torch.compile for each block, the final norm and
    the chunked loss's softmax step."""
    from qwen2_dist.model import loss as loss_module
    from qwen2_dist.model.args import get_model_args
    from qwen2_dist.model.qwen2 import build_model
    from qwen2_dist.parallel.parallelize import parallelize

    cfg = job("+parallel.compile_options.coordinate_descent_tuning=true",
              "+parallel.compile_options.triton.cudagraphs=false", "parallel.compile=true")
    validate(cfg, 1)
    wanted = {"coordinate_descent_tuning": True, "triton.cudagraphs": False}
    assert inductor_options(cfg.parallel) == wanted
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append(kwargs.get("options")) or fn)
    model = parallelize(build_model(get_model_args("tiny"), "meta"), None, cfg.parallel, device_type="cpu")
    assert seen == [wanted] * (len(model.layers) + 1)  # every block, and the final norm
    seen.clear()
    loss_module._compiled.cache_clear()
    loss_module._compiled_step.cache_clear()
    try:
        hidden, weight = torch.randn(6, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
        loss_module.linear_cross_entropy(hidden, weight, torch.randint(0, 11, (6,)), chunk_tokens=4, compiled=True,
                                         compile_options=tuple(sorted(wanted.items())))
    finally:
        loss_module._compiled.cache_clear()
        loss_module._compiled_step.cache_clear()
    assert seen == [wanted]
    # None when unset: torch.compile refuses options next to a mode, and Inductor's defaults apply.
    assert inductor_options(job().parallel) == {}



def test_data_the_model_cannot_read_is_refused_before_launch(tmp_path):
    """validate() reads the sources' prepare_summary.json: token ids beyond model.vocab_size, or a mixture weight
    too small for any share of a block, are one line each (after the launch they failed, or read the wrong rows)."""
    import json

    from tests.datasets import make_dataset

    data = make_dataset(tmp_path / "ds", 8, 16)
    with open(tmp_path / "ds" / "prepare_summary.json") as f:
        summary = json.load(f)
    with open(tmp_path / "ds" / "prepare_summary.json", "w") as f:
        json.dump({**summary, "tokenizer": "qwen2", "vocab_size": 151646, "max_token_id": 151643}, f)
    validate(job(f"data.path={data}", "train.seq_len=16"), 1)
    with pytest.raises(UserError, match="holds token ids up to 151643, beyond model.vocab_size=4096"):
        validate(job(f"data.path={data}", "train.seq_len=16", "model.vocab_size=4096"), 1)
    other = make_dataset(tmp_path / "other", 8, 16)
    with pytest.raises(UserError, match=r"data.sources\[1\].weight=0.0001 .* is too small"):
        validate(job(f"data.sources=[{{path: {data}, weight: 1}}, {{path: {other}, weight: 0.0001}}]"), 1)
    # Before the launch (the launchers' check), not in validate(), which qwen2-estimate shares.
    from qwen2_dist.cli.train import check_only

    validate(job(f"data.path={data}", "train.seq_len=32"), 1)
    with pytest.raises(UserError, match="samples hold 17 tokens but train.seq_len=32 needs 33; set train.seq_len=16"):
        check_only(job(f"data.path={data}", "train.seq_len=32", f"run_dir={tmp_path / 'run'}"), "1")


def test_evaluation_reads_whole_micro_batches_on_every_rank():
    from qwen2_dist.cli.train import eval_step_size

    assert eval_step_size(16, 4) == 16 and eval_step_size(10, 4) == 12 and eval_step_size(3, 8) == 8
    assert eval_step_size(390, 1) == 390


def test_rope_theta_norm_eps_and_init_range_override_a_size():
    """Weights trained with another RoPE base or norm epsilon (model.init_from_hf compares them with the job's
    config.json fields) can be matched by overrides."""
    args = job("model=qwen2-72b", "model.rope_theta=10000", "model.rms_norm_eps=1e-6",
               "model.initializer_range=0.01").model.args()
    assert (args.rope_theta, args.rms_norm_eps, args.initializer_range) == (10000.0, 1e-6, 0.01)
    assert args.hidden_size == 8192  # the rest is the named size's


def test_a_checkpoint_or_hugging_face_weights_of_another_model_are_refused_before_launch(tmp_path, capsys):
    import dataclasses

    from qwen2_dist.model.args import get_model_args
    from qwen2_dist.model.hf import write_hf
    from qwen2_dist.model.qwen2 import build_model
    from qwen2_dist.train import checkpoint

    tiny = get_model_args("tiny")
    model = build_model(tiny, "cpu")
    model.init_weights(0)
    checkpoint.write(str(tmp_path / "run" / "checkpoints" / "step_00000002"), model, None, {"step": 2},
                     {"model": "tiny", "model_args": tiny.to_dict()})
    from qwen2_dist.cli.train import check_only

    check_only(job("model=tiny", f"run_dir={tmp_path / 'run'}"), "1")
    # The launchers' check refuses it; validate() does not (qwen2-estimate plans a job whatever run_dir holds).
    other = job("model=tiny", "model.num_hidden_layers=3", f"run_dir={tmp_path / 'run'}")
    validate(other, 1)
    with pytest.raises(UserError, match=r"step_00000002 holds a tiny model whose sizes differ .*num_hidden_layers.*"
                                        r"\(its sizes: model.num_hidden_layers=2\)"):
        check_only(other, "1")
    # A context length or init scale of another value (Hugging Face configs differ in these) is no obstacle.
    check_only(job("model=tiny", "model.max_position_embeddings=32768", "model.initializer_range=0.01",
                   f"run_dir={tmp_path / 'run'}"), "1")
    write_hf(model.state_dict(), dataclasses.replace(tiny, rope_theta=10000.0), str(tmp_path / "hf"))
    with pytest.raises(UserError, match=r"config.json differs .*config.json vs job: rope_theta 10000.0 vs 1000000.0"):
        validate(job("model=tiny", f"model.init_from_hf={tmp_path / 'hf'}", f"run_dir={tmp_path / 'new'}"), 1)
    validate(job("model=tiny", "model.rope_theta=10000", f"model.init_from_hf={tmp_path / 'hf'}",
                 f"run_dir={tmp_path / 'new'}"), 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU refuses")
@pytest.mark.parametrize("override,field,processes", [
    ("train.device=cuda", "train.device=cuda: no CUDA device is visible", 1),
    ("model.attention=flex", "model.attention=flex", 1),
    ("model.kernels=liger", "model.kernels=liger runs on CUDA devices only", 1),
    ("model.loss=liger", "model.loss=liger needs a CUDA device", 1),
    ("optim.impl=apex", "optim.impl=apex runs on CUDA devices only", 1),
    ("model.float8=true", "model.float8=true needs a CUDA GPU", 1),
    ("parallel.fp32_weight_grads=true", "parallel.fp32_weight_grads=true needs compiled blocks on CUDA", 1),
    ("parallel.cpu_offload=true", "parallel.cpu_offload=true needs CUDA devices", 2),
])
def test_the_launchers_check_refuses_what_this_machine_cannot_run(override, field, processes, capsys, tmp_path):
    """QWEN2_CHECK_ONLY (launch/common.sh, before torchrun): the device and packages too, not only the config, so
    that torchrun does not start, and restart, workers that fail on them."""
    from qwen2_dist.cli.train import check_only

    check_only(job("model=tiny", f"run_dir={tmp_path}"), str(processes))
    assert f"config ok for {processes} process(es)" in capsys.readouterr().out
    with pytest.raises(UserError, match=re.escape(field)):
        check_only(job("model=tiny", f"run_dir={tmp_path}", override), str(processes))


def test_the_launchers_check_refuses_more_processes_than_gpus_on_cuda(monkeypatch, capsys, tmp_path):
    """NPROC=8 on a node with 4 GPUs (Slurm's for the node, or CUDA_VISIBLE_DEVICES): every worker past the fourth
    failed after torchrun started them all."""
    from qwen2_dist.cli import train

    monkeypatch.setattr(train, "check_machine", lambda job: "cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.setenv("QWEN2_LAUNCH_NPROC", "8")
    with pytest.raises(UserError, match=re.escape("NPROC=8: more processes than the 4 GPU(s) torch sees on this node "
                                                  "(CUDA_VISIBLE_DEVICES=0,1,2,3)") + ".*set NPROC=4 or fewer"):
        train.check_only(job("model=tiny", f"run_dir={tmp_path}"), "2")
    monkeypatch.setenv("QWEN2_LAUNCH_NPROC", "4")
    train.check_only(job("model=tiny", f"run_dir={tmp_path}"), "2")
    monkeypatch.setattr(train, "check_machine", lambda job: "cpu")  # train.device=cpu: as many as asked, on purpose
    monkeypatch.setenv("QWEN2_LAUNCH_NPROC", "8")
    train.check_only(job("model=tiny", f"run_dir={tmp_path}"), "2")
    assert capsys.readouterr().out.count("config ok for") == 2


def test_a_job_that_keeps_no_checkpoint_or_splits_tp_across_nodes_is_warned_about(monkeypatch, capsys, tmp_path):
    from qwen2_dist.cli.train import check_only

    assert advisories(job("train.steps=10", "train.stop_at=10"), 8) == []  # the defaults, and stop_at = steps
    assert advisories(job("parallel.tp=4"), 8) == advisories(job("parallel.tp=4"), None) == []
    for off in (["checkpoint.interval=0"], ["checkpoint.save_final=false"],
                ["checkpoint.interval=0", "checkpoint.save_final=false", "checkpoint.interval_minutes=30"]):
        assert advisories(job(*off), None) == [], off
    none = "checkpoint.interval=0", "checkpoint.save_final=false"
    assert [a.split(":")[0] for a in advisories(job(*none), None)] == [
        "checkpoint.interval=0, checkpoint.interval_minutes=0 and checkpoint.save_final=false"]
    for tp, per_node in ((16, 8), (3, 4)):
        said = advisories(job(f"parallel.tp={tp}"), per_node)
        assert len(said) == 1 and said[0].startswith(f"parallel.tp={tp} does not divide the {per_node} processes "
                                                     "of a node: tensor-parallel groups span nodes"), said
    # The launchers' check prints them (with the processes per node launch/common.sh passes), and goes on.
    monkeypatch.setenv("QWEN2_LAUNCH_NPROC", "1")
    check_only(job("model=tiny", f"run_dir={tmp_path}", *none, "parallel.tp=2"), "2")
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == [
        "warning", "warning", "config ok for 2 process(es) on cpu"], out
    assert out[1].startswith("warning: parallel.tp=2 does not divide the 1 processes of a node")


def test_the_launchers_check_refuses_a_metrics_sink_whose_package_is_missing(monkeypatch, tmp_path):
    import importlib.util

    from qwen2_dist.cli.train import check_machine

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    check_machine(job("model=tiny", f"run_dir={tmp_path}", "logging.tensorboard=true"))
    with pytest.raises(UserError, match=r"logging.wandb=true needs the wandb package; pip install wandb, or set "
                                        r"logging.wandb=false"):
        check_machine(job("model=tiny", f"run_dir={tmp_path}", "logging.wandb=true"))


def test_a_leading_tilde_in_a_local_path_is_the_home_directory(monkeypatch, tmp_path):
    """Hydra passes '~/x' through as it is; run_dir=~/x would otherwise be a directory named '~' in the working
    directory, and data.path=~/x a dataset nothing finds. Remote URLs and checkpoint.resume=auto stay as they are."""
    from qwen2_dist.cli.train import compose_job

    monkeypatch.setenv("HOME", str(tmp_path))
    job = compose_job(["run_dir='~/run'", "data.sources=[{path: '~/a'}, {path: 's3://b/~x'}]",
                       "data.cache_dir='~/cache'", "model.init_from_hf='~/hf'", "eval.datasets=[{path: '~/e'}]",
                       "eval.tasks=[{path: '~/t.jsonl'}]"])
    assert job.run_dir == str(tmp_path / "run") and job.data.cache_dir == str(tmp_path / "cache")
    assert (job.eval.datasets[0].path, job.eval.tasks[0].path) == (str(tmp_path / "e"), str(tmp_path / "t.jsonl"))
    assert [s.path for s in job.data.sources] == [str(tmp_path / "a"), "s3://b/~x"]
    assert job.model.init_from_hf == str(tmp_path / "hf") and job.checkpoint.resume == "auto"
    assert compose_job(["checkpoint.resume='~/ck'"]).checkpoint.resume == str(tmp_path / "ck")


def test_the_launch_check_names_a_data_order_the_job_changes():
    """check_saved's look at the checkpoint's data order, from the config and the sources' summaries: what changed
    is named, what cannot be told before the launch (the embedded corpus' samples) is left to the loader."""
    from qwen2_dist.cli.train import compose_job
    from qwen2_dist.config import _resume_data_problem

    job = compose_job(["data.path=/data/a"])
    order = {"seed": job.seed, "shuffle": job.data.shuffle, "shuffle_block_size": job.data.shuffle_block_size,
             "split": "train", "seq_len": job.train.seq_len,
             "sources": [{"path": "/old/a", "weight": 1.0, "shards": 3, "samples": 100}]}
    saved = {"samples_seen": 8, "fingerprint": "0123", "order": order}
    summary = {"splits": {"train": {"samples": 100}}}
    assert _resume_data_problem(job, saved, [("/data/a", summary)]) is None  # moved data is the same data
    # Another weight of the same share of the mixing block (a quota, recorded since 2026-12-05) is the same order.
    same_share = {**saved, "order": {**order, "sources": [{**order["sources"][0], "weight": 2.0, "quota": 4096}]}}
    assert _resume_data_problem(job, same_share, [("/data/a", summary)]) is None
    assert "weight 2.0 -> 1.0" in _resume_data_problem(job, {**same_share, "order": {**same_share["order"], "sources": [
        {**same_share["order"]["sources"][0], "quota": 4000}]}}, [("/data/a", summary)])
    problem = _resume_data_problem(job, saved, [("/data/a", {"splits": {"train": {"samples": 50}}})])
    assert "changed since: source 0 (/data/a): samples 100 -> 50)" in problem
    assert "model.init_from_checkpoint set to this checkpoint" in problem
    longer = compose_job(["data.path=/data/a", f"train.seq_len={2 * job.train.seq_len}", "seed=7"])
    problem = _resume_data_problem(longer, saved, [])  # the embedded corpus: no summary before the launch
    assert f"changed since: seed {job.seed} -> 7; train.seq_len {job.train.seq_len} -> {2 * job.train.seq_len})" \
        in problem
    assert _resume_data_problem(job, {"synthetic": True, "seed": 0, "batches_read": 2}, []) is None


def test_a_start_with_another_config_keeps_the_last_one_and_says_what_changed(tmp_path, caplog):
    from qwen2_dist.cli.train import write_job_config

    first = {"seed": 0, "train": {"steps": 10, "seq_len": 128}, "data": {"sources": []}}
    assert write_job_config(str(tmp_path), first) == []
    assert write_job_config(str(tmp_path), first) == [] and not (tmp_path / "configs").exists()  # a plain restart
    second = {"seed": 0, "train": {"steps": 20, "seq_len": 128, "stop_at": 15}, "data": {"sources": []}}
    with caplog.at_level("INFO", logger="qwen2_dist"):
        changes = write_job_config(str(tmp_path), second)
    assert changes == ["train.steps: 10 -> 20", "train.stop_at: (unset) -> 15"]
    assert "2 setting(s) changed since the last start" in caplog.text
    (kept,) = (tmp_path / "configs").iterdir()
    assert OmegaConf.to_container(OmegaConf.load(kept)) == first
    assert OmegaConf.to_container(OmegaConf.load(tmp_path / "config.yaml")) == second
    write_job_config(str(tmp_path), first)  # within the same second: kept beside the first, not over it
    assert len(list((tmp_path / "configs").iterdir())) == 2


@pytest.mark.parametrize("cpus, trainers, workers, warned", [(1, 8, 0, True), (8, 8, 0, False), (16, 8, 2, True),
                                                             (24, 8, 2, False)])
def test_fewer_cpus_than_trainers_and_data_workers_is_warned(monkeypatch, caplog, cpus, trainers, workers, warned):
    """A Slurm task without --cpus-per-task gets one CPU for all of its node's trainers and data workers."""
    from qwen2_dist.cli.train import warn_few_cpus

    monkeypatch.setattr("qwen2_dist.data.prepare.available_cpus", lambda: cpus)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(trainers))
    warn_few_cpus(workers)
    assert ("--cpus-per-task" in caplog.text) == warned
    if warned:
        assert f"{trainers} trainer process(es) and their {trainers * workers} data worker(s)" in caplog.text
        assert f"share {cpus} CPU(s)" in caplog.text


def test_available_cpus_are_the_affinity_bounded_by_a_cgroup_quota(tmp_path, monkeypatch):
    from qwen2_dist.data.prepare import available_cpus

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    cpu_max = tmp_path / "cpu.max"
    for text, cpus in (("max 100000", 16), ("250000 100000", 3), ("50000 100000", 1), ("3200000 100000", 16)):
        cpu_max.write_text(text + "\n")
        assert available_cpus(str(tmp_path)) == cpus, text
    assert available_cpus(str(tmp_path / "none")) == 16  # no cgroup file


def test_a_missing_sink_package_stops_qwen2_train_before_anything_is_built(tmp_path, monkeypatch):
    """Without the launchers' check (qwen2-train run directly, as the README does), a missing tensorboard or wandb
    failed on rank 0 only after the model was built and restored, with a traceback and exit 1."""
    import importlib.util

    from qwen2_dist.cli.train import run

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "wandb" else real(name, *rest))
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", f"run_dir={tmp_path}/run", "logging.wandb=true",
                                           "logging.wandb_mode=disabled", "data.synthetic=true", "train.steps=1",
                                           "optim.warmup_steps=0", "train.seq_len=16", "checkpoint.save_final=false"])
    with pytest.raises(UserError, match="logging.wandb=true needs the wandb package; pip install wandb, or set "):
        run(cfg)
    assert not (tmp_path / "run").exists()  # nothing built, nothing written
