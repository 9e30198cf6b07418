"""Activation checkpointing modes compute the same gradients; `op` recomputes only the element-wise ops."""

import collections

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from qwen2_dist.config import ParallelConfig
from qwen2_dist.model.args import get_model_args
from qwen2_dist.model.qwen2 import build_model
from qwen2_dist.parallel.parallelize import parallelize


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _backward_ops(mode: str):
    """(gradients, op counts of the backward pass) of the tiny model with activation_checkpointing=mode."""
    model = parallelize(build_model(get_model_args("tiny"), "meta"), None,
                        ParallelConfig(activation_checkpointing=mode, compile="false"))
    model.to_empty(device="cpu")
    model.init_weights(0)
    tokens = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(0))
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    with OpCounter() as counter:
        loss.backward()
    grads = {name.replace("._checkpoint_wrapped_module", ""): p.grad for name, p in model.named_parameters()}
    return grads, counter.counts


@pytest.fixture(scope="module")
def runs():
    return {mode: _backward_ops(mode) for mode in ("none", "op", "full")}


@pytest.mark.parametrize("mode", ["op", "full"])
def test_same_gradients_as_without_recompute(runs, mode):
    reference = runs["none"][0]
    for name, grad in runs[mode][0].items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-6, msg=f"{mode}: {name}")


def test_op_mode_recomputes_element_wise_ops_but_no_matmul(runs):
    none, op, full = (runs[mode][1] for mode in ("none", "op", "full"))
    matmuls = ("mm", "addmm", "bmm")
    # Backward's own matmuls only (input and weight gradients): nothing of the forward's is run again...
    assert sum(op[m] for m in matmuls) == sum(none[m] for m in matmuls) < sum(full[m] for m in matmuls)
    # ...while the norms (rsqrt) are: both recompute modes run them again in backward, none does not.
    assert none["rsqrt"] == 0 and op["rsqrt"] > 0 and full["rsqrt"] == op["rsqrt"]
    # ...and attention's forward kernel is kept, not run again (full does run it again).
    attention = [name for name in full if name.startswith("_scaled_dot_product") and not name.endswith("backward")]
    assert attention and all(op[name] == none[name] == 0 < full[name] for name in attention), (attention, op)


def test_op_mode_keeps_every_attention_backend_and_float8_matmul_and_tp_reduce_scatter():
    """The backends the CPU cannot run here (flash-attn and FlexAttention on CUDA, float8's scaled matmul) and TP's
    reduce-scatter are kept by op too, not recomputed: named in the policy's list on this torch."""
    from qwen2_dist.parallel.parallelize import _saved_ops

    saved = _saved_ops()
    for op in (torch.ops.aten._scaled_mm.default, torch.ops.higher_order.flex_attention,
               torch.ops._c10d_functional.reduce_scatter_tensor.default,
               torch.ops.aten._scaled_dot_product_cudnn_attention.default,
               torch.ops.aten._scaled_dot_product_flash_attention.default,
               torch.ops.aten._scaled_dot_product_efficient_attention.default,
               torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default):
        assert op in saved, op
