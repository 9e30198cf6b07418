"""The GPU check script (its throughput steps: ours against the Hugging Face baselines) and the throughput benchmark's
refusals, run for real on the CPU with the tiny size (seconds each)."""

import json
import math
import os
import re
import subprocess
import sys
import tarfile

import pytest
import torch

from tests import helpers
from tests.helpers import REPO, run_python

SEQ = 32
"""The sequence length of gpu_check's dry run (its SEQ), and of the tests' own tiny rows."""
TINY = ["--size", "tiny", "--seq-len", str(SEQ), "--micro-batch", "2", "--steps", "2", "--warmup", "1"]
GPU_CHECK_STEPS = ["wheels", "env", "throughput_1.5b", "throughput_0.5b", "throughput_1.5b_lean", "loss_parity",
                   "combined_1.5b", "fast_path_gpu", "throughput_1.5b_accum", "variant_coordinate_descent",
                   "variant_float8_overlap", "variant_expandable_segments", "attention_gpu", "targets", "estimate"]
"""In their order: the must-shows of issue 7 first (1.5B against HF and HF + Liger, 0.5B, the lean setting, loss
parity), so that the budget cuts the optional steps, never those; the targets before the estimate, so that a cut in
the estimate still leaves targets.txt packed."""
SMALL = ["--size", "tiny", "--seq-len", "16", "--micro-batch", "1", "--steps", "1", "--warmup", "0", "--ours",
         "data.synthetic=true", "--ours", "model.vocab_size=256"]
"""The least a row of ours can be (about a second on the CPU), for tests of what throughput.py records."""
VARIANTS = {"overlap": ["optim.overlap=true"], "loss_chunk_16384": ["model.loss_chunk_tokens=16384"],
            "fuse_qkv": ["model.fuse_projections=qkv"], "default_again": ["parallel.compile=auto"]}
"""The --variant rows of the throughput_1.5b step in a dry run, in their order (on CUDA the combination of overlap, the
16384-token chunk and fp32 weight gradients, and fp32_wgrad, come first: parallel.fp32_weight_grads is CUDA only)."""


def throughput(*args: str) -> subprocess.CompletedProcess:
    return run_python(["benchmarks/throughput.py", *args], timeout=120)


def test_throughput_refuses_a_bad_override_in_one_line(capsys):
    result = throughput(*TINY, "--baseline", "none", "--ours", "parallel.no_such_key=1")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --ours:") and "parallel.no_such_key" in lines[0], lines
    assert "ours" not in result.stdout  # refused before anything was measured
    # The other refusals take the same way out, checked in this process (a process each took a second or two).
    from benchmarks import throughput as throughput_script

    for args, error in [
        (["--baseline", "hf-fast"], "error: --baseline hf-fast: choose hf, hf-ac"),
        (["--variant", "overlap"], "error: --variant 'overlap': give NAME:KEY=VALUE"),
        (["--variant", "a:optim.overlap=true", "--variant", "a:model.loss_chunk_tokens=8"], "error: --variant 'a:"),
        (["--variant", "bad:optim.no_such_key=1"], "error: --variant bad: "),
        (["--variant", "a:optim.overlap=true", "--profile-variants", "a"],
         "error: --profile-variants a: needs --profile"),
        (["--variant", "a:optim.overlap=true", "--profile", "p.txt", "--profile-variants", "b"],
         "error: --profile-variants b: no --variant named b"),
        (["--variant", "a:optim.overlap=true", "--profile-row", "a"], "error: --profile-row a: needs --profile"),
        (["--variant", "a:optim.overlap=true", "--profile", "p.txt", "--profile-row", "b"],
         "error: --profile-row b: no --variant named b"),
    ]:
        baseline = [] if "--baseline" in args else ["--baseline", "none"]
        code = throughput_script.main([*TINY, *baseline, *args])
        out, err = capsys.readouterr()
        assert code == 2 and err.startswith(error), (args, err)
        assert len(err.strip().splitlines()) == 1 and "ours" not in out, err


