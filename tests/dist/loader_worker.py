"""Run by torchrun from test_loader_dist.py: each rank records the sample ids it reads, straight and resumed."""

import json
import os
import sys

import torch.distributed as dist

from qwen2_dist.data.loader import TokenBatches
from tests.datasets import sample_ids


def read_steps(batches: TokenBatches, steps: int) -> list[list[int]]:
    return [sum((sample_ids(batches.next_batch()) for _ in range(batches.grad_accum_steps)), [])
            for _ in range(steps)]


def main(out_dir: str, sources: str, steps: int, stop_at: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def batches() -> TokenBatches:
        weighted = [(path, float(w)) for path, w in (s.split("=") for s in sources.split(","))]
        return TokenBatches(weighted, seq_len=8, micro_batch_size=2, global_batch_size=8, seed=3, dp_rank=rank,
                            dp_size=world)

    straight = batches()
    record = {"straight": read_steps(straight, steps), "prefixes": [straight.dataset._shm_prefix_int]}
    straight.close()
    first = batches()
    record["prefixes"].append(first.dataset._shm_prefix_int)
    record["first"] = read_steps(first, stop_at)
    record["state"] = first.state_dict()
    first.close()
    resumed = batches()
    record["prefixes"].append(resumed.dataset._shm_prefix_int)
    resumed.load_state_dict(record["state"])
    record["resumed"] = read_steps(resumed, steps - stop_at)
    resumed.close()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
