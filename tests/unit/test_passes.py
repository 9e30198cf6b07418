"""parallel.fp32_weight_grads: the post-grad pass that lets each weight gradient's matmul write fp32 rewrites exactly
the weight gradients of a compiled block's backward (checked on the graphs Inductor hands it, on the CPU; the
numbers need CUDA: tests/unit/test_passes_gpu.py)."""

import pytest
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from qwen2_dist.cli.train import compose_job
from qwen2_dist.config import ParallelConfig, validate
from qwen2_dist.errors import UserError
from qwen2_dist.model.args import get_model_args
from qwen2_dist.model.qwen2 import DecoderLayer, build_model, rotary_cos_sin
from qwen2_dist.parallel.parallelize import parallelize
from qwen2_dist.parallel.passes import Fp32WeightGradients

aten = torch.ops.aten
prims = torch.ops.prims


def calls(graph: fx.Graph, target) -> list[fx.Node]:
    return [node for node in graph.nodes if node.op == "call_function" and node.target is target]


class Recorder(Fp32WeightGradients):
    """Runs the pass on a copy of each graph (the CPU cannot run its result) and keeps both."""

    def __init__(self):
        self.graphs: list[tuple[fx.Graph, fx.Graph]] = []

    def __call__(self, graph: fx.Graph) -> None:
        copy = fx.Graph()
        copy.output(copy.graph_copy(graph, {}))
        super().__call__(copy)
        self.graphs.append((graph, copy))

    def uuid(self) -> None:
        return None  # no cached graph: the pass must see every compile


def test_rewrites_the_weight_gradients_of_a_compiled_block_and_nothing_else():
    args = get_model_args("debug")
    torch.manual_seed(0)
    recorder = Recorder()
    block = torch.compile(DecoderLayer(args), options={"post_grad_custom_post_pass": recorder})
    x = torch.randn(2, 16, args.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rotary_cos_sin(torch.arange(16).expand(2, -1), args.head_dim, args.rope_theta)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x, cos, sin)
    out.float().sum().backward()
    (forward, forward_after), (backward, backward_after) = recorder.graphs
    # Forward: the products stay bf16 (SwiGLU reads its inputs' views in fp32): nothing to rewrite.
    assert not calls(forward_after, aten.mm.dtype)
    assert len(calls(forward_after, aten.mm.default)) == len(calls(forward, aten.mm.default)) > 0
    # Backward: the 7 projection matrices' gradients (q, k, v, o, gate, up, down), each a bf16 matmul converted to
    # fp32 and returned, become 7 matmuls writing fp32; the input gradients' matmuls stay.
    fused = calls(backward_after, aten.mm.dtype)
    assert len(fused) == 7
    assert len(calls(backward_after, aten.mm.default)) == len(calls(backward, aten.mm.default)) - 7
    returned = set(next(n for n in backward_after.nodes if n.op == "output").args[0])
    weights = {tuple(p.shape) for name, p in DecoderLayer(args).named_parameters() if p.ndim == 2}
    for node in fused:
        a, b, dtype = node.args
        assert dtype == torch.float32 and node in returned
        assert a.meta["val"].dtype == b.meta["val"].dtype == torch.bfloat16
        assert node.meta["val"].dtype == torch.float32 and tuple(node.meta["val"].shape) in weights
    # Every fp32 conversion of a matmul's product that the graph returned is gone.
    for convert in calls(backward_after, prims.convert_element_type.default):
        assert not (convert.args[0].target is aten.mm.default and convert.args[1] == torch.float32
                    and all(user.op == "output" for user in convert.users))


def test_leaves_a_product_with_another_use_or_not_returned():
    graph = fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    with FakeTensorMode():
        a.meta["val"], b.meta["val"] = torch.empty(4, 3, dtype=torch.bfloat16), torch.empty(3, 5, dtype=torch.bfloat16)
    shared = graph.call_function(aten.mm.default, (a, b))
    shared_fp32 = graph.call_function(prims.convert_element_type.default, (shared, torch.float32))
    kept = graph.call_function(prims.convert_element_type.default, (
        graph.call_function(aten.mm.default, (a, b)), torch.float32))
    used = graph.call_function(aten.mul.Tensor, (kept, 2.0))
    graph.output((shared_fp32, shared, used))
    Fp32WeightGradients()(graph)
    assert not calls(graph, aten.mm.dtype) and len(calls(graph, aten.mm.default)) == 2


def test_refused_without_compiled_blocks_on_cuda():
    with pytest.raises(UserError, match="parallel.fp32_weight_grads=true rewrites the compiled blocks"):
        validate(compose_job(["parallel.fp32_weight_grads=true", "parallel.compile=false"]), 1)
    model = build_model(get_model_args("tiny"), "meta")
    with pytest.raises(UserError, match="needs compiled blocks on CUDA .*device cpu"):
        parallelize(model, None, ParallelConfig(fp32_weight_grads=True, compile="true"), device_type="cpu")
