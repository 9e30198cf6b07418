"""The chunked linear cross-entropy equals the plain one (values and gradients) without ever holding full logits."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from qwen2_dist.errors import UserError
from qwen2_dist.model.args import get_model_args
from qwen2_dist.model import loss as loss_module
from qwen2_dist.model.loss import IGNORE_INDEX, linear_cross_entropy, resolve_loss
from qwen2_dist.model.qwen2 import build_model
from tests.helpers import REPO


def plain_loss_and_grads(hidden, weight, targets):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    loss = F.cross_entropy(F.linear(hidden, weight).float().flatten(0, 1), targets.flatten(), reduction="sum")
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def chunked_loss_and_grads(hidden, weight, targets, chunk_tokens, scale=1.0, masked=False):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    loss = linear_cross_entropy(hidden, weight, targets, "chunked", chunk_tokens=chunk_tokens, masked=masked)
    (loss * scale).backward()
    return loss.detach(), hidden.grad, weight.grad


def inputs(dtype=torch.float32, batch=2, seq=37, dim=16, vocab=101, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, dim, generator=generator).to(dtype)
    weight = (torch.randn(vocab, dim, generator=generator) * 0.3).to(dtype)
    targets = torch.randint(0, vocab, (batch, seq), generator=generator)
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_tokens", [1, 10, 37, 74, 1000])
def test_matches_plain_loss_and_gradients_fp32(chunk_tokens):
    hidden, weight, targets = inputs()
    loss, d_hidden, d_weight = plain_loss_and_grads(hidden, weight, targets)
    # A scaled loss (the trainer divides by the global token count) scales the gradients computed in forward.
    c_loss, c_hidden, c_weight = chunked_loss_and_grads(hidden, weight, targets, chunk_tokens, scale=0.25)
    torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(c_hidden, 0.25 * d_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_weight, 0.25 * d_weight, rtol=1e-5, atol=1e-6)
    assert c_hidden.dtype == c_weight.dtype == torch.float32


@pytest.mark.parametrize("chunk_tokens", [1, 10, 1000])
def test_masked_training_step_leaves_ignored_targets_out(chunk_tokens):
    """With masked=True (data.eod_mask_loss) an IGNORE_INDEX target adds nothing to the loss or the gradients, as in
    torch's cross_entropy; with none ignored, the masked step is bitwise the unmasked one."""
    hidden, weight, targets = inputs()
    ignored = targets.clone()
    ignored.view(-1)[::5] = IGNORE_INDEX
    loss, d_hidden, d_weight = plain_loss_and_grads(hidden, weight, ignored)
    c_loss, c_hidden, c_weight = chunked_loss_and_grads(hidden, weight, ignored, chunk_tokens, scale=0.25, masked=True)
    torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(c_hidden, 0.25 * d_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_weight, 0.25 * d_weight, rtol=1e-5, atol=1e-6)
    assert (c_hidden.flatten(0, 1)[::5] == 0).all() and (c_hidden.flatten(0, 1)[1::5] != 0).all()
    unmasked = chunked_loss_and_grads(hidden, weight, targets, chunk_tokens)
    for a, b in zip(chunked_loss_and_grads(hidden, weight, targets, chunk_tokens, masked=True), unmasked):
        assert torch.equal(a, b)


def test_bf16_error_is_that_of_the_plain_bf16_path():
    # Ground truth in fp64 from the same bf16 inputs; the chunked path may not be much further from it than the
    # plain bf16 path is (its weight gradient adds one bf16 rounding per chunk).
    hidden, weight, targets = inputs(torch.bfloat16, batch=4, seq=64, dim=32, vocab=300)
    truth = plain_loss_and_grads(hidden.double(), weight.double(), targets)
    plain = plain_loss_and_grads(hidden, weight, targets)
    chunked = chunked_loss_and_grads(hidden, weight, targets, chunk_tokens=32)
    assert chunked[1].dtype == chunked[2].dtype == torch.bfloat16
    assert_no_further_from_truth(truth, plain, chunked)


