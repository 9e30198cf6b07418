"""One job at a time in a run_dir: rank 0 holds an exclusive lock on run_dir/run.lock while the job runs.

Two jobs in one run_dir (a second torchrun of the same job, or two jobs given one run_dir=...) would clean each
other's checkpoints in progress (clean_partial), resume from each other's steps and overwrite config.yaml. The lock is
flock(2): the kernel drops it when the holding process ends, however it ends (a kill -9), so no stale lock is left
to clear by hand. A network filesystem keeps the lock of a client it lost (a node that died) until that client's
lease runs out or the server evicts it, minutes later: a job whose own earlier attempt holds the lock (the same
Slurm job id, another SLURM_RESTART_COUNT: a requeue after a node failure) waits for it up to QWEN2_LOCK_WAIT
seconds (default 300) instead of being refused at once. The file holds the holder's host, pid, Slurm job id and
restart count, for the message. Where the filesystem refuses flock (some NFS mounts, Lustre without -o flock), the
job runs with a warning, unlocked.
"""

import errno
import fcntl
import json
import logging
import math
import os
import socket
import time
from typing import IO

from qwen2_dist.errors import UserError
from qwen2_dist.parallel.mesh import broadcast_object

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


def _record(handle: IO[str]) -> dict:
    """The holder's record in the lock file ({} when there is none)."""
    handle.seek(0)
    try:
        who = json.loads(handle.read() or "{}")
    except ValueError:
        return {}
    return who if isinstance(who, dict) else {}


def _holder(handle: IO[str]) -> str:
    who = _record(handle)
    if not who:
        return "holder unknown"
    parts = [f"host {who.get('host', '?')}", f"pid {who.get('pid', '?')}"]
    if who.get("slurm_job_id"):
        parts.append(f"Slurm job {who['slurm_job_id']}")
    if who.get("started"):
        parts.append(f"since {who['started']}")
    return ", ".join(parts)


class RunDirBusy(UserError):
    """Another job holds the run_dir: this job stops, and leaves nothing of its own there (no_restart)."""


def _held(run_dir: str, holder: str, path: str) -> UserError:
    return RunDirBusy(f"run_dir={run_dir}: another job is running in it ({holder}; lock {path}). Wait for it to end, "
                     "or give this job a run_dir of its own (run_dir=..., or under Slurm another job name: sbatch "
                     f"-J NAME). If that job is gone (a network filesystem keeps a lost node's lock for minutes), "
                     f"delete {path} once you are sure none of its processes runs")


def _earlier_attempt(who: dict) -> bool:
    """Whether a lock record is an earlier attempt's of this Slurm job: the same job id, another restart count (a
    requeue; two launches in one allocation share both, and the second is another job in the run_dir)."""
    job = os.environ.get("SLURM_JOB_ID")
    return bool(job) and str(who.get("slurm_job_id")) == job and "slurm_restart_count" in who and \
        str(who["slurm_restart_count"]) != os.environ.get("SLURM_RESTART_COUNT", "0")


def _lock(handle: IO[str], operation: int) -> None:
    """flock (_flock_retrying); held by an earlier attempt of this Slurm job, tried again every second for up to
    QWEN2_LOCK_WAIT seconds: that attempt has ended, but a network filesystem may keep its lock a while."""
    try:
        _flock_retrying(handle, operation)
        return
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) or not _earlier_attempt(_record(handle)):
            raise
    text = os.environ.get("QWEN2_LOCK_WAIT", "300")
    try:
        wait = float(text)
    except ValueError:
        wait = math.nan
    if not 0 <= wait < math.inf:  # a traceback here would fail the requeued attempt it is meant to let through
        log.warning("QWEN2_LOCK_WAIT=%r is no number of seconds >= 0: waiting 300", text)
        wait = 300.0
    log.warning("run_dir lock %s: held by an earlier attempt of this Slurm job (%s), which has ended; waiting up to "
                "%.0f s for the filesystem to release it (QWEN2_LOCK_WAIT)", handle.name, _holder(handle), wait)
    deadline = time.monotonic() + wait
    while True:
        try:
            _flock_retrying(handle, operation)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                raise
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def _unopenable(path: str, exc: OSError) -> UserError:
    """The lock file cannot be opened (a directory by that name, no permission): one line, not a traceback that
    torchrun would restart."""
    return UserError(f"{path}: cannot be opened as the run's lock file ({exc.strerror or exc}); it must be a file "
                     "this user can read and write, or not exist: move it away")


