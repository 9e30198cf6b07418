"""Sharded checkpoints (torch.distributed.checkpoint) with an atomic commit, retention, verification and resume.

Layout: <run_dir>/checkpoints/step_00000100/ holds the DCP shards, train_state.json, rng/rank{N}.pt and, written
last, metadata.json (step, tokens, layout, config hash, time, and the size and CRC32 of every file). A directory
counts as a checkpoint only when metadata.json exists; it is written after the shards are renamed into place, so a
save killed at any point never becomes "latest", and a file that later goes missing, is truncated or has a changed
byte is caught before loading.
"""

import datetime
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
import warnings
import zlib
from concurrent.futures import Future
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemWriter
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_map

from qwen2_dist.errors import CheckpointNotLoadable, StorageUnreadable, UserError
from qwen2_dist.fsutil import fsync_path, replace_dir, write_atomic
from qwen2_dist.parallel.mesh import agree_any, broadcast_object

log = logging.getLogger(__name__)

METADATA = "metadata.json"
TRAIN_STATE = "train_state.json"
FORMAT_VERSION = 2
"""2: the optimizer's state and settings keyed by parameter name (DCP's flatten_optimizer_state_dict), so a
checkpoint loads into any grouping of the same parameters: one AdamW, optim.overlap's AdamW per block,
optim.in_backward's per parameter. 1 (written before 2026-11-27): parameter groups by position; still read, into an
optimizer grouped the same way."""
READABLE_FORMATS = (1, 2)
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_LEFTOVER = re.compile(r"^(.+)\.(tmp|old)-[0-9a-f]{8}$")
"""The names of a save's or an atomic write's temporary copies (fsutil.replace_dir, write_atomic, save_to):
another name with .tmp- or .old- in it (a user's step_00000004.old-lr3e-4) is none of ours, and stays."""
# Test hook: the step whose save stalls (for 10 minutes) after its shards are written and before the commit, so a
# test can kill a save at its most delicate point.
STALL_ENV = "QWEN2_CKPT_STALL_STEP"
# Test hook: "STEP" makes the save of that step fail on every rank before anything is written, as a full disk would;
# "STEP:RANK:write" makes it fail on that rank only, after the rank's shard files are written (mid-save).
FAIL_ENV = "QWEN2_INJECT_CKPT_FAIL_STEP"
_CHUNK = 16 << 20


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@contextmanager
def _quiet_dcp():
    """DCP warns that it 'assumes a single process' when there is no process group: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _write_json_atomic(path: str, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def _file_sizes(path: str) -> dict[str, int]:
    sizes = {}
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            full = os.path.join(dirpath, name)
            sizes[os.path.relpath(full, path)] = os.path.getsize(full)
    return sizes


def file_checksum(path: str) -> str:
    """CRC32 of a file's bytes, as "crc32:xxxxxxxx" (zlib's runs at several GB/s and releases the GIL)."""
    crc = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return f"crc32:{crc:08x}"


def config_hash(resolved_config: dict) -> str:
    """Short stable hash of a resolved job config."""
    return hashlib.sha256(json.dumps(resolved_config, sort_keys=True).encode()).hexdigest()[:16]


def is_committed(path: str) -> bool:
    """True when the directory holds a committed checkpoint (its metadata.json exists). CheckpointNotLoadable when
    the filesystem cannot say (StorageUnreadable: ESTALE, EIO, EACCES: os.path.isfile reads those as "no file", and
    an intact checkpoint was then removed as a killed save's leftover, or passed over for an older one)."""
    try:
        os.stat(os.path.join(path, METADATA))
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise StorageUnreadable(f"{path}: cannot tell whether it is a committed checkpoint ({exc}); it may be "
                                "intact, so the run stops rather than pass over it. Check the filesystem (a "
                                "stale NFS handle, permissions) and start again") from None
    return True


def require_committed(path: str, key: str | None = None) -> None:
    """UserError unless the directory holds a committed checkpoint, naming the newest committed one under it (a run
    directory or its checkpoints/) when there is one. key: the setting that named the path, if one did."""
    if is_committed(path):
        return
    found = committed_checkpoints(path) or committed_checkpoints(os.path.join(path, "checkpoints"))
    hint = f"; the newest committed one under it is {found[-1]}" if found else ""
    fix = f"point {key} at a step_* directory that has one" if key else "give a step_* directory that has one"
    if key == "checkpoint.resume":
        fix += " or use checkpoint.resume=auto"
    raise UserError(f"{f'{key}={path}' if key else path}: not a committed checkpoint (no {METADATA}){hint}; {fix}")


_NOT_LOADED = ("so it is not loaded, nor set aside as damaged: if the filesystem recovers, start the job again; if "
               "the checkpoint is lost, move it out of checkpoints/ (or name an older one with checkpoint.resume=PATH)")


def read_metadata(path: str) -> dict:
    """The metadata of a committed checkpoint; UserError when the directory is not one."""
    require_committed(path)
    try:
        with open(os.path.join(path, METADATA), encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as exc:  # not JSON (or not UTF-8)
        raise UserError(f"{path}/{METADATA}: unreadable ({exc}); the checkpoint is damaged") from None
    except OSError as exc:  # an I/O error: the file may be intact
        raise StorageUnreadable(f"{path}/{METADATA}: cannot be read ({exc}), {_NOT_LOADED}") from None
    if meta.get("format") not in READABLE_FORMATS:
        raise CheckpointNotLoadable(
            f"{path}/{METADATA}: checkpoint format {meta.get('format')} is not one this version reads "
            f"({', '.join(map(str, READABLE_FORMATS))}); load it with the version that wrote it")
    return meta


# The checkpoints whose checksums this process has checked (verify, every rank its share), by real path, with the
# stat signature of their files then: a second verify of files not changed since (a rollback's target, checked
# before anything moves and again when loaded) reads nothing again.
_checked: dict[str, tuple] = {}


def _signature(path: str, names) -> tuple:
    """What tells whether a checkpoint's files changed: each one's size, times and inode, and the metadata's."""
    stats = [(name, os.stat(os.path.join(path, name))) for name in sorted({*names, METADATA})]
    return tuple((name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for name, st in stats)


class _Missing(UserError):
    """A file of a checkpoint that this rank does not find (verify decides with the other ranks what it means);
    everywhere: the message when no rank finds it."""

    def __init__(self, text: str, everywhere: str):
        super().__init__(text)
        self.everywhere = everywhere


def _raise_agreed(problems: list[tuple], world: int) -> None:
    """verify's verdict from every rank's problem (kind, rank, text; for "missing", the texts for some ranks and for
    all), the same on every rank: a problem that may not be damage first (an I/O error; a file some ranks do not
    find while others do: not visible on every node yet, as a shared filesystem's cached listings lag), then damage
    (a file no rank finds is missing)."""
    if not problems:
        return
    missing = [p for p in problems if p[0] == "missing"]
    for kind, rank, text in problems:
        if kind == "not loadable":
            raise CheckpointNotLoadable(text)
        if kind == "unreadable":
            raise StorageUnreadable(text)
    if missing and len(missing) < world:
        ranks = ", ".join(str(p[1]) for p in missing)
        raise StorageUnreadable(f"{missing[0][2][0]} on rank(s) {ranks} only, while the others find it, "
                                f"{_NOT_LOADED}")
    if missing:
        raise UserError(missing[0][2][1])
    raise UserError(problems[0][2])


def verify(path: str, checksums: bool = True, collective: bool = True) -> dict:
    """Check that every file the commit recorded is present with its size and (checksums, when the commit recorded
    them) its CRC32; return the metadata. Collective when distributed: each rank reads its share of the files, and
    every rank raises the same UserError when any rank found a problem (also one only that rank sees, such as an
    unreadable file), so no rank is left waiting in a collective. collective=False: this rank alone reads every file
    (a check one rank makes while the others wait elsewhere). A rank reads its share once per process while the
    files stay as they were (_checked)."""
    started = time.monotonic()
    rank, world = (dist.get_rank(), dist.get_world_size()) if collective and dist.is_initialized() else (0, 1)
    meta, problem, checked, signature = None, None, 0, None
    try:
        try:
            require_committed(path)  # names the newest committed checkpoint under path, if any
        except UserError as exc:
            raise _Missing(f"{os.path.join(path, METADATA)}: missing", str(exc)) from None
        meta = read_metadata(path)
        for name, size in meta.get("files", {}).items():
            full = os.path.join(path, name)
            try:
                found_size = os.stat(full).st_size  # another OSError (ESTALE, EIO, EACCES): not loadable, below
            except FileNotFoundError:
                raise _Missing(f"{full}: missing from checkpoint {path}",
                               f"{full}: missing from checkpoint {path}; the checkpoint is damaged") from None
            if found_size != size:
                raise UserError(f"{full}: {found_size} bytes, the commit recorded {size}; the checkpoint is damaged")
        recorded = (meta.get("checksums") or {}) if checksums else {}
        if checksums and not recorded:
            log.warning("checkpoint: %s recorded no checksums (saved with checkpoint.checksums=false, or by an older "
                        "version): its files' sizes are checked, their contents cannot be", path)
        unrecorded = sorted(set(meta.get("files", {})) - set(recorded)) if recorded else []
        if unrecorded:
            raise UserError(f"{os.path.join(path, unrecorded[0])}: no checksum recorded for it, unlike the "
                            "checkpoint's other files; the metadata was changed, the checkpoint is damaged")
        if recorded:
            signature = _signature(path, meta.get("files", {}))
        already = signature is not None and _checked.get(os.path.realpath(path)) == signature
        for name in [] if already else _share(meta.get("files", {}), recorded, rank, world):
            found = file_checksum(os.path.join(path, name))
            checked += 1
            if found != recorded[name]:
                raise UserError(f"{os.path.join(path, name)}: checksum {found}, the commit recorded {recorded[name]} "
                                "(same size, changed bytes); the checkpoint is damaged")
    except _Missing as exc:
        problem = ("missing", rank, (str(exc), exc.everywhere))
    except CheckpointNotLoadable as exc:
        problem = ("unreadable" if isinstance(exc, StorageUnreadable) else "not loadable", rank, str(exc))
    except UserError as exc:
        problem = ("damaged", rank, str(exc))
    except OSError as exc:
        problem = ("unreadable", rank, f"{path}: cannot be read on rank {rank} ({exc}), {_NOT_LOADED}")
    problems = [problem]
    if world > 1:
        problems = [None] * world
        dist.all_gather_object(problems, problem)
    _raise_agreed([p for p in problems if p], world)
    if signature is not None:
        _checked[os.path.realpath(path)] = signature
    if checked:
        log.info("checkpoint: %d file checksums of %s checked on this rank in %.1f s", checked, path,
                 time.monotonic() - started)
    return meta


def peek_train_state(path: str) -> dict:
    """A checkpoint's train state as its file reads now, before the checkpoint is verified ({} when it cannot be
    read; never raises): what a restart can check against the job before it loads the checkpoint."""
    try:
        with open(os.path.join(path, TRAIN_STATE), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def train_state_intact(path: str, meta: dict) -> bool:
    """Whether a committed checkpoint's train_state.json has the size and (when recorded) the checksum its commit
    recorded: what a check before the launch may read it for (a damaged one is the job's to report and skip)."""
    full = os.path.join(path, TRAIN_STATE)
    size = (meta.get("files") or {}).get(TRAIN_STATE)
    try:
        if size is None or os.path.getsize(full) != size:
            return False
        recorded = (meta.get("checksums") or {}).get(TRAIN_STATE)
        return recorded is None or file_checksum(full) == recorded
    except OSError:
        return False


def _share(sizes: dict[str, int], names, rank: int, world: int) -> list[str]:
    """This rank's files to checksum: largest first, each to the rank with the fewest bytes so far (the same split
    on every rank), so the ranks read about equal amounts when the files are many."""
    loads = [0] * world
    mine = []
    for name in sorted(names, key=lambda n: (-sizes.get(n, 0), n)):
        least = loads.index(min(loads))
        loads[least] += sizes.get(name, 0)
        if least == rank:
            mine.append(name)
    return mine


def committed_checkpoints(ckpt_root: str) -> list[str]:
    """Committed checkpoint directories under ckpt_root, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    found = []
    for name in os.listdir(ckpt_root):
        match = _STEP_DIR.match(name)
        path = os.path.join(ckpt_root, name)
        if match and is_committed(path):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


ROLLBACK = "rollback.json"
"""In run_dir/checkpoints: the checkpoint a run was rolled back to with checkpoint.resume=PATH (see roll_back)."""


def in_run(ckpt_root: str, path: str) -> bool:
    """Whether path is a checkpoint directory of this run (under ckpt_root, however either is spelled: symlinks)."""
    return os.path.realpath(os.path.dirname(os.path.abspath(path))) == os.path.realpath(ckpt_root)


def rollback_done(ckpt_root: str, resume: str) -> bool:
    """True when checkpoint.resume names a checkpoint of this run (under ckpt_root) the run was rolled back to, or is
    none and the run was started afresh with it (see roll_back)."""
    if resume == "auto" or (resume != "none" and not in_run(ckpt_root, resume)):
        return False
    path = os.path.join(ckpt_root, ROLLBACK)
    try:
        with open(path, encoding="utf-8") as f:
            done = json.load(f).get("to")
    except FileNotFoundError:
        return False
    except (OSError, ValueError, AttributeError) as exc:
        # Not "not done": that would roll the run back again, moving aside everything written since.
        kind = StorageUnreadable if isinstance(exc, OSError) else CheckpointNotLoadable  # an I/O error may pass
        raise kind(f"{path}: cannot be read ({exc}); it says whether the run was rolled back to "
                   f"checkpoint.resume={resume} already. If the filesystem recovers, start the job again; to roll "
                   "back again, delete the file; to go on from the newest checkpoint, use checkpoint.resume=auto"
                   ) from None
    return done == ("none" if resume == "none" else os.path.basename(os.path.abspath(resume)))


def rollback_pending(ckpt_root: str, resume: str) -> bool:
    """Whether roll_back(ckpt_root, resume) would roll the run back (a step directory of this run, or none: not yet
    done)."""
    if resume == "auto" or rollback_done(ckpt_root, resume):
        return False
    return resume == "none" or (in_run(ckpt_root, resume)
                                and _STEP_DIR.match(os.path.basename(os.path.abspath(resume))) is not None)


def check_rollback_target(ckpt_root: str, resume: str, checksums: bool = True, pending: bool | None = None) -> None:
    """Before a rollback moves anything: the checkpoint it rolls back to must be intact (verify(); every rank calls
    this, as verify is collective), or the run's newer checkpoints would go aside for one that cannot be loaded.
    pending: whether a rollback is to come, as rank 0 sees it (default: as this process sees it)."""
    if pending is None:
        pending = rollback_pending(ckpt_root, resume)
    if resume == "none" or not pending:
        return
    try:
        verify(resume, checksums)
    except UserError as exc:
        raise UserError(f"checkpoint.resume={resume}: not rolling the run back to it, nothing was moved: {exc}. "
                        "Name another checkpoint of the run, or checkpoint.resume=auto to go on from the newest") \
            from None


def roll_back(ckpt_root: str, resume: str) -> list[str]:
    """checkpoint.resume=PATH naming a checkpoint of this run (under ckpt_root) rolls the run back to it, once: the
    committed checkpoints newer than PATH move to checkpoints/abandoned-TIME/ (neither resumed from nor deleted by
    retention or clean_partial), then ROLLBACK records PATH. A restart of the same command (torchrun, a requeue)
    finds the record and goes on from the newest checkpoint of the rolled-back run instead of rolling back again.
    checkpoint.resume=none is a rollback to before the first step: every checkpoint of the run moves aside (none
    mixes with the new start's), and restarts of the same command go on from what the new start writes. Rank 0
    only, before any rank lists the checkpoints. Returns the moved checkpoints' new paths."""
    if not rollback_pending(ckpt_root, resume):
        return []
    name = "none" if resume == "none" else os.path.basename(os.path.abspath(resume))
    after = -1 if resume == "none" else int(_STEP_DIR.match(name).group(1))
    newer = [path for path in committed_checkpoints(ckpt_root)
             if int(_STEP_DIR.match(os.path.basename(path)).group(1)) > after]
    moved = []
    if newer:
        aside = os.path.join(ckpt_root, time.strftime("abandoned-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4])
        os.makedirs(aside, exist_ok=True)
        for path in newer:
            moved.append(os.path.join(aside, os.path.basename(path)))
            os.replace(path, moved[-1])
        fsync_path(ckpt_root)
        log.warning("checkpoint.resume=%s: %s; its %d %scheckpoint(s) moved to %s (delete them when you no longer "
                    "need them)", resume, "starting the run afresh" if resume == "none" else "rolling the run back "
                    "to it", len(moved), "" if resume == "none" else "newer ", aside)
    os.makedirs(ckpt_root, exist_ok=True)
    _write_json_atomic(os.path.join(ckpt_root, ROLLBACK), {"to": name, "moved": moved, "time": time.time()})
    return moved


def set_aside_damaged(path: str) -> str:
    """Rename a committed checkpoint that failed to load to damaged-NAME-TIME beside it: no longer a checkpoint, so
    restarts do not check it again first (with checksums, every file) and retention does not count it among the
    kept ones; its files stay for a look. Rank 0 only. Returns the new path."""
    aside = os.path.join(os.path.dirname(path), f"damaged-{os.path.basename(path)}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    fsync_path(os.path.dirname(path))
    log.warning("checkpoint %s could not be loaded: renamed to %s (delete it when you no longer need it)", path, aside)
    return aside


def prepare_resume(ckpt_root: str, resume: str, checksums: bool = True) -> list[str]:
    """Every rank (collective): check a rollback's target, then (rank 0) remove interrupted saves and roll back,
    and return the checkpoints to resume from, newest first (resume_candidates). What rank 0 sees decides, and the
    other ranks take it: on a shared filesystem another node's directory listing can lag behind (NFS caches them),
    and ranks that disagreed would wait in different collectives or load different steps."""
    main = not dist.is_initialized() or dist.get_rank() == 0

    def on_main(step):
        """step()'s value on rank 0, or its error, raised on every rank (none waits for a broadcast that never
        comes)."""
        outcome = None
        if main:
            try:
                outcome = (step(), None)
            except UserError as exc:
                outcome = (None, exc)
            except OSError as exc:  # a full disk, permissions, a stale handle while it cleans up or rolls back
                outcome = (None, StorageUnreadable(
                    f"{ckpt_root}: preparing the resume failed ({exc}); no committed checkpoint was deleted. Fix the "
                    "filesystem (space, permissions) and start the same command again: it goes on from here"))
        value, error = broadcast_object(outcome)
        if error is not None:
            raise error
        return value

    pending = on_main(lambda: rollback_pending(ckpt_root, resume))
    check_rollback_target(ckpt_root, resume, checksums, pending)

    def tidy_and_list():
        clean_partial(ckpt_root)
        roll_back(ckpt_root, resume)
        return resume_candidates(ckpt_root, resume)

    return on_main(tidy_and_list)


def resume_note(ckpt_root: str, resume: str, candidates: list[str]) -> str | None:
    """What to tell the user when the job names a checkpoint.resume=PATH but resumes from a newer checkpoint of
    the run (a restart of the command that started or rolled back the run); None otherwise."""
    if resume == "auto" or not candidates or os.path.realpath(resume) == os.path.realpath(candidates[0]):
        return None  # however the two are spelled (relative, absolute, through a symlink)
    if rollback_done(ckpt_root, resume):
        return (f"checkpoint.resume={resume}: the run was rolled back to it before ({os.path.join(ckpt_root, ROLLBACK)}"
                "), and has checkpoints since: resuming from the newest (to roll back to it again, delete that file)")
    return (f"checkpoint.resume={resume} started this run, which has checkpoints of its own now: resuming from the "
            "newest (to start over, use a new run_dir)")


def resume_candidates(ckpt_root: str, resume: str) -> list[str]:
    """The checkpoints to resume from, newest first (the later ones are fallbacks for a damaged one).

    auto: this run's committed checkpoints. PATH of this run: the same, once roll_back() has moved the newer ones
    aside, so a restart goes on from what the rolled-back run wrote since. PATH elsewhere (a converted Hugging Face
    checkpoint, another run's): the run's starting point, used only while the run has no checkpoint of its own; a
    restart then resumes from its own newest one, not from PATH at step 0 again. none: nothing, until roll_back()
    has moved the run's checkpoints aside; then (restarts) the new start's."""
    if resume == "none" and not rollback_done(ckpt_root, resume):
        return []
    own = committed_checkpoints(ckpt_root)[::-1]
    if resume in ("auto", "none"):
        return own
    return own or [resume]


def clean_partial(ckpt_root: str) -> list[str]:
    """Delete leftovers of killed saves (temporary dirs, step dirs without metadata); return what went."""
    removed = []
    if not os.path.isdir(ckpt_root):
        return removed
    for name in sorted(os.listdir(ckpt_root)):
        path = os.path.join(ckpt_root, name)
        ours = _LEFTOVER.match(name)
        final = os.path.join(ckpt_root, ours.group(1)) if ours else path
        try:
            if ours and ours.group(2) == "old" and _STEP_DIR.match(os.path.basename(final)) \
                    and not os.path.lexists(final) and is_committed(path):
                # A commit killed between replace_dir's two renames: this is the step's only committed copy.
                os.rename(path, final)
                log.warning("checkpoint: %s put back as %s (a save was killed while it replaced it)", path, final)
                continue
            leftover = ours or (_STEP_DIR.match(name) and not is_committed(path))
        except CheckpointNotLoadable as exc:
            log.warning("checkpoint: %s; not removed", exc)  # the resume that lists it stops on it
            continue
        if leftover:
            if os.path.islink(path) or not os.path.isdir(path):
                os.remove(path)  # a link goes, never what it points to (another run's files)
            else:
                shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for path in removed:
        log.warning("checkpoint: removed the leftover of an interrupted save: %s", path)
    return removed


def _state(model: torch.nn.Module | dict, optimizer: torch.optim.Optimizer | None, fmt: int) -> dict:
    if isinstance(model, dict):  # the model's state dict itself (write(): qwen2-convert from-hf's mapped tensors)
        return {"model": model}
    if optimizer is None:
        return {"model": _unwrapped(get_model_state_dict(model))}
    if hasattr(optimizer, "wait"):
        optimizer.wait()  # optim.overlap: the last update may still be running on its side stream
    model_sd, optim_sd = get_state_dict(model, _optimizers(optimizer), options=_options(fmt))
    return {"model": _unwrapped(model_sd), "optim": optim_sd}


_FLOAT8_WRAPPER = "WeightWithDynamicFloat8CastTensor"


def _unwrapped(state: dict) -> dict:
    """The model's state with each tensor held in torchao's float8 weight wrapper replaced by the plain tensor inside
    it (the same storage, no copy). Under FSDP, model.float8 wraps every float8 weight's shard so that it is
    all-gathered in float8 (AdamW's moments are plain tensors); saved as they are, those weights pickle as that
    torchao class, which a load without torchao imported refuses (weights_only): such a checkpoint could not be
    exported, nor started from or resumed without float8. A load reads into the plain tensor, the wrapper's own."""

    def plain(value):  # the wrapper is made for FSDP's all-gather only: always the local shard of a DTensor
        if isinstance(value, DTensor) and type(value._local_tensor).__name__ == _FLOAT8_WRAPPER:
            with torch.no_grad():
                return DTensor.from_local(value._local_tensor._tensor, value.device_mesh, value.placements,
                                          run_check=False, shape=value.shape, stride=value.stride())
        return value

    return tree_map(plain, state)


def _holds_state(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether an optimizer (or any of an InBackwardOptimizer's) has state: it has made an update."""
    if optimizer is None:
        return False
    optimizers = _optimizers(optimizer)
    return any(o.state for o in (optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]))


def _options(fmt: int) -> StateDictOptions:
    """How the optimizer's state is laid out in a checkpoint of format fmt (see FORMAT_VERSION)."""
    return StateDictOptions(flatten_optimizer_state_dict=fmt >= 2)


def _optimizers(optimizer):
    """The torch optimizer(s) behind optimizer: an InBackwardOptimizer holds one per parameter, which distributed
    checkpointing saves and loads as one state dict under the parameters' names."""
    return getattr(optimizer, "optimizers", optimizer)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


class _Pending:
    """A save whose shards are being written; committed once the write finished."""

    def __init__(self, tmp: str, final: str, metadata: dict, contents: list[str], future: Future | None,
                 started: float, retain: bool, writer: "_Writer", checksums: dict[str, str]):
        self.tmp, self.final, self.metadata, self.contents = tmp, final, metadata, contents
        self.future, self.started, self.retain = future, started, retain
        self.writer, self.checksums = writer, checksums  # the writer adds the shard files' checksums when done


class Checkpointer:
    """Saves (optionally asynchronously), commits atomically, applies retention; one per run.

    With async saves, save() returns once the state is staged (copied); the shards are written in the background
    and committed by wait(), which the trainer calls when every rank reports its write done (pending_done()).
    """

    def __init__(self, ckpt_root: str, keep_last: int, keep_every: int = 0, async_save: bool = False,
                 checksums: bool = True, timeout_minutes: float = 30.0):
        self.ckpt_root = ckpt_root
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.async_save = async_save
        self.checksums = checksums
        self._pending: _Pending | None = None
        # Background writes run collectives of their own: keep them off the training process group (with the
        # job's train.pg_timeout_minutes: a new group's own default is 30 minutes).
        self._group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_minutes)) \
            if async_save and dist.is_initialized() else None
        self.last_blocking_seconds = 0.0
        self.failed_saves = 0

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
             train_state: dict, metadata: dict, blocking: bool = False, retain: bool = True) -> str | None:
        """Save step `step` under ckpt_root (committed on return unless in the background); None if it failed.
        retain=False: keep every older checkpoint (a halt's save: the ones before it are what a rollback needs)."""
        final = os.path.join(self.ckpt_root, f"step_{step:08d}")
        ok = self.save_to(final, model, optimizer, train_state, dict(metadata, step=step), blocking, retain=retain)
        return final if ok else None

    def save_to(self, final: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                train_state: dict, metadata: dict, blocking: bool, retain: bool) -> bool:
        """Write a checkpoint to a temporary sibling of `final`; commit now (blocking) or later (async).

        A storage failure (no space, permissions, ...) on any rank is logged and the save skipped on every rank:
        training goes on, the previous committed checkpoint is untouched. Returns False when it was skipped.
        """
        self.wait()
        started = time.monotonic()
        tmp = broadcast_object(f"{os.path.abspath(final)}.tmp-{uuid.uuid4().hex[:8]}")
        # An optimizer that has not updated anything yet (every step so far skipped, on a path that skips on the
        # host) has no state to save, and asking DCP for it would make some: a step at lr 0 that counts as step 1,
        # which the first real update's bias correction would then take for its second.
        state = _state(model, optimizer if _holds_state(optimizer) else None, FORMAT_VERSION)
        future = None
        sums: dict[str, str] = {}
        writer = _Writer(tmp, self.checksums, fail_after_write=_injected_fault(metadata.get("step")) == "write")
        try:
            # Everything a rank does alone comes before the first agreement, so a failure here (the disk, or
            # torch.save's RuntimeError for it) cannot leave the other ranks waiting inside DCP's collectives.
            _maybe_fail(metadata.get("step"))
            os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
            # On disk before the commit can name them (as DCP syncs its own files): a crash after the commit must
            # not leave a committed checkpoint with an empty train state or RNG file.
            if _rank() == 0:
                with open(os.path.join(tmp, TRAIN_STATE), "w", encoding="utf-8") as f:
                    json.dump(train_state, f, sort_keys=True)
                fsync_path(os.path.join(tmp, TRAIN_STATE))
            rng_name = f"rng/rank{_rank()}.pt"
            torch.save(_rng_state(), os.path.join(tmp, rng_name))
            fsync_path(os.path.join(tmp, rng_name))
            fsync_path(os.path.join(tmp, "rng"))
            if self.checksums:
                sums[rng_name] = file_checksum(os.path.join(tmp, rng_name))
            staged = None
            if self.async_save and not blocking:
                # The copy to host memory an async save writes from, made here: it can fail on one rank (host
                # memory), and dcp.async_save would then have started the other ranks' background writes, whose
                # first collective nothing would ever answer.
                if _injected_fault(metadata.get("step")) == "stage":
                    raise MemoryError(f"staging failed (injected by {FAIL_ENV})")
                staged = writer.stage(state)
            ok = _all_ok(True)
        except Exception as exc:  # OSError, MemoryError, or torch.save's RuntimeError for one
            ok = _all_ok(False, exc)
        if ok:
            try:
                with _quiet_dcp():
                    if staged is not None:
                        future = dcp.async_save(staged, checkpoint_id=tmp, storage_writer=writer,
                                                process_group=self._group, async_stager=_AlreadyStaged())
                    else:
                        dcp.save(state, checkpoint_id=tmp, storage_writer=writer)
                ok = _all_ok(True)
            except (Exception, CheckpointException) as exc:  # OSError, or DCP's wrapper (a BaseException) of one
                ok = _all_ok(False, exc)
        if not ok:
            self._abandon(tmp, final)
            return False
        self._pending = _Pending(tmp, final, metadata, sorted(state), future, started, retain, writer, sums)
        self.last_blocking_seconds = time.monotonic() - started
        if future is None:
            return self.wait()
        return True

    def pending_done(self) -> bool | None:
        """None when no save is pending, else whether this rank's part of it is written."""
        if self._pending is None:
            return None
        return self._pending.future is None or self._pending.future.done()

    def wait(self) -> bool:
        """Block until the pending save is written on every rank, then commit it (collective).

        Returns False when the save failed (logged; the previous checkpoint stays the latest).
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return True
        try:
            if pending.future is not None:
                pending.future.result()
            ok = _all_ok(True)
        except (Exception, CheckpointException) as exc:  # the background write failed
            ok = _all_ok(False, exc)
        if not ok:
            self._abandon(pending.tmp, pending.final)
            return False
        if self.checksums:
            _gather_checksums(pending, self._group)
        if os.environ.get(STALL_ENV) == str(pending.metadata.get("step")):
            log.warning("checkpoint: stalling before the commit of %s (%s)", pending.final, STALL_ENV)
            time.sleep(600)
        committed = True
        if _rank() == 0:
            try:
                _commit(pending, self.checksums)
            except Exception as exc:  # any kind: the other ranks wait for this one in the agreement below
                committed = False
                log.error("checkpoint: commit of %s failed (%s); the previous checkpoint stays the latest",
                          pending.final, describe_error(exc))
                # Before the rename only its source is this save's (the target may be anything, left as it is).
                written = pending.tmp if os.path.exists(pending.tmp) else pending.final
                try:
                    _delete(written)
                except OSError as rm_exc:
                    log.error("checkpoint: %s may look committed and could not be deleted (%s); delete it before "
                              "the job resumes", written, rm_exc)
        committed = _all_ok(committed)
        # After every rank has agreed on the commit, so no rank waits in that agreement for the deletes (minutes
        # for a large checkpoint on Lustre or NFS): each is un-committed here and deleted in the background.
        if _rank() == 0 and committed and pending.retain:
            _apply_retention(self.ckpt_root, self.keep_last, self.keep_every, protect=pending.final)
        if committed:
            log.info("checkpoint: committed %s in %.1f s", pending.final, time.monotonic() - pending.started)
        else:
            self.failed_saves += 1
        return committed

    def _abandon(self, tmp: str, final: str) -> None:
        """Forget a failed save: count it and remove what it wrote (rank 0; the leftovers are harmless)."""
        self.failed_saves += 1
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        log.error("checkpoint: save of %s failed and was skipped (%d so far); the previous committed checkpoint "
                  "stays the latest", final, self.failed_saves)


def describe_error(exc: BaseException) -> str:
    """One line: the type and first message line of the error, looking inside DCP's CheckpointException (whose
    own first line only lists the failing ranks)."""
    if isinstance(exc, CheckpointException) and exc.failures:
        rank, (inner, _) = next(iter(sorted(exc.failures.items())))
        return f"rank {rank}: {describe_error(inner)}"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}"


def _all_ok(ok: bool, exc: BaseException | None = None) -> bool:
    """True on every rank when the step succeeded on every rank (a CPU all-reduce); logs this rank's failure."""
    if isinstance(exc, CheckpointException):  # DCP hands every rank the failing ranks' errors
        log.error("checkpoint: write failed: %s", describe_error(exc))
    elif exc is not None:
        log.error("checkpoint: write failed on rank %d: %s", _rank(), describe_error(exc))
    return not agree_any([not ok])[0]


def _injected_fault(step: int | None) -> str | None:
    """Test hook (FAIL_ENV): "start", "stage" (an async save's copy to host memory) or "write" when this rank's save
    of `step` is to fail, else None."""
    specs = os.environ.get(FAIL_ENV)
    if step is None or not specs:
        return None
    for spec in specs.split(","):  # STEP[:RANK[:PHASE]], several separated by commas
        fail_step, _, rest = spec.partition(":")
        fail_rank, _, phase = rest.partition(":")
        if fail_step == str(step) and (not fail_rank or fail_rank == str(_rank())):
            return phase or "start"
    return None


def _maybe_fail(step: int | None) -> None:
    if _injected_fault(step) == "start":
        raise OSError(errno.ENOSPC, f"No space left on device (injected by {FAIL_ENV})")


class _AlreadyStaged(AsyncStager):
    """The stager of an async save whose state dict is staged already (Checkpointer.save): it hands it on."""

    _synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Writer(FileSystemWriter):
    """DCP's file writer that also checksums the shard files this rank wrote, in the thread that wrote them (the
    background, for an async save), while they are likely still in the page cache. fail_after_write is a test hook
    (FAIL_ENV): the files are written, then the write fails as a disk that filled up mid-save would."""

    def __init__(self, path: str, checksums: bool, fail_after_write: bool = False):
        super().__init__(path)
        self.want_checksums, self.fail_after_write = checksums, fail_after_write
        self.checksums: dict[str, str] = {}

    def write_data(self, plan, planner):
        results = super().write_data(plan, planner).wait()
        if self.fail_after_write:
            raise OSError(errno.ENOSPC, f"No space left on device after writing shards (injected by {FAIL_ENV})")
        if self.want_checksums:
            for name in sorted({result.storage_data.relative_path for result in results}):
                self.checksums[name] = file_checksum(os.path.join(os.fspath(self.path), name))
        done = torch.futures.Future()
        done.set_result(results)
        return done


def _gather_checksums(pending: _Pending, group) -> None:
    """Every rank's checksums (its rng file and shard files) into rank 0's pending.checksums (collective)."""
    mine = {**pending.checksums, **pending.writer.checksums}
    if not dist.is_initialized():
        pending.checksums = mine
        return
    gathered = [None] * dist.get_world_size() if _rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0, group=group)
    if _rank() == 0:
        pending.checksums = {name: crc for part in gathered for name, crc in part.items()}


def _commit(pending: _Pending, checksums: bool) -> None:
    replace_dir(pending.tmp, pending.final)  # over an uncommitted leftover of the same step, if any
    fsync_path(os.path.dirname(pending.final))
    files = _file_sizes(pending.final)
    # A file a writer reported that rank 0's listing lacks (a shared filesystem's cached directory listing lags):
    # recorded from its own stat, so every file is size- and checksum-checked at a load; missing here, no commit.
    for name in sorted(set(pending.checksums) - set(files)):
        log.warning("checkpoint: %s, written by another rank, is not in rank 0's listing of %s; recorded from its "
                    "own stat", name, pending.final)
        files[name] = os.stat(os.path.join(pending.final, name)).st_size
    meta = dict(pending.metadata, format=FORMAT_VERSION, time=time.time(), contents=pending.contents,
                save_seconds=round(time.monotonic() - pending.started, 3), files=files)
    if checksums:
        # Rank 0 reads only the files it wrote last and no writer checksummed: DCP's index and the train state
        # (small). Any other file without a checksum means a writer's were lost: said, then read here.
        meta["checksums"] = {}
        for name in sorted(files):
            crc = pending.checksums.get(name)
            if crc is None:
                if name not in (".metadata", TRAIN_STATE):
                    log.warning("checkpoint: %s came without a checksum from the rank that wrote it; rank 0 reads "
                                "it to make one", name)
                crc = file_checksum(os.path.join(pending.final, name))
            meta["checksums"][name] = crc
    _write_json_atomic(os.path.join(pending.final, METADATA), meta)
    fsync_path(pending.final)  # the commit on disk before retention deletes anything older


def _apply_retention(ckpt_root: str, keep_last: int, keep_every: int, protect: str) -> None:
    """Delete the committed checkpoints retention does not keep. One that cannot be deleted (a read-only directory,
    a stale NFS handle, a cleanup script faster than us) stays, with a warning; the next save tries again."""
    try:
        committed = committed_checkpoints(ckpt_root)
    except (OSError, CheckpointNotLoadable) as exc:  # the latter: an entry the filesystem cannot stat (ESTALE)
        # Only rank 0 applies retention: raised, it would stop that rank alone after a committed save, and the
        # others would wait for it in their next collective.
        log.warning("checkpoint: could not list %s for retention (%s); older checkpoints stay", ckpt_root, exc)
        return
    for path in committed[:-keep_last]:
        step = int(_STEP_DIR.match(os.path.basename(path)).group(1))
        if path == protect or (keep_every and step % keep_every == 0):
            continue
        try:
            _delete(path, background=True)
        except OSError as exc:
            log.warning("checkpoint: retention could not delete %s (%s); it stays, and the next save tries again",
                        path, exc)


_deletes: list[threading.Thread] = []  # retention's background deletes of this process, not yet waited for


def wait_for_deletes() -> None:
    """Wait until retention's background deletes are done (the end of a run; an exit without it leaves uncommitted
    leftovers, which clean_partial removes at the next start)."""
    while _deletes:
        _deletes.pop().join()


def _delete(path: str, background: bool = False) -> None:
    """Delete a checkpoint directory, un-committing it first (its metadata.json): a crash or a failure halfway
    through the delete leaves an uncommitted leftover, removed at the next start, never a checkpoint with files
    missing. OSError when the metadata cannot be removed (nothing else is touched then). background: the files
    are deleted by a thread once the checkpoint is un-committed (wait_for_deletes). A symbolic link (another run's
    checkpoint linked into this run's checkpoints/) is removed itself: the checkpoint it points to stays whole."""
    if os.path.islink(path):
        os.remove(path)
        return
    try:
        os.remove(os.path.join(path, METADATA))
    except FileNotFoundError:
        pass
    if not background:
        shutil.rmtree(path, ignore_errors=True)
        return
    _deletes[:] = [thread for thread in _deletes if thread.is_alive()]
    thread = threading.Thread(target=shutil.rmtree, args=(path,), kwargs={"ignore_errors": True},
                              name=f"delete {os.path.basename(path)}", daemon=True)
    thread.start()
    _deletes.append(thread)


def write(final: str, model: torch.nn.Module | dict, optimizer: torch.optim.Optimizer | None, train_state: dict,
          metadata: dict) -> None:
    """Write and commit one checkpoint at `final` (blocking), outside any run's retention. model: a module, or a
    state dict of its parameters' names (in any floating dtype: a load converts to the parameters' own)."""
    final = os.path.abspath(final)  # a bare name has no directory to sync ('')
    saver = Checkpointer(os.path.dirname(final), keep_last=1)
    if not saver.save_to(final, model, optimizer, train_state, metadata, blocking=True, retain=False):
        raise UserError(f"{final}: the checkpoint could not be written (see the error above); check the space "
                        "and permissions of its directory")


def _dcp_load(state: dict, path: str, intact: bool = False) -> None:
    """dcp.load into state; any failure is one UserError naming the checkpoint and the failing rank's error.
    intact: verify() has matched every file against the checksums of its commit, so a failure to load is not damage
    (CheckpointNotLoadable: never fallen back past and set aside as damaged, its progress lost)."""
    try:
        with _quiet_dcp():
            dcp.load(state, checkpoint_id=path)
    except (Exception, CheckpointException) as exc:  # DCP's wrapper is a BaseException
        if _is_io_error(exc):  # the files may be intact: not a reason to fall back past them and set them aside
            raise StorageUnreadable(f"{path}: cannot be read ({describe_error(exc)}); it may be intact, so the "
                                    "run stops rather than fall back past it. Check the filesystem and start "
                                    "again") from None
        if intact:  # out of memory, an interrupted read, state this job's settings do not fit
            raise CheckpointNotLoadable(
                f"{path}: cannot be loaded ({describe_error(exc)}), though its files match the checksums of its "
                "commit: the checkpoint is intact, so the run stops rather than fall back past it. Compare this "
                "job's settings with the run's config.yaml (optim.*, model.*); if it ran out of memory, free some "
                "and start again") from None
        raise UserError(f"{path}: cannot be loaded ({describe_error(exc)}); "
                        "the checkpoint is damaged or from another model") from None


def _is_io_error(exc: BaseException) -> bool:
    """An OSError, also inside DCP's CheckpointException: verify() has found every file at its size before the
    load, so a file that cannot be read now (gone, not yet visible on this node, EIO) is not a damaged checkpoint."""
    if isinstance(exc, CheckpointException):
        return any(_is_io_error(inner) for inner, _ in exc.failures.values())
    return isinstance(exc, OSError)


def load(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, checksums: bool = True) -> dict:
    """Load a verified checkpoint into model (and optimizer, when it has one); return its train state."""
    meta = verify(path, checksums)
    with_optim = "optim" in meta["contents"] and optimizer is not None
    state = _state(model, optimizer if with_optim else None, meta["format"])
    _dcp_load(state, path, intact=checksums and bool(meta.get("checksums")))  # verify matched every checksum
    if with_optim:
        set_state_dict(model, _optimizers(optimizer), model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=_options(meta["format"]))
    else:
        set_model_state_dict(model, state["model"])
    train_state = {}
    if os.path.isfile(os.path.join(path, TRAIN_STATE)):
        with open(os.path.join(path, TRAIN_STATE), encoding="utf-8") as f:
            train_state = json.load(f)
    rng_file = os.path.join(path, "rng", f"rank{_rank()}.pt")
    if os.path.isfile(rng_file):
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    log.info("checkpoint: loaded %s (step %s)", path, meta.get("step"))
    return train_state


def other_model_fix(ckpt_root: str, path: str) -> str:
    """What to do about a checkpoint to resume that holds another model than the job's (check_model_args' fix)."""
    if in_run(ckpt_root, path):
        return "set model= to match, or use another run_dir"
    return "set model= to match, or name another checkpoint.resume"


def check_model_args(what: str, meta: dict, args, fix: str) -> None:
    """UserError naming `what` and every size that differs when a checkpoint's metadata holds another model (the
    fields of model.args.INERT_ARGS aside: a checkpoint converted from Hugging Face weights that advertise a shorter
    context loads as it is), with the model.* overrides that give the checkpoint's sizes."""
    from qwen2_dist.model.args import INERT_ARGS

    saved, wanted = meta.get("model_args") or {}, args.to_dict()
    differ = [key for key in sorted(set(saved) | set(wanted))
              if key not in INERT_ARGS and saved.get(key) != wanted.get(key)]
    if not differ:
        return
    diffs = ", ".join(f"{key} {saved.get(key)} vs {wanted.get(key)}" for key in differ)
    overrides = " ".join(f"model.{key}={saved[key]}" for key in differ if key in saved)
    raise UserError(f"{what} holds a {meta.get('model') or 'custom-size'} model whose sizes differ from this job's "
                    f"model (checkpoint vs job: {diffs}); {fix}" + (f" (its sizes: {overrides})" if overrides else ""))


INIT_KEYS = ("init_from_hf", "init_from_checkpoint")


def init_source(model_cfg) -> dict:
    """Where a run's weights started, as its checkpoints record it ("init_from"): the real path of
    model.init_from_hf or model.init_from_checkpoint, or neither (a random initialization)."""
    return {key: os.path.realpath(getattr(model_cfg, key)) if getattr(model_cfg, key) else None for key in INIT_KEYS}


def check_init_source(path: str, meta: dict, job_source: dict) -> dict | None:
    """The init source a resumed run goes on recording: the checkpoint's (None: unknown, for a checkpoint written
    before sources were recorded). UserError when the job names model.init_from_* but the run whose checkpoint it
    resumes started from a random initialization or from the other kind of source: resuming would never load it.
    The same kind at another path (weights copied to a job's scratch, moved, downloaded again) resumes with a
    warning, as does a checkpoint that does not record its source."""
    named = {key: value for key, value in job_source.items() if value}
    saved = meta.get("init_from")
    if not isinstance(saved, dict):
        if named:
            log.warning("checkpoint %s does not record where its run's weights started; resuming it, and %s is not "
                        "loaded", path, "model." + next(iter(named)))
        return None
    if named:
        key, value = next(iter(named.items()))
        if not saved.get(key):
            origin = next((f"model.{k}={v}" for k, v in saved.items() if v), "a random initialization")
            raise UserError(f"model.{key}={value}, but the run_dir has checkpoints of a run that started from "
                            f"{origin} (the newest: {path}), which this job would resume without loading {value}. "
                            f"Use a new run_dir, or checkpoint.resume=none to start this run afresh (the old "
                            f"checkpoints move aside), or leave model.{key} unset to resume that run")
        if saved[key] != value:
            log.warning("model.%s=%s, but the run in this run_dir started from %s: resuming it (the weights named "
                        "are not loaded; a run that should start from them needs a new run_dir)", key, value,
                        saved[key])
    return saved


def init_checkpoint_metadata(path: str, args, checksums: bool = False, collective: bool = True) -> dict:
    """Metadata of the checkpoint model.init_from_checkpoint names, once it is known to be committed, intact (its
    files' sizes; their checksums too when asked) and of the job's model (UserError naming the key otherwise).
    collective: as verify's."""
    key = "model.init_from_checkpoint"
    require_committed(path, key)
    try:
        meta = verify(path, checksums, collective)
    except UserError as exc:
        raise UserError(f"{key}: {exc}") from None
    check_model_args(f"{key}={path}", meta, args, "set model= (and model.* overrides) to match it")
    return meta


def load_weights(path: str, model: torch.nn.Module, args, checksums: bool = True) -> None:
    """Only the model weights of a committed checkpoint (another run's, any layout) into model; nothing else of that
    run (step, optimizer, data position, RNG) is taken."""
    meta = init_checkpoint_metadata(path, args, checksums)
    state = _state(model, None, meta["format"])
    _dcp_load(state, path)
    set_model_state_dict(model, state["model"])
    log.info("checkpoint: model weights of %s (step %s) loaded", path, meta.get("step"))


def read_tensors(path: str, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Full fp32 model tensors of the given names from a checkpoint, in one process, reading only those."""
    state = {"model": {name: torch.empty(shape) for name, shape in shapes.items()}}
    _dcp_load(state, path)
    return state["model"]
