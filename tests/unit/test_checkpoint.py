"""Checkpoints: atomic commit, cleanup of interrupted saves, retention, exact restore."""

import json
import os

import pytest
import torch

from qwen2_dist.errors import UserError
from qwen2_dist.model.args import get_model_args
from qwen2_dist.model.qwen2 import build_model
from qwen2_dist.train import checkpoint


def _model_and_optimizer(seed: int):
    model = build_model(get_model_args("tiny"), "cpu")
    model.init_weights(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(torch.arange(8).view(1, 8)).float().logsumexp(-1).mean()
    loss.backward()
    optimizer.step()
    return model, optimizer


def test_save_commit_retention_and_restore(tmp_path):
    root = str(tmp_path / "checkpoints")
    model, optimizer = _model_and_optimizer(0)
    for step in (1, 2, 3):
        checkpoint.save(root, step, model, optimizer, {"step": step}, {"model": "tiny"}, keep_last=2)
    assert [os.path.basename(p) for p in checkpoint.committed_checkpoints(root)] == ["step_00000002", "step_00000003"]
    meta = checkpoint.read_metadata(os.path.join(root, "step_00000003"))
    assert meta["step"] == 3 and meta["contents"] == ["model", "optim"]

    other, other_opt = _model_and_optimizer(1)
    state = checkpoint.load(os.path.join(root, "step_00000003"), other, other_opt)
    assert state == {"step": 3}
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(optimizer.state.values(), other_opt.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_interrupted_saves_never_count_and_are_cleaned(tmp_path):
    root = tmp_path / "checkpoints"
    model, optimizer = _model_and_optimizer(0)
    checkpoint.save(str(root), 5, model, optimizer, {"step": 5}, {}, keep_last=2)
    # A save killed before the rename, and one killed after the rename but before metadata.json.
    (root / "step_00000010.tmp-deadbeef").mkdir()
    (root / "step_00000010.tmp-deadbeef" / "__0_0.distcp").write_bytes(b"partial")
    (root / "step_00000015").mkdir()
    assert [os.path.basename(p) for p in checkpoint.committed_checkpoints(str(root))] == ["step_00000005"]
    removed = checkpoint.clean_partial(str(root))
    assert sorted(os.path.basename(p) for p in removed) == ["step_00000010.tmp-deadbeef", "step_00000015"]
    assert sorted(os.listdir(root)) == ["step_00000005"]
    with pytest.raises(UserError, match="not a committed checkpoint"):
        checkpoint.read_metadata(str(root / "step_00000015"))


def test_model_only_checkpoint_loads_without_optimizer_state(tmp_path):
    model, _ = _model_and_optimizer(0)
    path = str(tmp_path / "weights")
    checkpoint.write(path, model, None, {"step": 0}, {"model": "tiny"})
    with open(os.path.join(path, checkpoint.METADATA)) as f:
        assert json.load(f)["contents"] == ["model"]
    other, other_opt = _model_and_optimizer(1)
    checkpoint.load(path, other, other_opt)
    assert torch.equal(model.embed_tokens.weight, other.embed_tokens.weight)
