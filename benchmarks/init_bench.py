"""How long a fresh run's weight initialization takes one rank, on this machine's CPU.

    .venv/bin/python benchmarks/init_bench.py [--model qwen2-1.5b] [--dp-shard 8] [--tp 1] [--rank 0]

Builds the model on the meta device, shards it as the trainer does for that layout (FSDP over --dp-shard ranks, TP
over --tp; a fake process group of dp_shard x tp ranks stands in for the others, so nothing is sent), materializes
this rank's shards on the CPU and times init_weights(). Prints one line: seconds, values drawn by this rank, and the
model's parameter count. --dp-shard 1 --tp 1 is one process (no sharding: every value drawn).
"""

import argparse
import time

import torch
import torch.distributed as dist

from qwen2_dist.config import ParallelConfig
from qwen2_dist.model.args import get_model_args
from qwen2_dist.model.qwen2 import build_model, count_parameters
from qwen2_dist.parallel.mesh import World, build_mesh
from qwen2_dist.parallel.parallelize import parallelize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2-1.5b")
    parser.add_argument("--dp-shard", type=int, default=8)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    world_size = opts.dp_shard * opts.tp
    model = build_model(get_model_args(opts.model), "meta")
    parameters = count_parameters(model)
    if world_size > 1:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=opts.rank, world_size=world_size)
        world = World(rank=opts.rank, local_rank=opts.rank, world_size=world_size, device=torch.device("cpu"))
        mesh = build_mesh(world, 1, opts.dp_shard, opts.tp)
        model = parallelize(model, mesh, ParallelConfig(dp_shard=opts.dp_shard, tp=opts.tp), torch.float32, "cpu")
    model.to_empty(device="cpu")
    start = time.perf_counter()
    drawn = model.init_weights(opts.seed)
    seconds = time.perf_counter() - start
    print(f"{opts.model} dp_shard={opts.dp_shard} tp={opts.tp} rank={opts.rank}: init_weights {seconds:.2f} s, "
          f"{drawn / 1e6:.1f}M values drawn of {parameters / 1e6:.1f}M parameters "
          f"({torch.get_num_threads()} threads)")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
