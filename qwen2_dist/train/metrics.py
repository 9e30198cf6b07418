"""Throughput, MFU and memory of a training step, and the sinks they go to (console, metrics.jsonl)."""

import hashlib
import json
import logging
import os
import resource

import torch

from qwen2_dist.model.args import ModelArgs

log = logging.getLogger(__name__)

# Dense bf16 peak (no sparsity) in FLOP/s, matched against torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {  # dense bf16, by a substring of torch.cuda.get_device_name(); the first match wins
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989.4e12,
    "H100": 989.4e12,
    "H800": 989.4e12,
    "GH200": 989.4e12,
    "GB200": 2500e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "MI300X": 1307.4e12,
    "MI325X": 1307.4e12,
    "MI250X": 191.5e12,  # one of its two dies: PyTorch sees each as a device
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


class MetricsSinks:
    """Where logged steps go: metrics.jsonl always, TensorBoard and W&B when asked (rank 0 only)."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "qwen2-dist", wandb_mode: str = "offline", config: dict | None = None):
        self.enabled = enabled
        self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8") if enabled else None
        self.tb = None
        self.wandb_run = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if enabled and wandb:
            import wandb as wandb_lib

            # A stable id from the run directory, so a resumed run appends to the same W&B run.
            run_id = "qwen2-" + hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:12]
            self.wandb_run = wandb_lib.init(project=wandb_project, mode=wandb_mode, dir=run_dir, id=run_id,
                                            resume="allow", config=config)

    def write(self, record: dict) -> None:
        """Record one logged step in every sink."""
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(f"train/{key}", value, record["step"])
            self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(numbers, step=record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


class StepProfiler:
    """A torch.profiler trace of the steps START:END (1-based, END excluded), one Chrome trace per rank."""

    def __init__(self, spec: str | None, run_dir: str, rank: int):
        self.start, self.end = (int(x) for x in spec.split(":")) if spec else (0, 0)
        self.path = os.path.join(run_dir, "profile", f"rank{rank}.json")
        self.profiler = None

    def before_step(self, step: int) -> None:
        """Called with the number of the step about to run."""
        if step == self.start:
            self.profiler = torch.profiler.profile(record_shapes=True, with_stack=False)
            self.profiler.__enter__()

    def after_step(self, step: int) -> None:
        """Called with the number of the step that just ran."""
        if self.profiler is not None and step + 1 >= self.end:
            self.profiler.__exit__(None, None, None)
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.profiler.export_chrome_trace(self.path)
            log.info("profiler: trace of steps %d-%d written to %s", self.start, self.end - 1, self.path)
            self.profiler = None


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