def assert_no_further_from_truth(truth, plain, chunked):
    """Loss, d hidden and d weight of the chunked path: within 2x the plain low-precision path's largest error
    from the fp64 truth (plus 0.1% of the largest value), and that error is not zero (low precision did happen)."""
    for name, t, p, c in zip(("loss", "d hidden", "d weight"), truth, plain, chunked):
        plain_error = (p.double() - t).abs().max().item()
        chunked_error = (c.double() - t).abs().max().item()
        scale = t.abs().max().item()
        assert plain_error > 1e-5 * scale, name
        assert chunked_error <= 2 * plain_error + 1e-3 * scale, (name, chunked_error, plain_error, scale)


def test_no_gradients_outside_autograd():
    hidden, weight, targets = inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, "chunked", chunk_tokens=8)
    expected = F.cross_entropy(F.linear(hidden, weight).flatten(0, 1), targets.flatten(), reduction="sum")
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-5)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_never_holds_the_full_logits():
    hidden, weight, targets = inputs(batch=4, seq=64, dim=8, vocab=500)
    hidden.requires_grad_()
    weight.requires_grad_()
    tokens, vocab, chunk = 4 * 64, 500, 16
    with LargestTensor() as seen:
        loss = linear_cross_entropy(hidden, weight, targets, "chunked", chunk_tokens=chunk)
        loss.backward()
    # The weight and its gradient (vocab x hidden) and chunk x vocab pieces; nothing of tokens x vocab.
    assert seen.largest == max(chunk * vocab, vocab * 8, tokens * 8)
    with LargestTensor() as seen:
        F.cross_entropy(F.linear(hidden, weight).flatten(0, 1), targets.flatten(), reduction="sum").backward()
    assert seen.largest == tokens * vocab  # the check above can fail


