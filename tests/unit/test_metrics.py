"""Metrics: the MFU formula, the sinks (JSONL, TensorBoard, W&B offline) writing what they were given, and the
profile summary."""

import errno
import glob
import json
import logging
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


def test_a_run_resumed_inside_the_profiled_range_traces_the_rest_of_it_once(tmp_path, caplog):
    """A resume (or torchrun's restart) at step 4 of logging.profile_steps=3:6 traced nothing, without a word."""
    from qwen2_dist.train.metrics import StepProfiler

    profiler = StepProfiler("3:6", str(tmp_path), rank=0)
    traced = []
    for step in (4, 5, 6, 7):
        profiler.before_step(step)
        traced.append(profiler.profiler is not None)
        torch.ones(64, 64) @ torch.ones(64, 64)
        with caplog.at_level(logging.INFO, logger="qwen2_dist"):
            profiler.after_step(step)
    assert traced == [True, True, False, False]
    assert "profiler: trace of steps 4-5 written to" in caplog.text
    # Beside the first part's trace (steps 3 to the stop), not over it.
    assert sorted(os.listdir(tmp_path / "profile")) == ["rank0_from4.json", "rank0_from4_summary.txt"]
    assert (tmp_path / "profile" / "rank0_from4_summary.txt").read_text().strip()


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


@pytest.fixture
def fake_wandb(monkeypatch):
    """wandb.init recording its arguments and the runs it made (their logged steps and exit code); it raises the
    exceptions put in its `failures` list first, one a call."""
    import wandb

    calls = SimpleNamespace(kwargs=[], runs=[], failures=[])

    def init(**kwargs):
        calls.kwargs.append(kwargs)
        if calls.failures:
            raise calls.failures.pop(0)
        run = SimpleNamespace(id=kwargs["id"], group=kwargs["group"], steps=[], exit_code=None)
        run.log = lambda numbers, step: run.steps.append(step)
        run.finish = lambda exit_code=None: setattr(run, "exit_code", exit_code)
        calls.runs.append(run)
        return run

    monkeypatch.setattr(wandb, "init", init)
    return calls


def test_a_restart_resumes_its_wandb_run_unless_it_goes_back_over_logged_steps(tmp_path, fake_wandb):
    """Online, W&B drops a step logged again: a start that resumes from before the last logged step logs to a new
    W&B run of the same group, and the next restart (past every logged step) resumes that one."""

    def start(from_step, steps):
        sinks = MetricsSinks(str(tmp_path), True, wandb=True, wandb_mode="online", from_step=from_step)
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
    assert {kwargs["resume"] for kwargs in fake_wandb.kwargs} == {"allow"}
    # A run_dir used again after its contents were deleted is another experiment: not the old W&B run.
    for name in os.listdir(tmp_path):
        shutil.rmtree(tmp_path / name) if (tmp_path / name).is_dir() else os.remove(tmp_path / name)
    again, same_group = start(0, [1])
    assert same_group == group and again not in (first, rewound)


def test_each_offline_start_is_a_wandb_run_of_its_own_in_the_run_s_group(tmp_path, fake_wandb):
    """wandb ignores resume offline: a second start with the same id writes another offline-run-* directory, and
    `wandb sync` of the two keeps one's history only. So each offline start logs to a new run of the group; an online
    start after them does not resume the last one either (it may not be uploaded yet)."""
    for from_step, steps in [(0, [1, 2]), (2, [3, 4]), (4, [5])]:
        sinks = MetricsSinks(str(tmp_path), True, wandb=True, wandb_mode="offline", from_step=from_step)
        for step in steps:
            sinks.write({"step": step, "loss": 1.0})
        sinks.close()
    online = MetricsSinks(str(tmp_path), True, wandb=True, wandb_mode="online", from_step=5)
    online.close()
    ids = [kwargs["id"] for kwargs in fake_wandb.kwargs]
    group = fake_wandb.kwargs[0]["group"]
    assert len(set(ids)) == 4 and {kwargs["group"] for kwargs in fake_wandb.kwargs} == {group}
    assert [run_id.startswith(f"{group}-from{step}-") for run_id, step in zip(ids, [0, 2, 4])] == [True] * 3
    assert ["resume" in kwargs for kwargs in fake_wandb.kwargs] == [False, False, False, True]
    assert [run.steps for run in fake_wandb.runs[:3]] == [[1, 2], [3, 4], [5]]


