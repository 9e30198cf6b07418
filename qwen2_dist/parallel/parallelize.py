"""The one place that knows about meshes: shard a plain Qwen2 over the DeviceMesh."""

import logging

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from qwen2_dist.model.qwen2 import Qwen2

log = logging.getLogger(__name__)


def parallelize(model: Qwen2, mesh: DeviceMesh | None, param_dtype: torch.dtype) -> Qwen2:
    """Apply FSDP2 (HSDP when dp_replicate > 1) per decoder block and at the root; no-op for one process."""
    if mesh is None:
        return model
    dp_mesh = mesh["dp_replicate", "dp_shard"] if mesh["dp_replicate"].size() > 1 else mesh["dp_shard"]
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mesh=dp_mesh, mp_policy=policy)
    # The root group holds the embedding, which is also the output head when tied: one group keeps the tie.
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)
    # The loss is already divided by the global token count, so gradients are summed, not averaged, over ranks.
    model.set_gradient_divide_factor(1.0)
    log.info("FSDP2 over %s (param dtype %s, reduce fp32)", dp_mesh, param_dtype)
    return model


def set_gradient_sync(model: Qwen2, enabled: bool) -> None:
    """Turn gradient reduction on or off for the next backward (off for all but the last micro-batch)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
