"""parallel.cpu_offload on CUDA: the model is built as qwen2-train builds it, sharded by FSDP with its parameters and
AdamW on the CPU, trains, and skips a NaN step there. Skipped without a GPU (benchmarks/gpu_check.sh runs it there).

The job needs several processes (config.validate); the GPU machine has one GPU, so the test makes FSDP's mesh of one
process itself: the same wrapping, offload and optimizer path, without the collectives' traffic.
"""

import socket

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from qwen2_dist.model.args import get_model_args
from qwen2_dist.model.qwen2 import build_model
from qwen2_dist.train.faults import INJECT_NAN_ENV

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def test_an_offloaded_model_trains_on_the_gpu_and_skips_a_nan_step_on_the_cpu(tmp_path, monkeypatch):
    from qwen2_dist.cli.train import build_model_and_optimizer, compose_job
    from qwen2_dist.data.synthetic import SyntheticBatches
    from qwen2_dist.parallel.mesh import World
    from qwen2_dist.train.trainer import Trainer

    torch.cuda.set_device(0)
    dist.init_process_group("cuda:nccl,cpu:gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    try:
        mesh = init_device_mesh("cuda", (1, 1, 1), mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
        mesh._qwen2_dp = mesh["dp_replicate", "dp_shard"]._flatten("dp")  # as mesh.build_mesh makes it
        job = compose_job(["model=tiny", f"run_dir={tmp_path}", "train.device=cuda", "train.seq_len=64",
                           "train.micro_batch_size=2", "train.global_batch_size=2", "optim.warmup_steps=0",
                           "optim.lr=1e-2", "parallel.cpu_offload=true", "checkpoint.interval=0",
                           "parallel.compile=false"])  # what is tested is the offload, not the compile
        world = World(rank=0, local_rank=0, world_size=1, device=torch.device("cuda", 0))
        model, optimizer = build_model_and_optimizer(job, world, mesh, "cuda")
        assert {_local(p).device.type for p in model.parameters()} == {"cpu"}
        args = job.model.args()
        # The offloaded shards (on the CPU, the mesh on the GPU) start from the one-process CPU model's values.
        plain = build_model(args, "cpu")
        plain.init_weights(job.seed)
        for (name, param), expected in zip(model.named_parameters(), plain.parameters()):
            assert torch.equal(_local(param).float(), expected), name
        batches = SyntheticBatches(args.vocab_size, 64, 2, 2, seed=0)
        trainer = Trainer(job, args, world, mesh, model, optimizer, batches, {})
        monkeypatch.setenv(INJECT_NAN_ENV, "2")
        losses, weights = [], []
        for step in range(3):
            trainer.step = step
            loss, _, _ = trainer.train_step()
            losses.append(float(loss))
            weights.append([_local(p).detach().clone() for p in model.parameters()])
        assert losses[0] == losses[0] and losses[2] == losses[2] and losses[1] != losses[1], losses
        assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1])), "the NaN step was applied"
        assert not all(torch.equal(a, b) for a, b in zip(weights[1], weights[2])), "the good step was not"
    finally:
        dist.destroy_process_group()


def test_weights_initialized_on_the_gpu_are_those_drawn_on_the_cpu():
    """init_weights of a model on CUDA (drawn on the CPU block by block and copied) gives the CPU model's values."""
    args = get_model_args("tiny", vocab_size=4096)
    on_gpu = build_model(args, "meta").to_empty(device="cuda")
    on_gpu.init_weights(5)
    on_cpu = build_model(args, "cpu")
    on_cpu.init_weights(5)
    for (name, param), expected in zip(on_gpu.named_parameters(), on_cpu.parameters()):
        assert param.device.type == "cuda" and torch.equal(param.cpu(), expected), name
