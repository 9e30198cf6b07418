"""Every attention backend on CUDA in bf16 against the fp32 reference: outputs and gradients, causal and per document.

Skipped without a GPU (benchmarks/gpu_check.sh runs it on one). Tolerance: the largest error, relative to the
largest reference value, below 2e-2 -- bf16 keeps 8 bits of mantissa (relative step 7.8e-3), and each kernel
rounds its inputs, its accumulations' outputs and P = softmax(QK^T) to bf16 in its own order.
"""

import pytest
import torch

from qwen2_dist.model.attention import attention, document_mask, flash_attn_available, prefer_cudnn_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# The Qwen2-1.5B attention shape: 12 query heads, 2 key/value heads, head_dim 128.
BATCH, SEQ, HEADS, KV_HEADS, HEAD_DIM = 2, 1024, 12, 2, 128
TOLERANCE = 2e-2


def _inputs():
    generator = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(BATCH, HEADS, SEQ, HEAD_DIM), (BATCH, KV_HEADS, SEQ, HEAD_DIM), (BATCH, KV_HEADS, SEQ, HEAD_DIM)]
    return [torch.randn(s, device="cuda", generator=generator, dtype=torch.bfloat16).requires_grad_() for s in shapes]


def _positions(documents: bool) -> torch.Tensor:
    if not documents:
        return torch.arange(SEQ, device="cuda").expand(BATCH, -1)
    lengths = [[300, 500, 224], [1024]]
    return torch.stack([torch.cat([torch.arange(n, device="cuda") for n in row]) for row in lengths])


def _run(backend: str, documents: bool, sdpa_kernels=None):
    q, k, v = _inputs()
    mask = document_mask(_positions(documents), backend) if documents or backend == "flex" else None
    if sdpa_kernels is not None:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(sdpa_kernels):
            out = attention(q, k, v, backend, mask)
    else:
        out = attention(q, k, v, backend, mask)
    grad_out = torch.randn(out.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1),
                           dtype=out.dtype)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in (q, k, v)]


def _reference(documents: bool):
    q, k, v = [t.detach().float().requires_grad_() for t in _inputs()]
    mask = document_mask(_positions(documents), "reference") if documents else None
    out = attention(q, k, v, "reference", mask)
    grad_out = torch.randn(out.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1),
                           dtype=torch.bfloat16).float()
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in (q, k, v)]


def _check(results, reference):
    for name, got, want in zip(("out", "dq", "dk", "dv"), results, reference):
        error = (got.float() - want).abs().max().item() / want.abs().max().item()
        assert error < TOLERANCE, f"{name}: max error {error:.2e} of the largest value"


def _sdpa_variants():
    from torch.nn.attention import SDPBackend

    return {
        "auto (cuDNN first)": None,
        "cudnn": [SDPBackend.CUDNN_ATTENTION],
        "flash": [SDPBackend.FLASH_ATTENTION],
    }


@pytest.mark.parametrize("variant", list(_sdpa_variants()))
def test_sdpa_causal_gqa(variant):
    prefer_cudnn_attention()
    _check(_run("sdpa", False, _sdpa_variants()[variant]), _reference(False))


@pytest.mark.parametrize("documents", [False, True])
def test_flex(documents):
    _check(_run("flex", documents), _reference(documents))


def test_sdpa_with_document_mask():
    """Without the math kernel: a fused one must take the mask with grouped-query heads."""
    from torch.nn.attention import SDPBackend

    _check(_run("sdpa", True, [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]), _reference(True))


@pytest.mark.skipif(not flash_attn_available(), reason="flash-attn is not installed")
@pytest.mark.parametrize("documents", [False, True])
def test_flash_attn(documents):
    _check(_run("flash_attn", documents), _reference(documents))
