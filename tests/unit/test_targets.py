"""benchmarks/targets.py: issue 7's verdicts from made-up GPU check reports (no model is run)."""

import json

import pytest

from benchmarks import targets
from tests.helpers import run_python

H100 = "NVIDIA H100 80GB HBM3"


def row(tokens, gib, *overrides, variant=None, name="ours", status="ok", micro_batch=4, ratio=None, losses=None,
        **extra):
    losses = {} if losses is None else {"first_loss": losses[0], "last_loss": losses[1]}
    return {"name": name, "status": status, "micro_batch": micro_batch, "global_batch": micro_batch,
            "tokens_per_sec": tokens, "peak_mem_gib": gib, "variant": variant, "vs_best_baseline": ratio,
            "overrides": ["model=qwen2-1.5b", "train.seq_len=4096", "parallel.compile=true", *overrides], **losses,
            **extra}


def write(out, name, rows, size="qwen2-1.5b", device=H100, accum=1):
    (out / name).write_text(json.dumps({"size": size, "seq_len": 4096, "accum": accum, "device": device,
                                        "ours_overrides": ["parallel.compile=true"], "rows": rows}))


PARITY_OK = {"device": H100, "fast_ok": True, "fast_error": 0.0356, "tolerance": 0.0846,
             "overlap": {"ok": True, "error": 0.0357}}


def speed_line(tmp_path, rows, parity=PARITY_OK, any_device=False) -> list[str]:
    """The speed target's lines for these rows of throughput_1.5b.json (the lines before the lean target's)."""
    write(tmp_path, "throughput_1.5b.json", rows)
    (tmp_path / "loss_parity.json").write_text(json.dumps(parity))
    lines = targets.judge(str(tmp_path), "qwen2-1.5b", "qwen2-0.5b", 4096, any_device=any_device)
    return lines[:next(i for i, line in enumerate(lines) if line.startswith("lean:"))]


def test_each_target_is_judged_by_the_row_that_decides_it(tmp_path):
    write(tmp_path, "throughput_1.5b.json", [
        row(44148.0, 53.1, ratio=1.38),
        row(32000.0, 59.8, name="hf-liger"),
        row(46512.0, 57.2, "optim.overlap=true", "model.loss_chunk_tokens=16384", variant="both", ratio=1.45),
        row(47000.0, 71.5, "model.loss_chunk_tokens=99999", variant="huge", ratio=1.47),  # over 70 GiB
        row(49337.0, 42.8, "model.float8=true", variant="float8", ratio=1.54),  # float8: listed apart
        row(0.0, 0.0, "model.fuse_projections=qkv", variant="oom", status="OOM"),
    ])
    write(tmp_path, "throughput_1.5b_accum.json", [row(60000.0, 50.0)], accum=4)  # not read
    write(tmp_path, "throughput_1.5b_lean.json", [row(36152.0, 23.11, "optim.in_backward=true")])
    write(tmp_path, "throughput_0.5b.json", [row(106852.0, 39.9, ratio=1.50), row(71348.0, 43.9, name="hf-liger")],
          size="qwen2-0.5b")
    (tmp_path / "loss_parity.json").write_text(json.dumps({
        "device": H100, "fast_ok": True, "fast_error": 0.0356, "tolerance": 0.0846,
        "overlap": {"ok": True, "error": 0.0357}, "float8": {"ok": False, "error": 0.2}}))
    lines = targets.judge(str(tmp_path), "qwen2-1.5b", "qwen2-0.5b", 4096, any_device=False)
    assert lines[0] == ("speed: qwen2-1.5b >= 46,000 tokens/s at <= 70 GiB, HF + Liger in the same run: MET: "
                        "46,512 tokens/s at 57.20 GiB, ours:both micro-batch 4 (parallel.compile=true "
                        "optim.overlap=true model.loss_chunk_tokens=16384) in throughput_1.5b.json; 1.45x the best "
                        "baseline of its run; 1.1% over 46,000, more than the run's drift of 0.5% (no default row "
                        "measured again: the least gain gpu_check picks)")
    assert lines[1].startswith("  fastest bf16 row, not counted (over 70 GiB, or no HF + Liger in its run): 47,000")
    assert lines[2].startswith("  float8, not counted (the targets are for bf16): 49,337 tokens/s")
    assert lines[3].startswith("lean: qwen2-1.5b under 24 GiB at >= 32,000 tokens/s: MET: 36,152 tokens/s at 23.11")
    assert lines[4].startswith("small: qwen2-0.5b >= 1.3x the best baseline of the same run (HF + Liger among them): "
                               "MET: 1.50x, 106,852")
    assert lines[5] == ("parity: the fast path's loss curve within bf16 noise over 20 steps: MET: largest distance "
                        "from fp32 0.0356 nats against a tolerance of 0.0846")
    assert lines[6:] == ["  overlap: within the tolerance (0.0357 nats)", "  float8: NOT within the tolerance (0.2000 "
                                                                          "nats)"]


