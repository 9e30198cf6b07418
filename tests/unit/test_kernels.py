"""Fused projections compute what the separate ones do; optional kernels and float8 are refused clearly where absent."""

import pytest
import torch
import torch.nn.functional as F

from qwen2_dist.config import OptimConfig, ParallelConfig
from qwen2_dist.errors import UserError
from qwen2_dist.model.args import get_model_args
from qwen2_dist.model.kernels import fused_linear
from qwen2_dist.model.qwen2 import RMSNorm, build_model
from qwen2_dist.parallel.parallelize import compile_enabled, parallelize
from qwen2_dist.train.optim import build_optimizer


def _loss_and_grads(fuse: bool | str):
    args = get_model_args("tiny")
    model = build_model(args, "cpu")
    model.init_weights(0)
    model.set_kernels("torch", fuse_projections=fuse, device_type="cpu")
    layer = model.layers[0]
    assert (layer.self_attn.fused, layer.mlp.fused) == {False: (False, False), True: (True, True),
                                                         "qkv": (True, False), "mlp": (False, True)}[fuse]
    tokens = torch.randint(0, args.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("fuse", [True, "qkv", "mlp"])
def test_fused_projections_match_separate_ones(fuse):
    loss, grads = _loss_and_grads(fuse=False)
    fused_loss, fused_grads = _loss_and_grads(fuse=fuse)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=1e-6)
    assert fused_grads.keys() == grads.keys()  # the same parameters: checkpoints and HF conversion are unchanged
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_projection_under_autocast_gives_the_values_of_the_fp32_concatenation():
    """fused_linear casts each weight to bf16 before concatenating: bitwise what F.linear computes from the
    concatenated fp32 weights under autocast, output and fp32 gradients alike. (That it casts first, with no fp32
    copy, is tests/unit/test_block_traffic.py's check.)"""
    torch.manual_seed(0)
    linears = [torch.nn.Linear(32, width) for width in (32, 16, 16)]
    x = torch.randn(2, 5, 32)

    def run(fused: bool):
        for linear in linears:
            linear.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                outs = fused_linear(x, linears)
            else:  # the concatenation in fp32, cast by autocast
                weight, bias = torch.cat([m.weight for m in linears]), torch.cat([m.bias for m in linears])
                outs = F.linear(x, weight, bias).split([32, 16, 16], dim=-1)
        sum((out.float() * (i + 1)).sum() for i, out in enumerate(outs)).backward()
        return outs, [(m.weight.grad.clone(), m.bias.grad.clone()) for m in linears]

    (fused, fused_grads), (plain, plain_grads) = run(True), run(False)
    assert all(out.dtype == torch.bfloat16 for out in fused)
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)
    for (wa, ba), (wb, bb) in zip(fused_grads, plain_grads):
        assert wa.dtype == torch.float32 and torch.equal(wa, wb) and torch.equal(ba, bb)


@pytest.mark.parametrize("kernels, message", [
    ("liger", "model.kernels=liger runs on CUDA devices only"),
    ("apex", "model.kernels=apex runs on CUDA devices only"),
    ("triton", "model.kernels: unknown choice 'triton'"),
])
def test_unavailable_kernels_are_refused(kernels, message):
    model = build_model(get_model_args("debug"), "meta")
    with pytest.raises(UserError, match=message):
        model.set_kernels(kernels, device_type="cpu")


def test_hand_written_kernels_turn_auto_compile_off():
    cfg = ParallelConfig(compile="auto")
    assert compile_enabled(cfg, "cuda") and not compile_enabled(cfg, "cuda", kernels="liger")
    assert not compile_enabled(cfg, "cpu")


def test_float8_and_apex_optimizer_need_cuda():
    model = build_model(get_model_args("debug"), "meta")
    with pytest.raises(UserError, match="model.float8=true needs a CUDA GPU"):
        parallelize(model, None, ParallelConfig(), device_type="cpu", float8=True)
    with pytest.raises(UserError, match="optim.impl=apex runs on CUDA devices only"):
        build_optimizer(build_model(get_model_args("debug"), "cpu"), OptimConfig(impl="apex"), "cpu")


def test_apex_rms_norm_returns_the_activations_dtype(monkeypatch):
    """Under autocast (bf16 activations, fp32 weight) model.kernels=apex gives bf16, as the plain path does: apex's
    kernels return their output in the weight's dtype (a stand-in computing as they do, for this CPU machine)."""
    import types

    from qwen2_dist.model import kernels

    def affine(x, weight, shape, eps):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        return (weight.float() * normed).to(weight.dtype)

    fake = types.SimpleNamespace(fused_rms_norm_affine=affine, mixed_dtype_fused_rms_norm_affine=affine)
    monkeypatch.setattr(kernels, "_apex_rms_norm", lambda: fake)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, generator=generator).bfloat16()
    norm = RMSNorm(32, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(32, generator=generator))
    plain = norm(x)
    norm.kernels = "apex"
    fused = norm(x)
    assert fused.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), plain.float(), rtol=2e-2, atol=2e-2)