class NewTensors(TorchDispatchMode):
    """Records (op, number of elements) of every tensor an op returns in new memory (not a view of an input)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = [a for a in [*args, *(kwargs or {}).values()] if isinstance(a, torch.Tensor)]
        held = {a.untyped_storage().data_ptr() for a in given}
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in held:
                self.made.append((str(func), tensor.numel()))
        return out


def test_backward_scales_the_gradients_in_place_and_only_once():
    """At the start of backward every activation of forward is still held: the output matrix's gradient, made in
    forward, is scaled in place there, not copied (at Qwen2-1.5B 0.9 GB); so a second backward is refused."""
    hidden, weight, targets = inputs(vocab=500)
    hidden.requires_grad_()
    weight.requires_grad_()
    loss = linear_cross_entropy(hidden, weight, targets, "chunked", chunk_tokens=16) / 7
    with NewTensors() as seen:
        loss.backward(retain_graph=True)
    assert not [made for made in seen.made if made[1] == weight.numel()], seen.made
    expected = plain_loss_and_grads(hidden, weight, targets)
    torch.testing.assert_close(weight.grad, expected[2] / 7, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad, expected[1] / 7, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("tied", [True, False])
def test_model_forward_with_targets_matches_logits_then_cross_entropy(tied):
    args = get_model_args("debug", tie_word_embeddings=tied)
    models = []
    for impl in ("plain", "chunked"):
        torch.manual_seed(0)
        model = build_model(args, "cpu")
        model.init_weights(seed=1)
        model.set_loss(impl, chunk_tokens=24)
        models.append(model)
    tokens = torch.randint(0, args.vocab_size, (2, 33), generator=torch.Generator().manual_seed(2))
    targets = torch.roll(tokens, -1, dims=1)
    plain = F.cross_entropy(models[0](tokens).flatten(0, 1), targets.flatten(), reduction="sum")
    chunked = models[1](tokens, targets=targets)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-4)
    plain.backward()
    chunked.backward()
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.parametrize("tied", [True, False])
def test_a_tied_matrix_gets_the_loss_s_gradient_with_the_lookup_s_rows_added(monkeypatch, tied):
    """Tied, the chunked loss hands its gradient of the matrix to the lookup's backward (loss.TiedGradient), which
    adds its rows and returns the sum: the same gradients as the plain path, over two accumulated micro-batches with
    repeated tokens. Untied, nothing is handed over."""

    handed = []
    take = loss_module.TiedGradient.take
    monkeypatch.setattr(loss_module.TiedGradient, "take", lambda self: handed.append(self.grad is not None)
                        or take(self))
    args = get_model_args("debug", tie_word_embeddings=tied)
    models = []
    for impl in ("plain", "chunked"):
        model = build_model(args, "cpu")
        model.init_weights(seed=1)
        model.set_loss(impl, chunk_tokens=24)
        models.append(model)
    generator = torch.Generator().manual_seed(2)
    for _ in range(2):
        tokens = torch.randint(0, 40, (2, 33), generator=generator)  # 40 distinct ids: many repeats
        targets = torch.roll(tokens, -1, dims=1)
        (F.cross_entropy(models[0](tokens).flatten(0, 1), targets.flatten(), reduction="sum") / 7).backward()
        (models[1](tokens, targets=targets) / 7).backward()
    assert handed == ([True, True] if tied else [])
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        # fp32 sums in another order: off by a few units in the last place of the matrix's largest gradient (the
        # embedding's, about 4: up to 3.9e-6 off), not of each element; a row not added is off by its whole value.
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=2e-6 * max(1.0, p.grad.abs().max().item()),
                                   msg=name)
    with torch.no_grad():  # evaluation: no gradient, nothing handed over
        models[1](tokens, targets=targets)
    assert len(handed) == (2 if tied else 0)


def test_twenty_training_steps_follow_the_plain_loss_curve():
    # fp32 on the CPU: the two paths are the same computation up to summation order, so the curves agree to ~1e-5
    # at first; AdamW (lr 3e-3) lets the rounding grow over the steps: at init seeds 0-3 up to 1.0e-4 by step 18 (of
    # a loss of 6; 7.7e-5 with the earlier init), hence 2.5e-4 (a dropped or doubled chunk is off by far more). The
    # GPU check compares the compiled bf16 paths within bf16 noise.
    args = get_model_args("debug", vocab_size=2048)
    generator = torch.Generator().manual_seed(3)
    distinct = [torch.randint(0, args.vocab_size, (2, 65), generator=generator) for _ in range(4)]
    batches = [distinct[i % 4] for i in range(20)]  # seen again and again, so the loss falls
    curves = {}
    for impl in ("plain", "chunked"):
        model = build_model(args, "cpu")
        model.init_weights(seed=0)
        model.set_loss(impl, chunk_tokens=50)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        curve = []
        for batch in batches:
            loss = model(batch[:, :-1], targets=batch[:, 1:]) / batch[:, 1:].numel()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            curve.append(loss.item())
        curves[impl] = torch.tensor(curve)
    assert curves["plain"][-1] < curves["plain"][0] - 0.5  # it trains
    torch.testing.assert_close(curves["chunked"], curves["plain"], rtol=0, atol=2.5e-4)


def z_reference(hidden, weight, targets, z_loss):
    """cross-entropy + z_loss x sum of lse^2 over the counted targets, by autograd in fp64: (cross-entropy, the z
    term, d hidden, d weight)."""
    hidden = hidden.detach().double().requires_grad_()
    weight = weight.detach().double().requires_grad_()
    logits = F.linear(hidden, weight).flatten(0, 1)
    flat = targets.flatten()
    cross_entropy = F.cross_entropy(logits, flat, reduction="sum")
    term = z_loss * torch.where(flat != IGNORE_INDEX, torch.logsumexp(logits, -1) ** 2, 0.0).sum()
    (cross_entropy + term).backward()
    return cross_entropy.detach(), term.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("impl,chunk_tokens,masked", [("chunked", 1, False), ("chunked", 10, True),
                                                      ("chunked", 1000, False), ("plain", 0, True)])
def test_z_loss_adds_z_times_lse_squared_and_its_gradient(impl, chunk_tokens, masked):
    """model.z_loss: the training loss is cross-entropy + z x lse^2 of each counted token, with that gradient (an
    fp64 autograd reference); z records the two parts apart for the log. Evaluation (no gradients) is cross-entropy
    alone and records nothing."""
    hidden, weight, targets = inputs()
    hidden = hidden * 3  # logits of a few units: lse^2 well away from what a wrong factor would give
    if masked:
        targets.view(-1)[::4] = IGNORE_INDEX
    z_loss = 0.05
    cross_entropy, term, d_hidden, d_weight = z_reference(hidden, weight, targets, z_loss)
    assert term > 0.2 * cross_entropy  # the term matters to this test's gradients
    z = loss_module.ZLoss(z_loss)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets, impl, chunk_tokens=chunk_tokens or 2048, masked=masked, z=z)
    (loss * 0.25).backward()
    torch.testing.assert_close(loss.double(), cross_entropy + term, rtol=1e-5, atol=0)
    torch.testing.assert_close(z.cross_entropy.double(), cross_entropy, rtol=1e-5, atol=0)
    torch.testing.assert_close(z.term.double(), term, rtol=1e-5, atol=0)
    torch.testing.assert_close(h.grad.double(), 0.25 * d_hidden, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), 0.25 * d_weight, rtol=1e-4, atol=1e-6)
    if masked:
        assert (h.grad.flatten(0, 1)[::4] == 0).all()
    with torch.no_grad():
        evaluated = linear_cross_entropy(hidden, weight, targets, impl, chunk_tokens=chunk_tokens or 2048, z=z)
    torch.testing.assert_close(evaluated.double(), cross_entropy, rtol=1e-5, atol=0)
    assert z.cross_entropy is None and z.term is None


def test_the_softmax_steps_with_z_loss_compute_what_the_eager_one_does():
    """The chunk steps with model.z_loss: the fusable one (eager, and compiled as the loss compiles it) gives the
    eager step's (cross-entropy, sum of lse^2) and gradient, written over the logits; z_loss 0 leaves every step
    as it was (a scalar loss)."""
    from qwen2_dist.model.loss import _chunk_loss_and_grad, _chunk_loss_and_grad_fusable

    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(24, 301, generator=generator) * 4).bfloat16()
    targets = torch.randint(0, 301, (24,), generator=generator)
    targets[::3] = IGNORE_INDEX
    for function in (_chunk_loss_and_grad, _chunk_loss_and_grad_fusable):
        assert function(logits.clone(), targets, True)[0].shape == ()
    pair, grad = _chunk_loss_and_grad(logits.clone(), targets, True, 0.01)
    lse = torch.logsumexp(logits.float(), -1)
    counted = targets != IGNORE_INDEX
    torch.testing.assert_close(pair, torch.stack([F.cross_entropy(logits.float(), targets, reduction="sum"),
                                                  (lse[counted] ** 2).sum()]), rtol=1e-6, atol=0)
    fused_pair, fused_grad = _chunk_loss_and_grad_fusable(logits.clone(), targets, True, 0.01)
    torch.testing.assert_close(fused_pair, pair, rtol=1e-6, atol=0)
    torch.testing.assert_close(fused_grad.float(), grad.float(), rtol=1e-2, atol=1e-3)
    torch._dynamo.reset()
    compiled_logits = logits.clone()
    compiled_pair, compiled_grad = loss_module._compiled_step()(compiled_logits, targets, True, 0.01)
    torch.testing.assert_close(compiled_pair, pair, rtol=1e-5, atol=0)
    torch.testing.assert_close(compiled_grad.float(), grad.float(), rtol=1e-2, atol=1e-3)
    assert compiled_grad.data_ptr() == compiled_logits.data_ptr()


def test_resolve_loss():
    assert resolve_loss("auto", tp=1, device_type="cpu") == "chunked"
    assert resolve_loss("auto", tp=2, device_type="cuda") == "plain"
    assert resolve_loss("plain", tp=1, device_type="cpu") == "plain"
    with pytest.raises(UserError, match="model.loss=chunked cannot read vocabulary-sharded logits"):
        resolve_loss("chunked", tp=2, device_type="cpu")
    with pytest.raises(UserError, match="model.loss=liger needs a CUDA device"):
        resolve_loss("liger", tp=1, device_type="cpu")
    with pytest.raises(UserError, match="model.loss: unknown implementation 'fused'"):
        resolve_loss("fused", tp=1, device_type="cpu")
    with pytest.raises(UserError, match="model.z_loss=0.0001 is not computed by model.loss=liger; use model.loss=auto"):
        resolve_loss("liger", tp=1, device_type="cuda", z_loss=1e-4)


def test_autocast_computes_in_bf16_and_returns_fp32_gradients():
    # One process on CUDA: fp32 weights under bf16 autocast. The projection runs in bf16, the weight gradient is
    # summed over the chunks in fp32 (here on the CPU's autocast, the same code path).
    hidden, weight, targets = inputs(batch=4, seq=64, dim=32, vocab=300)
    truth = plain_loss_and_grads(hidden.double(), weight.double(), targets)
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                self.seen.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
            return func(*args, **(kwargs or {}))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = plain_loss_and_grads(hidden, weight, targets)
        with MatmulDtypes() as matmuls:
            chunked = chunked_loss_and_grads(hidden, weight, targets, chunk_tokens=32)
    assert chunked[1].dtype == chunked[2].dtype == torch.float32
    assert_no_further_from_truth(truth, plain, chunked)
    # Every matmul of the chunked loss (8 chunks: the logits and the gradients) reads bf16: a path that fell
    # back to fp32 would pass the error bound above, being nearer the truth.
    assert len(matmuls.seen) >= 2 * 8 and all(set(dtypes) == {torch.bfloat16} for dtypes in matmuls.seen), \
        matmuls.seen


def test_the_compiled_softmax_step_computes_what_the_eager_one_does():
    """The compiled path's chunk step subtracts the one-hot element-wise (so Inductor writes the gradient in one
    pass, in the logits' dtype) where the eager one scatters: the same values, eager to eager bitwise, and compiled
    through Inductor within fp32 rounding of the log-sum-exp."""
    from qwen2_dist.model.loss import _chunk_loss_and_grad, _chunk_loss_and_grad_fusable

    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(24, 301, generator=generator) * 4).bfloat16()
    targets = torch.randint(0, 301, (24,), generator=generator)
    loss, grad = _chunk_loss_and_grad(logits.clone(), targets)
    fused_loss, fused_grad = _chunk_loss_and_grad_fusable(logits.clone(), targets)
    assert torch.equal(loss, fused_loss) and torch.equal(grad, fused_grad) and grad.dtype == torch.bfloat16
    assert (grad[torch.arange(24), targets] < 0).all()  # the one-hot is in it
    probs = torch.softmax(logits.float(), dim=-1)
    torch.testing.assert_close(grad.float().sum(-1), (probs.sum(-1) - 1).to(torch.bfloat16).float(), atol=2e-2,
                               rtol=0)
    compiled_logits = logits.clone()
    try:
        compiled_loss, compiled_grad = torch.compile(_chunk_loss_and_grad_fusable, dynamic=False)(compiled_logits,
                                                                                                  targets)
    except torch._dynamo.exc.BackendCompilerFailed:
        if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 12):
            pytest.xfail("torch 2.11's CPU Inductor cannot compile it (a KeyError in its loop fusion); the loss "
                         "falls back to _chunk_loss_and_new_grad there (loss._compiled_step)")
        raise
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(compiled_grad.float(), grad.float(), rtol=1e-2, atol=1e-3)
    # The gradient is returned in the logits' own storage, eager or compiled (whether a step makes a second
    # chunk-sized buffer on the way is measured on CUDA only: test_loss_gpu.py's max_memory_allocated check).
    for function in (_chunk_loss_and_grad, _chunk_loss_and_grad_fusable):
        chunk = logits.clone()
        assert function(chunk, targets)[1].data_ptr() == chunk.data_ptr()
    assert compiled_grad.data_ptr() == compiled_logits.data_ptr() and torch.equal(compiled_logits, compiled_grad)


def test_the_masked_softmax_steps_leave_ignored_targets_out():
    """data.eod_mask_loss's chunk steps: an IGNORE_INDEX row has no loss and a zero gradient; the fusable step is
    bitwise the eager one (compiled, it is checked on CUDA, where the loss compiles it: test_loss_gpu.py; the CPU
    probe below checks its graph keeps the one-pass softmax)."""
    from qwen2_dist.model.loss import _chunk_loss_and_grad, _chunk_loss_and_grad_fusable

    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(24, 301, generator=generator) * 4).bfloat16()
    targets = torch.randint(0, 301, (24,), generator=generator)
    ignored = torch.arange(24) % 3 == 1
    targets[ignored] = IGNORE_INDEX
    loss, grad = _chunk_loss_and_grad(logits.clone(), targets, masked=True)
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), targets, reduction="sum"), rtol=1e-6, atol=1e-5)
    assert (grad[ignored] == 0).all() and (grad[~ignored] != 0).any(dim=1).all()
    fused_loss, fused_grad = _chunk_loss_and_grad_fusable(logits.clone(), targets, masked=True)
    assert torch.equal(loss, fused_loss) and torch.equal(grad, fused_grad)


def test_the_one_pass_log_sum_exp_gives_the_same_values(monkeypatch):
    from qwen2_dist.model.loss import _lse_and_probs_one_pass

    logits = torch.randn(16, 301, generator=torch.Generator().manual_seed(0)) * 8
    lse, probs = _lse_and_probs_one_pass(logits)
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(probs, torch.softmax(logits, dim=-1), rtol=1e-5, atol=1e-7)
    # Evaluation's chunk loss, in the one-pass form (the CPU taken as a device of it) and in torch.logsumexp's.
    targets = torch.randint(0, 301, (16,), generator=torch.Generator().manual_seed(1))
    with_logsumexp = loss_module._chunk_loss(logits, targets)
    monkeypatch.setattr(loss_module, "ONLINE_SOFTMAX_DEVICES", ("cpu",))
    torch.testing.assert_close(loss_module._chunk_loss(logits, targets), with_logsumexp, rtol=1e-6, atol=0)


PROBE = """
import functools
import torch
from torch._inductor.fx_passes import post_grad
# Before Inductor registers its patterns: let the online-softmax pattern match on the CPU too (its check asks for
# CUDA, whose Triton code the CPU cannot generate: the probe stops each compile before that).
post_grad.prepare_softmax_extra_check = lambda match: True
from torch._inductor.custom_graph_pass import CustomGraphPass
from qwen2_dist.model import loss