def test_a_row_whose_loss_shows_it_did_not_train_as_the_default_did_is_not_counted(tmp_path):
    """A variant whose updates were all skipped (a non-finite gradient: the fused AdamW skips the step, about 16 ms
    of 371 at 1.5B, enough to cross 46,000) or did not lower the loss is listed apart; combined_1.5b's row is held to
    throughput_1.5b's default. The small target needs HF + Liger in its run (else the ratio is against plain HF)."""
    write(tmp_path, "throughput_1.5b.json", [
        row(44148.0, 53.1, ratio=1.38, losses=(12.2353, 12.2110)),
        row(32000.0, 59.8, name="hf-liger"),
        row(46100.0, 55.0, "parallel.fp32_weight_grads=true", variant="wgrad", ratio=1.44,
            losses=(12.2353, float("nan"))),
        row(45000.0, 55.0, "optim.overlap=true", variant="overlap", ratio=1.41, losses=(12.2353, 12.2131)),
    ])
    write(tmp_path, "combined_1.5b.json", [row(46300.0, 55.0, "parallel.fp32_weight_grads=true",
                                               losses=(12.2353, 12.2353)), row(32000.0, 59.8, name="hf-liger")])
    write(tmp_path, "throughput_0.5b.json", [row(106852.0, 39.9, ratio=1.8), row(59214.0, 58.8, name="hf")],
          size="qwen2-0.5b")
    (tmp_path / "loss_parity.json").write_text(json.dumps({
        **PARITY_OK, "float8": None, "float8_error": "ImportError: No module named 'torchao'"}))
    lines = targets.judge(str(tmp_path), "qwen2-1.5b", "qwen2-0.5b", 4096, any_device=False)
    assert lines[-1] == "  float8: its curve did not run (ImportError: No module named 'torchao')"
    assert ": NOT MET: 45,000 tokens/s" in lines[0] and "ours:overlap" in lines[0]
    assert any(line.startswith("  not counted, its loss is not finite (12.2353, nan): 46,100") for line in lines)
    assert any(line.startswith("  not counted, its last loss 12.2353 differs from the default row's 12.2110 by more "
                               "than 0.02 nats: 46,300") for line in lines)
    assert any(line.endswith("NOT MEASURED: HF + Liger did not run next to it (is liger-kernel installed?)")
               for line in lines if line.startswith("small:"))


def test_what_falls_short_or_was_not_measured_on_an_h100_says_so(tmp_path):
    # Fast enough only without its baseline (combined's hf-liger failed): not counted.
    write(tmp_path, "combined_1.5b.json", [row(46500.0, 57.0), row(0.0, 0.0, name="hf-liger", status="OOM")])
    write(tmp_path, "throughput_1.5b.json", [row(44148.0, 53.1, ratio=1.38), row(32000.0, 59.8, name="hf-liger")])
    write(tmp_path, "throughput_1.5b_lean.json", [row(31000.0, 23.5)])
    write(tmp_path, "throughput_0.5b.json", [row(106852.0, 39.9, ratio=1.2)], size="qwen2-0.5b",
          device="NVIDIA H200")
    lines = targets.judge(str(tmp_path), "qwen2-1.5b", "qwen2-0.5b", 4096, any_device=False)
    assert ": NOT MET: 44,148 tokens/s" in lines[0]
    assert lines[1].startswith("  fastest bf16 row, not counted") and "46,500 tokens/s" in lines[1]
    assert ": NOT MET: 31,000 tokens/s at 23.50 GiB" in lines[2]
    assert lines[3].endswith("NOT MEASURED: qwen2-0.5b ran on NVIDIA H200, not an H100")
    assert lines[4].endswith("NOT MEASURED: no loss_parity.json")
    # --any-device (the dry run) counts the H200's row.
    assert ": NOT MET: 1.20x" in targets.judge(str(tmp_path), "qwen2-1.5b", "qwen2-0.5b", 4096, True)[3]


