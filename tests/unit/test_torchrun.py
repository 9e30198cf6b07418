"""qwen2_dist/cli/torchrun.py: torchrun in this process, ending with the exit code of a deliberate stop."""

import json
import os
import signal

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.elastic.rendezvous import RendezvousClosedError

from qwen2_dist.cli import torchrun
from qwen2_dist.fsutil import write_atomic
from qwen2_dist.train import no_restart


@pytest.fixture(autouse=True)
def _environment(monkeypatch):
    """torchrun.main sets os.environ for its workers: taken back after each test."""
    monkeypatch.delenv(no_restart.EARLIER_ENV, raising=False)
    for name in torchrun._LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)


def _record(run_dir, code):
    write_atomic(str(run_dir / no_restart.NAME), json.dumps({
        "code": code, "error": "step 2: halted", "torchrun_run_id": "x", "restart": 0, "rank": 0, "time": 0.0}))


def _failing_torchrun(monkeypatch, run_dir, record_code=None, error=None):
    """torch.distributed.run.main replaced by one whose worker recorded a stop (or not), then failed."""
    import torch.distributed.run

    def fake_main(argv):
        if record_code is not None:
            _record(run_dir, record_code)
        raise error or ChildFailedError("qwen2_dist.cli.train", {0: ProcessFailure(0, 1, record_code or 1, "<N/A>")})

    monkeypatch.setattr(torch.distributed.run, "main", fake_main)


def _argv(run_dir, module="qwen2_dist.cli.train", *more):
    return ["--standalone", "--nproc-per-node=1", "-m", module, "model=tiny", f"run_dir={run_dir}", *more]


