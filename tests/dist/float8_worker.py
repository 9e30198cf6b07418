"""parity_worker.py with model.float8=true on the CPU, for tests/dist/test_float8_dist.py.

torchao's float8 linears run on the CPU (torch._scaled_mm has a CPU kernel since torch 2.7), so the FSDP2 path of
model.float8 (weights all-gathered in float8, their scales taken after each step in one all-reduce) runs here with
gloo; the trainer refuses model.float8 off CUDA (it is no faster there), which this worker lifts. With
QWEN2_TEST_FLOAT8_PER_WEIGHT=1 the trainer takes no precomputed scales: each all-gather reduces its own weight's amax.

Run as `python tests/dist/float8_worker.py LAYOUT OUT_FILE [hydra overrides...]`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import parity_worker  # noqa: E402

import qwen2_dist.parallel.parallelize as parallelize  # noqa: E402
import qwen2_dist.train.trainer as trainer  # noqa: E402

parallelize.check_float8 = lambda device_type: None
if os.environ.get("QWEN2_TEST_FLOAT8_PER_WEIGHT") == "1":
    trainer.float8_scale_precompute = lambda model: None
# The tiny model's block linears are 16 to 64 wide: all 14 are converted (both dimensions multiples of 16).
parity_worker.LAYOUTS.update({
    "single_float8": (1, ["train.micro_batch_size=4", "model.float8=true"]),
    "fsdp2_float8": (2, ["parallel.dp_shard=2", "train.micro_batch_size=2", "model.float8=true"]),
})

if __name__ == "__main__":
    parity_worker.main()