def test_loss_parity_reports_float8_that_cannot_run_and_keeps_the_bf16_verdict(tmp_path, monkeypatch, capsys):
    """On the GPU the float8 and overlap curves are more curves of the parity step: if one fails, the bf16 verdict
    still stands (here float8 fails as it does without CUDA). optim.overlap computes the same update: on the CPU,
    with no side stream, its curve is the fast one exactly. In this process, at seq 16 (gpu_check's dry run runs the
    step itself, without --float8)."""
    from benchmarks import loss_parity

    out = tmp_path / "parity.json"
    monkeypatch.setattr(sys, "argv", ["loss_parity.py", "--size", "tiny", "--layers", "2", "--seq-len", "16",
                                      "--no-compile", "--steps", "2", "--float8", "--overlap", "--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        loss_parity.main()
    stdout = capsys.readouterr().out
    assert exit_.value.code == 1, stdout
    assert "bf16 fast: max |fast - fp32|" in stdout and ": ok" in stdout
    assert "fast float8: FAILED to run (UserError: model.float8=true needs a CUDA GPU" in stdout
    assert "max |overlap - fast| = 0.0000: ok" in stdout
    report = json.loads(out.read_text())
    assert report["fast_ok"] and not report["ok"] and report["float8"] is None and report["overlap"]["ok"]
    assert set(report["curves"]) == {"fp32 plain", "bf16 plain", "bf16 fast", "fast overlap"}
    assert report["curves"]["fast overlap"] == report["curves"]["bf16 fast"]


def test_loss_parity_runs_the_overlap_curve_before_float8_so_a_timeout_cuts_float8(tmp_path, monkeypatch):
    """The overlap verdict decides whether optim.overlap's throughput rows count for the speed target; float8 is not
    needed for the bf16 targets."""
    from benchmarks import loss_parity

    def killed_in_float8(args, batches, device, float8=False, **kwargs):
        if float8:
            raise SystemExit(-9)  # what the process would show of a SIGKILL: nothing more runs
        return [12.0 - step / 10 for step in range(len(batches))]  # no model: the order is what is checked here

    out = tmp_path / "parity.json"
    monkeypatch.setattr(loss_parity, "curve", killed_in_float8)
    monkeypatch.setattr(sys, "argv", ["loss_parity.py", "--size", "tiny", "--seq-len", "16", "--no-compile", "--steps",
                                      "2", "--float8", "--overlap", "--out", str(out)])
    with pytest.raises(SystemExit):
        loss_parity.main()
    report = json.loads(out.read_text())
    assert report["overlap"]["ok"] and report["overlap_error"] is None
    assert report["float8"] is None and report["float8_error"] == "not run: the check was stopped before this curve"


def test_loss_parity_written_before_its_extra_curves_survives_a_timeout_in_them(tmp_path, monkeypatch):
    """gpu_check's timeout may kill the parity step in the cold compile of an extra curve: the core verdict is in the
    file already, and the extra curve says it did not run."""
    from benchmarks import loss_parity

    curve = loss_parity.curve

    def killed_in_overlap(*args, overlap=False, **kwargs):
        if overlap:
            raise SystemExit(-9)  # what the process would show of a SIGKILL: nothing more runs
        return curve(*args, **kwargs)

    out = tmp_path / "parity.json"
    monkeypatch.setattr(loss_parity, "curve", killed_in_overlap)
    monkeypatch.setattr(sys, "argv", ["loss_parity.py", "--size", "tiny", "--layers", "2", "--seq-len", "16",
                                      "--no-compile", "--steps", "2", "--overlap", "--out", str(out)])
    with pytest.raises(SystemExit):
        loss_parity.main()
    report = json.loads(out.read_text())
    assert report["fast_ok"] and not report["ok"] and report["overlap"] is None
    assert report["overlap_error"] == "not run: the check was stopped before this curve"


def test_gpu_check_refuses_an_archive_inside_the_directory_it_packs(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DRY_RUN": "1", "PACK": str(tmp_path / "out" / "gc.tgz")}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "lies inside OUT" in result.stderr and "PACK first" in result.stderr
    assert not (tmp_path / "out" / "summary.txt").exists()  # refused before any step


def test_gpu_check_moves_an_earlier_run_s_files_aside(tmp_path):
    """A second run into the same OUT (a second call on a warm device machine) read the first run's reports as its
    own: here a stale 0.5B report counted for the small target though this run skipped that step."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "throughput_0.5b.json").write_text(json.dumps({
        "size": "tiny", "seq_len": 128, "device": "cpu", "rows": [
            {"name": "ours", "status": "ok", "micro_batch": 2, "tokens_per_sec": 9.0, "peak_mem_gib": 1.0,
             "vs_best_baseline": 2.0, "overrides": []},
            {"name": "hf-liger", "status": "ok", "micro_batch": 2, "tokens_per_sec": 4.5, "peak_mem_gib": 1.0}]}))
    skip = " ".join(step for step in GPU_CHECK_STEPS if step != "targets")
    env = {**os.environ, "OUT": str(out), "DRY_RUN": "1", "PYTHON": sys.executable, "SKIP": skip}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    (previous,) = tmp_path.glob("out.previous-*")
    assert (previous / "throughput_0.5b.json").is_file() and not (out / "throughput_0.5b.json").exists()
    small = next(line for line in (out / "targets.txt").read_text().splitlines() if line.startswith("small:"))
    assert "NOT MEASURED" in small, small


def test_gpu_check_does_not_start_a_step_with_less_than_half_its_timeout_left(tmp_path):
    """It would most likely be cut before writing anything: the device time is not spent on it."""
    skip = " ".join(step for step in GPU_CHECK_STEPS if step not in ("throughput_1.5b", "targets"))
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DRY_RUN": "1", "PYTHON": sys.executable, "SKIP": skip,
           "BUDGET_S": "100"}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert re.search(r"throughput_1\.5b\s.*FAILED \(not run: 9\d s left of the budget, under half its 250 s\)",
                     summary), summary


GPU_ONLY_STEPS = ["env", "fast_path_gpu", "attention_gpu", "variant_coordinate_descent"]
"""Steps a dry run leaves to SKIP in CI: on a CPU they only import packages (env), run GPU-only tests that skip
themselves, or run what another step runs (coordinate-descent tuning tunes compiled kernels, and the dry run
compiles nothing: the row of variant_expandable_segments, whose env prefix is the other form of a variant step),
about 4-8 s each; what they name is checked without running them."""


def test_gpu_check_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "out"
    pack = tmp_path / "gpu_check.tgz"  # what a device machine sends back: everything in one archive
    # Its python processes forked by the test zygote (helpers.forked_python): this test alone took 65 s with real
    # interpreters, 41 s forked (2-core machine, 2026-12-07).
    env = {**os.environ, **helpers.forked_python(), "OUT": str(out), "DRY_RUN": "1", "PACK": str(pack),
           "SKIP": " ".join(GPU_ONLY_STEPS)}
    forked, fallbacks = helpers.worker_starts()
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=360)
    summary = (out / "summary.txt").read_text()
    assert result.returncode == 0, summary + result.stdout[-3000:] + result.stderr[-3000:]
    assert helpers.worker_starts() == (forked + 9, fallbacks + 1)  # PYTORCH_CUDA_ALLOC_CONF: expandable_segments
    outcomes = {line.split()[0]: line.split()[1] for line in summary.splitlines()[2:-1]}
    assert list(outcomes) == GPU_CHECK_STEPS, summary
    assert outcomes["wheels"] == "skipped"
    assert all(outcomes[name] in ("ok", "skipped") for name in GPU_CHECK_STEPS), summary
    assert all(outcomes[name] == "skipped" and "in SKIP" in (out / f"{name}.log").read_text()
               for name in GPU_ONLY_STEPS), summary
    script = open(os.path.join(REPO, "benchmarks", "gpu_check.sh")).read()
    named = set(re.findall(r"tests/unit/\S+\.py", script))
    assert len(named) == 6 and all(os.path.isfile(os.path.join(REPO, path)) for path in named), named
    from qwen2_dist.cli.train import compose_job

    (tuning,) = re.findall(r"^variant coordinate_descent \d+ -- (\S+)$", script, re.M)
    assert compose_job([tuning]).parallel.compile_options == {"coordinate_descent_tuning": True}
    for name in ("throughput_1.5b", "throughput_1.5b_lean", "throughput_0.5b", "estimate"):
        assert outcomes[name] == "ok", summary
        assert (out / f"{name}.log").is_file()
    lean = json.loads((out / "throughput_1.5b_lean.json").read_text())
    assert [r["name"] for r in lean["rows"]] == ["ours"]
    assert "parallel.activation_checkpointing=full" in lean["rows"][0]["overrides"]
    assert "optim.in_backward=true" in lean["rows"][0]["overrides"]
    for name in GPU_CHECK_STEPS:
        if name.startswith("variant_") and name not in ("variant_float8_overlap", *GPU_ONLY_STEPS):
            assert outcomes[name] == "ok", summary
            assert json.loads((out / f"{name}.json").read_text())["rows"][0]["status"] == "ok"
    # Step 2: the default row of ours, the baselines, then each variant as one more row of the same process.
    rows = json.loads((out / "throughput_1.5b.json").read_text())["rows"]
    assert [(r["name"], r.get("variant")) for r in rows] == [("ours", None), ("hf", None), ("hf-liger", None)] + [
        ("ours", name) for name in VARIANTS]
    ours, variants = rows[0], rows[3:]
    assert len(variants) == len(VARIANTS)
    for row, (name, overrides) in zip(variants, VARIANTS.items()):
        assert row["status"] == "ok" and row["variant_overrides"] == overrides
        assert row["overrides"] == ours["overrides"] + overrides
        # The same weights (drawn for the default row, copied for the variants), seed and batches, and the same
        # update (optim.overlap on a CPU; one chunk of the loss at 64 tokens): the same losses, exactly; q/k/v as
        # one matmul sums in another order.
        if name == "fuse_qkv":
            assert abs(row["last_loss"] - ours["last_loss"]) < 1e-3, (row, ours)
        else:
            assert (row["first_loss"], row["last_loss"]) == (ours["first_loss"], ours["last_loss"]), name
        assert row["build_s"] >= 0 and row["warmup_s"] > 0
    # Only default_again, the last row, is profiled (into profile_1.5b.txt): a profiler failing costs no other row.
    assert sorted(path.name for path in out.glob("profile_1.5b*")) == ["profile_1.5b.txt"]
    assert all(row["skipped_steps"] == 0 for row in rows if row["name"] == "ours")
    # The dry run combines every variant (--all; on a GPU only those 0.5% faster than the default row of ours).
    combined = json.loads((out / "combined_1.5b.json").read_text())
    assert combined["ours_overrides"] == ["parallel.compile=auto", "optim.overlap=true",
                                          "model.loss_chunk_tokens=16384", "model.fuse_projections=qkv"]
    assert [r["name"] for r in combined["rows"]] == ["ours", "hf-liger"] and combined["rows"][0]["status"] == "ok"
    picks = (out / "pick_variants.log").read_text().splitlines()
    assert [line.split(":")[0] for line in picks] == [f"variant {name}" for name in VARIANTS], picks
    assert all(": picked" in line for line in picks[:3]), picks  # "(--all)" only when slower
    assert picks[3].startswith("variant default_again: the default again, after the variants: "), picks
    accum = json.loads((out / "throughput_1.5b_accum.json").read_text())
    assert accum["accum"] == 2 and [r["name"] for r in accum["rows"]] == ["ours", "hf-liger"]
    assert accum["rows"][0]["global_batch"] == 2 * accum["rows"][0]["micro_batch"]
    assert accum["rows"][0]["tokens_per_sec"] == 2 * 2 * SEQ / accum["rows"][0]["seconds"]
    parity = json.loads((out / "loss_parity.json").read_text())
    assert parity["ok"] and parity["overlap"]["ok"]
    assert "estimated peak tensor memory" in (out / "estimate.log").read_text()
    verdicts = (out / "targets.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in verdicts if not line.startswith(" ")] == [
        "speed", "lean", "small", "parity"], verdicts
    assert verdicts[-2].startswith("parity: the fast path's loss curve within bf16 noise over 20 steps: MET")
    profile = (out / "profile_1.5b.txt").read_text()
    assert "ms/step wall clock" in profile and "aten::mm" in profile  # on a CPU: operators by their CPU time
    assert summary.splitlines()[-1].startswith("total ")
    with tarfile.open(pack) as archive:
        names = set(archive.getnames())
        packed_summary = archive.extractfile("out/summary.txt").read().decode()
    assert {"out/summary.txt", "out/throughput_1.5b.json", "out/profile_1.5b.txt", "out/estimate.log",
            "out/targets.txt"} <= names
    assert packed_summary == summary  # packed again after the final "total" line
    _check_ours_and_baselines(out / "throughput_1.5b.log", out / "throughput_1.5b.json")


def _check_ours_and_baselines(log_path, report_path):
    """benchmarks/throughput.py's table and JSON for ours, hf and hf-liger at the tiny size on the CPU."""
    table = {line.split()[0]: line.split() for line in log_path.read_text().splitlines()
             if line.split() and line.split()[0] in ("ours", "hf", "hf-liger") and "tiny" in line}
    # config, size, seq, mb, tokens/s, MFU, memory, ratio
    for name in ("ours", "hf"):
        assert table[name][1:4] == ["tiny", str(SEQ), "2"], table[name]
        assert float(table[name][4].replace(",", "")) > 0
        assert table[name][5] == "n/a"  # no MFU on a CPU
    assert table["hf"][7] == "1.00x"  # the only measured baseline is the best one
    assert "skipped" in " ".join(table["hf-liger"])  # Liger needs CUDA

    report = json.loads(report_path.read_text())
    assert report["device"].startswith("cpu") and report["torch"] and report["transformers"] and report["date"]
    rows = {row["name"]: row for row in report["rows"] if not row.get("variant")}
    assert set(rows) == {"ours", "hf", "hf-liger"}
    for name in ("ours", "hf"):
        row = rows[name]
        assert row["status"] == "ok" and row["tokens_per_sec"] > 0 and row["peak_mem_gib"] > 0
        assert row["tokens_per_sec"] == 2 * 2 * SEQ / row["seconds"]
        # Random init on random tokens: both near ln(vocab) = 11.93 on the measured steps.
        assert abs(row["first_loss"] - math.log(151936)) < 0.5 and abs(row["last_loss"] - math.log(151936)) < 0.5
    assert rows["ours"]["overrides"][:2] == ["model=tiny", f"train.seq_len={SEQ}"]
    assert rows["ours"]["vs_best_baseline"] == rows["ours"]["tokens_per_sec"] / rows["hf"]["tokens_per_sec"]
    assert rows["hf-liger"]["status"].startswith("skipped")


def test_kept_initial_weights_are_those_a_fresh_init_draws_and_fit_only_their_shape():
    from benchmarks.throughput import copy_initial
    from qwen2_dist.model.args import get_model_args
    from qwen2_dist.model.qwen2 import build_model

    def fresh(name: str, seed: int):
        model = build_model(get_model_args(name), "cpu")
        model.init_weights(seed)
        return model

    kept = [p.detach().clone() for p in fresh("tiny", 3).parameters()]
    model = build_model(get_model_args("tiny"), "cpu")
    model.init_placeholders()
    assert copy_initial(model, kept)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh("tiny", 3).parameters()))
    other = fresh("debug", 0)
    before = [p.detach().clone() for p in other.parameters()]
    assert not copy_initial(other, kept)  # another shape: refused, nothing copied
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), before))


