"""Throughput, MFU and memory of a training step, and the sinks they go to (console, metrics.jsonl)."""

import errno
import hashlib
import json
import logging
import math
import os
import re
import resource
import time
import uuid

import torch

from qwen2_dist.errors import UserError
from qwen2_dist.fsutil import write_atomic
from qwen2_dist.model.args import ModelArgs

log = logging.getLogger(__name__)

# Dense bf16 peak (no sparsity) in FLOP/s, matched against torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {  # dense bf16, by a substring of torch.cuda.get_device_name(); the first match wins
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200 NVL": 835e12,
    "H800 PCIe": 756e12,
    "H200": 989.4e12,
    "H100": 989.4e12,
    "H800": 989.4e12,
    "GH200": 989.4e12,
    "H20": 148e12,  # after the H200s, whose names hold it
    "GB200": 2500e12,
    "GB300": 2500e12,
    "B200": 2250e12,  # after GB200, whose name holds it
    "B300": 2250e12,  # HGX B300: 36 PFLOP/s with sparsity for 8 GPUs; after GB300
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,  # after L40S and L40
    "A10G": 70e12,
    "A10": 125e12,  # after A100 and A10G
    "MI300X": 1307.4e12,
    "MI325X": 1307.4e12,
    "MI355X": 2500e12,
    "MI350X": 2300e12,
    "MI250X": 191.5e12,  # one of its two dies: PyTorch sees each as a device
}


def synchronize(device: torch.device | None) -> None:
    """Wait for the work queued on a CUDA device (nothing to wait for on the CPU)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


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


def _records(path: str) -> list[tuple[str, int | None]]:
    """The lines of a metrics file (newline-terminated), each with its record's step (None: not a record, e.g. a
    line cut short by a kill); none when there is no file."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                step = json.loads(line).get("step")
            except (ValueError, AttributeError):
                step = None
            records.append((line.rstrip("\n") + "\n", step if isinstance(step, int) else None))
    return records


def supersede_records(path: str, from_step: int) -> int:
    """Keep in the metrics file at path the records of steps up to from_step, one per step, and move the others
    (steps logged after the checkpoint a restart resumes from, which the run logs again; an abandoned run's, after a
    rollback; a line cut short by a kill) to metrics.superseded.jsonl beside it, so that the file holds one record
    per logged step of the run as it went on. Returns how many moved."""
    kept, moved = [], []
    for line, step in _records(path):
        (kept if step is not None and step <= from_step else moved).append(line)
    if not moved:
        return 0
    with open(os.path.join(os.path.dirname(path), "metrics.superseded.jsonl"), "a", encoding="utf-8") as f:
        f.writelines(moved)
    write_atomic(path, "".join(kept))
    log.info("metrics: %d record(s) after step %d (or cut short), logged before this start, moved from %s to "
             "metrics.superseded.jsonl", len(moved), from_step, path)
    return len(moved)


def last_logged_step(path: str) -> int | None:
    """The largest step recorded in the metrics file at path (None: no file, or no record)."""
    return max((step for _, step in _records(path) if step is not None), default=None)


def wandb_run_id(run_dir: str, rewinds: bool, from_step: int, resumable: bool = True) -> tuple[str, str]:
    """The W&B run this start logs to, and its group (stable, from the run directory's path).

    Online (resumable), a restart resumes the W&B run of the start before it. W&B keeps a run's steps increasing and
    drops a step logged again, so a start that goes back over logged steps (a restart past its checkpoint, a
    rollback) logs to a new run of the same group: its steps would otherwise be lost and the abandoned ones shown.
    Offline (not resumable), every start logs to a new run of the group: wandb ignores resume offline and writes
    another offline-run-* directory with the same id, and `wandb sync` of two directories with one id keeps the
    history of one only. The current run's id is kept in run_dir/wandb/run_id, with "offline" on a second line when
    an offline start made it (an online start after it does not resume it: it may not be uploaded yet); the first
    start of a run makes a new one (a run_dir used again after its contents were deleted, or the same path on
    another machine, must not continue another experiment's W&B run)."""
    group = "qwen2-" + hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:12]
    path = os.path.join(run_dir, "wandb", "run_id")
    run_id, made_offline = "", False
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            lines = f.read().split()
        run_id, made_offline = (lines[0] if lines else ""), lines[1:] == ["offline"]
    if not run_id or made_offline:
        run_id = f"{group}-{uuid.uuid4().hex[:8]}"
    if rewinds or not resumable:
        run_id = f"{group}-from{from_step}-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:4]}"
        if resumable:
            log.info("W&B: this start goes back to step %d, over steps the last one logged; it logs to a new W&B "
                     "run, %s, in group %s (W&B drops a step logged again)", from_step, run_id, group)
        else:
            log.info("W&B offline: this start logs to a W&B run of its own, %s, in group %s (an offline run cannot "
                     "be resumed)", run_id, group)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, run_id + ("\n" if resumable else "\noffline\n"))
    return run_id, group


