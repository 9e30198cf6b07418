"""Graph passes for Inductor, given to torch.compile with the compiled blocks (parallelize)."""

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

aten = torch.ops.aten
prims = torch.ops.prims

LOW_PRECISION = (torch.bfloat16, torch.float16)


class Fp32WeightGradients(CustomGraphPass):
    """Post-grad pass (parallel.fp32_weight_grads): a bf16 matmul whose one use is a conversion to fp32 that the
    graph returns becomes one matmul that writes fp32 (aten.mm.dtype; cuBLAS accumulates in fp32 either way).

    That pattern is the weight gradient of an fp32 parameter under autocast, in a compiled block's backward: the
    bf16 product is written, read back and written again in fp32, 8 bytes a weight where the matmul alone writes 4.
    For Qwen2-1.5B's blocks (1.31B weights) about 5 GB of memory traffic a step, ~1.8 ms on an H100 by arithmetic
    (not measured), and each gradient is rounded to bf16 no more. Nothing else matches: in forward, the matmuls'
    products are used in bf16 (SwiGLU's fp32 steps read a view of them), and a product with another use keeps it.
    CUDA only: the CPU has no such matmul."""

    def __call__(self, graph: fx.Graph) -> None:
        for convert in list(graph.nodes):
            if not (convert.op == "call_function" and convert.target is prims.convert_element_type.default
                    and convert.args[1] == torch.float32):
                continue
            product = convert.args[0]
            if not (isinstance(product, fx.Node) and product.target is aten.mm.default and len(product.users) == 1
                    and all(user.op == "output" for user in convert.users)):
                continue
            a, b = product.args
            if not all(isinstance(x, fx.Node) and x.meta.get("val") is not None
                       and x.meta["val"].dtype in LOW_PRECISION for x in (a, b)):
                continue
            with graph.inserting_before(convert):
                fused = graph.call_function(aten.mm.dtype, (a, b, torch.float32))
            fused.meta.update(convert.meta)  # "val": the same fp32 result
            convert.replace_all_uses_with(fused)
            graph.erase_node(convert)
            graph.erase_node(product)

    def __repr__(self) -> str:  # as parallelize logs the Inductor options
        return "Fp32WeightGradients()"

    def uuid(self) -> bytes:
        # Inductor's compiled-graph cache keys on it: a changed pass is a changed key.
        return get_hash_for_files((__file__,))
