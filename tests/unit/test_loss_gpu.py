"""The chunked loss's fp32 weight-gradient accumulation on CUDA: the matmul writing the fp32 sum itself (torch.mm /
torch.addmm with out_dtype) against adding each chunk's bf16 product, both against an fp64 reference.

Skipped without a GPU (benchmarks/gpu_check.sh runs it on one); on the CPU the fallback is what every other loss
test runs.
"""

import pytest
import torch

from qwen2_dist.model import loss as loss_module

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _chunks(n=4, tokens=512, vocab=4096, hidden=256):
    generator = torch.Generator(device="cuda").manual_seed(0)
    return [(torch.randn(vocab, tokens, device="cuda", generator=generator).bfloat16(),
             torch.randn(tokens, hidden, device="cuda", generator=generator).bfloat16()) for _ in range(n)]


def _sum(chunks, fused: bool, monkeypatch):
    if not fused:  # the fallback: each chunk's bf16 product added to the fp32 sum
        monkeypatch.setattr(loss_module, "_fp32_out_matmul_works", lambda device, dtype: False)
    total = None
    for a, b in chunks:
        total = loss_module._accumulate(total, a, b, fp32=True)
    monkeypatch.undo()
    return total


def test_this_torch_writes_fp32_from_a_bf16_matmul():
    """If this fails, the loss falls back to adding bf16 products (correct, slower), with a warning at run time."""
    assert loss_module._fp32_out_matmul_works(torch.device("cuda", torch.cuda.current_device()), torch.bfloat16)


def test_fp32_accumulation_is_at_least_as_close_to_fp64(monkeypatch):
    chunks = _chunks()
    reference = sum(a.double() @ b.double() for a, b in chunks)
    fused, added = _sum(chunks, True, monkeypatch), _sum(chunks, False, monkeypatch)
    assert fused.dtype == added.dtype == torch.float32
    fused_error = (fused.double() - reference).abs().max().item()
    added_error = (added.double() - reference).abs().max().item()
    scale = reference.abs().max().item()
    # The added path rounds each chunk's product to bf16 (relative step 7.8e-3); the fused one keeps fp32.
    assert added_error < 2e-2 * scale
    assert fused_error <= added_error and fused_error < 1e-4 * scale, (fused_error, added_error, scale)


def test_the_compiled_softmax_step_takes_max_and_sum_in_one_pass_and_matches_the_eager_one():
    """loss._lse_and_probs_one_pass, compiled for CUDA: Inductor's online softmax (max and sum in one pass over the
    151,936 logits of a row), the gradient written over the logits, the values of the eager step (torch.logsumexp
    and a scatter)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    generator = torch.Generator(device="cuda").manual_seed(0)
    vocab = 151936
    logits = (torch.randn(2048, vocab, device="cuda", generator=generator) * 4).bfloat16()
    targets = torch.randint(0, vocab, (2048,), device="cuda", generator=generator)
    eager_loss, eager_grad = loss_module._chunk_loss_and_grad(logits.clone(), targets)
    step = torch.compile(loss_module._chunk_loss_and_grad_fusable, dynamic=False)
    compiled_logits = logits.clone()
    (compiled_loss, compiled_grad), code = run_and_get_code(step, compiled_logits, targets)
    assert "online_softmax" in "\n".join(code)
    assert compiled_grad.data_ptr() == compiled_logits.data_ptr()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(compiled_grad.float(), eager_grad.float(), rtol=1e-2, atol=1e-6)
    # Compiled once: a second chunk allocates nothing chunk-sized (its exp is not kept: 1.2 GB in fp32).
    again = logits.clone()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(again, targets)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 64 * 2**20


def test_the_compiled_evaluation_loss_takes_max_and_sum_in_one_pass():
    """loss._chunk_loss (evaluation), compiled for CUDA: the online softmax's one pass, torch.logsumexp's values."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(1024, 151936, device="cuda", generator=generator) * 4).bfloat16()
    targets = torch.randint(0, 151936, (1024,), device="cuda", generator=generator)
    fp32 = logits.float()
    reference = (torch.logsumexp(fp32, -1) - fp32.gather(1, targets[:, None]).squeeze(1)).sum()
    del fp32
    loss, code = run_and_get_code(torch.compile(loss_module._chunk_loss, dynamic=False), logits, targets)
    assert "online_softmax" in "\n".join(code)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=0)


def test_the_masked_softmax_step_is_the_same_one_pass_kernel_and_leaves_ignored_targets_out():
    """data.eod_mask_loss's compiled step: still the online softmax's one pass and the gradient over the logits; an
    IGNORE_INDEX row has no loss and a zero gradient; the eager masked step's values."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(512, 151936, device="cuda", generator=generator) * 4).bfloat16()
    targets = torch.randint(0, 151936, (512,), device="cuda", generator=generator)
    ignored = torch.arange(512, device="cuda") % 7 == 3
    targets[ignored] = loss_module.IGNORE_INDEX
    eager_loss, eager_grad = loss_module._chunk_loss_and_grad(logits.clone(), targets, masked=True)
    compiled_logits = logits.clone()
    (loss, grad), code = run_and_get_code(torch.compile(loss_module._chunk_loss_and_grad_fusable, dynamic=False),
                                          compiled_logits, targets, True)
    assert "online_softmax" in "\n".join(code) and grad.data_ptr() == compiled_logits.data_ptr()
    assert bool((grad[ignored] == 0).all())
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.float(), eager_grad.float(), rtol=1e-2, atol=1e-6)


def test_the_compiled_step_with_z_loss_is_still_one_pass_and_computes_the_eager_values():
    """model.z_loss's compiled step (softmax x (1 + 2 z lse) - one-hot): still the online softmax's one pass and the
    gradient over the logits, the eager step's (cross-entropy, sum of lse^2) and gradient."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(512, 151936, device="cuda", generator=generator) * 4).bfloat16()
    targets = torch.randint(0, 151936, (512,), device="cuda", generator=generator)
    targets[::5] = loss_module.IGNORE_INDEX
    # z = 1e-2: the gradient's factor 1 + 2 z lse is about 1.4 here (lse about 20), where 1e-4's 1.004 lay within
    # the tolerance below, so a step that dropped z from the gradient passed (as the control shows it would not now).
    z = 1e-2
    eager_pair, eager_grad = loss_module._chunk_loss_and_grad(logits.clone(), targets, True, z)
    _, without_z = loss_module._chunk_loss_and_grad(logits.clone(), targets, True)
    compiled_logits = logits.clone()
    (pair, grad), code = run_and_get_code(torch.compile(loss_module._chunk_loss_and_grad_fusable, dynamic=False),
                                          compiled_logits, targets, True, z)
    assert "online_softmax" in "\n".join(code) and grad.data_ptr() == compiled_logits.data_ptr()
    assert pair.shape == (2,) and bool((grad[::5] == 0).all())
    torch.testing.assert_close(pair, eager_pair, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.float(), eager_grad.float(), rtol=1e-2, atol=1e-6)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(without_z.float(), eager_grad.float(), rtol=1e-2, atol=1e-6)