class Probe(CustomGraphPass):
    def __call__(self, graph):
        print(path, sorted({str(node.target) for node in graph.nodes if node.op == "call_function"}))
        raise RuntimeError("probed")

    def uuid(self):
        return None


masked_step = functools.partial(loss._chunk_loss_and_grad_fusable, masked=True)
for path, fn, devices in (("logsumexp", loss._chunk_loss_and_grad_fusable, ()),
                          ("one-pass", loss._chunk_loss_and_grad_fusable, ("cpu",)),
                          ("masked-logsumexp", masked_step, ()), ("masked-one-pass", masked_step, ("cpu",)),
                          ("eval-logsumexp", loss._chunk_loss, ()), ("eval-one-pass", loss._chunk_loss, ("cpu",))):
    loss.ONLINE_SOFTMAX_DEVICES = devices  # the CPU as a device of the one-pass formulation
    torch._dynamo.reset()
    step = torch.compile(fn, dynamic=False, options={"post_grad_custom_post_pass": Probe(), "fx_graph_cache": False})
    try:
        step(torch.randn(8, 1000).bfloat16(), torch.randint(0, 1000, (8,)))
    except Exception as exc:
        assert "probed" in str(exc), exc
"""


def test_on_cuda_the_softmax_step_is_the_pattern_inductor_computes_in_one_pass():
    """Inductor replaces max / exp / sum by one pass computing max and sum together (prepare_softmax_online), on
    CUDA; the probe lets the pattern match on the CPU and reads the graph after Inductor's post-grad passes."""
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    ops = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    for path in ("one-pass", "masked-one-pass", "eval-one-pass"):  # the training steps' and evaluation's
        assert "prims.prepare_softmax_online.default" in ops[path], ops
        # torch.logsumexp, as the CPU computes it, does not match: its max passes through a masked_fill first.
        other = path.replace("one-pass", "logsumexp")
        assert "prepare_softmax_online" not in ops[other] and "aten.amax.default" in ops[other], ops


