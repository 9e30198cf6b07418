"""Faults injected into real runs: NaN steps, SIGTERM, a failing checkpoint write, a hung rank."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests import helpers
from tests.helpers import REPO, read_metrics, run_cli, run_torchrun, train_overrides

TRAIN = "qwen2_dist.cli.train"
JOB = {"train.steps": 12, "checkpoint.interval": 4}


def final(run_dir) -> dict:
    return read_metrics(run_dir)[-1]


@pytest.fixture(scope="module")
def clean(tmp_path_factory, corpus_cache):
    """JOB run without a fault (the run the faulty ones are compared with)."""
    run_dir = tmp_path_factory.mktemp("clean")
    assert run_cli(TRAIN, train_overrides(run_dir, corpus_cache, random_ids=True, **JOB)).returncode == 0
    return run_dir


def test_nan_step_is_skipped_once_and_the_run_goes_on(tmp_path, corpus_cache, clean):
    faulty = tmp_path / "nan"
    result = run_cli(TRAIN, train_overrides(faulty, corpus_cache, random_ids=True, **JOB),
                     env={"QWEN2_INJECT_NAN_STEP": "5"})
    assert result.returncode == 0, result.stderr[-3000:]
    by_step = {r["step"]: r for r in read_metrics(faulty)}
    assert by_step[4]["skipped_steps"] == 0 and by_step[5]["skipped_steps"] == 1
    assert final(faulty)["skipped_steps"] == 1
    assert final(faulty)["tokens_seen"] == final(clean)["tokens_seen"]
    # Steps before the fault are untouched; the skipped update makes the rest differ, but stay finite and close.
    assert [r["loss"] for r in read_metrics(faulty)][:4] == [r["loss"] for r in read_metrics(clean)][:4]
    assert abs(final(faulty)["loss"] - final(clean)["loss"]) < 0.5


def test_nonfinite_halt_saves_and_stops_with_a_clear_error(tmp_path, corpus_cache):
    run_dir = tmp_path / "halt"
    result = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, random_ids=True, **JOB,
                                            **{"train.nonfinite": "halt"}),
                     env={"QWEN2_INJECT_NAN_STEP": "5"})
    assert result.returncode == 3
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "train.nonfinite=halt" in lines[0]
    assert (run_dir / "checkpoints" / "step_00000005" / "metadata.json").is_file()
    # The rank's log says why it ended (it was only on stderr), on a dated line (the file spans restarts and days).
    last = (run_dir / "logs" / "rank0.log").read_text().splitlines()[-1]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[rank0\] ERROR qwen2_dist: stopped: step 5: ", last), last


def test_a_halt_under_torchrun_is_not_trained_past_by_its_restarts(tmp_path, corpus_cache, monkeypatch):
    """torchrun restarts the workers after any failure: the restart of a halted run stops at once with the halt's
    exit code and message instead of resuming from the halt's checkpoint and training on (and retention deleting
    the checkpoints to roll back to); the next torchrun (restart 0) is a new start and removes the record."""
    from qwen2_dist.train import no_restart

    # run_dir under ~ (HOME is tmp_path here): the record is in the directory the job uses, ~ expanded, where the
    # restarts and the launchers' torchrun look for it.
    run_dir = tmp_path / "halt"
    job = train_overrides("'~/halt'", corpus_cache, random_ids=True, **JOB,
                          **{"train.nonfinite": "halt", "checkpoint.keep_last": 1})
    torchrun = ["--standalone", "--nproc-per-node=1", "--max-restarts=1", "-m", TRAIN]
    # The launchers' torchrun (qwen2_dist/cli/torchrun.py) ends with the halt's code; torchrun's own would be 1.
    # Its workers forked by the test zygote (helpers.worker_env).
    env = {"OMP_NUM_THREADS": "1", "HOME": str(tmp_path), **helpers.worker_env()}
    result = run_cli("qwen2_dist.cli.torchrun", [*torchrun, *job], env={**env, "QWEN2_INJECT_NAN_STEP": "2"})
    assert result.returncode == 3, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and "train.nonfinite=halt" in errors[0], errors
    assert errors[1].startswith("error: not training on: torchrun restarted the workers (restart 1) after attempt 0 "
                                "stopped on purpose with exit 3: step 2: "), errors
    assert errors[2].startswith("error: the trainers stopped on purpose with exit 3, which torchrun reports as a "
                                "failure (exit 1); ending with 3: step 2: "), errors
    assert "resumed from" not in result.stdout and os.listdir(run_dir / "checkpoints") == ["step_00000002"]
    stop = json.loads((run_dir / "no_restart.json").read_text())
    assert (stop["code"], stop["restart"]) == (3, 0)
    # Another torchrun's restart does not take it for its own; the next torchrun's first attempt removes it once it
    # holds the run_dir's lock (a job refused by the lock of another job in the run_dir records and removes nothing).
    # Restart 0 reads no record.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", stop["torchrun_run_id"])
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert no_restart.previous_stop(str(run_dir))[0] == 3
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "another")
    assert no_restart.previous_stop(str(run_dir)) is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert no_restart.previous_stop(str(run_dir)) is None and (run_dir / "no_restart.json").exists()
    # The next torchrun (here resuming at the halt's step and stopping there) removes it.
    again = run_cli("torch.distributed.run", [*torchrun, *job, "train.stop_at=2"], env=env)
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-3000:]
    assert not (run_dir / "no_restart.json").exists()


def test_sigterm_mid_run_then_restart_matches_an_uninterrupted_run(tmp_path, corpus_cache):
    run_dir, straight = tmp_path / "run", tmp_path / "straight"
    # The stop's checkpoint is the only one. 60 short steps: the signal, sent at step 5, lands well before the end.
    job = dict(JOB, **{"checkpoint.interval": 0, "train.steps": 60})
    assert run_cli(TRAIN, train_overrides(straight, corpus_cache, random_ids=True, **job)).returncode == 0
    # Forked by the test zygote (its client passes the SIGTERM on and exits as the run does).
    proc = subprocess.Popen([helpers.forked_python()["PYTHON"], "-m", TRAIN,
                             *train_overrides(run_dir, corpus_cache, random_ids=True, **job)],
                            cwd=REPO, env={**os.environ, **helpers.worker_env()}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    stopped_at = final(run_dir)["step"]
    assert stopped_at < job["train.steps"]
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}" / "metadata.json").is_file()
    # Not "done": the run is not at its end.
    assert f"stopped by signal at step {stopped_at} of 60 (saved; the next start resumes there)" in \
        (run_dir / "logs" / "rank0.log").read_text()

    result = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, random_ids=True, **job))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {stopped_at}" in result.stdout
    assert final(run_dir)["step"] == 60
    assert final(run_dir)["loss"] == final(straight)["loss"]
    assert final(run_dir)["tokens_seen"] == final(straight)["tokens_seen"]


def _running(pid: int) -> bool:
    """Whether process pid exists and is not a zombie (an orphan's end waits for its new parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_workers_of_a_torchrun_killed_by_sigkill_save_and_stop(tmp_path, corpus_cache):
    """kill -9 of torchrun (or the out-of-memory killer) cannot stop its workers: they trained on, orphaned, to the
    end of the run, holding its run_dir (a restart was refused as another job) and the GPUs. Each now gets SIGTERM
    when its agent dies, saves a checkpoint and stops, as at a preemption. A real torchrun with real workers (the
    test zygote's are children of the zygote, not of the agent)."""
    run_dir = tmp_path / "run"
    job = dict(JOB, **{"checkpoint.interval": 0, "train.steps": 5000})
    env = {key: value for key, value in os.environ.items() if key not in helpers.worker_env()}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                             "-m", TRAIN, *train_overrides(run_dir, corpus_cache, random_ids=True, **job)],
                            cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, "torchrun ended before its third step"
        time.sleep(0.05)
    worker = json.loads((run_dir / "run.lock").read_text())["pid"]
    assert worker != proc.pid and _running(worker)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _running(worker):
        time.sleep(0.1)
    running = _running(worker)
    if running:
        os.kill(worker, signal.SIGKILL)
    assert not running, "the worker trained on after its torchrun was killed"
    stopped_at = final(run_dir)["step"]
    assert 3 <= stopped_at < job["train.steps"]
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}" / "metadata.json").is_file()
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "received SIGTERM: saving a checkpoint after this step and stopping" in log


