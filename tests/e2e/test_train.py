"""qwen2-train end to end on the CPU: outputs, exact resume, kill -9 during a run, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from qwen2_dist.model.args import get_model_args
from qwen2_dist.train.metrics import flops_per_token
from tests.helpers import REPO, read_metrics, run_cli, train_overrides

TRAIN = "qwen2_dist.cli.train"


def test_run_writes_metrics_config_and_checkpoints(tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    # A multiple-choice task (eval.tasks), scored at the evaluation of the last step.
    task = tmp_path / "capitals.jsonl"
    task.write_text("".join(json.dumps({"context": f"The capital of {country} is", "choices": ["Paris", "Rome"],
                                        "answer": answer}) + "\n" for country, answer in (("France", 0), ("Italy", 1),
                                                                                         ("Spain", 0))))
    # A peak given by hand gives an MFU on any device (the CPU too); without it, a CPU logs none.
    result = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, **{"logging.peak_tflops": 0.5,
                                                                      "eval.tasks": f"[{{path: {task}}}]"}))
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "task_acc/capitals" in r] == [6]
    assert records[-1]["task_acc/capitals"] in (0, 1 / 3, 2 / 3, 1) and "task_acc_norm/capitals" in records[-1]
    assert "eval.tasks: capitals, 3 examples (6 choices)" in result.stdout
    assert f"step 6 | eval.tasks: capitals acc {records[-1]['task_acc/capitals']:.4f}" in result.stdout
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "tokens_seen", "mem_gib", "data_wait_pct", "mfu"):
        assert all(key in r for r in records), key
    per_token = flops_per_token(get_model_args("tiny"), 32)
    assert all(r["mfu"] == pytest.approx(r["tokens_per_sec"] * per_token / 0.5e12, rel=0.01) for r in records)
    assert records[0]["loss"] > 11.0  # ln(151936) = 11.93 at init
    assert records[-1]["loss"] < records[0]["loss"] - 0.2
    assert records[-1]["tokens_seen"] == 6 * 4 * 32
    assert (run_dir / "config.yaml").is_file()
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_00000003", "step_00000006"]
    assert "step 6 | loss" in result.stdout
    # The tests' environment sets glibc's malloc as qwen2-train would on the CPU (tests/conftest.py): left as it is.
    assert "training on the CPU: glibc malloc as the environment sets it" in result.stdout

    # The job itself warns of what it does that its user may not mean (config.advisories), as the launchers do.
    again = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, **{"checkpoint.interval": 0,
                                                                     "checkpoint.save_final": "false"}))
    assert again.returncode == 0
    assert "run already complete" in again.stdout
    assert "checkpoint.save_final=false: the run writes no checkpoint (only a stop by signal" in again.stdout
    assert len(read_metrics(run_dir)) == 6
    # Another run starting from its last checkpoint without a larger train.steps would train nothing, and said so
    # only in the log, exiting 0.
    final = run_dir / "checkpoints" / "step_00000006"
    other = run_cli(TRAIN, train_overrides(tmp_path / "other", corpus_cache, **{"checkpoint.resume": final}))
    assert other.returncode == 2, other.stderr[-3000:]
    assert f"error: checkpoint.resume={final} is at step 6, and train.steps=6: the run would train nothing" \
        in other.stderr
    # The launchers' check sees the run complete (exit 10: launch/common.sh starts no torchrun and exits 0), and
    # one that has steps left to train not.
    check = {"QWEN2_CHECK_ONLY": "1"}
    done = run_cli(TRAIN, train_overrides(run_dir, corpus_cache), env=check)
    assert done.returncode == 10, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"run already complete: its newest checkpoint {final} is at step 6 (train.steps=6); nothing to launch" \
        in done.stdout
    more = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, **{"train.steps": 9}), env=check)
    assert more.returncode == 0 and "config ok for 1 process(es)" in more.stdout, more.stderr[-2000:]
    stopped = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, **{"train.steps": 9, "train.stop_at": 5}),
                      env=check)
    assert stopped.returncode == 10 and "is at step 6 (train.stop_at=5); nothing to launch: raise or remove " \
        "train.stop_at to train on" in stopped.stdout, stopped.stdout[-2000:] + stopped.stderr[-2000:]


def test_a_stable_run_is_extended_by_a_cool_down(tmp_path, corpus_cache):
    """Warmup-stable-decay in two jobs: constant lr to step 6, then the same run_dir with 4 more steps that decay."""
    run_dir = tmp_path / "run"
    job = {"optim.lr": 0.02, "optim.warmup_steps": 2, "optim.min_lr_ratio": 0.1}
    stable = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, random_ids=True, **job,
                                            **{"optim.schedule": "constant"}))
    assert stable.returncode == 0, stable.stderr[-3000:]
    cool = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, random_ids=True, **job, **{
        "optim.schedule": "linear", "optim.decay_steps": 4, "train.steps": 10}))
    assert cool.returncode == 0, cool.stderr[-3000:]
    assert "at step 6" in cool.stdout
    lrs = [round(r["lr"], 6) for r in read_metrics(run_dir)]
    assert lrs == [0.01, 0.02, 0.02, 0.02, 0.02, 0.02, 0.0155, 0.011, 0.0065, 0.002]


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, corpus_cache):
    """Stopped at step 3, inside a batch ramp-up (2 samples to step 4, then 4), and resumed: the same losses, and the
    same samples (tokens_seen), as a run without the stop."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    ramp = {"train.batch_rampup": "[[2,4]]"}
    assert run_cli(TRAIN, train_overrides(straight, corpus_cache, **ramp)).returncode == 0
    first = run_cli(TRAIN, train_overrides(split, corpus_cache, **ramp, **{"train.stop_at": 3,
                                                                            "checkpoint.interval": 0}))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped at train.stop_at=3: step 3 of 6 (saved; a start with train.stop_at raised or removed goes on" \
        in first.stdout  # not "done"
    second = run_cli(TRAIN, train_overrides(split, corpus_cache, **ramp))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    assert [r["loss"] for r in read_metrics(straight)] == [r["loss"] for r in read_metrics(split)]
    assert [r["step"] for r in read_metrics(split)] == [1, 2, 3, 4, 5, 6]
    assert [r["tokens_seen"] // 32 for r in read_metrics(split)] == [2, 4, 6, 8, 12, 16]  # samples of 32 tokens


def test_kill_9_mid_run_resumes_from_the_last_committed_checkpoint(tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    # The first checkpoint is at step 4: the kill lands some 56 short steps before the run would end.
    args = train_overrides(run_dir, corpus_cache, random_ids=True, **{"train.steps": 60, "checkpoint.interval": 4})
    proc = subprocess.Popen([sys.executable, "-m", TRAIN, *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = run_dir / "checkpoints"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpts.is_dir() and any((ckpts / d / "metadata.json").exists() for d in os.listdir(ckpts)):
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = sorted(d for d in os.listdir(ckpts) if (ckpts / d / "metadata.json").exists())
    assert committed, "no checkpoint was committed before the kill"
    killed_at = int(committed[-1].split("_")[1])
    assert killed_at < 60

    result = run_cli(TRAIN, args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {killed_at}" in result.stdout
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps[-1] == 60
    # Steps after the checkpoint were logged twice (before the kill and after the restart); none are missing.
    assert sorted(set(steps)) == list(range(1, 61))
    assert all(".tmp-" not in d for d in os.listdir(ckpts))


def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, corpus_cache):
    cases = [
        (["train.no_such_key=1"], "no_such_key"),
        (["model.num_attention_heads=5"], "num_attention_heads"),
        (["data.path=/nonexistent/shards"], "/nonexistent/shards"),
        (["model=qwen2-3b"], "qwen2-3b"),
    ]
    for extra, needle in cases:
        run_dir = tmp_path / needle.strip("/").replace("/", "_")
        result = run_cli(TRAIN, [f"run_dir={run_dir}", *extra])
        assert result.returncode == 2, (extra, result.stderr[-2000:])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (extra, result.stderr)
        assert not run_dir.exists()


def test_a_sweep_whose_points_share_a_run_dir_is_refused_before_training(tmp_path):
    """Refused before Hydra starts the sweep: nothing written, not even Hydra's multirun.yaml (which went to the
    run_dir before)."""
    sweeps = os.path.join(REPO, "multirun")  # Hydra's record of a sweep, under the working directory (the repository)
    before = sorted(os.walk(sweeps))
    result = run_cli(TRAIN, ["-m", "optim.lr=1e-3,2e-3", f"run_dir={tmp_path / 's'}${{seed}}", "train.steps=2"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith("error: qwen2-train -m: the sweep's points optim.lr=0.001 and optim.lr=0.002 "
                                    f"would both train in run_dir={tmp_path / 's0'}; give each point"), result.stderr
    assert not list(tmp_path.iterdir()) and sorted(os.walk(sweeps)) == before


def test_profiler_trace_of_a_chosen_step_range(tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    job = {"train.steps": 4, "logging.profile_steps": "2:4"}
    result = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, random_ids=True, **job))
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run_dir / "profile" / "rank0.json") as f:
        trace = json.load(f)
    assert any(event.get("name", "").startswith("aten::") for event in trace["traceEvents"])
    summary = (run_dir / "profile" / "rank0_summary.txt").read_text()  # on a CPU: operators by their own time
    assert summary.startswith("profiled 2 steps: ") and "aten::mm" in summary


def test_synthetic_data_trains_and_resumes_but_never_onto_real_data(tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    job = {"data.synthetic": "true", "data.cache_dir": str(tmp_path / "no_cache")}
    result = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, **job, **{"train.stop_at": 3}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "random token ids" in result.stdout + result.stderr
    assert not (tmp_path / "no_cache").exists()  # no corpus built, nothing read
    resumed = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, **job))
    assert resumed.returncode == 0 and "at step 3" in resumed.stdout
    losses = [r["loss"] for r in read_metrics(run_dir)]
    assert len(losses) == 6 and all(abs(loss - 11.93) < 0.5 for loss in losses)  # ln(151936): nothing to learn
    onto_data = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, **{"train.steps": 8}))
    assert onto_data.returncode == 2 and "trained on random tokens" in onto_data.stderr, onto_data.stderr[-2000:]


def test_mixed_precision_bf16_computes_in_bf16_in_one_cpu_process(tmp_path, corpus_cache):
    """train.mixed_precision=bf16 means bf16 compute in every layout (autocast in one process, also on the CPU)."""
    losses = {}
    for precision in ("fp32", "bf16"):
        run_dir = tmp_path / precision
        job = {"train.mixed_precision": precision, "train.steps": 3, "checkpoint.interval": 0}
        # Random ids: with bf16 matmuls of the Qwen2 vocabulary's output matrix on a CPU without bf16 instructions
        # this test took 33 s beside another pytest worker, 3.5 s alone on random ids (2-core machine, 2026-12-07).
        result = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, random_ids=True, **job))
        assert result.returncode == 0, result.stderr[-3000:]
        losses[precision] = [r["loss"] for r in read_metrics(run_dir)]
    assert losses["bf16"] != losses["fp32"]  # the same numbers would mean fp32 compute
    assert max(abs(a - b) for a, b in zip(losses["bf16"], losses["fp32"])) < 0.02


def test_a_second_job_in_a_running_jobs_run_dir_is_refused_before_it_touches_anything(tmp_path, corpus_cache):
    """A second job in a run_dir in use would delete the first one's save in progress (a partial checkpoint to
    it) and overwrite its config.yaml: refused, by the launchers' check and by the job itself."""
    from qwen2_dist.train import runlock

    run_dir = tmp_path / "run"
    in_progress = run_dir / "checkpoints" / "step-00000003.tmp-1"
    in_progress.mkdir(parents=True)
    rank_log = run_dir / "logs" / "rank0.log"
    rank_log.parent.mkdir()
    rank_log.write_text("the running job's log\n")
    held = runlock.acquire(str(run_dir))
    try:
        for env in ({"QWEN2_CHECK_ONLY": "1"}, {}):
            result = run_cli(TRAIN, train_overrides(run_dir, corpus_cache), env={**os.environ, **env})
            assert result.returncode == 2, result.stderr[-2000:]
            assert f"another job is running in it (host {os.uname().nodename}, pid {os.getpid()}" in result.stderr
        assert in_progress.is_dir() and not (run_dir / "config.yaml").exists()
        assert rank_log.read_text() == "the running job's log\n"  # the refusal is on the console only
    finally:
        held.close()
