"""Checkpoints: atomic commit, cleanup of interrupted saves, retention, verification, async saves, exact restore."""

import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch

from qwen2_dist.errors import UserError
from qwen2_dist.model.args import get_model_args
from qwen2_dist.model.qwen2 import build_model
from qwen2_dist.train import checkpoint
from tests.helpers import record_fsyncs


def _model_and_optimizer(seed: int):
    model = build_model(get_model_args("tiny"), "cpu")
    model.init_weights(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(torch.arange(8).view(1, 8)).float().logsumexp(-1).mean()
    loss.backward()
    optimizer.step()
    return model, optimizer


def _names(paths):
    return [os.path.basename(p) for p in paths]


def test_save_commit_retention_and_restore(tmp_path):
    root = str(tmp_path / "checkpoints")
    model, optimizer = _model_and_optimizer(0)
    saver = checkpoint.Checkpointer(root, keep_last=2)
    for step in (1, 2, 3):
        saver.save(step, model, optimizer, {"step": step}, {"model": "tiny"})
    assert _names(checkpoint.committed_checkpoints(root)) == ["step_00000002", "step_00000003"]
    meta = checkpoint.verify(os.path.join(root, "step_00000003"))
    assert meta["step"] == 3 and meta["contents"] == ["model", "optim"]
    assert "rng/rank0.pt" in meta["files"]

    other, other_opt = _model_and_optimizer(1)
    torch.manual_seed(1234)
    state = checkpoint.load(os.path.join(root, "step_00000003"), other, other_opt)
    assert state == {"step": 3}
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(optimizer.state.values(), other_opt.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    # The RNG state of the save is restored, not the one set just before the load.
    rng = torch.load(os.path.join(root, "step_00000003", "rng", "rank0.pt"), weights_only=True)
    checkpoint.load(os.path.join(root, "step_00000003"), other, other_opt)
    assert torch.equal(torch.get_rng_state(), rng["cpu"])


def test_milestones_survive_retention(tmp_path):
    root = str(tmp_path / "checkpoints")
    model, optimizer = _model_and_optimizer(0)
    saver = checkpoint.Checkpointer(root, keep_last=1, keep_every=4)
    for step in range(1, 10):
        saver.save(step, model, None, {"step": step}, {})
    assert _names(checkpoint.committed_checkpoints(root)) == ["step_00000004", "step_00000008", "step_00000009"]


def test_a_checkpoint_retention_cannot_delete_stays_and_the_new_one_is_committed(tmp_path, monkeypatch, caplog):
    root = str(tmp_path / "checkpoints")
    model, optimizer = _model_and_optimizer(0)
    saver = checkpoint.Checkpointer(root, keep_last=1)
    saver.save(1, model, None, {"step": 1}, {})
    remove = os.remove

    def protected(path):  # step 1 made read-only by its owner (as root, chmod would not stop us)
        if "step_00000001" in path:
            raise PermissionError(13, "Permission denied", path)
        remove(path)

    monkeypatch.setattr(os, "remove", protected)
    for step in (2, 3):
        assert saver.save(step, model, None, {"step": step}, {})
    assert _names(checkpoint.committed_checkpoints(root)) == ["step_00000001", "step_00000003"]
    assert "retention could not delete" in caplog.text and saver.failed_saves == 0


def test_a_checkpoint_retention_cannot_even_stat_stays_and_the_save_stands(tmp_path, monkeypatch, caplog):
    """Retention runs on rank 0 alone, after the commit: an entry the filesystem cannot stat (a stale NFS handle)
    stopped that rank with the save committed, and the other ranks waited for it in their next collective."""
    root = str(tmp_path / "checkpoints")
    model, _ = _model_and_optimizer(0)
    saver = checkpoint.Checkpointer(root, keep_last=1)
    saver.save(1, model, None, {"step": 1}, {})
    stat = os.stat

    def stale(path, *args, **kwargs):
        if "step_00000001" in str(path):
            raise OSError(116, "Stale file handle", path)
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stale)
    assert saver.save(2, model, None, {"step": 2}, {})
    monkeypatch.undo()
    assert _names(checkpoint.committed_checkpoints(root)) == ["step_00000001", "step_00000002"]
    assert "could not list" in caplog.text and "Stale file handle" in caplog.text and saver.failed_saves == 0


def test_retention_and_cleanup_remove_a_link_never_what_it_points_to(tmp_path):
    """Another run's checkpoint linked into this run's checkpoints/ (to start from it): retention un-committed it
    through the link (its metadata.json deleted in the other run), and that run's next start removed it as an
    interrupted save. Now the link goes, and the other run's checkpoint stays whole; the same for a link to an
    uncommitted directory at cleanup."""
    other, root = tmp_path / "other" / "checkpoints", tmp_path / "run" / "checkpoints"
    model, _ = _model_and_optimizer(0)
    checkpoint.Checkpointer(str(other), keep_last=2).save(4, model, None, {"step": 4}, {})
    (other / "step_00000009").mkdir()
    (other / "step_00000009" / "keep").write_text("not a checkpoint, not this run's to delete")
    root.mkdir(parents=True)
    os.symlink(other / "step_00000004", root / "step_00000004")
    os.symlink(other / "step_00000009", root / "step_00000009")
    assert _names(checkpoint.clean_partial(str(root))) == ["step_00000009"]
    assert not os.path.lexists(root / "step_00000009") and (other / "step_00000009" / "keep").exists()
    checkpoint.Checkpointer(str(root), keep_last=1).save(6, model, None, {"step": 6}, {})
    checkpoint.wait_for_deletes()
    assert sorted(os.listdir(root)) == ["step_00000006"]
    assert _names(checkpoint.committed_checkpoints(str(other))) == ["step_00000004"]
    assert checkpoint.clean_partial(str(other)) == [str(other / "step_00000009")]  # its own leftover, not ours
    assert _names(checkpoint.committed_checkpoints(str(other))) == ["step_00000004"]


def test_a_filesystem_error_while_preparing_the_resume_is_a_storage_error(tmp_path, monkeypatch):
    """A full disk while a rollback records itself: one clear error on every rank (StorageUnreadable: torchrun's
    restarts try again), not an OSError traceback on rank 0 while the other ranks wait for its broadcast; the
    same command, started again, finishes the rollback."""
    from qwen2_dist import fsutil
    from qwen2_dist.errors import StorageUnreadable

    root = str(tmp_path / "checkpoints")
    _run_with_checkpoints(root)
    step_8 = os.path.join(root, "step_00000008")
    write_atomic = fsutil.write_atomic

    def full(path, *args, **kwargs):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(checkpoint, "write_atomic", full)
    with pytest.raises(StorageUnreadable, match=r"preparing the resume failed \(\[Errno 28\] No space left on device"
                                                r".*no committed checkpoint was deleted\. Fix the filesystem"):
        checkpoint.prepare_resume(root, step_8, checksums=False)
    monkeypatch.setattr(checkpoint, "write_atomic", write_atomic)
    assert _names(checkpoint.prepare_resume(root, step_8, checksums=False)) == ["step_00000008", "step_00000004"]


def _run_with_checkpoints(root: str, steps=(4, 8, 12)):
    """A run's checkpoints/ with committed checkpoints of these steps; (model, its Checkpointer)."""
    model, _ = _model_and_optimizer(0)
    saver = checkpoint.Checkpointer(root, keep_last=3)
    for step in steps:
        saver.save(step, model, None, {"step": step}, {})
    return model, saver


def test_resume_from_a_checkpoint_of_the_run_rolls_it_back_once(tmp_path):
    root = str(tmp_path / "checkpoints")
    model, saver = _run_with_checkpoints(root)
    step_8 = os.path.join(root, "step_00000008")
    moved = checkpoint.roll_back(root, step_8)
    assert [os.path.basename(os.path.dirname(p)).startswith("abandoned-") for p in moved] == [True]
    assert _names(checkpoint.committed_checkpoints(root)) == ["step_00000004", "step_00000008"]
    assert checkpoint.is_committed(moved[0]) and checkpoint.rollback_done(root, step_8)
    assert checkpoint.resume_candidates(root, step_8)[0] == step_8
    # The rolled-back run writes step 10, and a restart of the same command goes on from it: nothing moves again.
    saver.save(10, model, None, {"step": 10}, {})
    assert checkpoint.roll_back(root, step_8) == []
    assert _names(checkpoint.resume_candidates(root, step_8)) == ["step_00000010", "step_00000008", "step_00000004"]
    note = checkpoint.resume_note(root, step_8, checkpoint.resume_candidates(root, step_8))
    assert "the run was rolled back to it before" in note and "delete that file" in note
    assert checkpoint.resume_note(root, step_8, [step_8]) is None
    # The rollback itself, with PATH spelled otherwise than the run's listing: it resumes PATH, and says nothing.
    assert checkpoint.resume_note(root, os.path.relpath(step_8), [step_8]) is None
    elsewhere = str(tmp_path / "converted")
    assert "started this run" in checkpoint.resume_note(root, elsewhere, checkpoint.resume_candidates(root, elsewhere))
    # Retention may delete step 8 later; the job that names it is still the rolled-back run (config.validate).
    keep_one = checkpoint.Checkpointer(root, keep_last=1)
    keep_one.save(11, model, None, {"step": 11}, {})
    checkpoint.wait_for_deletes()  # un-committed at once, its files deleted in the background
    assert not os.path.exists(step_8) and _names(checkpoint.resume_candidates(root, step_8)) == ["step_00000011"]
    # A rollback to another checkpoint moves what the rolled-back run wrote after it.
    for step in (12, 13):
        saver.save(step, model, None, {"step": step}, {})
    step_11 = os.path.join(root, "step_00000011")
    assert not checkpoint.rollback_done(root, step_11)
    assert _names(checkpoint.roll_back(root, step_11)) == ["step_00000012", "step_00000013"]
    assert checkpoint.rollback_done(root, step_11) and not checkpoint.rollback_done(root, step_8)
    assert _names(checkpoint.resume_candidates(root, step_11)) == ["step_00000011"]
    # A record that cannot be read is not "not rolled back yet": that would move aside what the run wrote since.
    from qwen2_dist.errors import CheckpointNotLoadable

    with open(os.path.join(root, checkpoint.ROLLBACK), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointNotLoadable, match="rollback.json: cannot be read.*delete the file"):
        checkpoint.rollback_pending(root, step_11)


def test_a_rollback_to_a_damaged_checkpoint_moves_nothing_and_a_symlinked_spelling_is_the_run(tmp_path):
    root = str(tmp_path / "checkpoints")
    _run_with_checkpoints(root)
    step_8 = os.path.join(root, "step_00000008")
    shard = next(f for f in sorted(os.listdir(step_8)) if f.endswith(".distcp"))
    _flip_byte(os.path.join(step_8, shard), os.path.getsize(os.path.join(step_8, shard)) // 2)
    with pytest.raises(UserError, match=r"checkpoint.resume=.*step_00000008: not rolling the run back to it, nothing "
                                        r"was moved: .*checksum"):
        checkpoint.check_rollback_target(root, step_8)
    assert _names(checkpoint.committed_checkpoints(root)) == ["step_00000004", "step_00000008", "step_00000012"]
    # The same run under another spelling of its path (a symlink to the run directory) is rolled back all the same.
    os.symlink(tmp_path, tmp_path / "link")
    step_4 = str(tmp_path / "link" / "checkpoints" / "step_00000004")
    checkpoint.check_rollback_target(root, step_4)
    assert _names(checkpoint.roll_back(root, step_4)) == ["step_00000008", "step_00000012"]
    assert checkpoint.rollback_done(root, step_4)


def test_resume_none_starts_the_run_afresh_once_and_restarts_go_on_from_the_new_start(tmp_path):
    """checkpoint.resume=none in a run_dir with checkpoints moves them aside (the new start's step 4 does not sit
    beside the old run's step 8 as 'latest'); a restart of the same command (torchrun, a requeue) goes on from the
    new start's checkpoints instead of starting over again. The same on a run_dir with nothing in it yet."""
    for root, old_steps in ((str(tmp_path / "used" / "checkpoints"), (4, 8)), (str(tmp_path / "new" / "ckpts"), ())):
        model, _ = _run_with_checkpoints(root, old_steps)
        assert checkpoint.resume_candidates(root, "none") == []
        assert _names(checkpoint.roll_back(root, "none")) == ["step_00000004", "step_00000008"][:len(old_steps)]
        assert checkpoint.committed_checkpoints(root) == [] and checkpoint.rollback_done(root, "none")
        checkpoint.Checkpointer(root, keep_last=3).save(2, model, None, {"step": 2}, {})
        assert checkpoint.roll_back(root, "none") == []
        assert _names(checkpoint.resume_candidates(root, "none")) == ["step_00000002"]


def test_resume_from_elsewhere_starts_the_run_and_restarts_resume_its_own(tmp_path):
    model, _ = _model_and_optimizer(0)
    converted = str(tmp_path / "from_hf" / "step_00000000")
    checkpoint.write(converted, model, None, {"step": 0}, {})
    root = str(tmp_path / "run" / "checkpoints")
    assert checkpoint.roll_back(root, converted) == [] and not checkpoint.rollback_done(root, converted)
    assert checkpoint.resume_candidates(root, converted) == [converted]
    checkpoint.Checkpointer(root, keep_last=2).save(2, model, None, {"step": 2}, {})
    assert _names(checkpoint.resume_candidates(root, converted)) == ["step_00000002"]
    assert checkpoint.is_committed(converted)


def test_async_save_commits_the_state_as_it_was_at_save_time(tmp_path):
    root = str(tmp_path / "checkpoints")
    model, optimizer = _model_and_optimizer(0)
    saved = model.embed_tokens.weight.detach().clone()
    saver = checkpoint.Checkpointer(root, keep_last=2, async_save=True)
    saver.save(1, model, optimizer, {"step": 1}, {})
    assert saver.pending_done() is not None
    with torch.no_grad():
        model.embed_tokens.weight.add_(1.0)  # training goes on while the shards are written
    saver.wait()
    assert saver.pending_done() is None
    other, _ = _model_and_optimizer(1)
    checkpoint.load(os.path.join(root, "step_00000001"), other, None)
    assert torch.equal(other.embed_tokens.weight, saved)


def test_interrupted_saves_never_count_and_are_cleaned(tmp_path):
    root = tmp_path / "checkpoints"
    model, optimizer = _model_and_optimizer(0)
    checkpoint.Checkpointer(str(root), keep_last=2).save(5, model, optimizer, {"step": 5}, {})
    # A save killed before the rename, and one killed after the rename but before metadata.json.
    (root / "step_00000010.tmp-deadbeef").mkdir()
    (root / "step_00000010.tmp-deadbeef" / "__0_0.distcp").write_bytes(b"partial")
    (root / "step_00000015").mkdir()
    # Names with .tmp- or .old- in them that no save or atomic write of ours makes: a user's, left alone.
    (root / "step_00000005.old-lr3e-4").mkdir()
    (root / "notes.tmp-keep").write_text("mine")
    assert _names(checkpoint.committed_checkpoints(str(root))) == ["step_00000005"]
    removed = checkpoint.clean_partial(str(root))
    assert sorted(_names(removed)) == ["step_00000010.tmp-deadbeef", "step_00000015"]
    assert sorted(os.listdir(root)) == ["notes.tmp-keep", "step_00000005", "step_00000005.old-lr3e-4"]
    with pytest.raises(UserError, match="not a committed checkpoint"):
        checkpoint.read_metadata(str(root / "step_00000015"))
    # Also read outside training (qwen2-convert): the message names no setting, and the newest committed step when
    # the path holds one.
    with pytest.raises(UserError, match=rf"^{re.escape(str(root))}: not a committed checkpoint \(no metadata.json\); "
                                        rf"the newest committed one under it is {re.escape(str(root))}/step_00000005; "
                                        "give a step_"):
        checkpoint.read_metadata(str(root))


def test_damage_is_detected_before_loading(tmp_path):
    root = tmp_path / "checkpoints"
    model, optimizer = _model_and_optimizer(0)
    path = checkpoint.Checkpointer(str(root), keep_last=2).save(1, model, optimizer, {"step": 1}, {})
    shard = next(name for name in os.listdir(path) if name.endswith(".distcp"))
    with open(os.path.join(path, shard), "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match=f"{shard}: 100 bytes"):
        checkpoint.load(path, model, optimizer)
    os.remove(os.path.join(path, shard))
    with pytest.raises(UserError, match=f"{shard}: missing"):
        checkpoint.load(path, model, optimizer)


def test_a_checkpoint_that_cannot_be_read_now_is_not_called_damaged(tmp_path, monkeypatch):
    """An I/O error (or a file this node cannot read yet) and a newer format say the checkpoint may be intact:
    CheckpointNotLoadable, which resume=auto stops on rather than falling back past it and setting it aside;
    damage (sizes, checksums) stays a plain UserError."""
    from qwen2_dist.errors import CheckpointNotLoadable, StorageUnreadable

    model, optimizer = _model_and_optimizer(0)
    path = checkpoint.Checkpointer(str(tmp_path), keep_last=2).save(1, model, optimizer, {"step": 1}, {})
    checkpoint._checked.clear()

    def unreadable(name):
        raise OSError(5, "Input/output error", name)

    monkeypatch.setattr(checkpoint, "file_checksum", unreadable)
    with pytest.raises(StorageUnreadable, match="cannot be read on rank 0.*Input/output error.*nor set aside"):
        checkpoint.verify(path)
    monkeypatch.undo()
    real_stat = os.stat

    def stale(name, *args, **kwargs):  # a file handle the NFS server no longer knows
        if str(name).endswith(".distcp"):
            raise OSError(116, "Stale file handle", name)
        return real_stat(name, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stale)
    with pytest.raises(StorageUnreadable, match="Stale file handle"):
        checkpoint.verify(path)
    monkeypatch.undo()
    # The same for the commit record itself: os.path.isfile read a stale handle as "no metadata.json", and the
    # start's clean-up deleted the committed checkpoint as a killed save's leftover.
    monkeypatch.setattr(os, "stat", lambda name, *a, **k: stale(f"{name}.distcp") if str(name).endswith(
        checkpoint.METADATA) else real_stat(name, *a, **k))
    assert checkpoint.clean_partial(str(tmp_path)) == [] and os.path.isdir(path)
    with pytest.raises(CheckpointNotLoadable, match=rf"{re.escape(path)}: cannot tell whether it is a committed "
                                                    r"checkpoint \(\[Errno 116\] Stale file handle"):
        checkpoint.resume_candidates(str(tmp_path), "auto")
    monkeypatch.undo()
    assert checkpoint.resume_candidates(str(tmp_path), "auto") == [path]
    # An I/O error while DCP reads the shards (checked by size only, checkpoint.checksums=false): not damage either.
    from torch.distributed.checkpoint import CheckpointException

    for failure in (OSError(5, "Input/output error"), CheckpointException("ranks: [1]", {
            1: (OSError(116, "Stale file handle"), None)})):
        def failing_load(*args, failure=failure, **kwargs):
            raise failure
        monkeypatch.setattr(checkpoint.dcp, "load", failing_load)
        with pytest.raises(CheckpointNotLoadable, match=r"cannot be read \((rank 1: )?OSError: .*it may be intact"):
            checkpoint.load(path, model, optimizer, checksums=False)
        monkeypatch.undo()
    # The verdict of all ranks: a file some ranks do not find while others do is not visible everywhere yet (not
    # damage); one no rank finds is missing (damage); a problem that may not be damage comes first.
    missing = ("missing", 1, ("f: missing from checkpoint c", "f: missing; the checkpoint is damaged"))
    with pytest.raises(CheckpointNotLoadable, match=r"f: missing from checkpoint c on rank\(s\) 1 only, while the "
                                                    r"others find it, so it is not loaded, nor set aside"):
        checkpoint._raise_agreed([missing], 2)
    with pytest.raises(UserError, match="the checkpoint is damaged") as everywhere:
        checkpoint._raise_agreed([("missing", 0, missing[2]), missing], 2)
    assert not isinstance(everywhere.value, CheckpointNotLoadable)
    with pytest.raises(CheckpointNotLoadable, match="^y$"):
        checkpoint._raise_agreed([("damaged", 0, "x"), ("not loadable", 1, "y")], 2)
    checkpoint._raise_agreed([], 2)
    meta = json.loads(open(os.path.join(path, checkpoint.METADATA)).read())
    with open(os.path.join(path, checkpoint.METADATA), "w") as f:
        json.dump({**meta, "format": 99}, f)
    with pytest.raises(CheckpointNotLoadable, match="format 99 is not one this version reads"):
        checkpoint.verify(path)
    with open(os.path.join(path, checkpoint.METADATA), "w") as f:
        json.dump(meta, f)
    shard = next(name for name in os.listdir(path) if name.endswith(".distcp"))
    with open(os.path.join(path, shard), "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError) as damaged:
        checkpoint.verify(path)
    assert not isinstance(damaged.value, CheckpointNotLoadable)


def test_every_file_of_a_checkpoint_is_on_disk_before_its_commit(tmp_path, monkeypatch):
    """fsync of each file the metadata will name (DCP's shards, the train state, the RNG states) before metadata.json
    is written: after a crash, a committed checkpoint has no empty file."""
    synced = record_fsyncs(monkeypatch)
    model, optimizer = _model_and_optimizer(0)
    path = checkpoint.Checkpointer(str(tmp_path), keep_last=2).save(1, model, optimizer, {"step": 1}, {})
    committed = next(i for i, name in enumerate(synced) if name.startswith(checkpoint.METADATA))
    meta = json.loads(open(os.path.join(path, checkpoint.METADATA)).read())
    files = {os.path.basename(name) for name in meta["files"]}
    # (DCP writes .metadata as .metadata.tmp, synced, then renamed.)
    assert files <= {name.removesuffix(".tmp") for name in synced[:committed]}, (files, synced)


def _flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


def test_a_file_damaged_at_its_full_size_is_a_clear_error(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    path = checkpoint.Checkpointer(str(tmp_path), keep_last=2).save(1, model, optimizer, {"step": 1}, {})
    meta = checkpoint.verify(path)
    assert sorted(meta["checksums"]) == sorted(meta["files"])  # every file: shards, index, rng, train state
    for name, crc in meta["checksums"].items():
        assert crc == checkpoint.file_checksum(os.path.join(path, name))

    # One changed byte in the middle of the shard file (tensor data): refused, naming the file, before any load.
    shard = max((name for name in meta["files"] if name.endswith(".distcp")),
                key=lambda name: meta["files"][name])
    _flip_byte(os.path.join(path, shard), meta["files"][shard] // 2)
    other, other_opt = _model_and_optimizer(1)
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(UserError, match=rf"{shard}: checksum crc32:\w+, the commit recorded crc32:\w+ .*damaged"):
        checkpoint.load(path, other, other_opt)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))  # nothing was loaded
    # Without checksums (checkpoint.checksums=false, or a checkpoint that has none) the same file loads, wrong.
    checkpoint.load(path, other, other_opt, checksums=False)
    def tensors(m, opt):
        return [*m.state_dict().values(), *(t for st in opt.state.values() for t in st.values() if t.dim())]
    differ = [i for i, (a, b) in enumerate(zip(tensors(model, optimizer), tensors(other, other_opt)))
              if not torch.equal(a, b)]
    assert len(differ) == 1, differ

    # DCP's index zeroed at its full size: caught by its checksum; without checksums, DCP's failure is one clear error.
    _flip_byte(os.path.join(path, shard), meta["files"][shard] // 2)
    with open(os.path.join(path, ".metadata"), "r+b") as f:
        f.write(b"\0" * meta["files"][".metadata"])
    with pytest.raises(UserError, match=r"\.metadata: checksum"):
        checkpoint.load(path, model, optimizer)
    with pytest.raises(UserError, match=r"cannot be loaded \(rank 0: \w+Error: .*damaged"):
        checkpoint.load(path, model, optimizer, checksums=False)


def test_checksum_work_is_split_by_bytes_and_every_file_needs_a_checksum(tmp_path, caplog):
    sizes = {"a": 100, "b": 60, "c": 50, "d": 10, "e": 0}
    shares = [checkpoint._share(sizes, sizes, rank, 2) for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(sizes)  # every file once
    assert shares == [["a", "d", "e"], ["b", "c"]]  # 110 bytes each (every other name: 150 and 70)

    model, optimizer = _model_and_optimizer(0)
    path = checkpoint.Checkpointer(str(tmp_path), keep_last=2).save(1, model, optimizer, {"step": 1}, {})
    meta_path = os.path.join(path, checkpoint.METADATA)
    with open(meta_path) as f:
        meta = json.load(f)
    del meta["checksums"]["train_state.json"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(UserError, match=r"train_state.json: no checksum recorded for it"):
        checkpoint.verify(path)
    del meta["checksums"]  # as saved with checkpoint.checksums=false: sizes only, and the user is told
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    checkpoint.verify(path)
    assert "recorded no checksums" in caplog.text


def test_model_only_checkpoint_loads_without_optimizer_state(tmp_path):
    model, _ = _model_and_optimizer(0)
    path = str(tmp_path / "weights")
    checkpoint.write(path, model, None, {"step": 0}, {"model": "tiny"})
    with open(os.path.join(path, checkpoint.METADATA)) as f:
        assert json.load(f)["contents"] == ["model"]
    other, other_opt = _model_and_optimizer(1)
    checkpoint.load(path, other, other_opt)
    assert torch.equal(model.embed_tokens.weight, other.embed_tokens.weight)
    shapes = {"norm.weight": model.norm.weight.shape}
    assert torch.equal(checkpoint.read_tensors(path, shapes)["norm.weight"], model.norm.weight)


def test_a_model_about_to_be_loaded_draws_no_init_and_no_placeholder_survives(tmp_path, monkeypatch):
    from qwen2_dist.cli.train import build_model_and_optimizer, compose_job
    from qwen2_dist.parallel.mesh import init_distributed

    job = compose_job(["model=tiny", f"run_dir={tmp_path / 'run'}", "train.device=cpu"])
    world = init_distributed("cpu")
    drawn = []
    monkeypatch.setattr("qwen2_dist.model.qwen2.Qwen2.init_weights", lambda self, seed=0: drawn.append(seed))
    model, optimizer = build_model_and_optimizer(job, world, None, "cpu", restoring=True)
    assert drawn == [] and all(torch.isnan(p).all() for p in model.parameters())
    build_model_and_optimizer(job, world, None, "cpu")
    assert drawn == [job.seed]  # a new run draws its init

    source, _ = _model_and_optimizer(0)
    path = str(tmp_path / "ckpt")
    checkpoint.write(path, source, None, {"step": 0}, {"model": "tiny"})
    checkpoint.load(path, model, optimizer)
    for (name, loaded), expected in zip(model.named_parameters(), source.parameters()):
        assert torch.equal(loaded, expected), name
    # A load that cannot fill every parameter is refused, so no NaN placeholder is ever trained: a tied model's
    # checkpoint has no separate head for an untied model.
    untied = build_model(get_model_args("tiny", tie_word_embeddings=False), "cpu")
    untied.init_placeholders()
    with pytest.raises(UserError, match="cannot be loaded"):
        checkpoint.load(path, untied, None)


def test_a_checkpoint_written_by_a_bare_name_lands_in_the_working_directory(tmp_path, monkeypatch):
    model, _ = _model_and_optimizer(0)
    monkeypatch.chdir(tmp_path)
    checkpoint.write("converted", model, None, {"step": 0}, {})  # as `qwen2-convert from-hf HF_DIR converted`
    assert checkpoint.is_committed(str(tmp_path / "converted"))


def test_from_hf_refuses_an_output_that_is_a_file_before_reading_anything(tmp_path):
    from qwen2_dist.cli.convert import from_hf

    (tmp_path / "out").write_text("")
    with pytest.raises(UserError, match="exists and is not an empty directory"):
        from_hf(str(tmp_path / "no_such_hf_dir"), str(tmp_path / "out"))


def test_to_hf_refuses_an_output_or_shard_size_it_cannot_write_before_reading_anything(tmp_path):
    """Before the checkpoint is read for its checksums (all of it, optimizer state included): an output path under a
    file, and a shard size that is no finite number of bytes, failed with a traceback only after that read."""
    from qwen2_dist.cli.convert import to_hf

    (tmp_path / "notes.txt").write_text("")
    missing = str(tmp_path / "no_such_checkpoint")  # read first, it would fail otherwise
    with pytest.raises(UserError, match=r"lies under the file .*notes\.txt; choose another output path"):
        to_hf(missing, str(tmp_path / "notes.txt" / "hf"))
    for size in (float("inf"), 1e-12, float("nan"), 0):
        with pytest.raises(UserError, match=r"the largest safetensors file must be a positive, finite size"):
            to_hf(missing, str(tmp_path / "hf"), max_shard_gib=size)


def test_a_checkpoint_to_start_from_of_another_model_is_refused_before_launch(tmp_path):
    """model.init_from_checkpoint of another model size: refused by check_saved (the launchers' check, and rank 0
    before the model is built), not only by every worker after the launch."""
    from qwen2_dist.cli.train import compose_job
    from qwen2_dist.config import check_saved

    model, _ = _model_and_optimizer(0)
    source = tmp_path / "source" / "step_00000002"
    checkpoint.write(str(source), model, None, {"step": 2}, {"model": "tiny",
                                                           "model_args": get_model_args("tiny").to_dict()})
    overrides = [f"run_dir={tmp_path / 'run'}", f"model.init_from_checkpoint={source}", "data.synthetic=true"]
    assert check_saved(compose_job(["model=tiny", *overrides])) == []
    with pytest.raises(UserError, match=r"model\.init_from_checkpoint=.*\(checkpoint vs job: hidden_size "):
        check_saved(compose_job(["model=debug", *overrides]))


def test_verify_checks_every_checkpoint_of_a_run_and_names_the_damaged_one(tmp_path, capsys):
    from qwen2_dist.cli.convert import main as convert_main

    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    model, optimizer = _model_and_optimizer(0)
    saver = checkpoint.Checkpointer(str(root), keep_last=3)
    for step in (1, 2, 3):
        saver.save(step, model, optimizer, {"step": step}, {"model": "tiny"})
    (root / "step_00000004").mkdir()  # a save killed before its commit
    shard = root / "step_00000002" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    capsys.readouterr()

    assert convert_main(["verify", str(run_dir)]) == 2
    out, err = capsys.readouterr()
    assert [line.split(":")[0] for line in out.splitlines()] == ["not committed", "ok", "ok"]
    assert "step_00000004" in out.splitlines()[0]
    assert [line.split()[1] for line in out.splitlines()[1:]] == [f"{root}/step_00000001:", f"{root}/step_00000003:"]
    assert err.startswith("damaged: ") and "step_00000002" in err and "__0_0.distcp: checksum crc32:" in err

    assert convert_main(["verify", str(root / "step_00000003"), str(root / "step_00000001")]) == 0
    assert convert_main(["verify", str(tmp_path)]) == 2  # neither a checkpoint nor a run
    assert "holds no committed checkpoint" in capsys.readouterr().err


def test_a_failed_write_is_skipped_and_harms_nothing(tmp_path, monkeypatch):
    root = str(tmp_path / "checkpoints")
    model, optimizer = _model_and_optimizer(0)
    saver = checkpoint.Checkpointer(root, keep_last=1)
    assert saver.save(1, model, optimizer, {"step": 1}, {}) is not None
    monkeypatch.setenv(checkpoint.FAIL_ENV, "2")
    assert saver.save(2, model, optimizer, {"step": 2}, {}) is None
    assert saver.failed_saves == 1
    assert os.listdir(root) == ["step_00000001"]
    checkpoint.verify(os.path.join(root, "step_00000001"))
    monkeypatch.delenv(checkpoint.FAIL_ENV)
    assert saver.save(3, model, optimizer, {"step": 3}, {}) is not None
    assert _names(checkpoint.committed_checkpoints(root)) == ["step_00000003"]


@pytest.mark.parametrize("async_save", [False, True], ids=["blocking", "async"])
def test_a_save_failing_after_its_shards_are_written_never_commits(tmp_path, monkeypatch, async_save):
    root = tmp_path / "checkpoints"
    model, optimizer = _model_and_optimizer(0)
    saver = checkpoint.Checkpointer(str(root), keep_last=3, async_save=async_save)
    assert saver.save(1, model, optimizer, {"step": 1}, {}) is not None
    saver.wait()
    written = []
    real_write = checkpoint.FileSystemWriter.write_data

    def write_and_record(self, plan, planner):
        future = real_write(self, plan, planner)
        future.wait()
        written.extend(p.name for p in root.glob("*.tmp-*/*.distcp"))
        return future

    monkeypatch.setattr(checkpoint.FileSystemWriter, "write_data", write_and_record)
    monkeypatch.setenv(checkpoint.FAIL_ENV, "2:0:write")
    if async_save:
        assert saver.save(2, model, optimizer, {"step": 2}, {}) is not None  # staged; the failure comes later
        assert saver.wait() is False
    else:
        assert saver.save(2, model, optimizer, {"step": 2}, {}) is None
    assert written, "the injected failure must come after shard files exist"
    assert saver.failed_saves == 1
    assert sorted(os.listdir(root)) == ["step_00000001"]  # the partial save is gone, step 1 is still the latest
    checkpoint.verify(str(root / "step_00000001"))
    monkeypatch.delenv(checkpoint.FAIL_ENV)
    assert saver.save(3, model, optimizer, {"step": 3}, {}) is not None
    assert saver.wait() is True
    assert _names(checkpoint.committed_checkpoints(str(root))) == ["step_00000001", "step_00000003"]


def test_a_commit_failing_with_an_error_of_any_kind_is_a_skipped_save(tmp_path, monkeypatch, caplog):
    """Not only an OSError: whatever stops rank 0's commit is a skipped save (every rank agrees on it; an error
    escaping there would leave the other ranks waiting in the agreement), and the new directory goes."""
    root = tmp_path / "checkpoints"
    model, optimizer = _model_and_optimizer(0)
    saver = checkpoint.Checkpointer(str(root), keep_last=3)
    assert saver.save(1, model, optimizer, {"step": 1}, {}) is not None

    def broken(tmp, final):
        raise ValueError("not what a rename raises")

    monkeypatch.setattr(checkpoint, "replace_dir", broken)
    assert saver.save(2, model, optimizer, {"step": 2}, {}) is None
    assert "commit of" in caplog.text and "ValueError: not what a rename raises" in caplog.text
    assert saver.failed_saves == 1 and sorted(os.listdir(root)) == ["step_00000001"]


def test_a_commit_failing_after_its_metadata_is_written_leaves_no_committed_directory(tmp_path, monkeypatch):
    """The commit's last fsync fails and the delete of the new directory fails halfway (as on a flaky network
    filesystem): what is left must be an uncommitted leftover, cleaned at the next start, not a checkpoint that
    resume would pick with files missing."""
    root = tmp_path / "checkpoints"
    model, optimizer = _model_and_optimizer(0)
    saver = checkpoint.Checkpointer(str(root), keep_last=3)
    assert saver.save(1, model, optimizer, {"step": 1}, {}) is not None
    real_fsync = checkpoint.fsync_path

    def failing_once_committed(path):
        if os.path.isfile(os.path.join(path, checkpoint.METADATA)) and "step_00000002" in path:
            raise OSError(5, "Input/output error", path)
        real_fsync(path)

    def deletes_one_shard(path, ignore_errors=False):  # a delete that stops after its first file
        os.remove(next(Path(path).glob("*.distcp")))

    monkeypatch.setattr(checkpoint, "fsync_path", failing_once_committed)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", deletes_one_shard)
    assert saver.save(2, model, optimizer, {"step": 2}, {}) is None
    assert os.path.isdir(root / "step_00000002")  # the delete failed ...
    assert _names(checkpoint.committed_checkpoints(str(root))) == ["step_00000001"]  # ... but it is no checkpoint
    monkeypatch.undo()
    assert checkpoint.clean_partial(str(root)) == [str(root / "step_00000002")]


def test_a_resumed_run_keeps_its_init_source_and_refuses_another(tmp_path, caplog):
    """A checkpoint records where its run's weights started; a job naming model.init_from_* for a run that started
    from scratch or from the other kind of source is refused (it would never load them); the same kind at another
    path (weights moved, copied to scratch) resumes with a warning; a job naming none resumes and keeps the run's."""
    from types import SimpleNamespace

    weights = tmp_path / "hf"
    weights.mkdir()
    (tmp_path / "link").symlink_to(weights)
    hf = checkpoint.init_source(SimpleNamespace(init_from_hf=str(tmp_path / "link"), init_from_checkpoint=None))
    none = checkpoint.init_source(SimpleNamespace(init_from_hf=None, init_from_checkpoint=None))
    assert hf == {"init_from_hf": str(weights), "init_from_checkpoint": None}  # by real path
    assert checkpoint.check_init_source("ck", {"init_from": hf}, hf) == hf
    assert checkpoint.check_init_source("ck", {"init_from": hf}, none) == hf  # a plain restart keeps the source
    with pytest.raises(UserError, match=rf"model.init_from_hf={weights}, but the run_dir has checkpoints of a run "
                                        r"that started from a random initialization \(the newest: ck\)"):
        checkpoint.check_init_source("ck", {"init_from": none}, hf)
    other = {"init_from_hf": None, "init_from_checkpoint": "/elsewhere/step_1"}
    with pytest.raises(UserError, match="started from model.init_from_checkpoint=/elsewhere/step_1"):
        checkpoint.check_init_source("ck", {"init_from": other}, hf)
    moved = {"init_from_hf": "/scratch/job7/hf", "init_from_checkpoint": None}
    with caplog.at_level("WARNING"):
        assert checkpoint.check_init_source("ck", {"init_from": moved}, hf) == moved
        assert checkpoint.check_init_source("old", {}, hf) is None  # written before sources were recorded: unknown
        assert checkpoint.check_init_source("old", {"init_from": None}, none) is None
    assert "but the run in this run_dir started from /scratch/job7/hf: resuming it" in caplog.text
    assert "does not record where its run's weights started" in caplog.text


def test_a_check_before_the_launch_reads_only_an_intact_train_state(tmp_path):
    """check_saved reads a checkpoint's data position only when its train_state.json is as committed (a damaged one
    is the job's to report and fall back past), and a train state of the wrong shape is no data change."""
    from qwen2_dist.cli.train import compose_job
    from qwen2_dist.config import _resume_data_problem

    model, optimizer = _model_and_optimizer(0)
    path = checkpoint.Checkpointer(str(tmp_path), keep_last=1).save(1, model, optimizer, {"step": 1, "loader": {
        "samples_seen": 8, "fingerprint": "0123", "order": {"seed": 5}}}, {"model": "tiny"})
    meta = checkpoint.read_metadata(path)
    assert checkpoint.train_state_intact(path, meta)
    assert checkpoint.peek_train_state(path)["loader"]["order"] == {"seed": 5}
    _flip_byte(os.path.join(path, "train_state.json"), 3)
    assert not checkpoint.train_state_intact(path, meta)
    os.remove(os.path.join(path, "train_state.json"))
    assert not checkpoint.train_state_intact(path, meta) and checkpoint.peek_train_state(path) == {}
    job = compose_job([])
    assert _resume_data_problem(job, "loader", []) is None
    assert _resume_data_problem(job, {"order": "seed 5"}, []) is None
    odd = _resume_data_problem(job, {"order": {"sources": 3, "seed": job.seed}}, [])  # named, no traceback
    assert "changed since: shuffle None -> " in odd


def test_the_launch_check_refuses_another_data_order_unless_the_train_state_is_damaged(tmp_path):
    from qwen2_dist.cli.train import compose_job
    from qwen2_dist.config import check_saved

    job = compose_job(["model=tiny", f"run_dir={tmp_path}", "seed=3"])
    order = {"seed": 0, "shuffle": job.data.shuffle, "shuffle_block_size": job.data.shuffle_block_size,
             "split": "train", "seq_len": job.train.seq_len, "sources": [{"path": "corpus", "weight": 1.0}]}
    model, optimizer = _model_and_optimizer(0)
    path = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep_last=1).save(
        1, model, optimizer, {"step": 1, "loader": {"samples_seen": 8, "fingerprint": "0123", "order": order}},
        {"model": "tiny", "model_args": get_model_args("tiny").to_dict()})
    with pytest.raises(UserError, match=rf"checkpoint {re.escape(path)}: .*changed since: seed 0 -> 3\)"):
        check_saved(job)
    state_file = os.path.join(path, "train_state.json")
    _flip_byte(state_file, open(state_file, "rb").read().index(b'"0123"') + 1)  # still JSON, seed still 0
    assert checkpoint.peek_train_state(path)["loader"]["order"]["seed"] == 0
    check_saved(job)  # damaged: the job reports it and falls back past it, the launch check does not call it a change


def test_the_launch_check_refuses_to_resume_another_run_at_or_past_train_steps(tmp_path):
    from qwen2_dist.cli.train import compose_job
    from qwen2_dist.config import check_saved

    model, optimizer = _model_and_optimizer(0)
    meta = {"model": "tiny", "model_args": get_model_args("tiny").to_dict()}
    done = checkpoint.Checkpointer(str(tmp_path / "a" / "checkpoints"), keep_last=1).save(
        8, model, optimizer, {"step": 8}, meta)
    overrides = ["model=tiny", f"checkpoint.resume={done}"]
    for steps in (8, 5):
        with pytest.raises(UserError, match=rf"checkpoint.resume={re.escape(done)} is at step 8, and train.steps="
                                            rf"{steps}: the run would train nothing. To continue that run, raise"):
            check_saved(compose_job([*overrides, f"run_dir={tmp_path / 'b'}", f"train.steps={steps}"]))
    check_saved(compose_job([*overrides, f"run_dir={tmp_path / 'b'}", "train.steps=9"]))
    # Once the run has checkpoints of its own, restarts resume those (a finished run says so and exits 0).
    checkpoint.Checkpointer(str(tmp_path / "b" / "checkpoints"), keep_last=1).save(
        8, model, optimizer, {"step": 8}, meta)
    check_saved(compose_job([*overrides, f"run_dir={tmp_path / 'b'}", "train.steps=8"]))
    # A rollback within the run is not a starting point: unchanged.
    check_saved(compose_job(["model=tiny", f"run_dir={tmp_path / 'a'}", f"checkpoint.resume={done}", "train.steps=8"]))
    # Another model: the fix for another run's checkpoint is another checkpoint.resume, not another run_dir.
    other = ["model=tiny", "model.num_hidden_layers=3", "train.steps=9"]
    with pytest.raises(UserError, match=r"num_hidden_layers 2 vs 3\); set model= to match, or name another "
                                        r"checkpoint.resume"):
        check_saved(compose_job([*other, f"checkpoint.resume={done}", f"run_dir={tmp_path / 'c'}"]))
    with pytest.raises(UserError, match=r"num_hidden_layers 2 vs 3\); set model= to match, or use another run_dir"):
        check_saved(compose_job([*other, f"run_dir={tmp_path / 'a'}"]))


def test_a_rollback_target_is_read_once_for_its_checksums(tmp_path, monkeypatch):
    """verify() checked before a rollback moves anything, and again when the checkpoint is loaded: the second reads
    nothing while the files are as they were, and reads again (finding the damage) once one changed."""
    root = str(tmp_path / "checkpoints")
    _run_with_checkpoints(root)
    step_8 = os.path.join(root, "step_00000008")
    read = []
    real = checkpoint.file_checksum
    monkeypatch.setattr(checkpoint, "file_checksum", lambda path: read.append(path) or real(path))
    checkpoint.check_rollback_target(root, step_8)
    files = len(checkpoint.read_metadata(step_8)["files"])
    assert len(read) == files
    checkpoint.roll_back(root, step_8)
    model, optimizer = _model_and_optimizer(1)
    checkpoint.load(step_8, model, optimizer)
    assert len(read) == files
    shard = next(f for f in sorted(os.listdir(step_8)) if f.endswith(".distcp"))
    _flip_byte(os.path.join(step_8, shard), os.path.getsize(os.path.join(step_8, shard)) // 2)
    with pytest.raises(UserError, match="checksum"):
        checkpoint.verify(step_8)
    assert len(read) > files


@pytest.mark.parametrize("fused", [False, True])
def test_an_optimizer_that_has_not_updated_yet_saves_no_state_and_gains_no_step(tmp_path, fused):
    """A save before the first update (train.stop_at=0, or every step so far skipped on the host): DCP would make the
    optimizer's state by a step at lr 0, counted as step 1; the checkpoint holds the model only, the live optimizer
    stays empty, and once it has updated its state is saved with the steps it took."""
    model = build_model(get_model_args("tiny"), "cpu")
    model.init_weights(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused, foreach=None if fused else True)
    saver = checkpoint.Checkpointer(str(tmp_path), keep_last=2)
    path = saver.save(0, model, optimizer, {"step": 0}, {})
    assert checkpoint.read_metadata(path)["contents"] == ["model"] and not optimizer.state
    model(torch.arange(8).view(1, 8)).float().logsumexp(-1).mean().backward()
    optimizer.step()
    path = saver.save(1, model, optimizer, {"step": 1}, {})
    assert checkpoint.read_metadata(path)["contents"] == ["model", "optim"]
    fresh = build_model(get_model_args("tiny"), "cpu")
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    checkpoint.load(path, fresh, fresh_optimizer)
    assert {float(state["step"]) for state in fresh_optimizer.state.values()} == {1.0}


def test_a_load_failing_on_files_that_match_their_checksums_is_not_called_damaged(tmp_path, monkeypatch):
    """Every file matched the checksum of its commit, so a load that fails anyway (out of memory, an interrupted
    read, state this job's settings do not fit) stops the run (CheckpointNotLoadable): resume=auto fell back past
    the newest checkpoint and renamed it damaged-*, its progress lost. Checked by size only, it may be damage."""
    from qwen2_dist.errors import CheckpointNotLoadable, StorageUnreadable

    model, optimizer = _model_and_optimizer(0)
    path = checkpoint.Checkpointer(str(tmp_path), keep_last=2).save(1, model, optimizer, {"step": 1}, {})

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(checkpoint.dcp, "load", out_of_memory)
    with pytest.raises(CheckpointNotLoadable, match=r"RuntimeError: CUDA out of memory.*match the checksums of its "
                                                    r"commit: the checkpoint is intact") as intact:
        checkpoint.load(path, model, optimizer)
    assert not isinstance(intact.value, StorageUnreadable)  # not an I/O error: a restart would fail the same way
    with pytest.raises(UserError, match="damaged or from another model") as unchecked:
        checkpoint.load(path, model, optimizer, checksums=False)
    assert not isinstance(unchecked.value, CheckpointNotLoadable)


def test_io_errors_are_storage_errors_a_restart_may_get_past_and_a_newer_format_is_not(tmp_path, monkeypatch):
    """StorageUnreadable (not recorded in no_restart.json: torchrun's restarts try again) for what the storage
    could not give now; a format this version does not read stays CheckpointNotLoadable, which a restart repeats."""
    from qwen2_dist.errors import CheckpointNotLoadable, StorageUnreadable

    model, optimizer = _model_and_optimizer(0)
    path = checkpoint.Checkpointer(str(tmp_path), keep_last=2).save(1, model, optimizer, {"step": 1}, {})
    with pytest.raises(StorageUnreadable, match=r"on rank\(s\) 1 only"):
        checkpoint._raise_agreed([("missing", 1, ("f: missing from checkpoint c", "damaged"))], 2)
    with pytest.raises(StorageUnreadable, match="^z$"):
        checkpoint._raise_agreed([("damaged", 0, "x"), ("unreadable", 1, "z")], 2)
    meta = json.loads(open(os.path.join(path, checkpoint.METADATA)).read())
    with open(os.path.join(path, checkpoint.METADATA), "w") as f:
        json.dump({**meta, "format": 99}, f)
    with pytest.raises(CheckpointNotLoadable, match="format 99") as newer:
        checkpoint.verify(path)
    assert not isinstance(newer.value, StorageUnreadable)


def test_a_file_missing_from_rank_0s_listing_is_still_recorded_and_checked(tmp_path, monkeypatch):
    """The commit's file list was rank 0's directory listing alone: a shard another node wrote that a lagging
    listing did not show was recorded nowhere, and never size- or checksum-checked at a load."""
    listing = checkpoint._file_sizes
    monkeypatch.setattr(checkpoint, "_file_sizes", lambda path: {
        name: size for name, size in listing(path).items() if not name.endswith(".distcp")})
    model, _ = _model_and_optimizer(0)
    path = checkpoint.Checkpointer(str(tmp_path), keep_last=1).save(1, model, None, {"step": 1}, {})
    meta = checkpoint.verify(path)
    shards = [name for name in meta["files"] if name.endswith(".distcp")]
    assert shards and set(meta["files"]) == set(meta["checksums"])
    assert meta["files"][shards[0]] == os.path.getsize(os.path.join(path, shards[0]))


def test_a_commit_killed_between_its_two_renames_gets_its_checkpoint_back(tmp_path):
    """replace_dir moves the step's directory aside (.old-*) before it renames the new one in; killed between the
    two, the committed copy aside was the step's only one, and the next start deleted it as a leftover."""
    root = str(tmp_path)
    model, _ = _model_and_optimizer(0)
    path = checkpoint.Checkpointer(root, keep_last=2).save(4, model, None, {"step": 4}, {})
    os.rename(path, f"{path}.old-0123abcd")
    os.makedirs(f"{path}.old-4567cdef")  # an uncommitted one aside is a leftover still
    assert checkpoint.clean_partial(root) == [f"{path}.old-4567cdef"]
    assert checkpoint.committed_checkpoints(root) == [path] and sorted(os.listdir(root)) == ["step_00000004"]


def test_retention_deletes_after_the_commit_is_agreed_and_in_the_background(tmp_path, monkeypatch):
    """Every rank waited in the commit's agreement while rank 0 deleted old checkpoints (minutes on Lustre)."""
    order = []
    agree, retain = checkpoint._all_ok, checkpoint._apply_retention
    monkeypatch.setattr(checkpoint, "_all_ok", lambda ok, exc=None: (order.append("agreed"), agree(ok, exc))[1])
    monkeypatch.setattr(checkpoint, "_apply_retention", lambda *a, **k: (order.append("retention"), retain(*a, **k)))
    # The files of step 1 are deleted only once the test lets them: the save must return before that.
    release, rmtree = threading.Event(), shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda path, *args, **kwargs: (
        os.path.basename(path) != "step_00000001" or release.wait(5), rmtree(path, *args, **kwargs))[1])
    model, _ = _model_and_optimizer(0)
    saver = checkpoint.Checkpointer(str(tmp_path), keep_last=1)
    for step in (1, 2):
        saver.save(step, model, None, {"step": step}, {})
    assert order[-2:] == ["agreed", "retention"]
    assert _names(checkpoint.committed_checkpoints(str(tmp_path))) == ["step_00000002"]  # un-committed at once
    assert sorted(os.listdir(tmp_path)) == ["step_00000001", "step_00000002"]  # its files: still being deleted
    release.set()
    checkpoint.wait_for_deletes()
    assert os.listdir(tmp_path) == ["step_00000002"]


def test_background_writes_use_the_jobs_process_group_timeout(tmp_path, monkeypatch):
    import datetime

    import torch.distributed as dist

    made = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "new_group", lambda **kwargs: made.append(kwargs))
    checkpoint.Checkpointer(str(tmp_path), keep_last=1, async_save=True, timeout_minutes=90)
    assert made == [{"backend": "gloo", "timeout": datetime.timedelta(minutes=90)}]