def test_a_failing_checkpoint_write_is_skipped_without_harm(tmp_path, corpus_cache, clean):
    run_dir = tmp_path / "run"
    result = run_cli(TRAIN, train_overrides(run_dir, corpus_cache, random_ids=True, **JOB),
                     env={"QWEN2_INJECT_CKPT_FAIL_STEP": "8"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "save of" in result.stdout + result.stderr and "failed and was skipped" in result.stdout + result.stderr
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_00000004", "step_00000012"]
    assert final(run_dir)["loss"] == final(clean)["loss"]
    assert final(run_dir)["tokens_seen"] == final(clean)["tokens_seen"]


def test_a_hung_rank_is_reported_with_stacks_within_the_timeout(tmp_path, corpus_cache):
    run_dir = tmp_path / "hang"
    timeout = 6  # a step of this job takes well under a second, also beside another pytest worker
    args = train_overrides(run_dir, corpus_cache, random_ids=True, **JOB, **{
        "train.hang_timeout": timeout, "train.hang_timeout_first": 120, "train.global_batch_size": 4})
    started = time.monotonic()
    result = run_torchrun(2, TRAIN, args, timeout=300, env={"QWEN2_INJECT_HANG": "3:1"})
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "watchdog: no training step, evaluation or save completed" in result.stderr
    assert "inject_hang" in result.stderr  # the hung rank's stack names where it hangs
    hung_log = (run_dir / "logs" / "rank1.log").read_text()
    assert "watchdog" in hung_log and "File " in hung_log
    assert elapsed < timeout + 30 + 60  # + start-up of two processes on a 2-core machine
