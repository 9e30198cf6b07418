"""The learning-rate schedule: warmup, then cosine / linear / sqrt decay, optionally after a stable phase (WSD)."""

import math

import pytest

from qwen2_dist.config import OptimConfig
from qwen2_dist.train.optim import lr_at

LR, MIN = 1e-3, 0.1


def schedule(total: int = 100, **fields) -> list[float]:
    cfg = OptimConfig(lr=LR, min_lr_ratio=MIN, **{"warmup_steps": 10, **fields})
    return [lr_at(step, total, cfg) for step in range(1, total + 1)]


def test_cosine_default_warms_up_then_decays_over_every_step_left():
    lrs = schedule()
    assert lrs[:10] == pytest.approx([LR * s / 10 for s in range(1, 11)])
    # Step 55 is half way through the 90 decay steps: cos(pi / 2) = 0.
    assert lrs[54] == pytest.approx(LR * (MIN + (1 - MIN) * 0.5))
    assert lrs[-1] == pytest.approx(MIN * LR)
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))


@pytest.mark.parametrize("shape, left_at_half", [("cosine", 0.5), ("linear", 0.5), ("sqrt", 1 - math.sqrt(0.5))])
def test_warmup_stable_decay(shape, left_at_half):
    lrs = schedule(schedule=shape, decay_steps=20)
    assert lrs[:10] == pytest.approx([LR * s / 10 for s in range(1, 11)])
    assert lrs[10:80] == [LR] * 70  # stable until train.steps - decay_steps
    assert lrs[89] == pytest.approx(LR * (MIN + (1 - MIN) * left_at_half))  # step 90: half of the decay
    assert lrs[-1] == pytest.approx(MIN * LR)
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))


def test_sqrt_cools_down_faster_early_than_linear():
    sqrt, linear = schedule(schedule="sqrt", decay_steps=40), schedule(schedule="linear", decay_steps=40)
    assert sqrt[65] < linear[65] and sqrt[-1] == pytest.approx(linear[-1])


def test_constant_holds_after_warmup():
    assert schedule(schedule="constant")[10:] == [LR] * 90


def test_a_cool_down_branch_continues_a_stable_run_at_the_same_learning_rate():
    """The WSD workflow: a run at constant lr to step 60, then resumed with 40 more steps that all decay."""
    stable = schedule(total=60, schedule="constant")
    branch = schedule(total=100, schedule="linear", decay_steps=40)
    assert branch[:60] == stable
    assert branch[60] < LR and branch[-1] == pytest.approx(MIN * LR)
