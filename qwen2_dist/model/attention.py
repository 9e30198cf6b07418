"""One causal grouped-query attention function with several backends; the choice is made once and logged."""

import functools
import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from qwen2_dist.errors import UserError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "flash_attn", "sdpa", "flex", "reference")


@dataclass
class DocumentMask:
    """Which keys each query may see in a batch of packed documents, in the form the backend wants: a dense
    (batch, 1, seq, seq) bool mask (sdpa, reference), cu_seqlens over the flattened batch (flash_attn), or a
    FlexAttention BlockMask (flex)."""

    dense: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    block_mask: Any = None


def document_mask(positions: torch.Tensor, backend: str) -> DocumentMask:
    """Causal attention within documents, which start where positions (batch, seq) restart at 0."""
    starts = positions == 0
    starts[:, 0] = True
    batch, seq_len = positions.shape
    if backend == "flash_attn":
        cu_seqlens = torch.cat([
            torch.nonzero(starts.flatten()).flatten(),
            torch.tensor([batch * seq_len], device=positions.device),
        ]).to(torch.int32)
        # max_seqlen only sizes the kernel's grid: the sequence length bounds every document, costs no host sync,
        # and stays the same from batch to batch (a compiled block would recompile for every new value).
        return DocumentMask(cu_seqlens=cu_seqlens, max_seqlen=seq_len)
    document = starts.cumsum(dim=1)
    if backend == "flex":
        def same_document_causal(b, h, q, kv):
            return (document[b, q] == document[b, kv]) & (kv <= q)

        return DocumentMask(block_mask=_block_mask_maker(positions.device.type)(
            same_document_causal, batch, None, seq_len, seq_len, device=positions.device
        ))
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=positions.device).tril()
    return DocumentMask(dense=((document[:, :, None] == document[:, None, :]) & causal)[:, None])


