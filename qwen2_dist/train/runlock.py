"""One job at a time in a run_dir: rank 0 holds an exclusive lock on run_dir/run.lock while the job runs.

Two jobs in one run_dir (a second torchrun of the same job, or two jobs given one run_dir=...) would clean each
other's checkpoints in progress (clean_partial), resume from each other's steps and overwrite config.yaml. The lock is
flock(2): the kernel drops it when the holding process ends, however it ends (a kill -9), so no stale lock is left
to clear by hand. A network filesystem keeps the lock of a client it lost (a node that died) until that client's
lease runs out or the server evicts it, minutes later: a job whose own earlier attempt holds the lock (the same
Slurm job id, another SLURM_RESTART_COUNT: a requeue after a node failure) waits for it up to QWEN2_LOCK_WAIT
seconds (default 300) instead of being refused at once. The file holds the holder's host, pid, Slurm job id and
restart count, for the message.

flock does not reach other nodes everywhere: Lustre mounted with -o localflock locks per node, and where the
filesystem refuses flock (some NFS mounts, Lustre without -o flock) there is no lock at all (the job runs with a
warning). So the holder also keeps a lease: it touches the file every QWEN2_LOCK_HEARTBEAT seconds (default 30)
and marks its record released when it lets go. A record of another host, not released, touched within
LEASE_BEATS heartbeats, is a job running there, whatever flock said: refused, as a held lock is (an earlier
attempt of the same Slurm job, or an earlier round of the same torchrun, waited for or passed, as above).
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from typing import IO

from qwen2_dist.errors import UserError
from qwen2_dist.parallel.mesh import broadcast_object

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
LEASE_BEATS = 4
"""A record not touched for this many heartbeats is a job that ended without letting go (a node that died)."""


def _heartbeat() -> float:
    """QWEN2_LOCK_HEARTBEAT in seconds (30 when unset or not a positive number)."""
    try:
        beat = float(os.environ.get("QWEN2_LOCK_HEARTBEAT", "30"))
    except ValueError:
        beat = 30.0
    return beat if 0 < beat < float("inf") else 30.0


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


def _earlier_round(who: dict) -> bool:
    """Whether a lock record is an earlier round's of this torchrun (the same TORCHELASTIC_RUN_ID, a lower restart
    count): torchrun ended that round's workers before it started this one, whichever node rank 0 is on now."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    try:
        return bool(run) and who.get("torchelastic_run_id") == run and \
            int(who.get("torchelastic_restart_count", -1)) < int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except (TypeError, ValueError):
        return False


def _lease_age(path: str, who: dict) -> float | None:
    """Seconds since another host's job touched its lock, when its lease still runs (not released, touched within
    LEASE_BEATS heartbeats, not an earlier round of this torchrun); else None. The same host is flock's to decide."""
    if not who or who.get("released") or who.get("host") in (None, socket.gethostname()) or _earlier_round(who):
        return None
    try:
        age = time.time() - os.stat(path).st_mtime
    except OSError:
        return None
    return age if age < LEASE_BEATS * _heartbeat() else None


def _check_lease(run_dir: str, path: str, handle: IO[str], wait: bool) -> None:
    """RunDirBusy when another host's job holds the lease (see the module's docstring); an earlier attempt of this
    Slurm job is waited for (wait=True: up to QWEN2_LOCK_WAIT seconds) until its lease runs out."""
    who = _record(handle)
    age = _lease_age(path, who)
    if age is None:
        return
    if wait and _earlier_attempt(who):
        deadline = time.monotonic() + float(os.environ.get("QWEN2_LOCK_WAIT", "300"))
        log.warning("run_dir lock %s: the lease of an earlier attempt of this Slurm job (%s) was renewed %.0f s ago; "
                    "waiting up to %s s for it to run out (QWEN2_LOCK_WAIT)", path, _holder(handle), age,
                    os.environ.get("QWEN2_LOCK_WAIT", "300"))
        while age is not None and time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            age = _lease_age(path, _record(handle))
        if age is None:
            return
    elif _earlier_attempt(who):
        return  # the launchers' check: the job itself waits for it
    raise RunDirBusy(
        f"run_dir={run_dir}: another job is running in it on another node ({_holder(handle)}; its lock {path} was "
        f"renewed {age:.0f} s ago, and a job renews it every {_heartbeat():g} s: this filesystem's locks do not "
        "reach other nodes, e.g. Lustre mounted with -o localflock). Wait for it to end, or give this job a run_dir "
        "of its own (run_dir=..., or under Slurm another job name: sbatch -J NAME). If that job is gone, its lease "
        f"runs out {LEASE_BEATS * _heartbeat():g} s after its last renewal, or delete {path} once you are sure none "
        "of its processes runs")


