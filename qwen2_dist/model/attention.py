"""One causal grouped-query attention function with several backends; the choice is made once and logged."""

import importlib.util
import logging

import torch
import torch.nn.functional as F

from qwen2_dist.errors import UserError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "flash_attn", "sdpa", "reference")


def flash_attn_available() -> bool:
    """True when the flash-attn package is importable and a CUDA device is present."""
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def resolve_backend(requested: str, device_type: str) -> str:
    """Turn model.attention (possibly 'auto') into a concrete backend name, and say why in the log."""
    if requested not in BACKENDS:
        raise UserError(f"model.attention: unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if requested == "flash_attn" and not (device_type == "cuda" and flash_attn_available()):
        raise UserError(
            "model.attention=flash_attn: flash-attn is not importable on this CUDA machine; "
            "install flash-attn or use model.attention=auto (SDPA)"
        )
    if requested != "auto":
        log.info("attention backend: %s (requested)", requested)
        return requested
    if device_type == "cuda" and flash_attn_available():
        log.info("attention backend: flash_attn (auto: flash-attn importable)")
        return "flash_attn"
    log.info("attention backend: sdpa (auto: flash-attn not installed or no CUDA; PyTorch fused attention)")
    return "sdpa"


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention in fp32 with K/V repeated per group; the ground truth for the others."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    seq_len = q.shape[2]
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Causal attention. q: (batch, heads, seq, head_dim); k, v: (batch, kv_heads, seq, head_dim)."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    if backend == "flash_attn":
        from flash_attn import flash_attn_func

        # flash-attn wants (batch, seq, heads, head_dim) and handles GQA without expanding K/V.
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    if backend == "reference":
        return _reference(q, k, v)
    raise AssertionError(f"unresolved attention backend {backend!r}")
