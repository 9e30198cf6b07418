"""Checkpoints through qwen2-train and qwen2-convert: kill -9 during a save, damage fallback, HF round trip."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import torch

from tests.helpers import RANDOM_IDS, REPO, read_metrics, run_cli, save_pickle_hf, step_losses, train_overrides

TRAIN = "qwen2_dist.cli.train"


def test_kill_9_during_a_save_resumes_from_the_previous_checkpoint(tmp_path, corpus_cache):
    straight, run_dir = tmp_path / "straight", tmp_path / "run"
    args = {"train.steps": 9, "checkpoint.interval": 3}
    assert run_cli(TRAIN, train_overrides(straight, corpus_cache, random_ids=True, **args)).returncode == 0
    # The save of step 6 writes its shards, then stalls before the commit: that is where it is killed.
    proc = subprocess.Popen(
        [sys.executable, "-m", TRAIN, *train_overrides(run_dir, corpus_cache, random_ids=True, **args)], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "QWEN2_CKPT_STALL_STEP": "6"},
    )
    ckpts = run_dir / "checkpoints"
    deadline = time.monotonic() + 120
    log = run_dir / "logs" / "rank0.log"
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and "stalling before the commit" in log.read_text():
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before its stalled save"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(".tmp-" in name for name in os.listdir(ckpts))
    assert sorted(n for n in os.listdir(ckpts) if (ckpts / n / "metadata.json").exists()) == ["step_00000003"]

    result = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, random_ids=True, **args))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "at step 3" in result.stdout
    assert not any(".tmp-" in name for name in os.listdir(ckpts))
    assert step_losses(run_dir)[9] == step_losses(straight)[9]
    # Steps 4-6, logged before the kill and trained again, are in metrics.jsonl once: the first run's records of
    # them moved to metrics.superseded.jsonl.
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, 10))
    with open(run_dir / "metrics.superseded.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [4, 5, 6]


def test_auto_resume_falls_back_past_a_damaged_checkpoint(tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    assert run_cli(TRAIN, train_overrides(run_dir, corpus_cache, random_ids=True)).returncode == 0
    newest = run_dir / "checkpoints" / "step_00000006"
    # A newer version's checkpoint is not damage: the run and the launchers' check stop on it (exit 2), neither
    # falling back past it (its progress lost) nor setting it aside.
    written = (newest / "metadata.json").read_text()
    (newest / "metadata.json").write_text(json.dumps({**json.loads(written), "format": 99}))
    for env in ({"QWEN2_CHECK_ONLY": "1"}, {}):
        newer = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, random_ids=True, **{"train.steps": 9}),
                        env=env)
        assert newer.returncode == 2, newer.stdout[-2000:] + newer.stderr[-3000:]
        assert "checkpoint format 99 is not one this version reads" in newer.stderr
        assert "falling back" not in newer.stdout + newer.stderr and sorted(os.listdir(newest.parent)) == [
            "step_00000003", "step_00000006"]
    (newest / "metadata.json").write_text(written)
    shard = next(p for p in newest.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:50])
    # The run's last checkpoint truncated: the launchers' check does not take the run as complete (exit 10), so the
    # job starts, falls back past it and trains the last steps again.
    check = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, random_ids=True), env={"QWEN2_CHECK_ONLY": "1"})
    assert check.returncode == 0 and "config ok" in check.stdout, check.stdout[-2000:] + check.stderr[-2000:]
    # Every checkpoint damaged: the error names the newest one's problem, and nothing is set aside.
    older = next(p for p in (run_dir / "checkpoints" / "step_00000003").iterdir() if p.suffix == ".distcp")
    kept = older.read_bytes()
    older.write_bytes(kept[:50])
    none_left = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, random_ids=True))
    assert none_left.returncode == 2, none_left.stderr[-3000:]
    assert f"no committed checkpoint under {run_dir / 'checkpoints'} could be loaded (2 tried; the newest, " \
           f"step_00000006: {newest / shard.name}: 50 bytes, the commit recorded " in none_left.stderr, \
        none_left.stderr[-3000:]
    assert sorted(os.listdir(newest.parent)) == ["step_00000003", "step_00000006"]
    older.write_bytes(kept)

    explicit = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, random_ids=True,
                                              **{"checkpoint.resume": str(newest)}))
    assert explicit.returncode == 2
    assert shard.name in explicit.stderr and "damaged" in explicit.stderr

    result = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, random_ids=True))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "falling back to the previous committed one" in result.stdout
    assert "at step 3" in result.stdout
    # Renamed, no longer a checkpoint: a restart does not check it again, retention does not count it, and the
    # resumed run's own step 6 took its place.
    assert [p.name[:21] for p in newest.parent.glob("damaged-*")] == ["damaged-step_00000006"]
    assert "renamed to" in result.stdout + result.stderr and (newest / "metadata.json").is_file()


def test_hugging_face_round_trip_through_training_zero_steps(tmp_path, corpus_cache, capsys):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen2_dist.model.args import get_model_args
    from qwen2_dist.model.hf import hf_config_from_args

    torch.manual_seed(0)
    # As an Instruct model's config has them: its eos (<|im_end|>) and context are carried to the export.
    config = Qwen2Config(**{**hf_config_from_args(get_model_args("tiny")), "eos_token_id": 151645,
                            "max_position_embeddings": 32768})
    original = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for param in original.parameters():
            param.normal_(0.0, 0.05)  # biases and norms too, so a mapping mistake cannot hide
    hf_in = tmp_path / "hf_in"
    original.save_pretrained(hf_in, safe_serialization=True, max_shard_size="20KB")
    generation = {"eos_token_id": [151645, 151643], "top_p": 0.8}
    (hf_in / "generation_config.json").write_text(json.dumps(generation))
    assert len([p for p in os.listdir(hf_in) if p.endswith(".safetensors")]) >= 2

    run_dir = tmp_path / "run"
    result = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, **{
        "model.init_from_hf": str(hf_in), "train.stop_at": 0}))
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "step_00000000"
    assert (ckpt / "metadata.json").is_file()

    hf_out = tmp_path / "hf_out"
    # float32: the fp32 weights exactly, compared below (the default, bfloat16, rounds them).
    export = run_cli("qwen2_dist.cli.convert", ["to-hf", str(ckpt), str(hf_out), "--max-shard-gib", "0.004",
                                                "--dtype", "float32"])
    assert export.returncode == 0, export.stderr[-3000:]
    assert (hf_out / "model.safetensors.index.json").is_file()
    exported = Qwen2ForCausalLM.from_pretrained(hf_out)
    assert (exported.config.eos_token_id, exported.config.max_position_embeddings) == (151645, 32768)
    assert json.loads((hf_out / "generation_config.json").read_text()) == generation
    tokens = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(original(tokens).logits, exported(tokens).logits)
    # The data was prepared with tokenizer=qwen2 (the embedded corpus): the export has that tokenizer, as
    # AutoTokenizer loads it.
    from transformers import AutoTokenizer

    from qwen2_dist.data.tokenizer import load_tokenizer

    assert json.loads((ckpt / "metadata.json").read_text())["data_tokenizer"] == "qwen2"
    text = "Hello, world! 12345 été\n    return x  # 你好"
    assert AutoTokenizer.from_pretrained(hf_out).encode(text) == load_tokenizer("qwen2").encode(text)

    # A changed byte in the checkpoint: the export refuses it (exit 2, naming the file) unless told to check sizes only.
    from qwen2_dist.cli.convert import main as convert_main

    assert convert_main(["verify", str(ckpt)]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {ckpt}: step 0, ")
    shard = ckpt / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    assert convert_main(["verify", str(ckpt)]) == 2
    assert "__0_0.distcp: checksum crc32:" in capsys.readouterr().err
    assert convert_main(["to-hf", str(ckpt), str(tmp_path / "refused")]) == 2
    assert "__0_0.distcp: checksum crc32:" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    # A used output directory and a bad shard size are refused first, naming the flag, before the checkpoint is read.
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    assert convert_main(["to-hf", str(ckpt), str(tmp_path / "used")]) == 2
    err = capsys.readouterr().err
    assert "used: exists and is not an empty directory; choose another output path" in err and "checksum" not in err
    assert convert_main(["to-hf", str(ckpt), str(tmp_path / "refused"), "--max-shard-gib", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-shard-gib 0.0: the largest safetensors file must be a positive, finite size" in err
    assert convert_main(["to-hf", str(ckpt), str(tmp_path / "unchecked"), "--no-checksums", "--tokenizer",
                         "none"]) == 0
    assert not (tmp_path / "unchecked" / "tokenizer.json").exists()


def test_convert_from_hf_makes_a_checkpoint_training_resumes_from(tmp_path, corpus_cache):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen2_dist.model.args import get_model_args
    from qwen2_dist.model.hf import hf_config_from_args

    hf_dir = tmp_path / "hf"
    config = {**hf_config_from_args(get_model_args("tiny")), "max_position_embeddings": 32768}
    Qwen2ForCausalLM(Qwen2Config(**config)).save_pretrained(hf_dir)
    ckpt = tmp_path / "converted"
    converted = run_cli("qwen2_dist.cli.convert", ["from-hf", str(hf_dir), str(ckpt)])
    assert converted.returncode == 0, converted.stderr[-3000:]
    result = run_cli(TRAIN, train_overrides(tmp_path / "run", corpus_cache, **{
        "checkpoint.resume": str(ckpt), "train.steps": 2}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 0" in result.stdout
    # The converted weights are the ones trained: step 1's loss (before any update) is that of a run that loads
    # the Hugging Face weights itself, and no update is skipped (a checkpoint whose weights were not applied left
    # the model's NaN placeholders, every step skipped, exit 0).
    direct = run_cli(TRAIN, train_overrides(tmp_path / "direct", corpus_cache, **{
        "model.init_from_hf": str(hf_dir), "train.steps": 2}))
    assert direct.returncode == 0, direct.stderr[-3000:]
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(1, 0), (2, 0)]
    assert abs(records[0]["loss"] - step_losses(tmp_path / "direct")[1]) < 1e-5
    # The same command again (a restart, a requeue) goes on from the run's own checkpoint, not from step 0.
    again = run_cli(TRAIN, train_overrides(tmp_path / "run", corpus_cache, **{
        "checkpoint.resume": str(ckpt), "train.steps": 3}))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "step_00000002 at step 2" in again.stdout
    # What the export keeps of the weights the run started from goes from checkpoint to checkpoint.
    with open(tmp_path / "run" / "checkpoints" / "step_00000003" / "metadata.json") as f:
        assert json.load(f)["hf_source"]["max_position_embeddings"] == 32768


def test_a_new_run_starts_from_another_runs_weights_only(tmp_path, corpus_cache):
    from qwen2_dist.model.args import get_model_args
    from qwen2_dist.model.qwen2 import build_model
    from qwen2_dist.train import checkpoint

    first = tmp_path / "first"
    assert run_cli(TRAIN, train_overrides(first, corpus_cache, random_ids=True)).returncode == 0
    source = first / "checkpoints" / "step_00000006"
    run_dir = tmp_path / "continued"
    # stop_at=0 saves the weights the run starts from, before any step. A stage at a shorter context: the export's
    # context stays the longest the weights were trained at.
    job = {"model.init_from_checkpoint": str(source), "train.stop_at": 0, "optim.lr": 0.001, "train.steps": 4,
           "train.seq_len": 16}
    result = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, random_ids=True, **job))
    assert result.returncode == 0, result.stderr[-3000:]
    start = run_dir / "checkpoints" / "step_00000000"
    args = dataclasses.replace(get_model_args("tiny"), vocab_size=RANDOM_IDS["model.vocab_size"])
    shapes = {name: t.shape for name, t in build_model(args, "meta").state_dict().items()}
    theirs, ours = checkpoint.read_tensors(str(source), shapes), checkpoint.read_tensors(str(start), shapes)
    assert all(torch.equal(theirs[name], ours[name]) for name in shapes)
    with open(start / "train_state.json") as f:
        assert json.load(f)["step"] == 0  # a new run: nothing but the weights is taken
    resumed = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, random_ids=True,
                                             **dict(job, **{"train.stop_at": "null"})))
    assert resumed.returncode == 0 and "at step 0" in resumed.stdout  # its own checkpoints win from now on
    # The weights of the step-0 checkpoint (no optimizer state in it) are the ones trained: step 1's loss is that of
    # a run that starts from the source's weights itself, and no update is skipped.
    direct = run_cli(TRAIN, train_overrides(tmp_path / "direct", corpus_cache, random_ids=True,
                                            **dict(job, **{"train.stop_at": "null", "train.steps": 2})))
    assert direct.returncode == 0, direct.stderr[-3000:]
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(1, 0), (2, 0), (3, 0), (4, 0)]
    assert abs(records[0]["loss"] - step_losses(tmp_path / "direct")[1]) < 1e-5
    last = run_dir / "checkpoints" / "step_00000004"
    with open(last / "metadata.json") as f:
        meta = json.load(f)
    assert meta["init_from"] == {"init_from_hf": None, "init_from_checkpoint": os.path.realpath(source)}
    assert meta["trained_seq_len"] == 32
    # A run_dir whose checkpoints started elsewhere (here from scratch) would be resumed without the weights named.
    # Refused by the launchers' check (QWEN2_CHECK_ONLY) and by the job itself.
    for env in ({"QWEN2_CHECK_ONLY": "1"}, {}):
        refused = run_cli(TRAIN, train_overrides(first, corpus_cache, random_ids=True,
                                                 **{"model.init_from_checkpoint": str(last)}),
                          env={**os.environ, **env})
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert (f"model.init_from_checkpoint={last}, but the run_dir has checkpoints of a run that started from a "
                "random initialization") in refused.stderr

    for bad, message in ((first / "checkpoints", "not a committed checkpoint"),
                         (source, "(checkpoint vs job: hidden_size 32 vs 128, intermediate_size 64 vs 384")):
        other = run_cli(TRAIN, train_overrides(tmp_path / "bad", corpus_cache, random_ids=True, **{
            "model.init_from_checkpoint": str(bad), "model": "debug"}))
        assert other.returncode == 2 and message in other.stderr, other.stderr[-2000:]


def test_pickle_weights_are_refused_unless_the_user_opts_in(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen2_dist.cli.convert import main as convert_main
    from qwen2_dist.model.args import ModelArgs
    from qwen2_dist.model.qwen2 import build_model
    from qwen2_dist.train import checkpoint

    config = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    hf = Qwen2ForCausalLM(config)
    hf_dir = tmp_path / "bin_only"
    save_pickle_hf(hf, hf_dir)
    assert any(p.endswith(".bin") for p in os.listdir(hf_dir))
    assert convert_main(["from-hf", str(hf_dir), str(tmp_path / "refused")]) == 2
    assert not (tmp_path / "refused").exists()

    out = tmp_path / "converted"
    assert convert_main(["from-hf", str(hf_dir), str(out), "--allow-pickle"]) == 0
    args = ModelArgs(**checkpoint.read_metadata(str(out))["model_args"])
    model = build_model(args, "cpu")
    checkpoint.load(str(out), model, None)
    tokens = torch.arange(12).view(1, 12)
    with torch.no_grad():
        assert torch.allclose(model(tokens), hf(tokens).logits, atol=1e-5)


def test_optimizer_in_backward_trains_and_resumes_exactly(tmp_path, corpus_cache):
    # The memory-lean optimizer (each parameter updated during backward) through the real trainer: it trains, logs
    # a gradient norm, and 3 steps + resume + 3 equal 6 straight.
    args = {"optim.in_backward": "true", "train.grad_clip": 0, "train.global_batch_size": 2, "checkpoint.interval": 3}
    straight, run_dir = tmp_path / "straight", tmp_path / "run"
    result = run_cli(TRAIN, train_overrides(straight, corpus_cache, **args))
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_cli(TRAIN, train_overrides(run_dir, corpus_cache, **args, **{"train.stop_at": 3})).returncode == 0
    result = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, **args))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "at step 3" in result.stdout
    first, last = step_losses(straight)[1], step_losses(straight)[6]
    assert last < first
    assert step_losses(run_dir)[6] == step_losses(straight)[6]
    with open(straight / "metrics.jsonl") as f:
        assert all(json.loads(line)["grad_norm"] > 0 for line in f)


def test_resume_with_another_data_order_stops_instead_of_falling_back(tmp_path, corpus_cache):
    # Another seed means another sample order: every checkpoint of the run would mismatch, so resume=auto reports
    # it once, naming the newest checkpoint, rather than calling them damaged one after the other.
    # It is refused before the checkpoint is loaded, and by the launchers' check (QWEN2_CHECK_ONLY) already; with
    # data.new_stage=true it is a new data stage instead (_new_data_stage, on a copy of the run).
    run_dir = tmp_path / "run"
    assert run_cli(TRAIN, train_overrides(run_dir, corpus_cache)).returncode == 0
    shutil.copytree(run_dir, tmp_path / "stage")
    newest = run_dir / "checkpoints" / "step_00000006"
    for env in ({"QWEN2_CHECK_ONLY": "1"}, {}):
        result = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, **{"seed": 1, "train.steps": 9}),
                         env={**os.environ, **env})
        assert result.returncode == 2
        error = result.stderr.strip().splitlines()[-1]
        assert error.startswith(f"error: checkpoint {newest}: the checkpoint was trained on other data or another "
                                "data order (changed since: seed 0 -> 1)"), error
        assert "start a new run_dir with model.init_from_checkpoint set to this checkpoint (its weights" in error
        assert "damaged" not in result.stdout + result.stderr and "checkpoint: loaded" not in result.stdout
    # The refused starts leave the record of the run's config as it was.
    assert "seed: 0" in (run_dir / "config.yaml").read_text() and not (run_dir / "configs").exists()
    # A rollback to a checkpoint of another model, started without the launchers (their check refuses it): the job
    # refuses it too before anything moves; it moved the newer checkpoints aside and recorded the rollback first.
    before = sorted(os.listdir(run_dir / "checkpoints"))
    result = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, **{
        "checkpoint.resume": run_dir / "checkpoints" / "step_00000003", "model.num_hidden_layers": 3}))
    assert result.returncode == 2 and "num_hidden_layers 2 vs 3" in result.stderr, result.stderr[-3000:]
    assert sorted(os.listdir(run_dir / "checkpoints")) == before == ["step_00000003", "step_00000006"]
    _new_data_stage(tmp_path / "stage", corpus_cache)


def _new_data_stage(run_dir, corpus_cache):
    """data.new_stage=true (another seed: another order) resumes the run's step-6 checkpoint, optimizer and schedule
    included, and reads the new order from its start (its checkpoints count the stage's samples only); a restart of
    the stage resumes its own checkpoint at its position rather than starting the stage again."""
    stage = {"seed": 1, "train.steps": 9, "data.new_stage": "true", "checkpoint.interval": 1}
    check = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, **stage), env={**os.environ, "QWEN2_CHECK_ONLY": "1"})
    assert check.returncode == 0 and "warning: data.new_stage=true: checkpoint " in check.stdout, check.stderr[-3000:]
    first = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, **stage, **{"train.stop_at": 7}))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "data.new_stage=true: checkpoint " in first.stdout and "(changed since: seed 0 -> 1)" in first.stdout
    assert "resumed from" in first.stdout and "at step 6" in first.stdout
    second = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, **stage))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "data.new_stage" not in second.stdout and "at step 7" in second.stdout
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 10))
    assert records[6]["tokens_seen"] == 7 * 4 * 32  # counted on
    with open(run_dir / "checkpoints" / "step_00000009" / "train_state.json") as f:
        assert json.load(f)["loader"]["samples_seen"] == 3 * 4  # the stage's 3 steps of 4 samples