def test_every_row_of_ours_after_the_first_starts_from_a_fresh_compile_state(monkeypatch, tmp_path):
    """Without it a second micro-batch recompiled the blocks with a dynamic batch size (torch 2.13, CPU, tiny,
    TORCH_LOGS=recompiles: "marking L['x'] as dynamic", 2026-11-27), and a variant could run code of another row."""
    from benchmarks import throughput

    resets = []
    rows_before = []
    real_run_ours = throughput.run_ours

    def run_ours(job, *args, **kwargs):
        rows_before.append(len(resets))
        return real_run_ours(job, *args, **kwargs)

    monkeypatch.setattr(throughput.torch._dynamo, "reset", lambda: resets.append(1))
    monkeypatch.setattr(throughput, "run_ours", run_ours)
    report = tmp_path / "t.json"
    assert throughput.main([*TINY[:4], "--micro-batch", "2,4", "--steps", "1", "--warmup", "1", "--baseline", "hf:2",
                            "--variant", "overlap:optim.overlap=true", "--json", str(report)]) == 0
    assert rows_before == [0, 1, 2, 3]  # ours mb 2, ours mb 4, (hf), overlap mb 2, overlap mb 4
    rows = json.loads(report.read_text())["rows"]
    assert [(r["name"], r["micro_batch"], r.get("variant")) for r in rows] == [
        ("ours", 2, None), ("ours", 4, None), ("hf", 2, None), ("ours", 2, "overlap"), ("ours", 4, "overlap")]
    assert not throughput.INITIAL  # the kept weights are dropped after the last row of ours


