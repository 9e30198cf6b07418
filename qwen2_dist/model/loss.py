"""The output projection and cross-entropy in one step, without the full logits of the 151,936-token vocabulary.

The plain path materializes (tokens, vocab) logits, then an fp32 copy for the softmax, then their gradient: at
Qwen2-1.5B, 4 x 4096 tokens, that is 2.5 GB per fp32 copy. Here the tokens go through in chunks: each chunk's
logits are computed, reduced to its loss, overwritten at once by the gradient of the logits (softmax - one-hot: no
second chunk-sized buffer) and multiplied into the gradients of the hidden states and of the weight, then dropped.
The gradients are computed in the forward pass and only scaled in backward, so the vocab-wide projection runs three
matmuls per token (logits, d hidden, d weight) as in the plain path, and is never recomputed.

Backends (model.loss): chunked (this module), liger (Liger-Kernel's fused linear cross-entropy, when installed),
plain (logits, then torch's cross_entropy; the only one that works on vocabulary-sharded tensor-parallel logits).

model.z_loss adds z x log-sum-exp^2 of each counted token's logits to the training loss (the auxiliary loss of PaLM
and OLMo 2, which keeps the softmax's normalizer near 1): chunked and plain, and under tensor parallelism
(vocab_parallel_z_term); its gradient, 2 z lse x softmax, joins the cross-entropy's in the same pass.
"""

import functools
import logging

import torch
import torch.nn.functional as F

from qwen2_dist.errors import UserError

log = logging.getLogger(__name__)

LOSSES = ("auto", "chunked", "liger", "plain")

IGNORE_INDEX = -100
"""A target that counts for nothing (torch's cross_entropy default): evaluation pads its last micro-batches with it,
and data.eod_mask_loss puts it on each document's first token. Every implementation skips it; the chunked one in
training only when told the targets may hold it (set_loss's masked), which costs it nothing otherwise."""


def resolve_loss(requested: str, tp: int, device_type: str, z_loss: float = 0.0) -> str:
    """Turn model.loss (possibly 'auto') into a concrete implementation, and say why in the log."""
    if requested not in LOSSES:
        raise UserError(f"model.loss: unknown implementation {requested!r}; choose one of {', '.join(LOSSES)}")
    if requested == "liger" and z_loss:
        raise liger_z_loss_error(z_loss)
    if requested in ("chunked", "liger") and tp > 1:
        raise UserError(f"model.loss={requested} cannot read vocabulary-sharded logits (parallel.tp={tp}); "
                        "use model.loss=auto or plain with tensor parallelism")
    if requested == "liger":
        if device_type != "cuda":
            raise UserError("model.loss=liger needs a CUDA device (Triton kernels); use model.loss=auto")
        _liger_function()  # fails now, with the fix, rather than at the first step
    if requested != "auto":
        log.info("loss: %s (requested)", requested)
        return requested
    if tp > 1:
        log.info("loss: plain (auto: vocabulary-parallel cross-entropy over tensor-parallel logits)")
        return "plain"
    log.info("loss: chunked (auto: fused output projection + cross-entropy, no full logits)")
    return "chunked"


def liger_z_loss_error(z_loss: float) -> UserError:
    return UserError(f"model.z_loss={z_loss:g} is not computed by model.loss=liger; use model.loss=auto (chunked) or "
                     "plain, or model.z_loss=0")


@functools.cache
def _liger_function():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        raise UserError("model.loss=liger: the liger-kernel package is not importable; pip install liger-kernel, "
                        "or use model.loss=auto (our chunked loss)") from None
    return liger_fused_linear_cross_entropy