def acquire(run_dir: str) -> IO[str] | None:
    """Lock run_dir for this process; the open lock file (close it to release), or None where the filesystem has
    no flock. A UserError naming the holder when another process holds it."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_NAME)
    try:
        handle = open(path, "a+", encoding="utf-8")
    except OSError as exc:
        raise _unopenable(path, exc) from None
    try:
        _lock(handle, fcntl.LOCK_EX)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = _holder(handle)
            handle.close()
            raise _held(run_dir, holder, path) from None
        handle.close()
        log.warning("run_dir %s: this filesystem refuses a lock (%s); nothing stops a second job from running in "
                    "the same run_dir at the same time", run_dir, os.strerror(exc.errno or 0))
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
                             "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
                             "torchrun_run_id": os.environ.get("TORCHELASTIC_RUN_ID", ""),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    handle.flush()
    return handle


def acquire_on_main(run_dir: str, is_main: bool) -> IO[str] | None:
    """acquire() on rank 0 (the lock to close, or None); a refusal raised on every rank, not on rank 0 alone while
    the others wait for it at their first collective."""
    handle, refusal = None, None
    if is_main:
        try:
            handle = acquire(run_dir)
        except UserError as exc:
            refusal = exc
    refusal = broadcast_object(refusal)  # the error itself: a RunDirBusy stays one (no_restart records none)
    if refusal is not None:
        raise refusal
    return handle


def _flock_retrying(handle: IO[str], operation: int, tries: int = 5) -> None:
    """flock without blocking, tried again a few times 0.1 s apart: the launchers' checks hold a shared lock for an
    instant (check_free), which must not refuse a job that starts just then."""
    for attempt in range(tries):
        try:
            fcntl.flock(handle, operation | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) or attempt == tries - 1:
                raise
            time.sleep(0.1)


def held_by_another_job(run_dir: str) -> bool:
    """Whether another job holds run_dir now, asked without waiting: this torchrun's own rank 0 (its run id in the
    lock's record), or an earlier attempt of this Slurm job holding it still (the wait _lock would give it), counts as
    this job's. A lock file that cannot be opened counts as held."""
    try:
        handle = open(os.path.join(run_dir, LOCK_NAME), encoding="utf-8")
    except FileNotFoundError:
        return False
    except OSError:
        return True
    with handle:
        try:
            _flock_retrying(handle, fcntl.LOCK_SH)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            who, run_id = _record(handle), os.environ.get("TORCHELASTIC_RUN_ID")
            return not (_earlier_attempt(who) or (run_id and who.get("torchrun_run_id") == run_id))
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def check_free(run_dir: str) -> None:
    """The launchers' check: a UserError naming the holder when a job holds run_dir now. A shared lock, taken and
    released at once, with the file left as it is: the checks of several nodes at the same moment (every node of a
    Slurm job runs one) do not refuse each other, and the holder's record stays for the message."""
    path = os.path.join(run_dir, LOCK_NAME)
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError:
        return  # no job has run in it (a job creates the file before it takes the lock)
    except OSError as exc:
        raise _unopenable(path, exc) from None
    with handle:
        try:
            _lock(handle, fcntl.LOCK_SH)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _held(run_dir, _holder(handle), path) from None
            # A filesystem without flock: the job itself says so when it starts.