def test_an_online_start_that_cannot_reach_wandb_logs_offline_and_a_bad_key_stays_an_error(tmp_path, fake_wandb,
                                                                                             caplog):
    """A network failure of wandb.init must not stop the job (on rank 0 alone, with no restart): that start logs
    offline, and says how to upload it. What the user must fix (the API key, the project) is a UserError still."""
    import wandb

    fake_wandb.failures.append(wandb.errors.CommError("Run initialization has timed out after 90.0 sec."))
    with caplog.at_level(logging.WARNING, logger="qwen2_dist.train.metrics"):
        sinks = MetricsSinks(str(tmp_path), True, wandb=True, wandb_mode="online")
    sinks.close()
    online, offline = fake_wandb.kwargs
    assert (online["mode"], offline["mode"]) == ("online", "offline") and offline["group"] == online["group"]
    assert sinks.wandb_run is None and fake_wandb.runs[0].id == offline["id"] != online["id"]
    assert "could not reach the W&B server" in caplog.text and "CommError: Run initialization has timed out" in \
        caplog.text and f"wandb sync {tmp_path}/wandb/offline-run-*-{offline['id']}" in caplog.text
    assert (tmp_path / "wandb" / "run_id").read_text().split() == [offline["id"], "offline"]
    for failure in [wandb.errors.AuthenticationError("API key must be 40 characters long, yours was 3"),
                    wandb.errors.CommError('returned error 404 Not Found: {"errors":["project not found"]}')]:
        fake_wandb.kwargs.clear()
        fake_wandb.failures.append(failure)
        with pytest.raises(UserError, match=rf"wandb_mode=online \({type(failure).__name__}: .*WANDB_API_KEY"):
            MetricsSinks(str(tmp_path), True, wandb=True, wandb_mode="online")
        assert len(fake_wandb.kwargs) == 1  # no offline start instead


def test_closing_after_an_error_marks_the_wandb_run_failed(tmp_path, fake_wandb):
    """finish() without an exit code marks a run "Finished" in W&B, a crashed or halted one too."""
    for exit_code in (1, 0):
        sinks = MetricsSinks(str(tmp_path), True, wandb=True)
        sinks.close(exit_code=exit_code)
        assert fake_wandb.runs[-1].exit_code == exit_code
    MetricsSinks(str(tmp_path), True, wandb=True).close()
    assert fake_wandb.runs[-1].exit_code == 0


class FullDisk:
    """metrics.jsonl on a full disk: a write puts the first bytes of its text in the file, then fails."""

    def __init__(self, path):
        self.path = path

    def write(self, text):
        with open(self.path, "a") as f:
            f.write(text[:7])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self):
        pass

    def close(self):
        pass


