"""Metrics: the MFU formula, the sinks (JSONL, TensorBoard, W&B offline) writing what they were given, and the
profile summary."""

import glob
import json
import os
import shutil
import time
from types import SimpleNamespace

import pytest
import torch

from qwen2_dist.errors import UserError
from qwen2_dist.model.args import get_model_args
from qwen2_dist.train.metrics import MetricsSinks, flops_per_token, format_step, profile_summary


def test_flops_per_token_matches_the_stated_formula():
    args = get_model_args("qwen2-1.5b")
    # 6N + 12 * layers * hidden * seq with N = 1,543,714,304 (the lm_head matmul counted once).
    assert flops_per_token(args, 4096) == 6 * 1_543_714_304 + 12 * 28 * 1536 * 4096
    untied = get_model_args("qwen2-7b")
    assert flops_per_token(untied, 4096) == 6 * (7_615_616_512 - 152064 * 3584) + 12 * 28 * 3584 * 4096


def test_sinks_write_jsonl_tensorboard_and_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    sinks = MetricsSinks(str(tmp_path), enabled=True, tensorboard=True, wandb=True, wandb_mode="offline",
                         config={"model": "tiny"})
    record = {"step": 3, "loss": 5.5, "lr": 1e-3, "grad_norm": 0.7, "tokens_per_sec": 100.0, "mfu": None,
              "mem_gib": 1.0, "data_wait_pct": 0.5, "skipped_steps": 0, "time": 0.0}
    sinks.write(record)
    sinks.close()
    with open(tmp_path / "metrics.jsonl") as f:
        assert json.loads(f.readline())["loss"] == 5.5
    # What each sink holds, read back (their files exist as soon as they are opened, logged or not).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(3, 5.5)]
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("train/grad_norm")] == [(3, 0.7)]
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    with open(run_file, "rb") as f:
        logged = f.read()
    assert b"grad_norm" in logged and b"data_wait_pct" in logged  # the history row, key by key
    assert "step 3 | loss 5.5000" in format_step(record)


def test_a_non_finite_number_is_written_as_json_a_strict_reader_takes(tmp_path):
    """A skipped step's NaN loss: Python's json would write a bare NaN, which jq and JavaScript refuse."""
    sinks = MetricsSinks(str(tmp_path), enabled=True)
    sinks.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": -float("inf"), "mfu": None})
    sinks.close()

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=refuse) == {"step": 1, "loss": "nan", "grad_norm": "inf", "lr": "-inf",
                                                       "mfu": None}


