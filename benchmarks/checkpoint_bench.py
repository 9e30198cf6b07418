"""Checkpoint save / async blocking / load times for a model size on this machine (default qwen2-0.5b, CPU).

    .venv/bin/python benchmarks/checkpoint_bench.py [--model qwen2-0.5b] [--dir /tmp/ckpt-bench]

Saves model + AdamW state (fp32) the way the trainer does, one process, and prints one line per measurement:
blocking saves with and without file checksums (checkpoint.checksums), an async save, loads with and without
checking the checksums.
"""

import argparse
import os
import shutil
import tempfile
import time

import torch

from qwen2_dist.config import OptimConfig
from qwen2_dist.model.args import get_model_args
from qwen2_dist.model.qwen2 import build_model, count_parameters
from qwen2_dist.train import checkpoint
from qwen2_dist.train.optim import build_optimizer


def _size_gib(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2-0.5b")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    opts = parser.parse_args()
    root = opts.dir or tempfile.mkdtemp(prefix="ckpt-bench-")
    model = build_model(get_model_args(opts.model), "meta")
    model.to_empty(device="cpu")
    model.init_weights(0)
    optimizer = build_optimizer(model, OptimConfig(lr=0.0), "cpu")  # the trainer's groups and state layout
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()  # materializes exp_avg / exp_avg_sq, as after a real step
    print(f"model {opts.model}: {count_parameters(model):,} parameters, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {root}")

    # The first save of a process pays for one-time set-up (seconds): made once, not timed. Before each timed save
    # os.sync(), and each checkpoint but the last removed, so no save waits for the write-back of another's pages.
    checkpoint.Checkpointer(os.path.join(root, "warmup"), keep_last=1).save(1, model, optimizer, {"step": 1}, {})
    shutil.rmtree(os.path.join(root, "warmup"))
    for checksums in (False, True):
        os.sync()
        sync = checkpoint.Checkpointer(os.path.join(root, f"sync-{checksums}"), keep_last=1, checksums=checksums)
        started = time.monotonic()
        path = sync.save(1, model, optimizer, {"step": 1}, {"model": opts.model})
        print(f"save (blocking, checksums={str(checksums).lower():5}): {time.monotonic() - started:7.2f} s  "
              f"({_size_gib(path):.2f} GiB)")
        if not checksums:
            shutil.rmtree(os.path.dirname(path))

    # What checksums add: one CRC32 pass over the files (read back from the page cache, when they are still there).
    files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
    started = time.monotonic()
    for name in files:
        checkpoint.file_checksum(name)
    print(f"checksum pass alone:              {time.monotonic() - started:7.2f} s  ({len(files)} files)")

    asynchronous = checkpoint.Checkpointer(os.path.join(root, "async"), keep_last=1, async_save=True)
    started = time.monotonic()
    asynchronous.save(1, model, optimizer, {"step": 1}, {"model": opts.model})
    blocked = time.monotonic() - started
    asynchronous.wait()
    committed = time.monotonic() - started
    print(f"save (async, checksums=true):     blocked {blocked:.2f} s, committed after {committed:.2f} s")

    checkpoint.load(path, model, optimizer, checksums=False)  # the first load's set-up, not timed
    for checksums in (False, True):
        started = time.monotonic()
        checkpoint.load(path, model, optimizer, checksums=checksums)
        print(f"load (checksums={str(checksums).lower():5}):           {time.monotonic() - started:7.2f} s")
    if opts.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