def _chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, masked: bool = False,
                         z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of one chunk of logits (any float dtype, math in fp32), and the logits themselves,
    overwritten by d loss / d logits. masked: targets equal to IGNORE_INDEX count for nothing (zero loss and
    gradient). z_loss > 0: the gradient is that of cross-entropy + z_loss x lse^2, and the loss a pair (summed
    cross-entropy, summed lse^2) (_with_z)."""
    fp32 = logits.float()  # fp32 logits: the logits themselves, overwritten below
    hits, counted = _hits(targets, masked)
    picked = fp32.gather(1, hits[:, None]).squeeze(1)  # read before the logits are overwritten
    # The softmax in place, one exp per logit: bitwise what _lse_and_probs_one_pass computes. torch.logsumexp and
    # then exp(logits - lse) took two and two new chunk-sized buffers: the step of a 64-token chunk of the 151,936
    # vocabulary in fp32 took 60 ms that way, 30 ms this way (one CPU thread, 2-core machine, 2026-12-07; with
    # glibc's malloc defaults, which page-fault each new buffer in, 190 ms and 36 ms: train/host_memory.py).
    row_max = fp32.amax(-1, keepdim=True)
    grad = fp32.sub_(row_max).exp_()
    row_sum = grad.sum(-1, keepdim=True)
    lse = (row_sum.log() + row_max).squeeze(-1)
    grad.div_(row_sum)
    loss = _summed(lse, picked, counted)
    if z_loss:
        grad.mul_((1.0 + 2.0 * z_loss * lse)[:, None])  # d(z lse^2) = 2 z lse softmax
    grad.scatter_add_(1, hits[:, None], torch.full_like(lse[:, None], -1.0))
    if counted is not None:
        grad.mul_(counted[:, None])
    return _with_z(loss, lse, targets, masked, z_loss), grad if grad is logits else logits.copy_(grad)


def _hits(targets: torch.Tensor, masked: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The column each row's target picks (0 for an IGNORE_INDEX target when masked) and which rows count (None:
    all of them)."""
    counted = targets != IGNORE_INDEX if masked else None
    return (targets if counted is None else torch.where(counted, targets, 0)), counted


def _summed(lse: torch.Tensor, picked: torch.Tensor, counted: torch.Tensor | None) -> torch.Tensor:
    """The summed cross-entropy of the counted rows, from their log-sum-exp and their target's logit."""
    return (lse - picked).sum() if counted is None else torch.where(counted, lse - picked, 0.0).sum()


def _summed_loss(fp32: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, masked: bool) -> torch.Tensor:
    """The chunk's summed cross-entropy from its fp32 logits and their log-sum-exp; masked: IGNORE_INDEX targets
    add nothing."""
    hits, counted = _hits(targets, masked)
    return _summed(lse, fp32.gather(1, hits[:, None]).squeeze(1), counted)