def test_the_speed_target_counts_only_rows_measured_next_to_hf_liger(tmp_path):
    """Plain HF is the weaker baseline: a run where Liger did not import measured ours against less."""
    rows = [row(46800.0, 55.0, ratio=1.6), row(29000.0, 59.7, name="hf"),
            row(0.0, 0.0, name="hf-liger", status="skipped: import liger_kernel failed")]
    lines = speed_line(tmp_path, rows)
    assert lines[0].endswith("HF + Liger in the same run: NOT MEASURED: no HF + Liger baseline in the same run (is "
                             "liger-kernel installed?)"), lines
    assert lines[1].startswith("  fastest bf16 row, not counted (over 70 GiB, or no HF + Liger in its run): 46,800")
    # The dry run (--any-device, on a CPU where Liger cannot run) takes any baseline.
    assert ": MET: 46,800 tokens/s" in speed_line(tmp_path, rows, any_device=True)[0]


def test_the_speed_target_is_met_only_by_more_than_the_run_s_drift(tmp_path):
    """The best of several noisy rows: a margin within how far the default row drifted when measured again
    (default_again: no overrides beyond the report's own) does not tell it from a row under 46,000."""
    default, liger = row(44148.0, 55.0), row(32000.0, 59.8, name="hf-liger")
    again = row(44501.0, 55.0, variant="default_again", variant_overrides=["parallel.compile=true"])  # +0.8%
    best = row(46300.0, 56.0, "optim.overlap=true", variant="overlap", variant_overrides=["optim.overlap=true"])
    lines = speed_line(tmp_path, [default, liger, best, again])
    assert ": NOT MET (within drift): 46,300 tokens/s" in lines[0], lines
    assert lines[0].endswith("; 0.7% over 46,000, not more than the run's drift of 0.8% (the default row measured "
                             "again in throughput_1.5b.json)")
    best["tokens_per_sec"] = 46600.0  # +1.3%
    assert ": MET: 46,600 tokens/s" in speed_line(tmp_path, [default, liger, best, again])[0]
    # Without the default measured again: 0.5%.
    best["tokens_per_sec"] = 46200.0  # +0.4%
    assert "NOT MET (within drift)" in speed_line(tmp_path, [default, liger, best])[0]
    best["tokens_per_sec"] = 45900.0
    line = speed_line(tmp_path, [default, liger, best, again])[0]
    assert ": NOT MET: 45,900 tokens/s" in line and "drift" not in line


def test_a_row_with_a_skipped_step_is_not_counted(tmp_path):
    """A step skipped for a non-finite or spiking loss or gradient (the fused AdamW's found_inf) is faster than an
    update; one of 13 barely moves the last loss, so the loss check alone would count the row."""
    assert targets.loss_problem({"skipped_steps": 1, "last_loss": 12.2110}, {"last_loss": 12.2110}) == (
        "1 of its steps skipped their update (a non-finite or spiking loss or gradient), which is faster than updating")
    assert targets.loss_problem({"skipped_steps": 0, "last_loss": 12.2110}, {"last_loss": 12.2110}) is None
    lines = speed_line(tmp_path, [row(44148.0, 55.0, losses=(12.2353, 12.2110), skipped_steps=0),
                                  row(32000.0, 59.8, name="hf-liger"),
                                  row(47000.0, 55.0, variant="v", losses=(12.2353, 12.2112), skipped_steps=1)])
    assert ": NOT MET: 44,148 tokens/s" in lines[0], lines
    assert lines[1].startswith("  not counted, 1 of its steps skipped their update (a non-finite or spiking loss or "
                               "gradient), which is faster than updating: 47,000"), lines