def test_a_full_disk_loses_records_with_a_warning_and_never_stops_the_training(tmp_path, monkeypatch, caplog):
    """The checkpointer lives through a full disk; the metrics sinks raised on rank 0 only, which stopped the job
    with the other ranks waiting in a collective. Now: a WARNING naming the file and the fix at the first failure,
    none while it goes on, and one saying how many records were lost once one is written again (or at the end);
    a line cut short by the failure is cut off, so that every line stays JSON."""
    from torch.utils.tensorboard import SummaryWriter

    def no_space(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    sinks = MetricsSinks(str(tmp_path), True, tensorboard=True)
    sinks.write({"step": 1, "loss": 9.0})
    sinks.file.close()
    sinks.file = FullDisk(tmp_path / "metrics.jsonl")
    monkeypatch.setattr(sinks, "_open_jsonl", lambda: FullDisk(tmp_path / "metrics.jsonl"))
    monkeypatch.setattr(SummaryWriter, "flush", no_space)
    with caplog.at_level(logging.WARNING, logger="qwen2_dist.train.metrics"):
        sinks.write({"step": 2, "loss": 8.0})
        sinks.write({"step": 3, "loss": 7.0})
        assert [r.getMessage() for r in caplog.records] == [
            f"metrics: could not write {tmp_path}/metrics.jsonl (ENOSPC: No space left on device): training goes "
            "on, and each logged step tries again (its record is lost until one is written). Free space on its "
            "file system, or check that run_dir is writable",
            f"metrics: could not write the TensorBoard events in {tmp_path}/tensorboard (ENOSPC: No space left on "
            "device): training goes on, and each logged step tries again (its record is lost until one is "
            "written). Free space on its file system, or check that run_dir is writable"]
        caplog.clear()
        monkeypatch.undo()  # space is freed
        sinks.write({"step": 4, "loss": 6.0})
        assert [r.getMessage() for r in caplog.records] == [
            f"metrics: {tmp_path}/metrics.jsonl written again; the 2 record(s) before this one could not be "
            "written and are lost",
            f"metrics: the TensorBoard events in {tmp_path}/tensorboard written again; the 2 record(s) before this "
            "one could not be written and are lost"]
        caplog.clear()
        sinks.file.close()
        sinks.file = FullDisk(tmp_path / "metrics.jsonl")  # full again, up to the end
        sinks.write({"step": 5, "loss": 5.0})
        sinks.close()
        assert caplog.records[-1].getMessage() == (f"metrics: the last 1 record(s) could not be written to "
                                                   f"{tmp_path}/metrics.jsonl and are lost")
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert {(e.step, e.value) for e in events.Scalars("train/loss")} >= {(1, 9.0), (4, 6.0)}


def test_a_storage_error_at_the_start_is_a_user_error_naming_the_file_and_the_fix(tmp_path, monkeypatch):
    """Before training (moving the records a restart logs again aside): a clear error, not a traceback."""
    from qwen2_dist.train import metrics

    def no_space(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    monkeypatch.setattr(metrics, "write_atomic", no_space)
    with pytest.raises(UserError, match=rf"run_dir={tmp_path}: {tmp_path}/metrics.jsonl: ENOSPC: No space left on "
                                        r"device. Free space on its file system or check that run_dir is writable"):
        MetricsSinks(str(tmp_path), True, from_step=1)


def test_tensorboard_shows_the_evaluation_losses_and_task_accuracies_under_eval(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sinks = MetricsSinks(str(tmp_path), True, tensorboard=True)
    sinks.write({"step": 4, "loss": 2.0, "eval_loss": 3.0, "eval_loss/web": 3.5, "task_acc/arc": 0.25,
                 "task_acc_norm/arc": 0.5, "time": 0.0})
    sinks.close()
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert sorted(events.Tags()["scalars"]) == ["eval/loss", "eval/loss/web", "eval/task_acc/arc",
                                                "eval/task_acc_norm/arc", "train/loss"]
    assert [(e.step, e.value) for e in events.Scalars("eval/loss/web")] == [(4, 3.5)]


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
    ("NVIDIA GH200 480GB", 989.4e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA H20", 148e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12), ("NVIDIA A10G", 70e12),
    ("NVIDIA A10", 125e12), ("NVIDIA B200", 2250e12), ("NVIDIA GB200", 2500e12), ("NVIDIA B300", 2250e12),
    ("NVIDIA GB300", 2500e12), ("AMD Instinct MI355X", 2500e12), ("AMD Instinct MI350X", 2300e12),
])
def test_the_peak_of_a_gpu_is_its_variant_s_not_its_family_s(monkeypatch, name, peak):
    from qwen2_dist.train.metrics import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda")) == peak