def _chunk_loss_and_grad_fusable(logits: torch.Tensor, targets: torch.Tensor, masked: bool = False,
                                 z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """_chunk_loss_and_grad as torch.compile fuses it best: the one-hot subtracted element-wise (a comparison with
    the column index) instead of scattered. A scatter makes Inductor write the chunk's softmax in fp32 and convert it
    in a second pass (checked in its generated code: for a 2048-token chunk of the 151,936 vocabulary a 1.2 GB fp32
    buffer written and read back); this way one kernel writes the gradient in the logits' dtype, into the logits'
    own memory (its generated code on the CPU, 2026-11-27: one kernel, whose output is the input buffer; the
    gradient of a 2048-token chunk needs no second 0.6 GB buffer, of one 16384-token chunk no second 4.6 GiB). The
    same values: bitwise when both run eagerly (tests/unit/test_loss.py: both take the one-pass softmax then), and
    bitwise compiled against the compiled scatter on the CPU (checked once, 2026-11-27). Eager it would build a
    (tokens, vocab) mask: the eager path keeps the scatter."""
    loss, grad = _loss_and_softmax_grad(logits, targets, masked=masked, z_loss=z_loss)
    return loss, logits.copy_(grad)


def _chunk_loss_and_new_grad(logits: torch.Tensor, targets: torch.Tensor, masked: bool = False,
                             z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """_chunk_loss_and_grad_fusable with the gradient in a buffer of its own (the logits left as they are) and
    torch.logsumexp on every device: what _compiled_step falls back to where this torch cannot compile the other,
    differing from it in both."""
    loss, grad = _loss_and_softmax_grad(logits, targets, one_pass=False, masked=masked, z_loss=z_loss)
    return loss, grad.to(logits.dtype)


ONLINE_SOFTMAX_DEVICES = ("cuda", "xpu")
"""Where Inductor computes a softmax's max and sum in one pass over the row (config.online_softmax, Triton only)."""


def _loss_and_softmax_grad(logits: torch.Tensor, targets: torch.Tensor, one_pass: bool = True, masked: bool = False,
                           z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The two fusable steps' common part: the chunk's summed loss (with z_loss > 0 the pair of _with_z) and
    softmax x (1 + 2 z_loss lse) - one-hot in fp32 (under torch.compile never written as such: it is fused into the
    write of the gradient). one_pass: the log-sum-exp as Inductor computes in one pass, where it does
    (_lse_and_probs_one_pass). masked: IGNORE_INDEX targets count for nothing (a select per row in the same kernel;
    their one-hot never hits, their gradient row is zero)."""
    fp32 = logits.float()
    # Eagerly (the tests run it so) the one-pass form on every device: the eager step's values, bitwise.
    if one_pass and (logits.device.type in ONLINE_SOFTMAX_DEVICES or not torch.compiler.is_compiling()):
        lse, probs = _lse_and_probs_one_pass(fp32)
    else:
        lse = torch.logsumexp(fp32, dim=-1)
        probs = torch.exp(fp32 - lse[:, None])
    if z_loss:
        probs = probs * (1.0 + 2.0 * z_loss * lse)[:, None]
    hit = torch.arange(logits.shape[-1], device=logits.device)[None, :] == targets[:, None]
    grad = torch.where(hit, probs - 1.0, probs)
    if masked:
        grad = torch.where((targets != IGNORE_INDEX)[:, None], grad, 0.0)
    return _with_z(_summed_loss(fp32, lse, targets, masked), lse, targets, masked, z_loss), grad


def _with_z(loss: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, masked: bool, z_loss: float) -> torch.Tensor:
    """The chunk's summed cross-entropy as it is (z_loss 0: the compiled step of a job without z_loss is the one it
    always was), or with z_loss the pair (summed cross-entropy, sum of lse^2 over the counted targets)."""
    if not z_loss:
        return loss
    return torch.stack([loss, _summed_z(lse, targets, masked)])


def _lse_and_probs_one_pass(fp32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log-sum-exp and softmax of each row, written as the max / exp / sum that Inductor's post-grad pass replaces
    by one pass computing the max and the sum together (prepare_softmax_online, on CUDA). torch.logsumexp does not
    match it: its decomposition masks an infinite max first. The chunk's logits are then read twice, once for the
    max and the sum and once for the gradient, instead of three times: at Qwen2-1.5B, 16,384 tokens a step, 5.0 GB
    less, ~1.7 ms at 3 TB/s by arithmetic. On the CPU, which has no such pass, Inductor would keep the exp in fp32
    to share it between the sum and the softmax (a chunk-sized fp32 buffer): there torch.logsumexp stays when
    compiled. Eagerly the steps take this form on every device, as _chunk_loss_and_grad does in place. The same
    values as torch.logsumexp's within fp32 rounding (tests/unit/test_loss.py checks both that and the pattern
    match)."""
    row_max, exp, row_sum = _max_exp_sum(fp32)
    return (row_sum.log() + row_max).squeeze(-1), exp / row_sum


def _max_exp_sum(fp32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    row_max = fp32.amax(-1, keepdim=True)
    exp = (fp32 - row_max).exp()
    return row_max, exp, exp.sum(-1, keepdim=True)


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Evaluation's summed loss of one chunk, targets equal to IGNORE_INDEX left out. On ONLINE_SOFTMAX_DEVICES the
    log-sum-exp is written as the max / exp / sum that Inductor computes in one pass (the logits read once for it,
    not twice as torch.logsumexp's max and sum are); elsewhere torch.logsumexp."""
    fp32 = logits.float()
    if logits.device.type in ONLINE_SOFTMAX_DEVICES:
        row_max, _, row_sum = _max_exp_sum(fp32)
        lse = (row_sum.log() + row_max).squeeze(-1)
    else:
        lse = torch.logsumexp(fp32, dim=-1)
    return _summed_loss(fp32, lse, targets, masked=True)


def _token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each token's cross-entropy of one chunk (fp32), every target counted."""
    fp32 = logits.float()
    return torch.logsumexp(fp32, dim=-1) - fp32.gather(1, targets[:, None]).squeeze(1)


@functools.cache
def _compiled(fn, options: tuple = ()):
    # One fused kernel per step of the softmax instead of an fp32 copy of the chunk's logits (CUDA only: a CPU
    # compile costs tens of seconds). dynamic=False: chunks have one size, except maybe the last one. options:
    # parallel.compile_options as sorted (name, value) pairs.
    return torch.compile(fn, dynamic=False, options=dict(options) or None)


@functools.cache
def _compiled_step(options: tuple = ()):
    """The compiled softmax step: _chunk_loss_and_grad_fusable, which writes the gradient over the logits; where
    Inductor fails to compile that (torch 2.11's CPU code generator does, with a KeyError in its loop fusion; seen on
    2026-11-27; torch 2.13 compiles it), _chunk_loss_and_new_grad instead, with a warning: the same values within
    fp32 rounding, one more chunk-sized buffer, and on CUDA torch.logsumexp's two passes over the logits for the
    max and the sum (the formulation the H100 ran on 2026-11-27), so that neither novelty can fail both. Only a
    failure to compile is caught, at whichever call compiles (a chunk of another size compiles again)."""
    in_place = _compiled(_chunk_loss_and_grad_fusable, options)
    chosen = [in_place]

    def step(logits: torch.Tensor, targets: torch.Tensor, masked: bool = False,
             z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        # z_loss is passed only when set: the compiled function of a job without it is the one it always was.
        args = (logits, targets, masked) + ((z_loss,) if z_loss else ())
        try:
            return chosen[0](*args)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            if chosen[0] is not in_place:
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            log.warning("loss: this torch could not compile the softmax step that writes the gradient over the "
                        "logits (%s: %s); using one that writes it to a buffer of its own, with torch.logsumexp "
                        "(the same values within fp32 rounding, one more chunk-sized buffer)", type(exc).__name__,
                        first)
            chosen[0] = _compiled(_chunk_loss_and_new_grad, options)
            return chosen[0](*args)

    return step


@functools.cache
def _fp32_out_matmul_works(device: torch.device, dtype: torch.dtype) -> bool:
    """One small trial of both calls against the sum they must compute, before the first real use: torch versions
    differ in what they accept here (torch 2.11's meta function of addmm with out_dtype fails outright), and a
    version that accepted the call but dropped the sum would be a silent error in every gradient of the head."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(64, 48, device=device, generator=generator).to(dtype)
    b = torch.randn(48, 32, device=device, generator=generator).to(dtype)
    total = torch.randn(64, 32, device=device, generator=generator)
    expected = total + a.float() @ b.float()
    try:
        product = torch.mm(a, b, out_dtype=torch.float32)
        result = torch.addmm(total, a, b, out_dtype=torch.float32, out=total)  # in place, as _accumulate calls it
        ok = (product.dtype == result.dtype == torch.float32 and result.data_ptr() == total.data_ptr()
              and torch.allclose(product, a.float() @ b.float(), rtol=1e-3, atol=1e-3)
              and torch.allclose(result, expected, rtol=1e-3, atol=1e-3))
        why = "it computed a different sum"
    except (RuntimeError, TypeError) as exc:
        ok, why = False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if not ok:
        log.warning("loss: this torch cannot write fp32 from a %s matmul on %s (%s); the head's gradient is summed "
                    "by adding each chunk's %s product instead (the same result, more memory traffic)",
                    dtype, device, why, dtype)
    return ok


def _accumulate(total: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, fp32: bool) -> torch.Tensor:
    """total + a @ b (total None: a @ b alone), in fp32 when `fp32`, else in a's dtype.

    For an fp32 total from bf16 a and b on CUDA, the matmul itself reads and writes the fp32 sum (cuBLAS with an fp32
    C), as Megatron's fused weight-gradient accumulation does: no bf16 product is written, read back and added. For
    the output head of Qwen2-1.5B that is about 2.8 GB of memory traffic less per chunk of the loss (0.9 ms on an
    H100 by arithmetic; not yet measured). Elsewhere (the CPU has no such kernel, or this torch fails the trial of
    _fp32_out_matmul_works) the bf16 product is added to the fp32 sum, promoted in the add."""
    if not fp32 or (total is not None and total.dtype == a.dtype):
        return a @ b if total is None else total.addmm_(a, b)
    if a.dtype != torch.float32 and a.is_cuda and _fp32_out_matmul_works(a.device, a.dtype):
        if total is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.addmm(total, a, b, out_dtype=torch.float32, out=total)
    product = a @ b
    if total is None:
        return product.float()
    return total.add_(product)


class ZLoss:
    """model.z_loss for one loss: its coefficient, and what the last training loss computed with it held apart
    (detached fp32 scalars on the device, for the log): the summed cross-entropy, and the term z x sum of lse^2 over
    the counted targets that the returned loss adds to it. Evaluation adds no term (it reports cross-entropy): its
    loss leaves both None."""

    def __init__(self, coefficient: float = 0.0):
        self.coefficient = float(coefficient)
        self.cross_entropy: torch.Tensor | None = None
        self.term: torch.Tensor | None = None

    def record(self, cross_entropy: torch.Tensor | None, term: torch.Tensor | None) -> None:
        self.cross_entropy = None if cross_entropy is None else cross_entropy.detach()
        self.term = None if term is None else term.detach()


def _summed_z(lse: torch.Tensor, targets: torch.Tensor, masked: bool) -> torch.Tensor:
    """Sum of lse^2 over the chunk's tokens (masked: IGNORE_INDEX targets add nothing)."""
    squares = lse * lse
    if masked:
        squares = torch.where(targets != IGNORE_INDEX, squares, 0.0)
    return squares.sum()


def plain_z_term(logits: torch.Tensor, targets: torch.Tensor, z_loss: float) -> torch.Tensor:
    """z_loss x sum of log-sum-exp^2 over the targets that count (not IGNORE_INDEX), from (tokens, vocab) logits of
    one process; differentiable."""
    return z_loss * _summed_z(torch.logsumexp(logits.float(), dim=-1), targets, masked=True)


def vocab_parallel_z_term(logits, targets: torch.Tensor, z_loss: float):
    """plain_z_term of vocabulary-sharded logits (a DTensor sharded on its last dimension, as tensor parallelism's
    head makes them), without gathering them: each rank sums exp(logits - max) over its columns (the max taken
    across the ranks, detached: the log-sum-exp does not depend on it), and the ranks add those sums, one value a
    token. A replicated scalar DTensor."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    fp32 = logits.float()
    mesh, vocab_dim = fp32.device_mesh, fp32.ndim - 1
    sharded = [i for i, placement in enumerate(fp32.placements) if placement in (Shard(vocab_dim), Shard(-1))]
    if len(sharded) != 1 or any(not isinstance(placement, Replicate)
                                for i, placement in enumerate(fp32.placements) if i != sharded[0]):
        raise AssertionError(f"vocab_parallel_z_term takes logits sharded on the vocabulary only: {fp32.placements}")
    row_max = fp32.to_local().detach().amax(-1, keepdim=True)
    torch.distributed.all_reduce(row_max, op=torch.distributed.ReduceOp.MAX, group=mesh.get_group(sharded[0]))
    replicated = [Replicate()] * mesh.ndim
    row_max = DTensor.from_local(row_max, mesh, replicated, run_check=False)
    lse = (fp32 - row_max).exp().sum(-1).log() + row_max.squeeze(-1)
    counted = DTensor.from_local((targets != IGNORE_INDEX).to(lse.dtype), mesh, replicated, run_check=False)
    return z_loss * (lse * lse * counted).sum()


class TiedGradient:
    """Hands the output matrix's gradient from the chunked loss's backward to the embedding lookup's backward, for a
    tied model whose one matrix is both (one per forward: Qwen2.forward makes it).

    Left to autograd, the lookup's backward writes a dense (vocab, hidden) gradient, zeros but for the rows of the
    batch's tokens, and autograd adds it to the loss's gradient of the same matrix: for Qwen2-1.5B in fp32 a 0.93 GB
    fill, then 2.8 GB read and written by the add, ~1.2 ms a step on an H100 by arithmetic (not measured), and one
    more 0.93 GB tensor at the end of backward. Handed over, the loss's gradient (made in forward, scaled in its
    backward) receives the lookup's rows in place (index_put_, accumulating). The loss's backward then gives no
    gradient for the matrix itself, and the lookup's backward gives it the sum: the parameter receives one gradient,
    as it would from one use. The loss's backward always runs first: the lookup starts the forward, so its backward
    ends the backward."""

    def __init__(self):
        self.grad: torch.Tensor | None = None

    def hand_over(self, grad: torch.Tensor) -> None:
        self.grad = grad

    def take(self) -> torch.Tensor | None:
        grad, self.grad = self.grad, None
        return grad


class TiedEmbedding(torch.autograd.Function):
    """F.embedding(tokens, weight) whose backward adds its rows into the gradient a TiedGradient holds (the chunked
    loss's gradient of the same matrix), or into zeros when it holds none (no chunked loss ran in this graph)."""

    @staticmethod
    def forward(ctx, tokens, weight, tie: TiedGradient):
        ctx.save_for_backward(tokens)
        ctx.tie, ctx.weight_meta = tie, (weight.shape, weight.dtype, weight.device)
        return F.embedding(tokens, weight)

    @staticmethod
    def backward(ctx, grad_out):
        (tokens,) = ctx.saved_tensors
        grad = ctx.tie.take()
        if grad is None:
            shape, dtype, device = ctx.weight_meta
            grad = torch.zeros(shape, dtype=dtype, device=device)
        # accumulate=True sums the rows of repeated tokens (on CUDA sorted first: one order of summation).
        grad.index_put_((tokens.flatten(),), grad_out.reshape(-1, grad.shape[-1]).to(grad.dtype), accumulate=True)
        return None, grad, None


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of cross_entropy(hidden @ weight.T, targets), gradients computed in forward. With a
    TiedGradient, the weight's gradient goes to it instead (see there)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens, compute_dtype, compiled, compile_options, tie, masked,
                z: ZLoss | None):
        # hidden (tokens, hidden) and weight (vocab, hidden) in any dtype; the matmuls run in compute_dtype.
        # masked: targets may hold IGNORE_INDEX. z: model.z_loss, whose term the returned loss includes.
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        loss_and_grad = (_compiled_step(compile_options) if compiled
                         else _chunk_loss_and_grad)
        # d weight summed over the chunks: in fp32 for an fp32 weight; for a low-precision weight (FSDP's bf16
        # gather) in its dtype, each chunk's matmul accumulating in fp32 -- the rounding of the plain path's
        # bf16 weight gradient, plus one rounding per chunk.
        grad_w = None
        grad_h = torch.empty_like(h)
        z_loss = z.coefficient if z is not None else 0.0
        # With z_loss: (summed cross-entropy, summed lse^2), accumulated together.
        loss = torch.zeros((2,) if z_loss else (), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_tokens):
            h_chunk = h[start : start + chunk_tokens]
            chunk_targets = targets[start : start + chunk_tokens]
            chunk_loss, grad_logits = (loss_and_grad(h_chunk @ w.T, chunk_targets, masked, z_loss) if z_loss
                                       else loss_and_grad(h_chunk @ w.T, chunk_targets, masked))
            loss += chunk_loss
            torch.matmul(grad_logits, w, out=grad_h[start : start + chunk_tokens])
            grad_w = _accumulate(grad_w, grad_logits.T, h_chunk, weight.dtype == torch.float32)
        # Kept on ctx, not saved for backward: tensors made here, not inputs or outputs, which backward scales in
        # place, so that the output matrix's gradient (0.9 GB in fp32 at Qwen2-1.5B) is not held twice at the start
        # of backward, when the activations of forward are all still held.
        ctx.grads = (grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.tie = tie
        if not z_loss:
            return loss
        cross_entropy, term = loss[0], z_loss * loss[1]
        z.record(cross_entropy, term)
        return cross_entropy + term

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("the chunked loss's backward ran twice (retain_graph=True): its gradients were scaled "
                               "in place and handed on; use model.loss=plain to differentiate the loss again")
        (grad_h, grad_w), ctx.grads = ctx.grads, None
        hidden_dtype, weight_dtype = ctx.dtypes
        # The loss is a sum: its gradient only scales the ones computed in forward (1/tokens in the trainer).
        grad_w = grad_w.mul_(grad_loss).to(weight_dtype)
        if ctx.tie is not None:
            ctx.tie.hand_over(grad_w)  # the embedding lookup's backward, which comes last, returns it
            grad_w = None
        return grad_h.mul_(grad_loss).to(hidden_dtype), grad_w, None, None, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    impl: str = "chunked",
    chunk_tokens: int = 2048,
    compiled: bool = False,
    compile_options: tuple = (),
    tie: TiedGradient | None = None,
    masked: bool = False,
    z: ZLoss | None = None,
    per_row: bool = False,
) -> torch.Tensor:
    """Summed cross-entropy (fp32 scalar) of the logits hidden @ weight.T against targets, by `impl` (a resolved
    model.loss). hidden: (..., hidden); targets: (...) token ids, or IGNORE_INDEX for none (the chunked training
    step only with masked=True, else it takes every target: an IGNORE_INDEX there is an out-of-range index);
    weight: (vocab, hidden). Under autocast the
    projection runs in the autocast dtype, as a plain F.linear would. compiled: the chunked loss's softmax step
    through torch.compile, with compile_options (sorted (name, value) pairs of Inductor settings). tie: the
    TiedGradient of a TiedEmbedding lookup of the same weight in this graph, which then receives the chunked loss's
    gradient of the weight (the other implementations ignore it, and the lookup makes its own). z: model.z_loss;
    with a coefficient, a loss that computes gradients (training) adds z x lse^2 of each counted token and records
    its parts in z; one that does not (evaluation) is cross-entropy alone, and records None. per_row (evaluation
    only, any impl): the (batch,) summed cross-entropy of each row of targets (batch, seq) instead, only the counted
    tokens projected."""
    rows = targets.shape[0]
    hidden = hidden.flatten(0, -2)
    targets = targets.flatten().to(hidden.device)
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    # Training (the term added) is what the chunked loss below takes for it: gradients wanted of hidden or weight.
    training = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    z_loss = z.coefficient if z is not None and training else 0.0
    if z is not None:
        z.record(None, None)
    if per_row:
        if training:
            raise AssertionError("per-row losses are computed for evaluation, without gradients")
        # Only the scored tokens (a task's choice, a few per row) are projected: the rest of the row, context and
        # padding, would cost the vocabulary-wide projection for nothing.
        scored = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        with torch.autocast(device_type, enabled=False):
            h, w, step = hidden[scored].to(compute_dtype), weight.to(compute_dtype), max(chunk_tokens, 1)
            t = targets[scored]
            losses = [_token_losses(h[s : s + step] @ w.T, t[s : s + step]) for s in range(0, h.shape[0], step)]
        summed = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
        if not losses:  # no scored token in the micro-batch (padding rows only)
            return summed
        return summed.index_add_(0, scored // (targets.numel() // rows), torch.cat(losses))
    if impl == "plain":
        logits = F.linear(hidden, weight)
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        if not z_loss:
            return loss
        term = plain_z_term(logits, targets, z_loss)
        z.record(loss, term)
        return loss + term
    if impl == "liger":
        if z_loss:
            raise liger_z_loss_error(z_loss)
        return _liger_function()(hidden.to(compute_dtype), weight.to(compute_dtype), targets, reduction="sum").float()
    if impl != "chunked":
        raise AssertionError(f"unresolved loss implementation {impl!r}")
    if chunk_tokens < 1:
        raise UserError(f"model.loss_chunk_tokens={chunk_tokens} must be positive, e.g. 2048")
    with torch.autocast(device_type, enabled=False):
        if not training:
            # Evaluation: the same chunked loss, no gradients.
            h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
            chunk_loss = _compiled(_chunk_loss, compile_options) if compiled else _chunk_loss
            return sum((chunk_loss(h[s : s + chunk_tokens] @ w.T, targets[s : s + chunk_tokens])
                        for s in range(0, h.shape[0], chunk_tokens)), torch.zeros((), device=h.device))
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens, compute_dtype, compiled,
                                                compile_options, tie, masked, z if z_loss else None)