def wandb_unreachable(exc: Exception) -> bool:
    """Whether wandb.init failed for want of the W&B server (no network, a timeout, the server down), rather than
    for something the user must fix (no or a bad API key, a wrong entity or project, a bad setting)."""
    import wandb

    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if not isinstance(exc, wandb.errors.CommError) or isinstance(exc, wandb.errors.AuthenticationError):
        return False
    # wandb-core reports an HTTP error as a CommError too: a client error (4xx but 408 timeout and 429 too many
    # requests) is the user's (a project or entity that does not exist or is not theirs).
    return not re.search(r"\b4(0[0-79]|1\d|2[0-8]|[3-9]\d)\b|permission|forbidden|unauthori[sz]ed|not found|api.?key",
                         str(exc), re.I)


def os_error_text(exc: OSError) -> str:
    """An OSError as its errno's name and text ("ENOSPC: No space left on device"), or its message without one."""
    if exc.errno is None:
        return f"{type(exc).__name__}: {exc}"
    return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror or os.strerror(exc.errno)}"


class _LostRecords:
    """The storage errors of one sink (metrics.jsonl, TensorBoard's event files), logged without stopping the
    training: rank 0 alone would stop while the other ranks wait for it in a collective (and the checkpointer also
    lives through a full disk). One WARNING at the first error, then none until a record is written again, which
    says how many were lost; close() says it for those lost up to the end."""

    def __init__(self, what: str):
        self.what = what
        self.lost = 0

    def failed(self, exc: OSError) -> None:
        self.lost += 1
        if self.lost == 1:
            log.warning("metrics: could not write %s (%s): training goes on, and each logged step tries again (its "
                        "record is lost until one is written). Free space on its file system, or check that run_dir "
                        "is writable", self.what, os_error_text(exc))

    def written(self) -> None:
        if self.lost:
            log.warning("metrics: %s written again; the %d record(s) before this one could not be written and are "
                        "lost", self.what, self.lost)
            self.lost = 0

    def closed(self) -> None:
        if self.lost:
            log.warning("metrics: the last %d record(s) could not be written to %s and are lost", self.lost, self.what)
            self.lost = 0


def tensorboard_tag(key: str) -> str:
    """A record's key as a TensorBoard tag: eval_loss and eval_loss/NAME under eval/ (eval/loss, eval/loss/NAME),
    as are eval.tasks' accuracies (eval/task_acc/NAME, eval/task_acc_norm/NAME); the others under train/."""
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    return f"eval/{key}" if key.startswith("task_acc") else f"train/{key}"


def record_as_json(record: dict) -> dict:
    """The record with a non-finite number written as the string "nan", "inf" or "-inf": Python's json would write
    a bare NaN or Infinity, which is not JSON, and jq, JavaScript and most strict readers refuse the whole line."""
    return {key: str(value) if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in record.items()}


