"""AdamW with decay on matrices only, and the warmup + cosine learning-rate schedule."""

import math

import torch

from qwen2_dist.config import OptimConfig
from qwen2_dist.errors import UserError


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW; weight decay on projection matrices, none on biases, norms and the embedding."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.ndim < 2 or "embed_tokens" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    # Fused (CUDA and CPU) by default: fastest, and it can skip a flagged step on the device (found_inf).
    fused = True if cfg.fused == "auto" else bool(cfg.fused)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.impl == "apex":
        if device_type != "cuda":
            raise UserError("optim.impl=apex runs on CUDA devices only; use optim.impl=torch")
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            raise UserError("optim.impl=apex: NVIDIA apex (with its CUDA extensions) is not importable; build it "
                            "from github.com/NVIDIA/apex or use optim.impl=torch") from None
        # AdamW's decoupled weight decay (adam_w_mode); a flagged step is skipped on the host (no found_inf).
        return FusedAdam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, adam_w_mode=True)
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused, foreach=None if fused else True
    )


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup, then cosine down to min_lr_ratio * lr."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
