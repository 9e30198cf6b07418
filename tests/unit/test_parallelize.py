"""parallelize() on a fake 8-rank world (one process, values meaningless): every layout runs forward and backward,
the logits come out vocabulary-sharded under TP, and the tied embedding stays one parameter."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.debug import _clear_sharding_prop_cache
from torch.testing._internal.distributed.fake_pg import FakeStore

from qwen2_dist.config import ParallelConfig
from qwen2_dist.errors import UserError
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


# (the tiny model's 2 blocks) which are checkpointed, and which reshard after forward
@pytest.mark.parametrize("dp_replicate, dp_shard, tp, checkpointing, reshard, wrapped, resharded", [
    (2, 2, 2, "full", "default", [True, True], [True, False]),  # HSDP x TP: three mesh axes
    (1, 4, 2, "selective", "never", [True, False], [False, False]),  # ac_every=2: every 2nd block from the first
    (2, 4, 1, "none", "always", [False, False], [True, True]),
])
def test_layout_runs_and_keeps_the_tie(fake_world, dp_replicate, dp_shard, tp, checkpointing, reshard, wrapped,
                                       resharded):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    args = get_model_args("tiny")
    cfg = ParallelConfig(dp_replicate=dp_replicate, dp_shard=dp_shard, tp=tp, activation_checkpointing=checkpointing,
                         ac_every=2, reshard_after_forward=reshard)
    mesh = build_mesh(fake_world, dp_replicate, dp_shard, tp)
    model = parallelize(build_model(args, "meta"), mesh, cfg, torch.bfloat16, "cpu")
    assert [isinstance(layer, CheckpointWrapper) for layer in model.layers] == wrapped
    # FSDP2 keeps a block's mesh for after forward only when it reshards then.
    assert [layer._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is not None
            for layer in model.layers] == resharded
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


def test_one_process_compiles_the_final_norm_and_it_computes_the_eager_norm():
    """parallel.compile compiles the final RMSNorm too (one process, no TP); under bf16 autocast its output and its
    gradients are the eager norm's to bf16 rounding, its parameter keeps the name checkpoints save it under."""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    args = get_model_args("tiny")
    eager = build_model(args, "cpu")
    eager.init_weights(0)
    model = parallelize(build_model(args, "meta"), None, ParallelConfig(compile="true"), device_type="cpu")
    assert isinstance(model.norm, OptimizedModule) and not isinstance(eager.norm, OptimizedModule)
    model.to_empty(device="cpu")
    model.init_weights(0)  # tells the norms' weights (ones) apart by module: the wrapper prefixed their names
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), eager.parameters()) if a.ndim == 2)
    assert torch.equal(model.norm.weight, torch.ones(args.hidden_size))
    # Checkpoints and Hugging Face export name parameters as DCP's state dict does: without the wrapper's prefix.
    saved = get_model_state_dict(model)
    assert set(saved) == set(eager.state_dict()) and "norm.weight" in saved
    with torch.no_grad():
        eager.norm.weight.uniform_(0.5, 1.5)
    set_model_state_dict(model, eager.state_dict())
    x = torch.randn(2, 16, args.hidden_size, dtype=torch.bfloat16)

    def run(norm, bf16: bool) -> list[torch.Tensor]:
        """The output and the gradients of x and of the weight, of a loss that makes them all non-trivial."""
        x_in = (x if bf16 else x.float()).clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = norm(x_in)
        (out.float().pow(2) * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads = [out.detach().float(), x_in.grad.float(), norm.weight.grad.float()]
        norm.weight.grad = None
        return grads

    exact = run(eager.norm, bf16=False)  # fp32 throughout: the scale of bf16's rounding
    plain, compiled = run(eager.norm, bf16=True), run(model.norm, bf16=True)
    for name, reference, a, b in zip(("output", "d x", "d weight"), exact, plain, compiled):
        error_plain = ((a - reference).norm() / reference.norm()).item()
        error_compiled = ((b - reference).norm() / reference.norm()).item()
        print(f"{name}: relative error eager bf16 {error_plain:.2e}, compiled bf16 {error_compiled:.2e}")
        # Compiled, the fp32 steps are not rounded to bf16 in between: no further from fp32 than the eager norm.
        assert error_compiled <= 1.5 * error_plain + 1e-4, name


def test_fsdp_in_bf16_computes_what_one_process_computes_under_autocast(tmp_path):
    """A real 1-rank FSDP2 group with bf16 weights gives the logits of the plain model under bf16 autocast (what one
    process runs), bit for bit: the blocks get the residual stream in bf16 either way and the rotary tables in fp32
    (FSDP casts no block input), so one GPU and many compute alike."""
    from qwen2_dist.parallel.parallelize import apply_fsdp

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        args = get_model_args("tiny")
        tokens = torch.randint(0, args.vocab_size, (2, 256), generator=torch.Generator().manual_seed(0))
        plain = build_model(args, "cpu")
        plain.init_weights(0)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            expected = plain(tokens).float()
        sharded = build_model(args, "cpu")
        sharded.init_weights(0)
        # build_mesh gives one process no mesh (it runs without FSDP): the mesh of a 1 x 1 x 1 layout by hand.
        mesh = init_device_mesh("cpu", (1, 1, 1), mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
        apply_fsdp(sharded, mesh, ParallelConfig(), torch.bfloat16, "cpu")
        with torch.no_grad():
            assert torch.equal(sharded(tokens).float(), expected)
    finally:
        dist.destroy_process_group()
        _clear_sharding_prop_cache()


@pytest.mark.parametrize("every_micro_batch", [False, True])
def test_gradients_between_micro_batches_are_sharded_only_when_reduced_every_micro_batch(tmp_path, every_micro_batch):
    """parallel.reduce_every_micro_batch: after a micro-batch that is not the step's last, the gradients are reduced
    into the sharded parameters' .grad (nothing unsharded kept); by default nothing is reduced until the last one
    (every block keeps its unsharded gradient); both end with the same gradients."""
    from qwen2_dist.parallel.parallelize import apply_fsdp, set_gradient_sync

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        args = get_model_args("tiny")
        model = build_model(args, "cpu")
        model.init_weights(0)
        mesh = init_device_mesh("cpu", (1, 1, 1), mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
        apply_fsdp(model, mesh, ParallelConfig(), torch.float32, "cpu")
        tokens = torch.randint(0, args.vocab_size, (2, 2, 16), generator=torch.Generator().manual_seed(0))
        for index in range(2):
            set_gradient_sync(model, index == 1, every_micro_batch)
            model(tokens[index]).float().logsumexp(-1).mean().backward()
            if index == 0:
                reduced = [p.grad is not None for p in model.layers[0].parameters()]
                assert all(reduced) if every_micro_batch else not any(reduced)
        grads = {name: p.grad.full_tensor().clone() for name, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()
        _clear_sharding_prop_cache()
    plain = build_model(args, "cpu")
    plain.init_weights(0)
    for index in range(2):
        plain(tokens[index]).float().logsumexp(-1).mean().backward()
    for name, p in plain.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-6), name


def test_more_processes_on_a_node_than_gpus_is_a_user_error_naming_nproc(monkeypatch):
    from qwen2_dist.parallel.mesh import init_distributed

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: pytest.fail("set_device reached"))
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(UserError, match=r"local rank 3: this node starts 4 processes, but torch sees 2 GPU\(s\) here "
                                        r"\(CUDA_VISIBLE_DEVICES=0,1\); start one process per GPU: NPROC=2"):
        init_distributed("cuda")


def test_agree_max_gives_every_rank_the_largest_value_of_any_rank(monkeypatch):
    """The logged mem_gib is the largest peak over the ranks (the rank nearest its limit), not rank 0's own."""
    from qwen2_dist.parallel.mesh import agree_max

    other_rank = torch.tensor([7.5, 0.25], dtype=torch.float64)

    def all_reduce(tensor, op):  # what a second rank holding other_rank contributes
        assert op == dist.ReduceOp.MAX
        torch.maximum(tensor, other_rank, out=tensor)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    assert agree_max([3.0, 1.5]) == [7.5, 1.5]


@pytest.mark.parametrize("dp_replicate, dp_shard, tp, tied", [
    (1, 4, 2, True), (1, 4, 2, False), (2, 2, 2, True), (1, 8, 1, True),
])
def test_every_rank_initializes_its_shards_as_one_process_does_drawing_only_its_blocks(monkeypatch, dp_replicate,
                                                                                       dp_shard, tp, tied):
    """init_weights on a sharded model (FSDP, HSDP, TP x FSDP: _StridedShard rows; a tied and an untied head): every
    rank's shards hold the values of the same shards of the one-process model, while the rank draws only the row
    blocks it holds rows of. Blocks of 96 values (3 rows of a 32-wide matrix), so that shards cut through blocks
    and hold several."""
    from dataclasses import replace

    import qwen2_dist.model.qwen2 as qwen2

    monkeypatch.setattr(qwen2, "INIT_BLOCK_VALUES", 96)
    # Uneven shards (FSDP pads the last ranks' rows): 1002 rows, 501 per TP rank (validate() has tp divide it).
    args = replace(get_model_args("tiny", tie_word_embeddings=tied), vocab_size=1002)
    plain = build_model(args, "cpu")
    total = plain.init_weights(3)
    expected = dict(plain.named_parameters())
    cfg = ParallelConfig(dp_replicate=dp_replicate, dp_shard=dp_shard, tp=tp)
    for rank in range(8):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=8)
        try:
            world = World(rank=rank, local_rank=rank, world_size=8, device=torch.device("cpu"))
            model = parallelize(build_model(args, "meta"), build_mesh(world, dp_replicate, dp_shard, tp), cfg,
                                torch.float32, "cpu")
            model.to_empty(device="cpu")
            drawn = model.init_weights(3)
            for name, param in model.named_parameters():
                shard = distribute_tensor(expected[name].detach(), param.device_mesh, param.placements,
                                          src_data_rank=None)
                assert torch.equal(param.to_local(), shard.to_local()), (rank, name, param.placements)
        finally:
            dist.destroy_process_group()
            _clear_sharding_prop_cache()
        # Each matrix is split dp_shard ways along its rows (TP's halves are rows of some, columns of others).
        assert drawn <= total / dp_shard + 2 * 96 * len(expected), (rank, drawn, total)