class MetricsSinks:
    """Where logged steps go: metrics.jsonl always, TensorBoard and W&B when asked (rank 0 only).

    A storage error (a full disk) while writing a record is logged and the record lost, in each file sink on its own:
    write() and close() never raise for it (see _LostRecords). One at the start, before training, is a UserError."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "qwen2-dist", wandb_mode: str = "offline", config: dict | None = None,
                 from_step: int = 0, logs_start: bool = False):
        """from_step: the step the run starts or resumes at; metrics.jsonl keeps the records up to it (see
        supersede_records), or before it with logs_start (this start logs from_step itself: eval.at_start)."""
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb_dir = os.path.join(run_dir, "tensorboard")
        self.file = None
        self.tb = None
        self.wandb_run = None
        self.jsonl = enabled  # False once closed, as the others
        self.tensorboard = enabled and tensorboard
        self.size = 0  # of metrics.jsonl up to its last record written whole
        self.file_lost = _LostRecords(self.path)
        self.tb_lost = _LostRecords(f"the TensorBoard events in {self.tb_dir}")
        if not enabled:
            return
        try:
            keep = from_step - 1 if logs_start else from_step
            last = last_logged_step(self.path)
            rewinds = last is not None and last > keep
            supersede_records(self.path, keep)
            self.file = self._open_jsonl()
            if tensorboard:
                # Events of steps past from_step, written before this start, are hidden from TensorBoard from now on
                # (as metrics.jsonl's records of them move aside).
                self.tb = self._open_tensorboard(purge_step=keep + 1)
            if wandb:
                run_id, group = wandb_run_id(run_dir, rewinds, from_step, resumable=wandb_mode != "offline")
        except OSError as exc:
            self.close()
            raise UserError(
                f"cannot write the metrics of run_dir={run_dir}: {exc.filename or run_dir}: {os_error_text(exc)}. "
                "Free space on its file system or check that run_dir is writable, then run the same command again"
            ) from exc
        if wandb:
            self.wandb_run = self._start_wandb(run_dir, wandb_project, wandb_mode, config, run_id, group, from_step)

    def _start_wandb(self, run_dir: str, project: str, mode: str, config: dict | None, run_id: str, group: str,
                     from_step: int):
        """wandb.init; online, a W&B server out of reach makes this start log offline instead (a network failure
        must not stop the job), and any other failure is a UserError."""
        import wandb as wandb_lib

        try:
            try:
                return wandb_lib.init(project=project, mode=mode, dir=run_dir, id=run_id, group=group, config=config,
                                      **({"resume": "allow"} if mode == "online" else {}))
            except Exception as exc:  # wandb's own errors (no API key, no network, a bad project) share no base
                if mode != "online" or not wandb_unreachable(exc):
                    raise
                run_id, group = wandb_run_id(run_dir, False, from_step, resumable=False)
                log.warning("W&B: wandb.init could not reach the W&B server in logging.wandb_mode=online (%s: %s): "
                            "this start logs offline instead, to run %s. Upload it when the network is back with "
                            "`wandb sync %s`", type(exc).__name__, exc, run_id,
                            os.path.join(run_dir, "wandb", f"offline-run-*-{run_id}"))
                mode = "offline"
                return wandb_lib.init(project=project, mode=mode, dir=run_dir, id=run_id, group=group, config=config)
        except Exception as exc:
            self.close()
            raise UserError(
                f"logging.wandb=true: wandb.init failed in logging.wandb_mode={mode} "
                f"({type(exc).__name__}: {exc}). For online, run `wandb login` or set WANDB_API_KEY and check "
                "logging.wandb_project; or set logging.wandb_mode=offline (sync later with `wandb sync`)"
            ) from exc

    def _open_jsonl(self):
        f = open(self.path, "a", encoding="utf-8")
        self.size = os.path.getsize(self.path)
        return f

    def _cut_to_last_record(self) -> None:
        """Cut off what a failed write put in metrics.jsonl of its record: a line cut short, which strict JSON
        readers refuse."""
        if os.path.exists(self.path) and os.path.getsize(self.path) > self.size:
            os.truncate(self.path, self.size)

    def _open_tensorboard(self, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(self.tb_dir, purge_step=purge_step)

    def write(self, record: dict) -> None:
        """Record one logged step in every sink."""
        if self.jsonl:
            line = json.dumps(record_as_json(record)) + "\n"
            try:
                if self.file is None:  # the write of an earlier record failed
                    self._cut_to_last_record()
                    self.file = self._open_jsonl()
                self.file.write(line)
                self.file.flush()
                self.size += len(line.encode("utf-8"))
                self.file_lost.written()
            except OSError as exc:
                self.file_lost.failed(exc)
                self._close_file()
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if self.tensorboard:
            try:
                if self.tb is None:  # the writer failed at an earlier record: its events go to a new file
                    self.tb = self._open_tensorboard()
                for key, value in numbers.items():
                    self.tb.add_scalar(tensorboard_tag(key), value, record["step"])
                self.tb.flush()
                self.tb_lost.written()
            except OSError as exc:
                self.tb_lost.failed(exc)
                self._close_tensorboard()
        if self.wandb_run is not None:
            self.wandb_run.log(numbers, step=record["step"])

    def _close_file(self) -> None:
        file, self.file = self.file, None
        try:
            if file is not None:
                file.close()
        except OSError:  # its buffer could not be written: the record it held is counted lost already
            pass

    def _close_tensorboard(self) -> None:
        tb, self.tb = self.tb, None
        try:
            if tb is not None:
                tb.close()
        except OSError:  # the events it held are counted lost already
            pass

    def close(self, exit_code: int = 0) -> None:
        """Close every sink; exit_code: the W&B run's (0: finished, another: failed)."""
        self._close_file()
        if self.jsonl and self.file_lost.lost:
            try:
                self._cut_to_last_record()
            except OSError:  # the next start moves a line cut short aside (supersede_records)
                pass
        self.file_lost.closed()
        self._close_tensorboard()
        self.tb_lost.closed()
        self.jsonl = self.tensorboard = False
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None


