"""optim.in_backward: the same updates as AdamW after backward, without ever holding every gradient; skips and
checkpoints work; the settings it cannot honour are refused; both decay the same parameters."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from qwen2_dist.cli.train import compose_job
from qwen2_dist.config import OptimConfig, validate
from qwen2_dist.errors import UserError
from qwen2_dist.model.args import get_model_args
from qwen2_dist.model.qwen2 import build_model
from qwen2_dist.train import checkpoint
from qwen2_dist.train.optim import build_optimizer, set_lr

CFG = OptimConfig(lr=1e-2, warmup_steps=0)


def _model():
    model = build_model(get_model_args("tiny"), "cpu")
    model.init_weights(0)
    return model


def _batches(n=4):
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 1000, (2, 17), generator=generator) for _ in range(n)]


def _train(model, optimizer, batches, nan_at=None):
    for index, batch in enumerate(batches):
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        if index == nan_at:
            # Non-finite loss, finite gradients: only the skip flag can stop the updates (a NaN loss would make
            # every gradient NaN, which each parameter's own check skips anyway).
            loss = loss + float("inf")
        if hasattr(optimizer, "skip_if"):
            optimizer.skip_if(~torch.isfinite(loss))
        loss.backward()
        if hasattr(optimizer, "grad_norm"):
            optimizer.grad_norm()
        elif torch.isfinite(loss):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_same_updates_as_adamw_after_backward():
    plain, fused = _model(), _model()
    plain_opt = build_optimizer(plain, CFG, "cpu")
    in_bwd = build_optimizer(fused, OptimConfig(lr=1e-2, warmup_steps=0, in_backward=True), "cpu")
    set_lr(plain_opt, 5e-3)
    set_lr(in_bwd, 5e-3)
    _train(plain, plain_opt, _batches())
    _train(fused, in_bwd, _batches())
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        assert b.grad is None  # freed right after its update


def test_gradients_never_all_exist_at_once():
    model = _model()
    optimizer = build_optimizer(model, OptimConfig(in_backward=True), "cpu")
    params = list(model.parameters())
    most = 0

    def count(_grad):
        nonlocal most
        most = max(most, sum(p.grad is not None for p in params))

    for p in params:
        p.register_hook(count)  # runs as each gradient arrives, before it is accumulated
    batch = _batches(1)[0]
    F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).backward()
    assert most <= 1 < len(params)
    # The logged norm is the global L2 norm of the step's gradients, as a plain backward has them all at the end.
    plain = _model()
    F.cross_entropy(plain(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in plain.parameters()])
    torch.testing.assert_close(optimizer.grad_norm(), expected, rtol=1e-5, atol=0)


def test_a_non_finite_loss_skips_every_update():
    model = _model()
    optimizer = build_optimizer(model, OptimConfig(in_backward=True), "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, optimizer, _batches(1), nan_at=0)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    _train(model, optimizer, _batches(1))
    assert not torch.equal(model.embed_tokens.weight, before["embed_tokens.weight"])


def test_checkpoint_round_trip(tmp_path):
    model = _model()
    optimizer = build_optimizer(model, OptimConfig(in_backward=True), "cpu")
    _train(model, optimizer, _batches(2))
    checkpoint.write(str(tmp_path / "ckpt"), model, optimizer, {"step": 2}, {"step": 2})
    restored = _model()
    restored_opt = build_optimizer(restored, OptimConfig(in_backward=True), "cpu")
    assert checkpoint.load(str(tmp_path / "ckpt"), restored, restored_opt)["step"] == 2
    for a, b in zip(optimizer.optimizers, restored_opt.optimizers):
        (pa,), (pb,) = a.param_groups[0]["params"], b.param_groups[0]["params"]
        torch.testing.assert_close(b.state[pb]["exp_avg"], a.state[pa]["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(pb, pa, rtol=0, atol=0)


@pytest.mark.parametrize("overrides, world_size, needs", [
    (["optim.in_backward=true", "train.global_batch_size=4"], 1,
     "train.grad_clip=0 (got 1: no gradient norm exists before the update)"),  # grad_clip defaults to 1.0
    (["optim.in_backward=true", "train.grad_clip=0", "train.global_batch_size=8", "train.micro_batch_size=4"], 1,
     "train.global_batch_size = train.micro_batch_size, one micro-batch a step (got 8 and 4)"),
    (["optim.in_backward=true", "train.grad_clip=0", "train.global_batch_size=8", "train.micro_batch_size=8"], 2,
     "one process (got 2)"),
])
def test_refused_where_it_cannot_hold(overrides, world_size, needs):
    """Naming what the job lacks, only that."""
    with pytest.raises(UserError) as refused:
        validate(compose_job(overrides), world_size)
    assert str(refused.value) == ("optim.in_backward=true updates each parameter during backward with torch's fused "
                                  f"AdamW, so it needs {needs} (or set optim.in_backward=false)")


@pytest.mark.parametrize("tied", [True, False])
def test_weight_decay_is_on_the_projection_matrices_only_in_both_optimizers(tied):
    """Not on biases, norms or the embedding; on an untied head. The same for AdamW after backward and in
    backward."""
    model = build_model(dataclasses.replace(get_model_args("tiny"), tie_word_embeddings=tied), "cpu")
    names = {id(p): name for name, p in model.named_parameters()}
    projections = {f"layers.{i}.{part}.weight" for i in range(len(model.layers))
                   for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    expected = projections if tied else projections | {"lm_head.weight"}
    groups = build_optimizer(model, CFG, "cpu").param_groups
    assert {names[id(p)] for g in groups if g["weight_decay"] == CFG.weight_decay > 0 for p in g["params"]} == expected
    undecayed = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert undecayed == set(names.values()) - expected
    in_backward = build_optimizer(model, OptimConfig(in_backward=True), "cpu")
    assert {names[id(o.param_groups[0]["params"][0])] for o in in_backward.optimizers
            if o.param_groups[0]["weight_decay"] > 0} == expected
