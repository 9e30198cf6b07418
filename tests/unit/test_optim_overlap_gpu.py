"""optim.overlap on CUDA: the next forward sees every weight fully updated, although the update runs on a side
stream, and the gradient norm taken on that stream during backward is the norm. Skipped without a GPU
(benchmarks/gpu_check.sh runs it there, before it times the overlap variant).

The check is exact: right after step() (the update still in flight on the side stream) the forward runs, waiting
only where the pre-hooks make it wait; then, with the GPU synchronized, the same forward runs again on the same
weights. An eager forward on the same inputs runs the same kernels, so the two logits must be equal bit for bit. The
update is made slow against the forward (about 300M parameters, 8 tokens), and the tokens are the embedding's last
rows, which the update reaches last: without the waits the first forward reads weights the update has not reached
yet, which the negative control shows.
"""

import pytest
import torch
import torch.nn.functional as F

from qwen2_dist.config import OptimConfig
from qwen2_dist.model.args import get_model_args
from qwen2_dist.model.qwen2 import build_model
from qwen2_dist.train.optim import OverlappedOptimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _setup():
    args = get_model_args("tiny", vocab_size=32768, hidden_size=2048, intermediate_size=5632, num_hidden_layers=6,
                          num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True)
    model = build_model(args, "meta").to_empty(device="cuda")
    model.init_weights(0)
    model.set_attention_backend("sdpa")
    optimizer = OverlappedOptimizer(model, OptimConfig(lr=1e-2, warmup_steps=0))
    tokens = torch.arange(args.vocab_size - 8, args.vocab_size, device="cuda")[None]  # the last rows
    return model, optimizer, tokens


def _step(model, optimizer, tokens):
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
    optimizer.step()  # in flight on the side stream from here
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def _forward(model, tokens):
    return model(tokens[:, :-1]).float()


def test_the_next_forward_sees_the_whole_update():
    model, optimizer, tokens = _setup()
    for step in range(3):
        _step(model, optimizer, tokens)
        racing = _forward(model, tokens)  # waits only where the hooks make it wait
        torch.cuda.synchronize()
        settled = _forward(model, tokens)
        assert torch.equal(racing, settled), f"step {step + 1}: the forward read weights still being updated"


def test_without_the_waits_the_forward_would_read_stale_weights():
    """The negative control: the same check with the events dropped right after step() must see a difference, or
    the test above could not fail."""
    model, optimizer, tokens = _setup()
    differed = 0
    for _ in range(3):
        _step(model, optimizer, tokens)
        optimizer._events = [None] * len(optimizer._events)  # nothing to wait for
        racing = _forward(model, tokens)
        torch.cuda.synchronize()
        differed += not torch.equal(racing, _forward(model, tokens))
    assert differed > 0


def test_the_norm_taken_on_the_side_stream_during_backward_is_the_norm():
    """The gradient norms each group took on the side stream while backward ran, once waited for, give
    get_total_norm's value bit for bit (computed after the GPU is synchronized)."""
    model, optimizer, tokens = _setup()
    for step in range(3):
        optimizer.last_micro_batch(True)
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
        norm = optimizer.grad_norm()  # waits for the side stream, nothing more
        torch.cuda.synchronize()
        expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], foreach=True)
        assert torch.equal(norm, expected), f"step {step + 1}: {norm.item()} against {expected.item()}"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