@pytest.mark.parametrize("code", [2, 3])
@pytest.mark.parametrize("error", ["worker failed", "rendezvous closed (another node stopped)"])
def test_a_recorded_stop_ends_torchrun_with_its_code(tmp_path, monkeypatch, capsys, code, error):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _record(run_dir, 3)  # an earlier torchrun's record: replaced by this one's
    _failing_torchrun(monkeypatch, run_dir, record_code=code,
                      error=RendezvousClosedError() if error.startswith("rendezvous") else None)
    with pytest.raises(SystemExit) as exc:
        torchrun.main(_argv(run_dir, "qwen2_dist.cli.train", "+hydra.verbose=true"))
    assert exc.value.code == code
    err = capsys.readouterr().err
    assert f"error: the trainers stopped on purpose with exit {code}" in err and "step 2: halted" in err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_stop_by_a_signal_ends_with_its_code_and_one_line(tmp_path, monkeypatch, capsys, signum):
    """torchrun raises SignalException once its workers stopped: a traceback and exit 1, as a crash ends."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _failing_torchrun(monkeypatch, run_dir, error=SignalException(f"Process got signal: {signum}", sigval=signum))
    monkeypatch.setenv(no_restart.CHECK_RECORDS_ENV, str(tmp_path / "records"))
    monkeypatch.setenv("SLURM_NODEID", "3")
    with pytest.raises(SystemExit) as exc:
        torchrun.main(_argv(run_dir))
    assert exc.value.code == 128 + signum
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"torchrun: stopped by {signal.Signals(signum).name}, which it passed on to its workers")
    assert ("they save a checkpoint and stop on it" in line) == (signum != signal.SIGINT)
    # A stop by SIGUSR1 is recorded for slurm/train.sbatch, which requeues the job for it.
    records = sorted(os.listdir(tmp_path / "records")) if (tmp_path / "records").exists() else []
    assert records == (["sigusr1-node3"] if signum == signal.SIGUSR1 else [])
    if records:
        assert (tmp_path / "records" / records[0]).read_text() == f"138\n{line}\n"


@pytest.mark.parametrize("case", ["no record", "an earlier torchrun's record", "another program"])
def test_any_other_failure_stays_torchrun_s(tmp_path, monkeypatch, case):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if case == "an earlier torchrun's record":
        _record(run_dir, 3)
    _failing_torchrun(monkeypatch, run_dir, record_code=3 if case == "another program" else None)
    argv = _argv(run_dir, "some.other.module") if case == "another program" else _argv(run_dir)
    with pytest.raises(ChildFailedError):
        torchrun.main(argv)


def test_a_restart_does_not_obey_a_record_from_before_its_torchrun_of_the_same_run_id(tmp_path, monkeypatch):
    """A fixed --rdzv-id (launch/train_multi_node.sh's default) repeats between jobs: when a job's first attempt
    fails before it removes an earlier job's record, its restart must not stop on that record; it does stop on one
    its own torchrun's workers wrote."""
    import torch.distributed.run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _record(run_dir, 3)  # the earlier job's halt, under the same run id "x"
    seen = []

    def fake_main(argv):  # the restarted workers' view, in the environment torchrun hands them
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
        seen.append(no_restart.previous_stop(str(run_dir)))
        _record(run_dir, 2)  # this torchrun's attempt 0 stopped on purpose
        seen.append(no_restart.previous_stop(str(run_dir)))

    monkeypatch.setattr(torch.distributed.run, "main", fake_main)
    torchrun.main(_argv(run_dir))
    assert seen[0] is None and seen[1][0] == 2, seen


def test_overrides_that_do_not_compose_stop_before_torchrun_with_exit_2(tmp_path, monkeypatch, capsys):
    """As the trainers would, but before they start (they stop before they know the run_dir to record it in),
    also where the launchers' check does not run (PRECHECK=0, an elastic node count)."""
    import torch.distributed.run

    monkeypatch.setattr(torch.distributed.run, "main", lambda argv: pytest.fail("torchrun started"))
    with pytest.raises(SystemExit) as exc:
        torchrun.main(_argv(tmp_path / "run", "qwen2_dist.cli.train", "train.stepz=3"))
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("error: bad override in ")


def _launch_check(monkeypatch, world, gpus="0", nproc="1"):
    """The environment launch/common.sh gives our torchrun: check the job for world processes first."""
    monkeypatch.setenv(torchrun.LAUNCH_CHECK_ENV, world)
    monkeypatch.setenv("QWEN2_LAUNCH_GPUS", gpus)
    monkeypatch.setenv("QWEN2_LAUNCH_NPROC", nproc)


def test_the_launch_check_runs_before_torchrun_and_none_of_its_settings_reach_the_workers(tmp_path, monkeypatch,
                                                                                          capsys):
    import os

    import torch.distributed.run

    started = []
    monkeypatch.setattr(torch.distributed.run, "main", lambda argv: started.append(
        {name: os.environ.get(name) for name in torchrun._LAUNCH_ENV}))
    _launch_check(monkeypatch, "2", nproc="2")
    torchrun.main(_argv(tmp_path / "run", "qwen2_dist.cli.train", "data.synthetic=true"))
    assert started == [dict.fromkeys(torchrun._LAUNCH_ENV)]
    assert "config ok for 2 process(es) on cpu" in capsys.readouterr().out

    # A job the check refuses (a layout the world does not divide), as `QWEN2_CHECK_ONLY=3 qwen2-train` refuses it:
    # exit 2, no torchrun; and the launcher's counts are the check's (a GPU it counted that torch does not see).
    for world, gpus, refused in (("3", "0", "world size 3 is not divisible"), ("1", "1", "sees no CUDA device")):
        _launch_check(monkeypatch, world, gpus=gpus)
        with pytest.raises(SystemExit) as exc:
            torchrun.main(_argv(tmp_path / "run", "qwen2_dist.cli.train", "data.synthetic=true", "parallel.tp=2"
                                if world == "3" else "train.device=auto"))
        assert exc.value.code == 2 and refused in capsys.readouterr().err
        assert len(started) == 1 and torchrun.LAUNCH_CHECK_ENV not in os.environ


@pytest.mark.parametrize("nnodes", ["1", "2"])
def test_a_complete_run_launches_nothing_on_one_node_only(tmp_path, monkeypatch, capsys, nnodes):
    """The launchers' check finds nothing left to train: one node ends with 0 and no torchrun; of several nodes,
    none decides alone (a file one node sees late), and the trainers find the run complete together."""
    import torch.distributed.run

    from qwen2_dist.cli import train

    started = []
    monkeypatch.setattr(torch.distributed.run, "main", lambda argv: started.append(argv))
    monkeypatch.setattr(train, "completed_run", lambda job: "run already complete: (made up)")
    _launch_check(monkeypatch, "1")
    argv = _argv(tmp_path / "run", "qwen2_dist.cli.train", "data.synthetic=true")
    if nnodes == "1":
        with pytest.raises(SystemExit) as exc:
            torchrun.main(argv)
        assert exc.value.code == 0 and not started
    else:
        argv = ["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", *argv[1:]]
        torchrun.main(argv)
        assert started == [argv]
    out = capsys.readouterr().out
    assert "run already complete: (made up)" in out
    assert ("launching all the same: with --nnodes=2" in out) == (nnodes == "2")


def test_a_stop_signal_before_the_workers_start_ends_torchrun(tmp_path):
    """The launchers ignore SIGUSR1 before they exec torchrun, and torchrun handles it only once its workers start:
    a SIGUSR1 in between (its imports, the compose, the rendezvous) was lost, and the job ran into its time limit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import REPO

    env = {**os.environ, "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGUSR1"}
    command = f"trap '' USR1; exec {sys.executable} -m qwen2_dist.cli.torchrun " + " ".join(
        _argv(tmp_path / "run", "qwen2_dist.cli.train", "data.synthetic=true", "train.steps=2"))
    proc = subprocess.Popen(["bash", "-c", command], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # Sent once the handler is in (the first thing main() does; torch's import takes seconds more), not on a timer.
    caught = 0
    deadline = time.monotonic() + 60
    while not caught >> (signal.SIGUSR1 - 1) & 1 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                caught = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
        except FileNotFoundError:  # ended (the handler never came): the assertions below say so
            break
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR1, out[-2000:] + err[-2000:]
    assert "torchrun: SIGUSR1 before the workers started: stopping, nothing trained yet" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("has_option", [True, False])
def test_sigusr1_is_ignored_only_where_torchrun_does_not_handle_it(monkeypatch, has_option):
    """An older torchrun (no --signals-to-handle), or one told on its command line to handle other signals only (which
    wins over PET_SIGNALS_TO_HANDLE), would end at a SIGUSR1 and leave the workers unsaved: this process ignores it
    then, and leaves it to torchrun's own handling otherwise."""
    import argparse
    import signal

    import torch.distributed.run

    real_parser = torch.distributed.run.get_args_parser

    def parser():
        parser = argparse.ArgumentParser()
        if has_option:  # as torchrun's: its default from the environment
            parser.add_argument("--signals-to-handle", default=os.environ.get("PET_SIGNALS_TO_HANDLE", "SIGTERM"))
        return parser

    monkeypatch.setattr(torch.distributed.run, "get_args_parser", parser)
    monkeypatch.setenv("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGUSR1")
    before = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        torchrun.ignore_sigusr1_where_torchrun_never_handles_it([])
        assert signal.getsignal(signal.SIGUSR1) == (signal.SIG_DFL if has_option else signal.SIG_IGN)
        monkeypatch.setenv("PET_SIGNALS_TO_HANDLE", "SIGTERM")  # SIGUSR1 not asked for: left as it is
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        torchrun.ignore_sigusr1_where_torchrun_never_handles_it([])
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
        # torchrun's own parser: the command line's --signals-to-handle decides.
        monkeypatch.setattr(torch.distributed.run, "get_args_parser", real_parser)
        monkeypatch.setenv("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGUSR1")
        for option, handled in (("--signals-to-handle=SIGTERM,SIGINT", False), ("--nnodes=1", True),
                                ("--signals-to-handle=SIGUSR1,SIGTERM", True)):
            signal.signal(signal.SIGUSR1, signal.SIG_DFL)
            torchrun.ignore_sigusr1_where_torchrun_never_handles_it([option, "-m", "qwen2_dist.cli.train"])
            assert signal.getsignal(signal.SIGUSR1) == (signal.SIG_DFL if handled else signal.SIG_IGN), option
    finally:
        signal.signal(signal.SIGUSR1, before)
