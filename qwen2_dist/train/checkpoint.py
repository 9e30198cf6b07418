"""Sharded checkpoints (torch.distributed.checkpoint) with an atomic commit, retention and auto-resume.

Layout: <run_dir>/checkpoints/step_00000100/ holds the DCP shards, train_state.json and, written last,
metadata.json. A directory counts as a checkpoint only when metadata.json exists; it is written after the shards
are renamed into place, so a save killed at any point never becomes "latest".
"""

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from qwen2_dist.errors import UserError
from qwen2_dist.fsutil import replace_dir

log = logging.getLogger(__name__)

METADATA = "metadata.json"
TRAIN_STATE = "train_state.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast_str(value: str | None) -> str | None:
    """Rank 0's value on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def config_hash(resolved_config: dict) -> str:
    """Short stable hash of a resolved job config."""
    return hashlib.sha256(json.dumps(resolved_config, sort_keys=True).encode()).hexdigest()[:16]


def is_committed(path: str) -> bool:
    """True when the directory holds a complete checkpoint."""
    return os.path.isfile(os.path.join(path, METADATA))


def read_metadata(path: str) -> dict:
    """The metadata of a committed checkpoint; UserError when the directory is not one."""
    if not is_committed(path):
        raise UserError(
            f"{path}: not a committed checkpoint (no {METADATA}); point checkpoint.resume at a step_* directory "
            "that has one, or use checkpoint.resume=auto"
        )
    with open(os.path.join(path, METADATA), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(f"{path}/{METADATA}: checkpoint format {meta.get('format')} is not {FORMAT_VERSION}")
    return meta


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


def clean_partial(ckpt_root: str) -> list[str]:
    """Delete leftovers of killed saves (temporary dirs, step dirs without metadata); return what went."""
    removed = []
    if not os.path.isdir(ckpt_root):
        return removed
    for name in sorted(os.listdir(ckpt_root)):
        path = os.path.join(ckpt_root, name)
        if ".tmp-" in name or (_STEP_DIR.match(name) and not is_committed(path)):
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            removed.append(path)
    for path in removed:
        log.warning("checkpoint: removed the leftover of an interrupted save: %s", path)
    return removed


def save(
    ckpt_root: str,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    train_state: dict,
    metadata: dict,
    keep_last: int,
) -> str:
    """Save a sharded checkpoint of step `step` under ckpt_root on every rank, commit it, apply retention."""
    final = os.path.join(ckpt_root, f"step_{step:08d}")
    write(final, model, optimizer, train_state, dict(metadata, step=step))
    if not dist.is_initialized() or dist.get_rank() == 0:
        _apply_retention(ckpt_root, keep_last, protect=final)
    _barrier()
    return final


def write(
    final: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    train_state: dict,
    metadata: dict,
) -> None:
    """Write a checkpoint to a temporary sibling of `final`, rename it into place, then write metadata.json."""
    parent = os.path.dirname(os.path.abspath(final))
    tmp = _broadcast_str(f"{os.path.abspath(final)}.tmp-{uuid.uuid4().hex[:8]}")
    started = time.monotonic()
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    else:
        state = {"model": get_model_state_dict(model)}
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        os.makedirs(tmp, exist_ok=True)
    _barrier()
    with warnings.catch_warnings():
        # DCP warns that it "assumes a single process" when there is no process group: that is the intent.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=tmp)
    _barrier()
    if rank0:
        with open(os.path.join(tmp, TRAIN_STATE), "w", encoding="utf-8") as f:
            json.dump(train_state, f, sort_keys=True)
        replace_dir(tmp, final)  # over an uncommitted leftover of the same step, if any
        _fsync_dir(parent)
        meta = dict(metadata, format=FORMAT_VERSION, time=time.time(), contents=sorted(state),
                    save_seconds=round(time.monotonic() - started, 3))
        _write_json_atomic(os.path.join(final, METADATA), meta)
    _barrier()
    log.info("checkpoint: saved %s in %.1f s", final, time.monotonic() - started)


def _apply_retention(ckpt_root: str, keep_last: int, protect: str) -> None:
    committed = committed_checkpoints(ckpt_root)
    for path in committed[:-keep_last]:
        if path != protect:
            # Un-commit first, so a crash halfway through the delete leaves a leftover, not a broken checkpoint.
            os.remove(os.path.join(path, METADATA))
            shutil.rmtree(path, ignore_errors=True)


def _dcp_load(state: dict, path: str) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path)


def load(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load a committed checkpoint into model (and optimizer, when the checkpoint has one); return train state."""
    meta = read_metadata(path)
    if "optim" in meta["contents"] and optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        _dcp_load(state, path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        state = {"model": get_model_state_dict(model)}
        _dcp_load(state, path)
        set_model_state_dict(model, state["model"])
    train_state_path = os.path.join(path, TRAIN_STATE)
    train_state = {}
    if os.path.isfile(train_state_path):
        with open(train_state_path, encoding="utf-8") as f:
            train_state = json.load(f)
    log.info("checkpoint: loaded %s (step %s)", path, meta.get("step"))
    return train_state


def full_model_state(path: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) model weights of a checkpoint, read in one process into `model` (built on CPU)."""
    load(path, model, optimizer=None)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
