"""The GPU check script (its throughput steps: ours against the Hugging Face baselines) and the throughput benchmark's
refusals, run for real on the CPU with the tiny size (seconds each)."""

import json
import math
import os
import subprocess
import sys

from tests.helpers import REPO, run_python

TINY = ["--size", "tiny", "--seq-len", "128", "--micro-batch", "2", "--steps", "2", "--warmup", "1"]
GPU_CHECK_STEPS = ["wheels", "env", "attention_gpu", "loss_parity", "throughput_1.5b", "throughput_1.5b_lean",
                   "throughput_1.5b_lean_clip", "throughput_0.5b", "estimate", "variant_model.fuse_projections",
                   "variant_model.float8", "variant_model.loss", "variant_parallel.activation_checkpointing"]


def throughput(*args: str) -> subprocess.CompletedProcess:
    return run_python(["benchmarks/throughput.py", *args], timeout=120)


def test_throughput_refuses_a_bad_override_in_one_line():
    result = throughput(*TINY, "--baseline", "none", "--ours", "parallel.no_such_key=1")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --ours:") and "parallel.no_such_key" in lines[0], lines
    assert "ours" not in result.stdout  # refused before anything was measured

    result = throughput(*TINY, "--baseline", "hf-fast")
    assert result.returncode == 2 and result.stderr.startswith("error: --baseline hf-fast: choose hf, hf-ac")


def test_gpu_check_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "DRY_RUN": "1", "PYTHON": sys.executable}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=180)
    summary = (out / "summary.txt").read_text()
    assert result.returncode == 0, summary + result.stdout[-3000:] + result.stderr[-3000:]
    outcomes = {line.split()[0]: line.split()[1] for line in summary.splitlines()[2:-1]}
    assert list(outcomes) == GPU_CHECK_STEPS, summary
    assert outcomes["wheels"] == "skipped"
    assert all(outcomes[name] in ("ok", "skipped") for name in GPU_CHECK_STEPS), summary
    for name in ("env", "throughput_1.5b", "throughput_1.5b_lean", "throughput_0.5b", "estimate"):
        assert outcomes[name] == "ok", summary
        assert (out / f"{name}.log").is_file()
    lean = json.loads((out / "throughput_1.5b_lean.json").read_text())
    assert [r["name"] for r in lean["rows"]] == ["ours"]
    assert "parallel.activation_checkpointing=full" in lean["rows"][0]["overrides"]
    assert "optim.in_backward=true" in lean["rows"][0]["overrides"]
    assert outcomes["variant_model.fuse_projections"] == "ok", summary
    assert "estimated peak tensor memory" in (out / "estimate.log").read_text()
    assert summary.splitlines()[-1].startswith("total ")
    _check_ours_and_baselines(out / "throughput_1.5b.log", out / "throughput_1.5b.json")


def _check_ours_and_baselines(log_path, report_path):
    """benchmarks/throughput.py's table and JSON for ours, hf and hf-liger at the tiny size on the CPU."""
    table = {line.split()[0]: line.split() for line in log_path.read_text().splitlines()
             if line.split() and line.split()[0] in ("ours", "hf", "hf-liger") and "tiny" in line}
    # config, size, seq, mb, tokens/s, MFU, memory, ratio
    for name in ("ours", "hf"):
        assert table[name][1:4] == ["tiny", "128", "2"], table[name]
        assert float(table[name][4].replace(",", "")) > 0
        assert table[name][5] == "n/a"  # no MFU on a CPU
    assert table["hf"][7] == "1.00x"  # the only measured baseline is the best one
    assert "skipped" in " ".join(table["hf-liger"])  # Liger needs CUDA

    report = json.loads(report_path.read_text())
    assert report["device"].startswith("cpu") and report["torch"] and report["transformers"] and report["date"]
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) == {"ours", "hf", "hf-liger"}
    for name in ("ours", "hf"):
        row = rows[name]
        assert row["status"] == "ok" and row["tokens_per_sec"] > 0 and row["peak_mem_gib"] > 0
        assert row["tokens_per_sec"] == 2 * 2 * 128 / row["seconds"]
        # Random init on random tokens: both near ln(vocab) = 11.93 on the measured steps.
        assert abs(row["first_loss"] - math.log(151936)) < 0.5 and abs(row["last_loss"] - math.log(151936)) < 0.5
    assert rows["ours"]["overrides"][:2] == ["model=tiny", "train.seq_len=128"]
    assert rows["ours"]["vs_best_baseline"] == rows["ours"]["tokens_per_sec"] / rows["hf"]["tokens_per_sec"]
    assert rows["hf-liger"]["status"].startswith("skipped")
