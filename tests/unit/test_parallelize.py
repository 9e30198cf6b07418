"""parallelize() on a fake 8-rank world (one process, values meaningless): every layout runs forward and backward,
the logits come out vocabulary-sharded under TP, and the tied embedding stays one parameter."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.debug import _clear_sharding_prop_cache
from torch.testing._internal.distributed.fake_pg import FakeStore

from qwen2_dist.config import ParallelConfig
from qwen2_dist.model.args import get_model_args
from qwen2_dist.model.qwen2 import build_model
from qwen2_dist.parallel.mesh import World, build_mesh
from qwen2_dist.parallel.parallelize import loss_context, parallelize


@pytest.fixture
def fake_world():
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    yield World(rank=0, local_rank=0, world_size=8, device=torch.device("cpu"))
    dist.destroy_process_group()
    # DTensor caches sharding decisions per mesh shape; one process meets several meshes only in tests.
    _clear_sharding_prop_cache()


@pytest.mark.parametrize("dp_replicate, dp_shard, tp, checkpointing, reshard", [
    (2, 2, 2, "full", "default"),  # HSDP x TP: three mesh axes
    (1, 4, 2, "selective", "never"),
    (2, 4, 1, "none", "always"),
])
def test_layout_runs_and_keeps_the_tie(fake_world, dp_replicate, dp_shard, tp, checkpointing, reshard):
    args = get_model_args("tiny")
    cfg = ParallelConfig(dp_replicate=dp_replicate, dp_shard=dp_shard, tp=tp, activation_checkpointing=checkpointing,
                         ac_every=2, reshard_after_forward=reshard)
    mesh = build_mesh(fake_world, dp_replicate, dp_shard, tp)
    model = parallelize(build_model(args, "meta"), mesh, cfg, torch.bfloat16, "cpu")
    model.to_empty(device="cpu")
    model.init_weights(0)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert all(isinstance(p, DTensor) for p in model.parameters())
    tokens = torch.randint(0, args.vocab_size, (2, 17))
    logits = model(tokens[:, :-1])
    if tp > 1:
        assert logits.placements == (Shard(2),) and logits.shape == (2, 16, args.vocab_size)
    with loss_context(mesh):
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
        loss.backward()
    assert all(p.grad is not None for p in model.parameters())