def test_a_softmax_step_this_torch_cannot_compile_falls_back_to_a_buffer_of_its_own(monkeypatch, caplog):
    """torch 2.11's CPU Inductor fails to compile the step that writes the gradient over the logits; the loss then
    compiles the one that writes a new buffer, says so once, and computes the same loss and gradients. Where the
    first takes the log-sum-exp in one pass (CUDA; here the CPU stands in), the fallback uses torch.logsumexp."""
    from torch._dynamo.exc import BackendCompilerFailed


    attempts, one_pass = [], []
    monkeypatch.setattr(loss_module, "ONLINE_SOFTMAX_DEVICES", ("cpu",))
    one_pass_fn = loss_module._lse_and_probs_one_pass
    monkeypatch.setattr(loss_module, "_lse_and_probs_one_pass", lambda fp32: one_pass.append(1) or one_pass_fn(fp32))

    def fake_compile(fn, options=()):
        def run(*args):
            attempts.append(fn.__name__)
            if fn is loss_module._chunk_loss_and_grad_fusable:
                raise BackendCompilerFailed("inductor", KeyError("buf3"), None)
            return fn(*args)
        return run

    monkeypatch.setattr(loss_module, "_compiled", fake_compile)
    loss_module._compiled_step.cache_clear()
    try:
        generator = torch.Generator().manual_seed(5)
        hidden = torch.randn(40, 16, generator=generator, requires_grad=True)
        weight = torch.randn(50, 16, generator=generator, requires_grad=True)
        targets = torch.randint(0, 50, (40,), generator=generator)
        with caplog.at_level("WARNING", logger="qwen2_dist.model.loss"):
            loss = linear_cross_entropy(hidden, weight, targets, "chunked", chunk_tokens=16, compiled=True)
        loss.backward()
    finally:
        loss_module._compiled_step.cache_clear()
    # Tried once, then the fallback for every chunk (16, 16, 8 tokens).
    assert attempts == ["_chunk_loss_and_grad_fusable"] + ["_chunk_loss_and_new_grad"] * 3
    assert not one_pass
    assert "could not compile the softmax step that writes the gradient over the logits" in caplog.text
    expected_loss, expected_hidden, expected_weight = chunked_loss_and_grads(hidden.detach(), weight.detach(),
                                                                             targets, 16)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(hidden.grad, expected_hidden)
    torch.testing.assert_close(weight.grad, expected_weight)