def test_a_failed_profile_loses_the_profile_not_the_row(monkeypatch, tmp_path):
    from benchmarks import throughput

    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("CUPTI is busy")

    monkeypatch.setattr(throughput.torch.profiler, "profile", Broken)
    report, profile = tmp_path / "t.json", tmp_path / "p.txt"
    assert throughput.main([*TINY, "--baseline", "none", "--profile", str(profile), "--json", str(report)]) == 0
    assert json.loads(report.read_text())["rows"][0]["status"] == "ok"
    assert "profile failed after the timed steps (RuntimeError: CUPTI is busy)" in profile.read_text()


def test_a_run_cut_while_profiling_keeps_the_row_s_timing(monkeypatch, tmp_path):
    """The profile runs after the timed steps; a cut there (the GPU check's timeout) lost the row too, when its JSON
    was written only after the profile."""
    import pytest

    from benchmarks import throughput

    class Cut:
        def __init__(self, *args, **kwargs):
            raise KeyboardInterrupt  # as a kill would: not caught by the profile's own error handling

    monkeypatch.setattr(throughput.torch.profiler, "profile", Cut)
    report = tmp_path / "t.json"
    with pytest.raises(KeyboardInterrupt):
        throughput.main([*TINY, "--baseline", "none", "--profile", str(tmp_path / "p.txt"), "--json", str(report)])
    (row,) = json.loads(report.read_text())["rows"]
    assert row["status"] == "ok" and row["tokens_per_sec"] > 0


