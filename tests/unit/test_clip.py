"""Gradient clipping folded into torch's fused AdamW (its grad_scale) updates the weights as clip_grad_norm_ followed
by the step does, and reports the same norm; without a clip (0) nothing is scaled; the trainer's step clips."""

import copy

import pytest
import torch
import torch.nn.functional as F

from qwen2_dist.config import OptimConfig
from qwen2_dist.model.args import get_model_args
from qwen2_dist.model.qwen2 import build_model
from qwen2_dist.train.optim import build_optimizer, clip_gradients


def _losses(model, steps=3):
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(0, 1000, (2, 17), generator=generator)
        yield F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())


def _train(model, optimizer, max_norm, folded):
    norms = []
    for loss in _losses(model):
        loss.backward()
        if folded:
            norm = clip_gradients(model, optimizer, max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        norms.append(float(norm))
    return norms


@pytest.mark.parametrize("max_norm", [0.05, 0.0])
def test_clip_folded_into_fused_adamw_matches_clip_grad_norm(max_norm):
    model = build_model(get_model_args("tiny"), "cpu")
    model.init_weights(0)
    reference, unclipped = copy.deepcopy(model), copy.deepcopy(model)
    cfg = OptimConfig(lr=1e-2, warmup_steps=0)
    folded = build_optimizer(model, cfg, "cpu")
    assert folded.defaults["fused"]
    norms = _train(model, folded, max_norm, folded=True)
    assert norms == pytest.approx(_train(reference, build_optimizer(reference, cfg, "cpu"), max_norm, folded=False),
                                  rel=1e-5)
    _train(unclipped, build_optimizer(unclipped, cfg, "cpu"), 0.0, folded=False)

    def largest_difference(other):
        return max((a - b).abs().max().item() for a, b in zip(model.parameters(), other.parameters()))

    assert largest_difference(reference) < 1e-5  # float rounding (a thousandth of one lr=1e-2 update)
    if max_norm:
        assert min(norms) > 10 * max_norm  # every step was clipped ...
        assert largest_difference(unclipped) > 1e-3  # ... and that changed the weights
    else:
        assert largest_difference(unclipped) == 0 and folded.grad_scale is None


@pytest.mark.parametrize("fused", [True, False])
def test_gradients_under_the_limit_are_not_scaled_up_to_it(fused):
    """max(1, norm / max_norm): every clip above had norms over the limit, so a scale without the max (each step's
    gradient brought to max_norm, up as well as down) passed them all; AdamW hides a uniform scale behind eps, so
    the trajectories barely show it. The divisor is 1 here, and the gradients are left as they are."""
    model = build_model(get_model_args("tiny"), "cpu")
    model.init_weights(0)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0, fused=fused), "cpu")
    next(_losses(model)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = clip_gradients(model, optimizer, 1e3)
    assert 0 < float(norm) < 1e3
    assert float(optimizer.grad_scale) == 1.0 if fused else getattr(optimizer, "grad_scale", None) is None
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_other_optimizers_clip_in_place():
    model = build_model(get_model_args("tiny"), "cpu")
    model.init_weights(0)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0, fused=False), "cpu")
    loss = next(_losses(model))
    loss.backward()
    norm = clip_gradients(model, optimizer, 0.05)
    clipped = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert float(norm) > 1 and float(clipped) == pytest.approx(0.05, rel=1e-4)
    assert getattr(optimizer, "grad_scale", None) is None


@pytest.mark.parametrize("grad_clip", [0.0, 1e-12])
def test_the_trainer_clips(tmp_path, grad_clip):
    """Trainer.train_step applies train.grad_clip. AdamW is blind to a uniform gradient scale except through its eps:
    gradients clipped to a norm of 1e-12 sit far below eps=1e-8, so the weights barely move (no weight decay), where
    unclipped ones move by about lr per element."""
    from tests.helpers import cpu_trainer

    trainer = cpu_trainer(tmp_path, "train.global_batch_size=2", "optim.lr=1e-2", "optim.eps=1e-8",
                          "optim.weight_decay=0", f"train.grad_clip={grad_clip}")
    model = trainer.model
    before = [p.detach().clone() for p in model.parameters()]
    _, grad_norm, _ = trainer.train_step()
    moved = max((p - b).abs().max().item() for p, b in zip(model.parameters(), before))
    assert float(grad_norm) > 0.1  # the norm reported is the one before clipping
    if grad_clip:
        assert moved < 1e-4
    else:
        assert moved > 5e-3