def test_the_fp32_out_matmul_is_tried_before_it_is_trusted(monkeypatch, caplog):
    """The head's gradient is summed by the matmul itself only where a small trial computes the right sum: refused
    (the CPU has no such kernel) or wrong (a torch that dropped the sum), the loss warns and adds bf16 products."""

    cpu = torch.device("cpu")
    loss_module._fp32_out_matmul_works.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert not loss_module._fp32_out_matmul_works(cpu, torch.bfloat16)
        assert "cannot write fp32 from a torch.bfloat16 matmul" in caplog.text and "NotImplementedError" in caplog.text
        loss_module._fp32_out_matmul_works.cache_clear()
        caplog.clear()
        # A matmul that accepts the call but overwrites the sum instead of adding to it.
        monkeypatch.setattr(torch, "mm", lambda a, b, out_dtype: a.float() @ b.float())
        monkeypatch.setattr(torch, "addmm", lambda c, a, b, out_dtype, out: out.copy_(a.float() @ b.float()))
        with caplog.at_level("WARNING"):
            assert not loss_module._fp32_out_matmul_works(cpu, torch.bfloat16)
        assert "it computed a different sum" in caplog.text
        loss_module._fp32_out_matmul_works.cache_clear()
        # One that adds: trusted.
        monkeypatch.setattr(torch, "addmm", lambda c, a, b, out_dtype, out: out.add_(a.float() @ b.float()))
        assert loss_module._fp32_out_matmul_works(cpu, torch.bfloat16)
    finally:
        loss_module._fp32_out_matmul_works.cache_clear()