def test_profile_row_profiles_that_variant_after_every_row_before_it(monkeypatch, tmp_path):
    """gpu_check.sh profiles default_again, its last row: a profiler that fails or hangs on a new image then costs
    neither the baselines nor a variant."""
    from benchmarks import throughput

    report, profile = tmp_path / "t.json", tmp_path / "p.txt"
    rows_at_profile = []

    def profile_steps(trainer, device, steps=2):
        rows_at_profile.append([row.get("variant") for row in json.loads(report.read_text())["rows"]])
        return "profiled"

    monkeypatch.setattr(throughput, "profile_steps", profile_steps)
    assert throughput.main([*SMALL, "--baseline", "none", "--variant", "again:parallel.compile=auto", "--profile",
                            str(profile), "--profile-row", "again", "--json", str(report)]) == 0
    assert rows_at_profile == [[None, "again"]]  # once, after both rows' timings were written
    assert profile.read_text().endswith("\nprofiled\n")


def test_rows_of_ours_record_the_steps_whose_update_was_skipped(monkeypatch, tmp_path):
    """A skipped step (a non-finite or spiking loss or gradient: the fused AdamW's found_inf) is faster than an
    update; benchmarks/targets.py refuses rows with any."""
    from benchmarks import throughput

    report = tmp_path / "t.json"
    monkeypatch.setenv("QWEN2_INJECT_NAN_STEP", "1")  # the trainer's step counter stays at 0 here: every step
    assert throughput.main([*SMALL, "--warmup", "1", "--baseline", "none", "--json", str(report)]) == 0
    (row,) = json.loads(report.read_text())["rows"]
    assert row["status"] == "ok" and row["skipped_steps"] == 2  # the warmup step and the timed one


def test_the_profile_writes_its_summary_without_a_chrome_trace(monkeypatch, tmp_path):
    """The trace went to the temporary run directory, deleted unread: writing it was benchmark time for nothing."""
    from benchmarks import throughput

    def no_trace(self, path):
        raise AssertionError(f"a Chrome trace was written to {path}")

    monkeypatch.setattr(torch.profiler.profile, "export_chrome_trace", no_trace)
    profile = tmp_path / "p.txt"
    assert throughput.main([*SMALL, "--baseline", "none", "--profile", str(profile)]) == 0
    assert "ms/step wall clock" in profile.read_text()