# Kernel (or, on a CPU, operator) names by what they do: attention (cuDNN, flash), matmuls (cuBLAS, CUTLASS), the
# optimizer and gradient norm (multi-tensor kernels), Inductor's fused Triton kernels (FlexAttention's too), eager
# element-wise ops, copies and reductions. The first match wins.
KERNEL_KINDS = [
    ("attention", re.compile(r"sdpa|scaled_dot_product|fmha|flash|attention|flex", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|nvjet|xmma|cublas|matmul|sm90_|sm80_|aten::(mm|addmm|bmm|linear)$", re.I)),
    ("optimizer + grad norm", re.compile(r"adam|multi_tensor|lpnorm|foreach", re.I)),
    ("compiled (Inductor Triton)", re.compile(r"^triton_", re.I)),
    ("memset / memcpy", re.compile(r"memset|memcpy", re.I)),
    ("eager element-wise, copies, reductions", re.compile(r"elementwise|copy|reduce|index|scatter|gather|fill",
                                                           re.I)),
]


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(name)), "other")


def profile_summary(prof, steps: int, seconds: float, top: int = 25) -> str:
    """Where a step's time goes: device kernels by kind and the busiest kernels, per step, against the wall clock;
    the share of the wall clock with no kernel running (the device waiting for the host). On a CPU: the operators'
    own CPU time instead."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    out = [f"profiled {steps} steps: {seconds / steps * 1e3:.1f} ms/step wall clock"]
    if kernels:
        intervals = sorted((e.time_range.start, e.time_range.end) for e in kernels)
        busy, end = 0.0, float("-inf")
        for start, stop in intervals:  # the union of kernel intervals, in microseconds
            if stop > end:
                busy += stop - max(start, end)
                end = stop
        out.append(f"device busy {busy / 1e3 / steps:.1f} ms/step ({busy / 1e6 / seconds:.1%} of the wall clock); "
                   f"idle {100 - 100 * busy / 1e6 / seconds:.1f}%")
        concurrent = sum(stop - start for start, stop in intervals) - busy
        if concurrent > 0:
            # Kernels of several streams at once (optim.overlap's side stream, NCCL): the kinds below add up to more
            # than the busy time by this much.
            out.append(f"kernels running alongside others (several streams): {concurrent / 1e3 / steps:.2f} "
                       "ms/step of kernel time")
        by_name: dict[str, list[float]] = {}
        for event in kernels:
            entry = by_name.setdefault(event.name, [0, 0.0])
            entry[0] += 1
            entry[1] += event.time_range.end - event.time_range.start
    else:
        out.append("no device kernels (CPU): operators by their own CPU time")
        by_name = {e.key: [e.count, e.self_cpu_time_total] for e in prof.key_averages()}
    total = sum(us for _, us in by_name.values())
    by_kind: dict[str, float] = {}
    for name, (_, us) in by_name.items():
        kind = kernel_kind(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + us
    out += ["", f"{'kind':<44}{'ms/step':>9}{'share':>8}"]
    out += [f"{kind:<44}{us / 1e3 / steps:>9.2f}{us / total:>8.1%}"
            for kind, us in sorted(by_kind.items(), key=lambda item: -item[1])]
    out += ["", f"{'calls/step':>10}{'ms/step':>9}  name (top {top})"]
    for name, (calls, us) in sorted(by_name.items(), key=lambda item: -item[1][1])[:top]:
        out.append(f"{calls / steps:>10.1f}{us / 1e3 / steps:>9.2f}  {name[:110]}")
    return "\n".join(out)


class StepProfiler:
    """A torch.profiler trace of the steps START:END (1-based, END excluded), one Chrome trace per rank, and next to
    it profile_summary() of those steps (rank{N}_summary.txt: where the step's time goes, without a trace viewer)."""

    def __init__(self, spec: str | None, run_dir: str, rank: int, device: torch.device | None = None):
        self.start, self.end = (int(x) for x in spec.split(":")) if spec else (0, 0)
        self.path = os.path.join(run_dir, "profile", f"rank{rank}.json")
        self.summary_path = os.path.join(run_dir, "profile", f"rank{rank}_summary.txt")
        self.device = device
        self.profiler = None
        self.first = self.start  # the first step traced: later on a run resumed inside START:END
        self.finished = False
        self.started = 0.0
        self.left_out: list[tuple[str, float]] = []

    def leave_out(self, what: str, seconds: float) -> None:
        """Work that is not a training step (a checkpoint save, an evaluation) took seconds of the wall clock while
        the trace records: the summary's ms/step leaves them out, and says so (their kernels stay in its tables)."""
        if self.profiler is not None:
            self.left_out.append((what, seconds))

    def _synchronize(self) -> None:
        synchronize(self.device)

    def before_step(self, step: int) -> None:
        """Called with the number of the step about to run: tracing starts at START, or at the first step of a run
        resumed (or restarted) inside START:END, which then traces the rest of the range."""
        if self.profiler is None and not self.finished and self.start <= step < self.end:
            self.first = step
            if step > self.start:  # beside the trace of the range's first part, which an earlier start wrote
                stem = self.path.removesuffix(".json")
                self.path, self.summary_path = f"{stem}_from{step}.json", f"{stem}_from{step}_summary.txt"
            self._synchronize()  # the wall clock of the summary covers the profiled steps' kernels only
            self.profiler = torch.profiler.profile(record_shapes=True, with_stack=False)
            self.profiler.__enter__()
            self.started = time.perf_counter()
            self.left_out = []

    def after_step(self, step: int) -> float:
        """Called with the number of the step that just ran; returns the seconds spent writing the trace and its
        summary (not training: the caller leaves them out of the logged throughput)."""
        if self.profiler is not None and step + 1 >= self.end:
            return self._finish(step)
        return 0.0

    def close(self, step: int) -> None:
        """The loop ended (the run's last step, train.stop_at, a preemption, an error) with step the last one that
        ran: a trace still recording is stopped and written with the steps it has. A profiler left running made the
        process crash at exit."""
        if self.profiler is not None:
            self._finish(step)

    def _finish(self, last: int) -> float:
        """Stop and write the trace; the seconds that took, after the profiled steps' kernels finished."""
        self._synchronize()
        finished = time.perf_counter()
        seconds = finished - self.started
        self.profiler.__exit__(None, None, None)
        profiler, self.profiler = self.profiler, None
        self.finished = True
        if last < self.first:
            return time.perf_counter() - finished  # started, then the step failed before it ran
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        profiler.export_chrome_trace(self.path)
        left_out = sum(s for _, s in self.left_out)
        summary = profile_summary(profiler, last + 1 - self.first, seconds - left_out)
        if self.left_out:
            summary += "\n\nleft out of the wall clock above (their kernels are in the tables): " + "; ".join(
                f"{what} ({s:.2f} s)" for what, s in self.left_out)
        with open(self.summary_path, "w") as f:
            f.write(summary + "\n")
        log.info("profiler: trace of steps %d-%d written to %s; %s (%s)", self.first, last, self.path,
                 "; ".join(summary.splitlines()[:2]), self.summary_path)
        return time.perf_counter() - finished


def format_step(record: dict) -> str:
    """The one console line of a logged step."""
    parts = [
        f"step {record['step']}",
        f"loss {record['loss']:.4f}",
        *([f"z_loss {record['z_loss']:.4g}"] if record.get("z_loss") is not None else []),
        f"lr {record['lr']:.2e}",
        f"grad_norm {record['grad_norm']:.3f}",
        f"tok/s {record['tokens_per_sec']:,.0f}",
    ]
    if record.get("mfu") is not None:
        parts.append(f"mfu {record['mfu']:.1%}")
    parts.append(f"mem {record['mem_gib']:.2f}GiB")
    parts.append(f"data_wait {record['data_wait_pct']:.1f}%")
    return " | ".join(parts)
