"""One job at a time in a run_dir (qwen2_dist/train/runlock.py)."""

import errno
import fcntl
import logging
import os
import threading

import pytest

from qwen2_dist.errors import UserError
from qwen2_dist.train import runlock


def test_a_held_run_dir_is_refused_naming_the_holder_until_it_is_released(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    held = runlock.acquire(str(tmp_path))
    # flock locks belong to an open file: a second open, even in this process, is a second job.
    with pytest.raises(UserError, match=rf"run_dir={tmp_path}: another job is running in it \(host .*, pid "
                                        rf"{os.getpid()}, Slurm job 4242, since .*run_dir=\.\.\., or under Slurm "
                                        r"another job name: sbatch -J NAME"):
        runlock.acquire(str(tmp_path))
    with pytest.raises(runlock.RunDirBusy, match="another job is running"):  # a UserError (no_restart skips it)
        runlock.check_free(str(tmp_path))
    held.close()
    runlock.check_free(str(tmp_path))
    runlock.acquire(str(tmp_path)).close()


def test_the_launchers_checks_of_several_nodes_at_once_do_not_refuse_each_other(tmp_path):
    """Every node of a multi-node (Slurm) job runs the check at about the same moment: a check holding its probe
    (a shared lock) neither refuses another check nor the job's own lock taken an instant later; the holder's record
    is left as it is for the message."""
    runlock.acquire(str(tmp_path)).close()  # a job ran here before: the file exists, with its record
    record = (tmp_path / runlock.LOCK_NAME).read_text()
    with open(tmp_path / runlock.LOCK_NAME) as other_check:
        fcntl.flock(other_check, fcntl.LOCK_SH | fcntl.LOCK_NB)
        runlock.check_free(str(tmp_path))
        assert (tmp_path / runlock.LOCK_NAME).read_text() == record
    probe = open(tmp_path / runlock.LOCK_NAME)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    threading.Timer(0.15, probe.close).start()  # a check ending just as the job takes its lock
    runlock.acquire(str(tmp_path)).close()
    held = runlock.acquire(str(tmp_path))
    with pytest.raises(UserError, match=rf"another job is running in it \(host {os.uname().nodename}, pid "
                                        rf"{os.getpid()}"):
        runlock.check_free(str(tmp_path))
    held.close()


def test_a_lock_path_that_cannot_be_opened_is_one_error_naming_it(tmp_path):
    (tmp_path / runlock.LOCK_NAME).mkdir()
    for check in (runlock.acquire, runlock.check_free):
        with pytest.raises(UserError, match=rf"{runlock.LOCK_NAME}: cannot be opened as the run's lock file \(Is a "
                                            r"directory\); it must be a file"):
            check(str(tmp_path))


def test_the_launchers_check_creates_no_run_dir(tmp_path):
    runlock.check_free(str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


def test_a_filesystem_without_flock_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    def refuse(handle, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", refuse)
    with caplog.at_level(logging.WARNING, logger=runlock.__name__):
        assert runlock.acquire(str(tmp_path)) is None
    assert "refuses a lock" in caplog.text and str(tmp_path) in caplog.text


def test_a_lock_left_by_an_earlier_attempt_of_the_same_slurm_job_is_waited_for(tmp_path, monkeypatch, caplog):
    """A network filesystem keeps a lost node's lock for minutes: the requeued job (same Slurm job id) waits for it
    (QWEN2_LOCK_WAIT), the launchers' check too; another job's lock is refused at once, naming the file to delete
    if that job is gone."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("QWEN2_LOCK_WAIT", "20")
    stale = runlock.acquire(str(tmp_path))
    # Two launches in one allocation (salloc): the same job id and restart count, another job in the run_dir.
    with pytest.raises(UserError, match="another job is running in it"):
        runlock.acquire(str(tmp_path))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the requeued job
    threading.Timer(1.0, stale.close).start()  # the filesystem lets the dead attempt's lock go
    with caplog.at_level(logging.WARNING):
        runlock.check_free(str(tmp_path))
    assert "held by an earlier attempt of this Slurm job" in caplog.text
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    stale = runlock.acquire(str(tmp_path))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    threading.Timer(1.0, stale.close).start()
    runlock.acquire(str(tmp_path)).close()

    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    other = runlock.acquire(str(tmp_path))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(UserError, match=rf"Slurm job 77.*delete {tmp_path}/run.lock once you are sure none of its "):
        runlock.acquire(str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("QWEN2_LOCK_WAIT", "0.3")  # still held when the wait runs out
    with pytest.raises(UserError, match="another job is running in it"):
        runlock.acquire(str(tmp_path))
    other.close()


def test_whether_another_job_holds_the_run_dir_is_asked_without_waiting(tmp_path, monkeypatch):
    """What decides whether a job stopped before it took the lock may write its stop record in run_dir: an earlier
    attempt of this Slurm job still holding the lock (which _lock would wait QWEN2_LOCK_WAIT for) is this job's."""
    assert not runlock.held_by_another_job(str(tmp_path / "new"))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("QWEN2_LOCK_WAIT", "600")
    held = runlock.acquire(str(tmp_path))
    assert runlock.held_by_another_job(str(tmp_path))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the requeued attempt: the lock is its own job's
    assert not runlock.held_by_another_job(str(tmp_path))
    held.close()
    assert not runlock.held_by_another_job(str(tmp_path))
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "mine")
    held = runlock.acquire(str(tmp_path))  # as rank 0 of this torchrun holds it, for a rank that failed before it
    assert not runlock.held_by_another_job(str(tmp_path))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "another")
    assert runlock.held_by_another_job(str(tmp_path))
    held.close()
    os.remove(tmp_path / runlock.LOCK_NAME)
    (tmp_path / runlock.LOCK_NAME).mkdir()
    assert runlock.held_by_another_job(str(tmp_path))


def test_a_lock_wait_that_is_no_number_of_seconds_is_named_and_300_taken(tmp_path, monkeypatch, caplog):
    """A traceback there failed the requeued attempt that the wait exists to let through."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("QWEN2_LOCK_WAIT", "soon")
    stale = runlock.acquire(str(tmp_path))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    threading.Timer(0.5, stale.close).start()
    with caplog.at_level(logging.WARNING):
        runlock.acquire(str(tmp_path)).close()
    assert "QWEN2_LOCK_WAIT='soon' is no number of seconds >= 0: waiting 300" in caplog.text


def test_a_job_refused_by_another_jobs_lock_leaves_no_stop_record_in_its_run_dir(tmp_path, monkeypatch):
    """Under torchrun a stop on purpose is recorded (no_restart.json) so that restarts do not train on; a job refused
    because another job runs in the run_dir writes nothing there, so the running job's restarts are not affected; nor
    does a stop on storage that could not be read (StorageUnreadable), so that torchrun's restarts try again."""
    from omegaconf import OmegaConf

    from qwen2_dist.cli import train
    from qwen2_dist.errors import StorageUnreadable

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "theirs")
    held = runlock.acquire(str(tmp_path))  # the other job's lock (a second open file: flock refuses it here too)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "mine")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    cfg = OmegaConf.create({"run_dir": str(tmp_path)})

    def busy(cfg):  # the refusal as run() meets it, on rank 0 and handed to every rank
        runlock.acquire_on_main(str(tmp_path), True)

    def bad(cfg):
        raise UserError("bad")

    def storage(cfg):  # a stale NFS handle at the resume: a restart may read the checkpoint
        raise StorageUnreadable("checkpoints/step_00000004: cannot be read ([Errno 116] Stale file handle)")

    def bad_after_the_lock(cfg):  # this job's own run_dir: its rank 0 (this torchrun's run id) took the lock
        held.close()
        taken.append(runlock.acquire(str(tmp_path)))
        raise UserError("bad")

    taken = []

    # A config refused before the lock (a plain torchrun into the busy run_dir, past no launcher's check) wrote its
    # stop into the running job's run_dir, whose launcher then reported it for that job's next failure.
    for refuse, recorded in ((busy, False), (storage, False), (bad, False), (bad_after_the_lock, True)):
        monkeypatch.setattr(train, "run", refuse)
        with pytest.raises(SystemExit) as stopped:
            train._entry(cfg)
        assert stopped.value.code == 2
        assert (tmp_path / "no_restart.json").exists() == recorded
    taken[0].close()
    os.remove(tmp_path / "no_restart.json")
    monkeypatch.setattr(train, "run", bad)
    with pytest.raises(SystemExit):
        train._entry(cfg)
    assert (tmp_path / "no_restart.json").exists()  # refused before the lock in a run_dir no job holds: recorded