@pytest.mark.parametrize("overlap, why", [
    ({"ok": False, "error": 0.1}, "its curve is 0.1000 nats from fp32, over the tolerance"),
    (None, "its curve did not run: not run: the check was stopped before this curve"),
])
def test_an_overlap_row_counts_only_with_an_ok_overlap_parity_verdict(tmp_path, overlap, why):
    """optim.overlap computes the same update on a side stream: a missed wait would change the losses, which loss
    parity checks over 20 steps and a throughput row's few steps cannot."""
    rows = [row(44148.0, 55.0), row(32000.0, 59.8, name="hf-liger"),
            row(46700.0, 55.0, "optim.overlap=true", variant="overlap")]
    assert ": MET: 46,700 tokens/s" in speed_line(tmp_path, rows)[0]
    parity = {**PARITY_OK, "overlap": overlap, "overlap_error": None if overlap else
              "not run: the check was stopped before this curve"}
    lines = speed_line(tmp_path, rows, parity)
    assert ": NOT MET: 44,148 tokens/s" in lines[0], lines
    assert lines[1].startswith(f"  not counted, optim.overlap=true without an ok overlap verdict in loss_parity.json "
                               f"({why}): 46,700"), lines
    (tmp_path / "loss_parity.json").unlink()
    lines = targets.judge(str(tmp_path), "qwen2-1.5b", "qwen2-0.5b", 4096, any_device=False)
    assert ": NOT MET: 44,148" in lines[0] and "(no loss_parity.json): 46,700" in lines[1]


def test_command_line(tmp_path):
    result = run_python(["benchmarks/targets.py", str(tmp_path)], timeout=60)
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 4
    assert all("NOT MEASURED" in line for line in result.stdout.splitlines())
    result = run_python(["benchmarks/targets.py", str(tmp_path / "missing")], timeout=60)
    assert result.returncode == 2 and "is not a directory" in result.stderr


def test_rows_over_the_memory_limits_fall_short_and_a_variant_without_its_default_row_is_not_counted(tmp_path):
    """Rows that ran over 70 GiB (or, in the lean step, over 24) did not meet the target: they were measured. A
    variant row whose report's default row failed has no loss to be held to (it was counted unchecked)."""
    write(tmp_path, "throughput_1.5b_lean.json", [row(36000.0, 25.5, "optim.in_backward=true")])
    lines = speed_line(tmp_path, [row(46300.0, 70.5, ratio=1.4), row(32000.0, 59.8, name="hf-liger")])
    assert lines[0].endswith(": NOT MET: every row next to a baseline took more than 70 GiB"), lines
    lean = targets.judge(str(tmp_path), "qwen2-1.5b", "qwen2-0.5b", 4096, any_device=False)[len(lines)]
    assert lean.startswith("lean: qwen2-1.5b under 24 GiB at >= 32,000 tokens/s: NOT MET: no row under 24 GiB; the "
                           "leanest: 36,000 tokens/s at 25.50 GiB"), lean
    (tmp_path / "throughput_1.5b_lean.json").unlink()
    lean = targets.judge(str(tmp_path), "qwen2-1.5b", "qwen2-0.5b", 4096, any_device=False)[len(lines)]
    assert lean.endswith(": NOT MEASURED: no row under 24 GiB"), lean
    lines = speed_line(tmp_path, [row(0.0, 0.0, status="OOM"), row(32000.0, 59.8, name="hf-liger"),
                                  row(50000.0, 55.0, "parallel.fp32_weight_grads=true", variant="v", ratio=1.5,
                                      losses=(12.2353, 12.2110))])
    assert lines[0].endswith("NOT MEASURED: no row of ours ran for qwen2-1.5b"), lines
    assert lines[1].startswith("  not counted, the default row did not run, so its loss has nothing to be compared "
                               "with: 50,000 tokens/s"), lines
