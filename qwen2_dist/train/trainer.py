"""The training loop: batches -> forward -> loss over the global token count -> backward -> clip -> step."""

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh

from qwen2_dist.config import JobConfig
from qwen2_dist.data.loader import TokenBatches
from qwen2_dist.model.args import ModelArgs
from qwen2_dist.parallel.mesh import World, all_reduce_sum
from qwen2_dist.parallel.parallelize import set_gradient_sync
from qwen2_dist.train import checkpoint
from qwen2_dist.train.metrics import MetricsWriter, flops_per_token, format_step, memory_gib, peak_flops
from qwen2_dist.train.optim import lr_at, set_lr

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """How a run ended."""

    step: int
    tokens_seen: int
    last_loss: float | None
    stopped_by_signal: bool


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (preemption); the loop saves and leaves at the end of the current step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        log.warning("received %s: saving a checkpoint after this step and stopping", signal.Signals(signum).name)

    def agreed(self, mesh: DeviceMesh | None) -> bool:
        """True on every rank when any rank was signalled (a CPU all-reduce: no device sync)."""
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Trainer:
    """Owns the loop; everything it needs is built beforehand (see qwen2_dist.cli.train)."""

    def __init__(
        self,
        cfg: JobConfig,
        args: ModelArgs,
        world: World,
        mesh: DeviceMesh | None,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: TokenBatches,
        grad_accum_steps: int,
        metadata: dict,
    ):
        self.cfg, self.args, self.world, self.mesh = cfg, args, world, mesh
        self.model, self.optimizer, self.batches = model, optimizer, batches
        self.grad_accum_steps = grad_accum_steps
        self.metadata = metadata
        self.ckpt_root = os.path.join(cfg.run_dir, "checkpoints")
        self.step = 0
        self.tokens_seen = 0
        self.tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
        self.flops_per_token = flops_per_token(args, cfg.train.seq_len)
        self.peak_flops = peak_flops(world.device)
        use_autocast = mesh is None and world.device.type == "cuda" and cfg.train.mixed_precision != "fp32"
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
        )

    def restore(self, path: str) -> None:
        """Continue from a committed checkpoint: weights, optimizer, step, tokens and data position."""
        state = checkpoint.load(path, self.model, self.optimizer)
        self.step = state.get("step", 0)
        self.tokens_seen = state.get("tokens_seen", 0)
        if "loader" in state:
            self.batches.load_state_dict(state["loader"])

    def save(self) -> str:
        """Save and commit a checkpoint of the current step."""
        train_state = {"step": self.step, "tokens_seen": self.tokens_seen, "loader": self.batches.state_dict()}
        meta = dict(self.metadata, tokens_seen=self.tokens_seen)
        return checkpoint.save(
            self.ckpt_root, self.step, self.model, self.optimizer, train_state, meta, self.cfg.checkpoint.keep_last
        )

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step; returns (summed loss, grad norm) as device tensors and the seconds spent on data."""
        data_started = time.monotonic()
        micro_batches = [self.batches.next_batch() for _ in range(self.grad_accum_steps)]
        data_seconds = time.monotonic() - data_started
        device = self.world.device
        # Normalize by the number of target tokens of the whole global batch, so the result is the same
        # whatever the layout and accumulation split.
        local_tokens = sum(targets.numel() for _, targets in micro_batches)
        global_tokens = all_reduce_sum(torch.tensor(float(local_tokens), device=device), self.mesh)
        loss_sum = torch.zeros((), device=device)
        for index, (inputs, targets) in enumerate(micro_batches):
            set_gradient_sync(self.model, index == len(micro_batches) - 1)
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            with self.autocast:
                logits = self.model(inputs)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
            (loss / global_tokens).backward()
            loss_sum += loss.detach()
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return all_reduce_sum(loss_sum, self.mesh) / global_tokens, grad_norm, data_seconds

    def fit(self) -> TrainResult:
        """Train from the current step up to train.steps, logging, checkpointing and honouring preemption."""
        cfg = self.cfg
        writer = MetricsWriter(os.path.join(cfg.run_dir, "metrics.jsonl"), enabled=self.world.is_main)
        stop = StopFlag()
        last_loss, stopped = None, False
        window_started, window_steps, window_data = time.monotonic(), 0, 0.0
        if self.step >= cfg.train.steps:
            log.info("run already complete: step %d of train.steps=%d", self.step, cfg.train.steps)
        try:
            last_step = min(cfg.train.steps, cfg.train.stop_at or cfg.train.steps)
            while self.step < last_step:
                lr = lr_at(self.step + 1, cfg.train.steps, cfg.optim)
                set_lr(self.optimizer, lr)
                loss, grad_norm, data_seconds = self.train_step()
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                window_steps += 1
                window_data += data_seconds
                if self.step % cfg.logging.interval == 0 or self.step == cfg.train.steps:
                    elapsed = time.monotonic() - window_started
                    last_loss = loss.item()
                    tokens_per_sec = window_steps * self.tokens_per_step / elapsed
                    record = {
                        "step": self.step,
                        "loss": last_loss,
                        "lr": lr,
                        "grad_norm": grad_norm.item(),
                        "tokens_per_sec": tokens_per_sec,
                        "tokens_seen": self.tokens_seen,
                        "mfu": (tokens_per_sec / self.world.world_size * self.flops_per_token / self.peak_flops)
                        if self.peak_flops else None,
                        "mem_gib": memory_gib(self.world.device),
                        "data_wait_pct": 100.0 * window_data / elapsed,
                        "time": time.time(),
                    }
                    writer.write(record)
                    if self.world.is_main:
                        log.info(format_step(record))
                    window_started, window_steps, window_data = time.monotonic(), 0, 0.0
                if stop.agreed(self.mesh):
                    self.save()
                    stopped = True
                    break
                interval = cfg.checkpoint.interval
                final = self.step == last_step and cfg.checkpoint.save_final
                if (interval and self.step % interval == 0) or final:
                    self.save()
                    window_started = time.monotonic()
        finally:
            writer.close()
        return TrainResult(self.step, self.tokens_seen, last_loss, stopped)