class Lease:
    """The lock of a job's run_dir, while it runs: the open, flock-locked file (None where the filesystem has no
    flock), renewed every heartbeat by a daemon thread; close() stops that and marks the record released."""

    def __init__(self, path: str, handle: IO[str] | None, record: dict):
        self.path, self.handle, self.record = path, handle, record
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="qwen2-run-lock", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(_heartbeat()):
            try:
                os.utime(self.path)
            except OSError as exc:  # a storage hiccup: the next beat tries again
                log.warning("run_dir lock %s: could not renew its lease (%s)", self.path, exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            _write_record(self.path, self.handle,
                          {**self.record, "released": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        except OSError as exc:
            log.warning("run_dir lock %s: could not mark it released (%s); another node takes the run_dir once the "
                        "lease runs out", self.path, exc)
        finally:
            if self.handle is not None:
                self.handle.close()


def _lock(handle: IO[str], operation: int) -> None:
    """flock (_flock_retrying); held by an earlier attempt of this Slurm job, tried again every second for up to
    QWEN2_LOCK_WAIT seconds: that attempt has ended, but a network filesystem may keep its lock a while."""
    try:
        _flock_retrying(handle, operation)
        return
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) or not _earlier_attempt(_record(handle)):
            raise
    wait = float(os.environ.get("QWEN2_LOCK_WAIT", "300"))
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


def acquire(run_dir: str) -> Lease:
    """Lock run_dir for this process: the Lease (close it to release). A UserError naming the holder when another
    process holds it, or another node's job holds its lease."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_NAME)
    handle = open(path, "a+", encoding="utf-8")
    try:
        _lock(handle, fcntl.LOCK_EX)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = _holder(handle)
            handle.close()
            raise _held(run_dir, holder, path) from None
        log.warning("run_dir %s: this filesystem refuses a lock (%s); only the lease in %s (its record, renewed "
                    "every %g s) tells another node's job that this one runs", run_dir, os.strerror(exc.errno or 0),
                    path, _heartbeat())
        try:
            _check_lease(run_dir, path, handle, wait=True)
        finally:
            handle.close()
        handle = None
    else:
        try:
            _check_lease(run_dir, path, handle, wait=True)
        except UserError:
            handle.close()
            raise
    record = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
              "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
              "torchelastic_run_id": os.environ.get("TORCHELASTIC_RUN_ID", ""),
              "torchelastic_restart_count": os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_record(path, handle, record)
    return Lease(path, handle, record)


def _write_record(path: str, handle: IO[str] | None, record: dict) -> None:
    """The lock file's record replaced: through the locked handle where there is one (the next holder's flock then
    waits for it to be closed), else through a file of its own."""
    with open(path, "r+", encoding="utf-8") if handle is None else contextlib.nullcontext(handle) as f:
        f.seek(0)
        f.truncate()
        f.write(json.dumps(record) + "\n")
        f.flush()


def acquire_on_main(run_dir: str, is_main: bool) -> Lease | None:
    """acquire() on rank 0 (the Lease to close; None elsewhere); a refusal raised on every rank, not on rank 0
    alone while the others wait for it at their first collective."""
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


def check_free(run_dir: str) -> None:
    """The launchers' check: a UserError naming the holder when a job holds run_dir now. A shared lock, taken and
    released at once, with the file left as it is: the checks of several nodes at the same moment (every node of a
    Slurm job runs one) do not refuse each other, and the holder's record stays for the message."""
    path = os.path.join(run_dir, LOCK_NAME)
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError:
        return  # no job has run in it (a job creates the file before it takes the lock)
    with handle:
        try:
            _lock(handle, fcntl.LOCK_SH)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _held(run_dir, _holder(handle), path) from None
            # A filesystem without flock: the job itself says so when it starts.
        _check_lease(run_dir, path, handle, wait=False)