@functools.cache
def _block_mask_maker(device_type: str):
    """create_block_mask, compiled on CUDA: eager, it first builds the dense (batch, 1, seq, seq) mask and reduces it
    to blocks (at seq 32768, 1 GiB a sample, every forward); compiled, the reduction is fused and no dense mask is
    made. Eager on the CPU, where FlexAttention serves tests only and a compile would cost more than the mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask) if device_type == "cuda" else create_block_mask


def flash_attn_available() -> bool:
    """True when the flash-attn package is importable and a CUDA device is present."""
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


# The head sizes the kernels take: flash-attn 2 up to 256; FlexAttention's Triton kernels from 16 (tl.dot's least).
FLASH_ATTN_MAX_HEAD_DIM = 256
FLEX_MIN_HEAD_DIM = 16


def resolve_backend(requested: str, device_type: str, document_masking: bool = False, bf16: bool = True,
                    head_dim: int | None = None) -> str:
    """Turn model.attention (possibly 'auto') into a concrete backend name, and say why in the log. bf16: whether
    the job computes in bf16 (flash-attn's kernels take bf16 and fp16 only). head_dim: the model's, when known (a
    size a kernel cannot take is refused here, or passed over by auto, not found at the first forward)."""
    if requested not in BACKENDS:
        raise UserError(f"model.attention: unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    flash_fits = head_dim is None or head_dim <= FLASH_ATTN_MAX_HEAD_DIM
    flex_fits = head_dim is None or head_dim >= FLEX_MIN_HEAD_DIM or device_type != "cuda"
    if requested == "flash_attn" and not flash_fits:
        raise UserError(f"model.attention=flash_attn: flash-attn takes heads of up to {FLASH_ATTN_MAX_HEAD_DIM} "
                        f"dimensions, and this model's have {head_dim}; use model.attention=auto (SDPA)")
    if requested == "flex" and not flex_fits:
        raise UserError(f"model.attention=flex: FlexAttention's CUDA kernels take heads of {FLEX_MIN_HEAD_DIM} "
                        f"dimensions or more, and this model's have {head_dim}; use model.attention=auto (SDPA, "
                        "with an explicit mask under data.document_masking)")
    if requested == "flash_attn" and device_type != "cuda":
        raise UserError(f"model.attention=flash_attn: flash-attn's kernels run on CUDA devices only, and this job "
                        f"runs on {device_type}; use model.attention=auto (SDPA)")
    if requested == "flash_attn" and not flash_attn_available():
        raise UserError(
            "model.attention=flash_attn: flash-attn is not importable on this CUDA machine; "
            "install flash-attn or use model.attention=auto (SDPA)"
        )
    if requested == "flash_attn" and not bf16:
        raise UserError("model.attention=flash_attn computes in bf16 or fp16 only, and this job computes in fp32 "
                        "(train.mixed_precision); use model.attention=auto (SDPA) or train.mixed_precision=bf16")
    if requested == "flex" and device_type != "cuda":
        raise UserError(
            "model.attention=flex: FlexAttention has no backward pass on the CPU; use model.attention=auto "
            "(SDPA, with an explicit mask under data.document_masking) or reference"
        )
    if requested != "auto":
        if requested == "sdpa" and device_type == "cuda":
            prefer_cudnn_attention()
        log.info("attention backend: %s (requested)", requested)
        return requested
    if device_type == "cuda" and bf16 and flash_fits and flash_attn_available():
        log.info("attention backend: flash_attn (auto: flash-attn importable%s)",
                 "; documents through flash_attn_varlen_func" if document_masking else "")
        return "flash_attn"
    if device_type == "cuda" and document_masking and flex_fits:
        log.info("attention backend: flex (auto: document masking on CUDA without flash-attn; compiled "
                 "FlexAttention with a block mask)")
        return "flex"
    if device_type == "cuda":
        prefer_cudnn_attention()
    log.info("attention backend: sdpa (auto: %s; PyTorch fused attention%s%s)",
             "flash-attn not installed, no CUDA or fp32" if flash_fits and flex_fits else
             f"head_dim {head_dim}, which flash-attn or FlexAttention cannot take",
             ", cuDNN kernel first" if device_type == "cuda" else "",
             "; documents through an explicit block-diagonal causal mask" if document_masking else "")
    return "sdpa"


def prefer_cudnn_attention() -> None:
    """Make SDPA try cuDNN's attention first, then flash, efficient, math (on an H100 at the Qwen2-1.5B shape, GQA,
    fwd+bwd: 343 TFLOP/s with cuDNN vs 208 with SDPA's flash kernel). Process-wide, set once: a context manager
    around each call would have to be entered again, identically, by activation checkpointing's recompute (else
    "Recomputed values ... have different metadata")."""
    from torch.nn.attention import SDPBackend

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if not hasattr(torch._C, "_set_sdp_priority_order"):
        log.warning("this torch cannot reorder SDPA's kernels; SDPA picks its default (flash) first")
        return
    current = list(torch._C._get_sdp_priority_order())
    wanted = [int(b) for b in order]
    torch._C._set_sdp_priority_order(wanted + [b for b in current if b not in wanted])
    torch.backends.cuda.enable_cudnn_sdp(True)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Plain softmax attention in fp32 with K/V repeated per group; the ground truth for the others."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    seq_len = q.shape[2]
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is None:
        mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled, FlexAttention materializes the full score matrix; compiled, it is a fused kernel.
    return torch.compile(flex_attention, dynamic=False)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, mask: DocumentMask | None = None
) -> torch.Tensor:
    """Causal attention, within documents when mask is given (see document_mask).
    q: (batch, heads, seq, head_dim); k, v: (batch, kv_heads, seq, head_dim)."""
    gqa = q.shape[1] != k.shape[1]
    if backend == "sdpa":
        if mask is not None:
            if gqa and q.is_cuda:
                # Of SDPA's CUDA kernels only flash takes GQA unexpanded, and flash takes no mask: K/V expanded, the
                # memory-efficient kernel runs, where enable_gqa with a mask falls back to the math one (the whole
                # fp32 score matrix).
                repeats = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if backend == "flash_attn":
        # flash-attn wants (batch, seq, heads, head_dim) and handles GQA without expanding K/V.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if mask is not None:
            from flash_attn import flash_attn_varlen_func

            batch, seq_len = q.shape[:2]
            out = flash_attn_varlen_func(
                q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), mask.cu_seqlens, mask.cu_seqlens,
                mask.max_seqlen, mask.max_seqlen, causal=True,
            )
            return out.view(batch, seq_len, *out.shape[1:]).transpose(1, 2)
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v, causal=True).transpose(1, 2)
    if backend == "flex":
        assert mask is not None and mask.block_mask is not None, "flex always runs with a block mask"
        return _compiled_flex_attention()(q, k, v, block_mask=mask.block_mask, enable_gqa=gqa)
    if backend == "reference":
        return _reference(q, k, v, None if mask is None else mask.dense)
    raise AssertionError(f"unresolved attention backend {backend!r}")