def test_a_storage_error_under_torchrun_waits_before_the_restart_it_leaves_to_come(tmp_path, monkeypatch):
    """torchrun restarts a failed worker group at once: its restarts all met the same storage outage in seconds.
    Each but the last waits QWEN2_STORAGE_RETRY_WAIT seconds before it exits."""
    from omegaconf import OmegaConf

    from qwen2_dist.cli import train
    from qwen2_dist.errors import StorageUnreadable

    def storage(cfg):
        raise StorageUnreadable("checkpoints/step_00000004: cannot be read ([Errno 5] Input/output error)")

    waits = []
    monkeypatch.setattr(train, "run", storage)
    monkeypatch.setattr(train.time, "sleep", waits.append)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "mine")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("QWEN2_STORAGE_RETRY_WAIT", "45")
    for restart in (0, 2, 3):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restart))
        with pytest.raises(SystemExit):
            train._entry(OmegaConf.create({"run_dir": str(tmp_path)}))
    assert waits == [45.0, 45.0]  # none after the last restart
    assert not (tmp_path / "no_restart.json").exists()


@pytest.mark.parametrize("value", ["-5", "soon", "nan", "inf"])
def test_a_storage_wait_that_is_no_number_of_seconds_is_named_and_60_taken(value, monkeypatch, capsys):
    """A negative wait made time.sleep raise inside the error's handler, hiding the storage error behind a traceback;
    a word was taken as 60 without a word."""
    from qwen2_dist.cli import train

    monkeypatch.setenv("QWEN2_STORAGE_RETRY_WAIT", value)
    assert train.storage_wait() == 60.0
    assert f"warning: QWEN2_STORAGE_RETRY_WAIT='{value}' is no number of seconds >= 0" in capsys.readouterr().err
    monkeypatch.setenv("QWEN2_STORAGE_RETRY_WAIT", "0")
    assert train.storage_wait() == 0.0 and not capsys.readouterr().err
