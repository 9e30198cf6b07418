"""parallel.compile=true under FSDP and under TP x FSDP on 2 CPU ranks: the same losses as eager (fp32)."""

import json
import os

import pytest

from tests.helpers import run_torchrun, train_overrides

TRAIN = "qwen2_dist.cli.train"
JOB = {
    "data.synthetic": "true", "train.seq_len": 64, "train.global_batch_size": 8, "train.steps": 3,
    "optim.warmup_steps": 0, "optim.lr": 1e-3, "train.mixed_precision": "fp32", "train.deterministic": "true",
    "checkpoint.interval": 0, "checkpoint.save_final": "false",
}


def losses(run_dir) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f)]


@pytest.mark.parametrize("layout", [
    {"parallel.activation_checkpointing": "selective"},
    {"parallel.tp": 2, "parallel.activation_checkpointing": "op"},
], ids=["fsdp2-selective", "tp2-op"])
def test_compiled_blocks_train_like_eager(tmp_path, corpus_cache, layout):
    runs = {}
    for compile_ in ("false", "true"):
        run_dir = tmp_path / f"compile_{compile_}"
        result = run_torchrun(2, TRAIN, train_overrides(run_dir, corpus_cache, **JOB, **layout,
                                                        **{"parallel.compile": compile_}))
        assert result.returncode == 0, result.stderr[-4000:]
        assert f"compile {'on' if compile_ == 'true' else 'off'}" in result.stdout + result.stderr
        # The gradient norm over FSDP x TP is one all-reduce (mesh axes flattened), not two in sequence.
        assert "sequential all_reduce" not in result.stderr
        runs[compile_] = losses(run_dir)
    assert len(runs["true"]) == 3
    assert max(abs(a - b) for a, b in zip(runs["true"], runs["false"])) <= 1e-4, runs
