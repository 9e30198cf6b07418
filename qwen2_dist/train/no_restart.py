"""A stop that needs the user (a config or data error, exit 2; a training halt, exit 3) is not trained past by a
torchrun restart.

torchrun restarts the workers after any failure, up to --max-restarts times, and cannot tell a crash (worth a
restart from the newest checkpoint) from a refusal: restarted, a halted run would resume from the checkpoint saved
at the halt and train on, its retention deleting the checkpoints the halt said to roll back to. So a worker that
stops on purpose under torchrun records why in RUN_DIR/no_restart.json, and a restarted worker of the same torchrun
that finds the record stops at once with the same exit code and message, before it builds anything. The first start
of a torchrun (restart 0) removes an earlier record once it holds the run_dir's lock; a job refused by another job's
lock records nothing. torchrun itself then exits 1 once its restarts are spent; qwen2_dist/cli/torchrun.py (what
the launchers run) and slurm/train.sbatch turn the record into their own exit code.
"""

import json
import logging
import os
import time

from qwen2_dist.fsutil import write_atomic

log = logging.getLogger(__name__)

NAME = "no_restart.json"


def _attempt() -> tuple[str, int] | None:
    """(torchrun's run id, its restart count) in a worker started by torchrun; None otherwise."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:
        return None
    try:
        return run_id, int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    except ValueError:
        return run_id, 0


def restarts_left() -> int:
    """How many more times torchrun restarts this worker's group after a failure (its --max-restarts less the
    restarts so far); 0 outside torchrun."""
    attempt = _attempt()
    try:
        limit = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS") or 0)
    except ValueError:
        return 0
    return max(0, limit - attempt[1]) if attempt is not None else 0


def record(run_dir: str, code: int, error: str) -> None:
    """Under torchrun: say in run_dir that this attempt stopped on purpose with `code` (never raises: the stop's own
    error is what the user must see)."""
    attempt = _attempt()
    if attempt is None:
        return
    path = os.path.join(run_dir, NAME)
    try:
        os.makedirs(run_dir, exist_ok=True)
        # "code" first: slurm/train.sbatch reads it with grep.
        write_atomic(path, json.dumps({"code": code, "error": error, "torchrun_run_id": attempt[0],
                                       "restart": attempt[1], "rank": int(os.environ.get("RANK", 0)),
                                       "time": time.time()}))
    except OSError as exc:
        log.warning("could not write %s (%s): torchrun may restart this stopped run", path, exc)


def _read(path: str) -> dict | None:
    """The record at path, when there is one with an exit code."""
    try:
        with open(path, encoding="utf-8") as f:
            stop = json.load(f)
    except (OSError, ValueError):
        return None
    return stop if isinstance(stop, dict) and isinstance(stop.get("code"), int) and stop["code"] else None


EARLIER_ENV = "QWEN2_EARLIER_STOP_RECORD"
"""Set by qwen2_dist/cli/torchrun.py for its workers: the identity (record_identity) of the record that was in the
run_dir before this torchrun started, as "INODE:MTIME_NS:SIZE"."""


def _earlier_identity() -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in os.environ[EARLIER_ENV].split(":"))
    except (KeyError, ValueError):
        return None


def previous_stop(run_dir: str) -> tuple[int, str] | None:
    """In a worker that torchrun restarted: (exit code, message) when an earlier attempt of the same torchrun
    stopped on purpose; None otherwise. The same torchrun: its run id (a fixed --rdzv-id repeats between jobs), and,
    under the launchers, not the record that was there before it started (the first attempt of a job may fail before
    it removes an earlier job's record)."""
    attempt = _attempt()
    if attempt is None or attempt[1] == 0:
        return None
    path = os.path.join(run_dir, NAME)
    run_id, restart = attempt
    earlier = _earlier_identity()
    if earlier is not None and record_identity(run_dir) == earlier:
        return None
    stop = _read(path)
    if stop is None or stop.get("torchrun_run_id") != run_id:
        return None
    return stop["code"], (
        f"not training on: torchrun restarted the workers (restart {restart}) after attempt {stop.get('restart')} "
        f"stopped on purpose with exit {stop['code']}: {stop.get('error')}. A restart cannot fix that; fix it and "
        f"start the job again ({path} records the stop)"
    )


def record_identity(run_dir: str) -> tuple[int, int, int] | None:
    """What tells this record file apart from any rewrite of it (inode, modification time, size); None: none."""
    try:  # opened, not only stat'ed: an NFS client revalidates its cached attributes at open
        with open(os.path.join(run_dir, NAME), "rb") as f:
            st = os.fstat(f.fileno())
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def recorded_since(run_dir: str, before: tuple[int, int, int] | None) -> tuple[int, str] | None:
    """(exit code, error) of a stop on purpose recorded in run_dir after `before` (record_identity's value then:
    every record is a new file, write_atomic); None when the record is the same one, or there is none."""
    if record_identity(run_dir) in (None, before):
        return None
    stop = _read(os.path.join(run_dir, NAME))
    return None if stop is None else (stop["code"], str(stop.get("error")))


def clear_earlier(run_dir: str) -> None:
    """In the first attempt of a torchrun, once this job holds the run_dir's lock (rank 0): remove an earlier
    torchrun's record (a job refused by another's lock removes nothing of that job's, and records nothing)."""
    attempt = _attempt()
    if attempt is None or attempt[1] != 0:
        return
    try:
        os.remove(os.path.join(run_dir, NAME))
    except FileNotFoundError:
        pass


CHECK_RECORDS_ENV = "QWEN2_CHECK_RECORDS"
"""slurm/train.sbatch sets it to a directory of the attempt, where each node's launch check writes its refusal: on
several nodes the first refused node ends the step, srun stops the others (--kill-on-bad-exit), and the step's code
was their SIGTERM's (143), its reason in one node's log only."""


def record_refusal(code: int, message: str, kind: str = "refused") -> None:
    """Write a launch check's refusal (its exit code, and its message on one line) where slurm/train.sbatch reads it
    (CHECK_RECORDS_ENV; nothing without it); kind="sigusr1": torchrun's stop by SIGUSR1 (sent to the job step),
    which the script requeues also where srun reports another node's SIGTERM. Best effort: the refusal or stop is
    printed either way."""
    where = os.environ.get(CHECK_RECORDS_ENV)
    if not where:
        return
    import socket

    node = os.environ.get("SLURM_NODEID") or socket.gethostname()
    try:
        os.makedirs(where, exist_ok=True)
        write_atomic(os.path.join(where, f"{kind}-node{node}"), f"{code}\n{' '.join(message.split())}\n")
    except OSError as exc:
        log.warning("could not record the launcher's %s in %s (%s)", kind, where, exc)
