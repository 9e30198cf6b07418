"""mosaicml-streaming's shared memory and lock files: released when a loader closes, cleaned after killed runs.

A StreamingDataset keeps its state in POSIX shared memory named "<prefix:06>_<name>" (in /dev/shm) and lock files
"<tmpdir>/<prefix:06>_*_filelock". A killed run leaves them behind, and streaming's clean_stale_shared_memory()
cannot tell a dead run's prefix from a live one's: it would unlink the segments of a run still training. So every
process that opens a dataset writes an owner record /dev/shm/qwen2_dist-owner-<prefix>-<pid>-<start time>.<PID
namespace> holding its lock directory. A prefix is stale when every recorded owner is dead; prefixes without a record
(other programs, or a run in its first milliseconds) are never touched, nor are those with an owner recorded in
another PID namespace (a container sharing /dev/shm), whose processes this one cannot see.

streaming chooses a prefix by looking for the first free one in /dev/shm; two runs starting at the same moment can
choose the same one, and the second then fails ("File exists: '/000000_locals'"). prefix_lock() makes the choice
one run at a time on a machine, and release() removes a prefix under the same lock.
"""

import contextlib
import glob
import logging
import os
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
RECORD_PREFIX = "qwen2_dist-owner-"
# streaming.base.constant: SHM_TO_CLEAN and the two lock names (copied so cleaning needs no streaming import).
SEGMENT_NAMES = ("locals", "barrier", "next_epoch", "cache_usage", "shard_states", "shard_access_times", "resume",
                 "epoch_shape", "epoch_data")
LOCK_NAMES = ("barrier_filelock", "cache_filelock")


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a process (tells a live pid from a reused one); None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 22, counted after the parenthesized command name (which may itself hold spaces).
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_namespace() -> str:
    """This process's PID namespace, as the inode of /proc/self/ns/pid ('' when /proc does not say)."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _alive(pid: int, start_time: str) -> bool:
    """Whether a recorded owner may still run. A record "START.NAMESPACE" of another PID namespace (a container
    sharing this /dev/shm, e.g. docker --ipc=host) names a pid this /proc does not show: taken as alive."""
    start, _, namespace = start_time.partition(".")
    if namespace and namespace != _pid_namespace():
        return True
    return _start_time(pid) == start


def _records(prefix_int: int | None = None) -> list[tuple[str, int, int, str]]:
    """(record path, prefix, pid, start time) of every owner record, or of one prefix's."""
    pattern = f"{prefix_int:06d}-*" if prefix_int is not None else "*"
    found = []
    for path in glob.glob(os.path.join(SHM_DIR, RECORD_PREFIX + pattern)):
        try:
            prefix, pid, start = os.path.basename(path)[len(RECORD_PREFIX):].split("-")
            found.append((path, int(prefix), int(pid), start))
        except ValueError:
            continue
    return found


def _unlink_prefix(prefix_int: int, lock_dirs: set[str]) -> list[str]:
    removed = []
    paths = [os.path.join(SHM_DIR, f"{prefix_int:06d}_{name}") for name in SEGMENT_NAMES]
    paths += [os.path.join(d, f"{prefix_int:06d}_{name}") for d in lock_dirs for name in LOCK_NAMES]
    for path in paths:
        try:
            os.remove(path)
            removed.append(path)
        except OSError:  # gone already, or another user's (sticky /dev/shm and /tmp): not ours to remove
            pass
    return removed