def test_a_failing_wandb_init_is_a_user_error_naming_the_mode_and_the_fix(tmp_path, monkeypatch):
    import wandb

    def no_key(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", no_key)
    with pytest.raises(UserError, match=r"wandb_mode=online \(UsageError: api_key not configured.*WANDB_API_KEY"):
        MetricsSinks(str(tmp_path), enabled=True, wandb=True, wandb_mode="online")


def test_disabled_sinks_write_nothing(tmp_path):
    sinks = MetricsSinks(str(tmp_path), enabled=False, tensorboard=True, wandb=True)
    sinks.write({"step": 1, "loss": 1.0})
    sinks.close()
    assert os.listdir(tmp_path) == []


def test_profile_summary_counts_kernel_time_by_kind_and_the_idle_share():
    """The CUDA side of the profile summary (throughput.py --profile, logging.profile_steps), on made-up kernel
    events: overlapping kernels count once towards busy time."""
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name, start, end, device=cuda):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end))

    events = [event("sm90_xmma_gemm_bf16bf16_bf16f32", 0, 100), event("triton_red_fused_add_mul_0", 50, 150),
              event("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 300, 400),
              event("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 400, 440),
              event("aten::mm", 0, 900, device=cpu)]
    prof = SimpleNamespace(events=lambda: events, key_averages=lambda: [])
    text = profile_summary(prof, steps=2, seconds=1e-3)  # 1000 us of wall clock for 2 steps
    lines = text.splitlines()
    assert lines[0] == "profiled 2 steps: 0.5 ms/step wall clock"
    assert lines[1] == "device busy 0.1 ms/step (29.0% of the wall clock); idle 71.0%"  # 0-150, 300-440: 290 us
    # 50-100 ran on two streams at once: 340 us of kernels in 290 us of busy time.
    assert lines[2] == "kernels running alongside others (several streams): 0.03 ms/step of kernel time"
    kinds = {line[:44].strip(): float(line[44:53]) for line in lines[5:9]}
    assert kinds == {"matmul": 0.05, "compiled (Inductor Triton)": 0.05, "attention": 0.05,
                     "optimizer + grad norm": 0.02}
    assert "aten::mm" not in text  # host-side operators are not device time


def test_the_time_spent_writing_a_trace_is_returned_to_be_left_out_of_the_throughput(tmp_path, monkeypatch):
    """The step that ends logging.profile_steps wrote the trace inside the logged window: its tokens/s came out at
    about half (461 against about 800 in a CPU run). after_step returns the seconds the writing took."""
    from qwen2_dist.train import metrics

    real = metrics.profile_summary
    monkeypatch.setattr(metrics, "profile_summary", lambda *args: (time.sleep(0.3), real(*args))[1])
    profiler = metrics.StepProfiler("1:3", str(tmp_path), rank=0)
    spent = []
    for step in (1, 2, 3):
        profiler.before_step(step)
        torch.ones(64, 64) @ torch.ones(64, 64)
        spent.append(profiler.after_step(step))
    assert spent[0] == 0.0 and 0.3 <= spent[1] < 30 and spent[2] == 0.0, spent


def test_a_trace_still_recording_when_the_loop_ends_is_written_with_its_steps(tmp_path):
    """train.stop_at, a preemption or an error can end the loop inside logging.profile_steps: the trace is stopped
    and written (a profiler left running crashed the process at exit)."""
    from qwen2_dist.train.metrics import StepProfiler

    profiler = StepProfiler("2:10", str(tmp_path), rank=0)
    for step in (1, 2, 3):
        profiler.before_step(step)
        torch.ones(64, 64) @ torch.ones(64, 64)
        profiler.after_step(step)
    assert profiler.profiler is not None
    profiler.close(3)
    assert profiler.profiler is None
    assert os.path.getsize(tmp_path / "profile" / "rank0.json") > 0
    assert (tmp_path / "profile" / "rank0_summary.txt").read_text().strip()


def test_a_restart_keeps_one_record_per_step_and_moves_the_rest_aside(tmp_path):
    """Steps 6 and 7 were logged after the checkpoint of step 5 that the restart resumes from (and a kill cut the
    last line short): they move to metrics.superseded.jsonl, and the run's records follow on from step 5."""
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": step, "loss": 10.0 - step}) for step in range(1, 8)] + ['{"step": 8, "lo']
    path.write_text("\n".join(lines))
    sinks = MetricsSinks(str(tmp_path), True, from_step=5)
    sinks.write({"step": 6, "loss": 3.5})
    sinks.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "metrics.superseded.jsonl").read_text().splitlines() == lines[5:]
    MetricsSinks(str(tmp_path), True, from_step=6).close()  # nothing past step 6: nothing moves
    assert len(path.read_text().splitlines()) == 6 and len((tmp_path / "metrics.superseded.jsonl").read_text()
                                                           .splitlines()) == 3


def test_a_restart_resumes_its_wandb_run_unless_it_goes_back_over_logged_steps(tmp_path, monkeypatch):
    """W&B drops a step logged again: a start that resumes from before the last logged step logs to a new W&B run
    of the same group, and the next restart (past every logged step) resumes that one."""
    monkeypatch.setenv("WANDB_SILENT", "true")

    def start(from_step, steps):
        sinks = MetricsSinks(str(tmp_path), True, wandb=True, from_step=from_step)
        run_id, group = sinks.wandb_run.id, sinks.wandb_run.group
        for step in steps:
            sinks.write({"step": step, "loss": 1.0})
        sinks.close()
        return run_id, group

    first, group = start(0, [1, 2, 3])
    assert first.startswith(f"{group}-") and group.startswith("qwen2-")
    assert start(3, [4]) == (first, group)  # nothing logged past step 3: the same run goes on
    rewound, same_group = start(2, [3])  # steps 3 and 4 were logged: a new run
    assert same_group == group and rewound.startswith(f"{group}-from2-") and rewound != first
    assert start(3, [4]) == (rewound, group)
    assert (tmp_path / "wandb" / "run_id").read_text().strip() == rewound
    # A run_dir used again after its contents were deleted is another experiment: not the old W&B run.
    for name in os.listdir(tmp_path):
        shutil.rmtree(tmp_path / name) if (tmp_path / name).is_dir() else os.remove(tmp_path / name)
    again, same_group = start(0, [1])
    assert same_group == group and again not in (first, rewound)


def test_a_restart_hides_the_tensorboard_events_past_the_step_it_resumes_from(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = MetricsSinks(str(tmp_path), True, tensorboard=True)
    for step in range(1, 8):
        first.write({"step": step, "loss": 10.0 - step})
    first.close()
    restarted = MetricsSinks(str(tmp_path), True, tensorboard=True, from_step=5)
    restarted.write({"step": 6, "loss": 1.5})
    restarted.close()
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0),
                                                                         (5, 5.0), (6, 1.5)]


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989.4e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA H800 PCIe", 756e12), ("NVIDIA H800", 989.4e12),
    ("NVIDIA GH200 480GB", 989.4e12), ("NVIDIA A100-SXM4-80GB", 312e12),
])
def test_the_peak_of_a_gpu_is_its_variant_s_not_its_family_s(monkeypatch, name, peak):
    from qwen2_dist.train.metrics import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda")) == peak
