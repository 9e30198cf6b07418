"""Helpers shared by the end-to-end tests: job overrides and running a CLI as a subprocess."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_overrides(run_dir, corpus_cache: str, **extra) -> list[str]:
    """Overrides of a seconds-long CPU job on the tiny model and the small embedded corpus."""
    base = {
        "model": "tiny", "run_dir": str(run_dir), "data.cache_dir": corpus_cache, "data.embedded_max_tokens": 60000,
        "train.seq_len": 32, "train.micro_batch_size": 2, "train.global_batch_size": 4, "train.steps": 6,
        "optim.warmup_steps": 2, "optim.lr": 0.02, "logging.interval": 1, "checkpoint.interval": 3,
    }
    base.update(extra)
    return [f"{key}={value}" for key, value in base.items()]


def read_metrics(run_dir) -> list[dict]:
    """The records of a run's metrics.jsonl, in order."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_losses(run_dir) -> dict[int, float]:
    """Step -> training loss, from a run's metrics.jsonl."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def run_cli(module: str, args: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m module args` from the repository root and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def run_torchrun(nproc: int, module: str, args: list[str], timeout: float = 300,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `torchrun --standalone --nproc-per-node=nproc -m module args` (gloo on CPU) and capture its output."""
    return run_cli("torch.distributed.run", ["--standalone", f"--nproc-per-node={nproc}", "-m", module, *args],
                   timeout=timeout, env={"OMP_NUM_THREADS": "1", **(env or {})})


def save_pickle_hf(model, path) -> None:
    """An old-style Hugging Face directory: config.json and pytorch_model.bin (transformers 5 no longer writes the
    pickle format, so it is made from what save_pretrained writes)."""
    import torch
    from safetensors.torch import load_file

    model.save_pretrained(path)
    weights = os.path.join(path, "model.safetensors")
    torch.save(load_file(weights), os.path.join(path, "pytorch_model.bin"))
    os.remove(weights)
