"""The one place that knows about meshes: shard a plain Qwen2 over the DeviceMesh.

Applied in a fixed order, each step on the result of the one before:
tensor + sequence parallelism -> activation checkpointing -> torch.compile per block (and the final norm) -> FSDP2 per
block and root.
"""

import contextlib
import functools
import importlib
import logging

import torch
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from qwen2_dist.config import ParallelConfig, compile_fails_with_recompute_under_tp, inductor_options
from qwen2_dist.errors import UserError
from qwen2_dist.model.qwen2 import Qwen2, TiedHead

log = logging.getLogger(__name__)


def parallelize(
    model: Qwen2,
    mesh: DeviceMesh | None,
    cfg: ParallelConfig,
    param_dtype: torch.dtype = torch.float32,
    device_type: str = "cpu",
    float8: bool = False,
    kernels: str = "torch",
) -> Qwen2:
    """Apply float8 linears (model.float8), TP(+SP), activation checkpointing, per-block compile and FSDP2 (HSDP
    when dp_replicate > 1).

    One process (mesh None) gets only checkpointing and compile. Call on the meta device, before to_empty.
    """
    check_parallel_on(cfg, device_type, kernels)
    tp = mesh["tp"].size() if mesh is not None else 1
    if float8:
        apply_float8(model, device_type, fsdp=mesh is not None)
    if tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if cfg.activation_checkpointing == "op":
        for index, layer in enumerate(model.layers):
            model.layers[index] = checkpoint_wrapper(layer, context_fn=_recompute_elementwise_only)
    elif cfg.activation_checkpointing != "none":
        every = 1 if cfg.activation_checkpointing == "full" else cfg.ac_every
        for index, layer in enumerate(model.layers):
            if index % every == 0:
                model.layers[index] = checkpoint_wrapper(layer)
    compiled = compile_enabled(cfg, device_type, kernels)
    options = inductor_options(cfg)
    if cfg.fp32_weight_grads:
        from qwen2_dist.parallel.passes import Fp32WeightGradients  # imports Inductor (a second): only when used

        options = {**options, "post_grad_custom_post_pass": Fp32WeightGradients()}
    if compiled:
        # Each block on its own (one graph, reused by every block), before FSDP so its hooks stay outside the graph.
        for index, layer in enumerate(model.layers):
            model.layers[index] = torch.compile(layer, options=options or None)
        if tp == 1:
            # The final norm too. Eager, each of its fp32 steps is a kernel over the whole micro-batch writing a
            # (tokens, hidden) tensor, most of them in fp32: for Qwen2-1.5B at 16,384 tokens about 2.6 GB of memory
            # traffic a step, forward and backward (~0.8 ms on an H100 by arithmetic, not measured); compiled, one
            # kernel each way, under 0.3 GB, and no fp32 copy of its input kept for backward (96 MiB there). Under
            # TP its input is a sequence-sharded DTensor: it stays eager there (not tried).
            model.norm = torch.compile(model.norm, options=options or None)
    if mesh is not None:
        apply_fsdp(model, mesh, cfg, param_dtype, device_type)
    log.info(
        "parallelize: tp %d, activation checkpointing %s%s, compile %s, %s",
        tp, cfg.activation_checkpointing,
        f" (every {cfg.ac_every})" if cfg.activation_checkpointing == "selective" else
        " (matmuls and attention kept, element-wise ops recomputed)" if cfg.activation_checkpointing == "op" else "",
        ("on" + (f" with Inductor options {options}" if options else "")) if compiled else
        "off" + (f" (parallel.compile_options {options} unused)" if options else ""),
        "one process (no FSDP)" if mesh is None else
        f"FSDP2 dp_replicate {mesh['dp_replicate'].size()} x dp_shard {mesh['dp_shard'].size()}, param dtype "
        f"{param_dtype}, reduce fp32, reshard {cfg.reshard_after_forward}, cpu offload {cfg.cpu_offload}",
    )
    return model


@functools.cache
def _saved_ops() -> frozenset:
    """The ops whose outputs activation_checkpointing=op keeps: the matmuls (float8's _scaled_mm too) and attention
    (the FLOPs of a block), whichever backend runs it (SDPA's, flash-attn's, FlexAttention), and TP's reduce-scatter
    (recomputing it would repeat the communication in backward)."""
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward", "_efficient_attention_forward")
    saved = {getattr(aten, name).default for name in names if hasattr(aten, name)}
    saved.add(torch.ops._c10d_functional.reduce_scatter_tensor.default)
    saved.add(torch.ops.higher_order.flex_attention)
    if importlib.util.find_spec("flash_attn") is not None:
        try:
            importlib.import_module("flash_attn")  # its import registers torch.ops.flash_attn
            saved |= {torch.ops.flash_attn._flash_attn_forward.default,
                      torch.ops.flash_attn._flash_attn_varlen_forward.default}
        except (ImportError, AttributeError, RuntimeError):  # an older flash-attn without torch ops, a broken build
            pass
    return frozenset(saved)


