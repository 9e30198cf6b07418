"""Optional kernels of the decoder block (model.kernels) and projections fused into one matmul (model.fuse_projections).

torch (default): plain PyTorch ops, which torch.compile fuses per block on CUDA (RMSNorm, SwiGLU, RoPE each become
one or two kernels). liger: Liger-Kernel's Triton RMSNorm and SwiGLU, for eager runs (parallel.compile=false).
apex: NVIDIA apex's fused RMSNorm, likewise. Both are imported only when chosen, and refused with the fix when
they cannot be.
"""

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen2_dist.errors import UserError

KERNELS = ("torch", "liger", "apex")
FUSE_PROJECTIONS = (False, True, "qkv", "mlp")
"""model.fuse_projections: none, both, q/k/v only, gate/up only."""


def check_available(name: str, device_type: str = "cuda") -> None:
    """UserError unless model.kernels=name can run here."""
    if name not in KERNELS:
        raise UserError(f"model.kernels: unknown choice {name!r}; choose one of {', '.join(KERNELS)}")
    if name == "torch":
        return
    if device_type != "cuda":
        raise UserError(f"model.kernels={name} runs on CUDA devices only; use model.kernels=torch")
    if name == "liger":
        _liger()
    else:
        _apex_rms_norm()


@functools.cache
def _liger():
    try:
        from liger_kernel.transformers import functional
    except ImportError:
        raise UserError("model.kernels=liger: the liger-kernel package is not importable; pip install liger-kernel "
                        "or use model.kernels=torch") from None
    return functional


@functools.cache
def _apex_rms_norm():
    try:
        from apex.normalization import fused_layer_norm
    except ImportError:
        raise UserError("model.kernels=apex: NVIDIA apex (with its CUDA extensions) is not importable; build it from "
                        "github.com/NVIDIA/apex or use model.kernels=torch") from None
    return fused_layer_norm


def rms_norm(kernels: str, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm by the chosen fused kernel (both normalize in fp32, as the plain path does)."""
    if kernels == "liger":
        # "llama" casting: normalized in fp32, cast to the input dtype, then scaled -- Qwen2's order.
        return _liger().liger_rms_norm(x, weight, eps, offset=0.0, casting_mode="llama", in_place=False)
    # With bf16 activations under autocast and an fp32 weight, the weight is cast (as the plain path casts it): apex's
    # mixed-dtype kernel would return fp32 activations, in the weight's dtype, where the plain path returns bf16.
    return _apex_rms_norm().fused_rms_norm_affine(x, weight.to(x.dtype), weight.shape, eps)


def liger_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in one Triton kernel (and one in backward)."""
    return _liger().liger_swiglu(gate, up)


def fused_linear(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    """The outputs of several linear layers on the same input from one matmul over their concatenated weights
    (q/k/v: one GEMM of width 2048 instead of 1536 + 256 + 256 at Qwen2-1.5B, whose narrow ones run well below the
    tensor cores' peak). The concatenation is a copy of the weights per call (per forward, and per recompute).

    Under autocast each weight is cast to the compute dtype before the concatenation, the same values bitwise as
    casting the concatenated fp32 matrix, which F.linear would do: the copy is then the cast itself, 6 bytes a weight,
    as for separate projections. Concatenated first, a compiled block wrote and read back an fp32 copy too, 8 more
    bytes a weight (Inductor's count on the CPU, benchmarks/block_traffic.py: 234 MiB a Qwen2-1.5B block with q/k/v
    and gate/up fused, 6.9 GB a step, ~2.3 ms at 3 TB/s by arithmetic)."""
    weights, biases = [linear.weight for linear in linears], [linear.bias for linear in linears]
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        weights = [w.to(dtype) for w in weights]
        biases = [b if b is None else b.to(dtype) for b in biases]
    bias = None if biases[0] is None else torch.cat(biases)
    return F.linear(x, torch.cat(weights), bias).split([linear.weight.shape[0] for linear in linears], dim=-1)