def _lock_dir(record_path: str) -> str | None:
    try:
        with open(record_path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def register(prefix_int: int, lock_dir: str) -> str | None:
    """Record this process as an owner of a dataset's prefix; returns the record path (None without /dev/shm)."""
    start = _start_time(os.getpid())
    if start is None or not os.path.isdir(SHM_DIR):
        return None
    namespace = _pid_namespace()
    start = f"{start}.{namespace}" if namespace else start
    path = os.path.join(SHM_DIR, f"{RECORD_PREFIX}{prefix_int:06d}-{os.getpid()}-{start}")
    with open(path, "w") as f:
        f.write(lock_dir)
    return path


def release(prefix_int: int, record: str | None, lock_dir: str) -> None:
    """Drop this process's record; the last live owner of the prefix removes its segments and lock files."""
    if record is not None:
        try:
            os.remove(record)
        except FileNotFoundError:
            pass
    # Under the prefix lock: another run's ranks may be choosing their prefix from what is in /dev/shm right now,
    # and one of them would see this prefix taken, another free.
    with _cleanup_lock():
        if any(_alive(pid, start) for _, _, pid, start in _records(prefix_int)):
            return
        _unlink_prefix(prefix_int, {lock_dir})


def _orphan_lock_files(lock_dir: str) -> list[str]:
    """Lock files of prefixes that have no shared memory at all: a live dataset creates its segments before its
    lock files and keeps them until it ends, so these belong to runs that are gone."""
    orphans = []
    for path in glob.glob(os.path.join(lock_dir, "[0-9]" * 6 + "_*_filelock")):
        prefix, _, name = os.path.basename(path).partition("_")
        if name in LOCK_NAMES and not glob.glob(os.path.join(SHM_DIR, f"{prefix}_*")):
            orphans.append(path)
    return orphans


def clean_stale(lock_dir: str | None = None) -> list[str]:
    """Remove the segments, lock files and records of prefixes whose recorded owners are all dead, and lock files
    in lock_dir (streaming's, the temporary directory) whose prefix has no shared memory left."""
    by_prefix: dict[int, list[tuple[str, int, str]]] = {}
    for path, prefix, pid, start in _records():
        by_prefix.setdefault(prefix, []).append((path, pid, start))
    removed = []
    for prefix, owners in sorted(by_prefix.items()):
        if any(_alive(pid, start) for _, pid, start in owners):
            continue
        lock_dirs = {d for d in (_lock_dir(path) for path, _, _ in owners) if d}
        removed += _unlink_prefix(prefix, lock_dirs)
        for path, _, _ in owners:
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass
    if lock_dir is not None and os.path.isdir(SHM_DIR):
        for path in _orphan_lock_files(lock_dir):
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass
    if removed:
        log.warning("data: removed %d shared-memory segments, lock files and records left by killed runs",
                    len(removed))
    return removed


_held = False
"""Whether this process holds the machine's prefix lock now (a loader's finalizer, run by the garbage collector
inside the locked section, must not wait for the lock its own process holds)."""


@contextlib.contextmanager
def prefix_lock(leader: bool, lock_path: str = SHM_DIR) -> Iterator[None]:
    """Held by each run's local leaders (local rank 0) while its StreamingDataset picks and registers a shared-memory
    prefix, so that no other run on the same machine picks at the same time. An exclusive flock on the /dev/shm
    directory itself (lock_path): it needs no file (nothing to leave behind) and is released by the kernel if the
    process dies. The other local ranks take no lock: they wait at the run's barriers, which their leader passes
    only with the lock in hand, and pick the prefix their leader registers.

    Collective when torch.distributed is initialized: the run's leaders hold their machines' locks all together or
    none of them. Each tries without waiting, the run agrees (a CPU all-reduce), and when a leader did not get its
    lock the others let theirs go and all try again after a random pause. A leader that waited for its lock while
    holding another machine's would deadlock two multi-node runs sharing two machines: each would hold one machine's
    lock, waiting at its barriers for a rank that waits for the other's."""
    global _held
    import fcntl

    fd = os.open(lock_path, os.O_RDONLY) if leader and os.path.isdir(lock_path) else None
    try:
        if fd is not None and not _dist_initialized():
            fcntl.flock(fd, fcntl.LOCK_EX)  # one process: nothing to agree on, wait for the lock
        else:
            _lock_together(fd)
        _held = fd is not None
        yield
    finally:
        _held = False
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the lock


def _dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _lock_together(fd: int | None) -> None:
    """Every rank: return once every leader of the run holds its lock (fd None: this rank takes none)."""
    import fcntl
    import random

    from qwen2_dist.parallel.mesh import agree_any

    pause, started, said = 0.05, time.monotonic(), False
    jitter = random.SystemRandom()  # not the random module's seeded state, which a run may use
    while True:
        got = True
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                got = False
        if not agree_any([not got])[0]:
            return
        if got and fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        if not said and time.monotonic() - started > 60:
            log.warning("data: waiting for other runs on this run's machines to finish choosing their "
                        "shared-memory prefixes (%s is locked)", SHM_DIR)
            said = True
        time.sleep(jitter.uniform(pause / 2, pause))
        pause = min(2 * pause, 2.0)


@contextlib.contextmanager
def _cleanup_lock(timeout: float = 10.0) -> Iterator[None]:
    """The prefix lock for a cleanup, unless this process holds it already; after `timeout` seconds without it, the
    cleanup goes on (a process stopped while holding it must not hang another's exit)."""
    import fcntl

    if _held or not os.path.isdir(SHM_DIR):
        yield
        return
    fd = os.open(SHM_DIR, os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("data: %s stayed locked for %.0f s; releasing this loader's shared memory without "
                                "the lock", SHM_DIR, timeout)
                    break
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)
