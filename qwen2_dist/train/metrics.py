"""Throughput, MFU and memory of a training step, and the sinks they go to (console, metrics.jsonl)."""

import json
import logging
import os
import resource

import torch

from qwen2_dist.model.args import ModelArgs

log = logging.getLogger(__name__)

# Dense bf16 peak (no sparsity) in FLOP/s, matched against torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100": 989.4e12,
    "H800": 989.4e12,
    "GH200": 989.4e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12 * layers * hidden * seq, N = matmul parameters incl. the output head.

    The embedding lookup costs no FLOPs, so N counts one vocab x hidden matrix whether or not it is tied
    (for tied sizes N equals the parameter count, e.g. 1,543,714,304 for qwen2-1.5b).
    """
    n = args.vocab_size * args.hidden_size
    kv = args.num_key_value_heads * args.head_dim
    per_layer = (
        args.hidden_size * (args.hidden_size + 2 * kv) + 2 * kv + args.hidden_size  # q/k/v with bias
        + args.hidden_size * args.hidden_size  # o
        + 3 * args.hidden_size * args.intermediate_size  # gate, up, down
        + 2 * args.hidden_size  # norms
    )
    n += args.num_hidden_layers * per_layer + args.hidden_size
    return 6 * n + 12 * args.num_hidden_layers * args.hidden_size * seq_len


def peak_flops(device: torch.device, override: float | None = None) -> float | None:
    """The device's dense bf16 peak, or None when unknown (CPU, unlisted GPU)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    log.warning("no peak FLOP/s known for %r: MFU not reported", name)
    return None


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl (rank 0 only)."""

    def __init__(self, path: str, enabled: bool):
        self.enabled = enabled
        self.file = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def format_step(record: dict) -> str:
    """The one console line of a logged step."""
    parts = [
        f"step {record['step']}",
        f"loss {record['loss']:.4f}",
        f"lr {record['lr']:.2e}",
        f"grad_norm {record['grad_norm']:.3f}",
        f"tok/s {record['tokens_per_sec']:,.0f}",
    ]
    if record.get("mfu") is not None:
        parts.append(f"mfu {record['mfu']:.1%}")
    parts.append(f"mem {record['mem_gib']:.2f}GiB")
    parts.append(f"data_wait {record['data_wait_pct']:.1f}%")
    return " | ".join(parts)


def run_file(run_dir: str, name: str) -> str:
    """Path of a file under the run directory."""
    return os.path.join(run_dir, name)