def _recompute_elementwise_only():
    """Selective checkpointing contexts: keep what _saved_ops makes, recompute everything else in backward."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = _saved_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def compile_enabled(cfg: ParallelConfig, device_type: str, kernels: str = "torch") -> bool:
    """parallel.compile resolved: auto compiles on CUDA only (a first CPU compile costs tens of seconds), not around
    hand-written kernels (model.kernels liger or apex), and not where this torch cannot (see
    compile_fails_with_recompute_under_tp)."""
    choice = str(cfg.compile).lower()
    return choice == "true" or (choice == "auto" and device_type == "cuda" and kernels == "torch"
                                and not compile_fails_with_recompute_under_tp(cfg))


def check_float8(device_type: str) -> None:
    """UserError unless model.float8=true can run here: a CUDA GPU of compute capability >= 8.9, and torchao."""
    if device_type != "cuda" or torch.cuda.get_device_capability() < (8, 9):
        raise UserError("model.float8=true needs a CUDA GPU of compute capability >= 8.9 (H100, L40S, RTX 4090); "
                        "set model.float8=false")
    try:
        importlib.import_module("torchao.float8")
    except ImportError:
        raise UserError("model.float8=true: the torchao package is not importable; pip install torchao or set "
                        "model.float8=false") from None


def apply_float8(model: Qwen2, device_type: str, fsdp: bool) -> None:
    """Swap the decoder blocks' linear layers for torchao's Float8Linear (dynamic tensor-wise scaling; with FSDP2 the
    weights are all-gathered in float8). The output head stays bf16: it feeds the loss, where float8 hurts most."""
    check_float8(device_type)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    def wanted(module: torch.nn.Module, name: str) -> bool:
        # float8 matmuls need both dimensions divisible by 16.
        return (isinstance(module, torch.nn.Linear) and name.startswith("layers.")
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    convert_to_float8_training(model, config=Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp),
                               module_filter_fn=wanted)
    log.info("float8: decoder-block linears converted (torchao, dynamic tensor-wise scaling)")


def float8_scale_precompute(model: nn.Module):
    """torchao's precompute_float8_dynamic_scale_for_fsdp when the model has float8 weights that FSDP2 all-gathers in
    float8 (apply_float8 with fsdp=True) on the training device, else None. Called after each optimizer step, it
    takes every such weight's amax in one all-reduce (a max over the shards) and sets the scale the next
    all-gathers cast with; without it, each weight's all-gather all-reduces its own amax first, in forward and again
    in backward's all-gather where blocks are resharded after forward: hundreds of small, latency-bound collectives a
    step (196 in forward for qwen2-1.5b). Once set, a scale is used until the next call sets it anew, so it must be
    called after every update of the weights (torchtitan's float8.precompute_float8_dynamic_scale_for_fsdp).
    CPU-offloaded weights keep the per-weight reduction (their amax would be all-reduced from host memory)."""
    if not any(type(module).__name__ == "Float8Linear" for module in model.modules()):
        return None
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    weights = [p for p in model.parameters()
               if isinstance(p, DTensor) and isinstance(p._local_tensor, WeightWithDynamicFloat8CastTensor)]
    if not weights or any(p.device.type != p.device_mesh.device_type for p in weights):
        return None
    return functools.partial(precompute_float8_dynamic_scale_for_fsdp, model)


def _settle(module: nn.Module, inputs, output: DTensor) -> DTensor:
    """Forward hook of the tensor-parallel embedding: its output with the reduce-scatter already waited for.

    The sequence-sharded output of the embedding holds its local shard as an AsyncCollectiveTensor (the collective
    is waited for at first use), while every later block receives a plain tensor from the block before it. A
    compiled block guards on that type, so torch 2.11 and 2.13 compiled the block function twice (2.14.1 once). The
    first block needs the shard at once, so the wait only comes one hook earlier, and one compiled graph is left
    (wait_tensor keeps the autograd graph; AsyncCollectiveTensor.wait would cut the embedding's gradient).
    """
    local = output.to_local()
    if not isinstance(local, AsyncCollectiveTensor):
        return output
    local = torch.ops._c10d_functional.wait_tensor(local)
    return DTensor.from_local(local, output.device_mesh, output.placements, run_check=False, shape=output.shape,
                              stride=output.stride())


def apply_tensor_parallel(model: Qwen2, tp_mesh: DeviceMesh) -> None:
    """Megatron-style TP with sequence parallelism over tp_mesh; the logits come out vocabulary-sharded.

    Between blocks the residual stream is split along the sequence (dim 1); each block gathers it before q/k/v and
    gate/up (column-parallel: heads and MLP width split) and reduce-scatters it after o and down (row-parallel).
    The embedding is split over the vocabulary, and so is the head: when tied, the head reads the embedding's own
    sharded matrix (one parameter serves both), so only its input layout needs declaring.
    The residual stream stays a DTensor (use_local_output=False where it is made): given a plain local tensor, a
    compiled block of torch 2.13 returned no gradient for its input, so the embedding never trained (2.11 was right).
    """
    if isinstance(model.lm_head, TiedHead):
        head = PrepareModuleInput(input_layouts=Shard(1), desired_input_layouts=Replicate())
    else:
        head = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(model, tp_mesh, {
        "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False),
        "norm": SequenceParallel(),
        "lm_head": head,
    })
    model.embed_tokens.register_forward_hook(_settle)
    for layer in model.layers:
        parallelize_module(layer, tp_mesh, {
            "input_layernorm": SequenceParallel(),
            # Attention.forward(x, cos, sin): only x is sharded; the rotary tables are plain, full-length tensors.
            "self_attn": PrepareModuleInput(
                input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)
            ),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        })


def check_parallel_on(cfg: ParallelConfig, device_type: str, kernels: str = "torch") -> None:
    """The parallel settings that need CUDA (or compiled blocks), refused on this device: checked by the launchers
    before the workers start, and by parallelize()."""
    compiled = compile_enabled(cfg, device_type, kernels)
    if cfg.fp32_weight_grads and (device_type != "cuda" or not compiled):
        raise UserError("parallel.fp32_weight_grads=true needs compiled blocks on CUDA (the CPU has no bf16 matmul "
                        f"writing fp32; here: device {device_type}, compile {'on' if compiled else 'off'}); set "
                        "parallel.fp32_weight_grads=false")
    if cfg.cpu_offload and device_type != "cuda":
        raise UserError("parallel.cpu_offload=true needs CUDA devices; set parallel.cpu_offload=false")


def apply_fsdp(
    model: Qwen2, mesh: DeviceMesh, cfg: ParallelConfig, param_dtype: torch.dtype, device_type: str
) -> None:
    """FSDP2 per decoder block and at the root (embedding, final norm, head: one group keeps a tie in one piece)."""
    dp_mesh = mesh["dp_replicate", "dp_shard"] if mesh["dp_replicate"].size() > 1 else mesh["dp_shard"]
    # The blocks' inputs as they come: the residual stream is in param_dtype already (the root's embedding), and
    # the rotary tables stay fp32, as in one process under autocast (FSDP's default would round them to bf16).
    block_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    options = {"mesh": dp_mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)}
    if cfg.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    last = len(model.layers) - 1
    for index, layer in enumerate(model.layers):
        # default: the last block is needed again as soon as backward starts, so its weights stay gathered.
        reshard = {"always": True, "never": False, "default": index < last}[cfg.reshard_after_forward]
        fully_shard(layer, reshard_after_forward=reshard, **{**options, "mp_policy": block_policy})
    # None lets FSDP keep the root's weights gathered between forward and backward (they are used first in both).
    root_reshard = {"always": True, "never": False, "default": None}[cfg.reshard_after_forward]
    fully_shard(model, reshard_after_forward=root_reshard, **options)
    # The loss is already divided by the global token count, so gradients are summed, not averaged, over ranks,
    # with plain SUM collectives (a factor alone means NCCL's PREMUL_SUM, which gloo lacks). Each call sets one
    # group only, so every block and the root get it.
    for module in (*model.layers, model):
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)


def loss_context(mesh: DeviceMesh | None) -> contextlib.AbstractContextManager:
    """Where the loss and its backward must run: loss_parallel when the logits are vocabulary-sharded (tp > 1)."""
    if mesh is not None and mesh["tp"].size() > 1:
        return loss_parallel()
    return contextlib.nullcontext()


def set_gradient_sync(model: Qwen2, last: bool, every_micro_batch: bool = False) -> None:
    """Gradient reduction for the next backward, that of the step's last micro-batch or of an earlier one. By
    default only the last reduces: the earlier ones keep every block's unsharded fp32 gradient until then (no
    communication before the last backward). every_micro_batch (parallel.reduce_every_micro_batch): each backward
    reduce-scatters, so only the sharded gradients are kept between micro-batches, and HSDP's all-reduce over the
    replicas runs at the last one only."""
    if not hasattr(model, "set_requires_gradient_sync"):
        return
    if every_micro_batch:
        model.set_requires_gradient_sync(True)
        model.set_requires_all_reduce(last)
    else:
        model.set_requires_gradient_sync(last)
