"""Tokens/s, MFU and peak memory of a training step: ours (the real Trainer) next to the Hugging Face baselines.

    python benchmarks/throughput.py --size qwen2-1.5b --seq-len 4096 --micro-batch 4,8 \\
        --ours parallel.compile=true --baseline hf:2 --baseline hf-liger:4 --json out.json

One process, one device (CUDA when visible, else the CPU), one configuration after the other:

- ours: the job qwen2-train would run with model=SIZE, train.seq_len, train.micro_batch_size = the micro-batch,
  train.global_batch_size = the micro-batch x --accum (default 1: no accumulation), optim.lr=3e-4, then every --ours
  KEY=VALUE; built by qwen2_dist.cli.train.build_model_and_optimizer (one process: no FSDP, fp32 weights under bf16
  autocast on CUDA) and stepped by Trainer.train_step() on random token ids (a fixed seed, the same ids for every
  configuration).
- the baselines a user would pick instead: transformers' Qwen2ForCausalLM of the same shape, random init, fp32 weights
  under bf16 autocast (on CUDA), SDPA attention with PyTorch's default kernel order, loss from
  model(input_ids, labels=input_ids), fused AdamW with our optim.* values (weight decay on every parameter), gradient
  clipping at train.grad_clip as ours, the same --accum micro-batches per optimizer step. `hf-ac` adds
  model.gradient_checkpointing_enable(); `hf-liger` applies liger_kernel.transformers.apply_liger_kernel_to_qwen2()
  first (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE; CUDA only) and runs last, because its patches stay for
  the rest of the process. `--baseline NAME:MB,MB` gives a baseline its own micro-batches; `--baseline none` runs
  none.

Each configuration runs --warmup steps (torch.compile happens there), then --steps timed steps between two device
synchronizations. tokens/s counts global batch x seq_len per step; MFU = tokens/s x flops_per_token / the device's
dense bf16 peak (qwen2_dist.train.metrics; --peak-tflops overrides); peak memory is torch.cuda.max_memory_allocated
since the configuration started (on the CPU: the process' max RSS, which never goes down); on CUDA each row also
records the allocator's peak reserved memory and how often it had to free its cache and retry cudaMalloc (a
synchronizing stall). The last column is tokens/s over the best baseline of the same run. An out-of-memory
configuration is reported as OOM and the run goes on; a configuration that fails otherwise is reported as failed
(traceback on stderr) and the exit code is 1. Each row of ours records how many of its steps (warmup included) the
trainer's StepGuard skipped (skipped_steps: a non-finite or spiking loss or gradient; the fused AdamW then leaves the
weights as they were, which is faster, so such a row is no measure of the setting). --profile FILE: after timing
ours, 2 more steps under torch.profiler, summarized as logging.profile_steps does it (metrics.profile_summary) into
FILE, without the Chrome trace (the run directory is temporary).

--variant NAME:KEY=VALUE[ KEY=VALUE...] (repeatable): one more row of ours per micro-batch, with these overrides
after the --ours ones, measured in the same process after the baselines (its row: "variant": NAME). A variant costs
its build and compile and its steps, not a process of its own (on an H100 on 2026-11-27, one more throughput.py
process for a 1.5B variant took about 40 s; ours and both baselines together in one process took 56 s), and it is
measured in the same run as the baselines. Each row of ours after the first starts from a fresh torch.compile state
(torch._dynamo.reset(): a row never runs code compiled for another row's shapes or settings; Inductor's on-disk
cache still serves what did not change) and from the same initial weights, drawn once per process (copied, not
drawn again: the draw of a 1.5B model takes seconds of CPU time). Liger's patches, applied before hf-liger, change
transformers' classes only, which ours does not use. --profile-row NAME: the row --profile profiles into FILE, a
--variant's NAME instead of the default row (e.g. the default measured again as the last variant: a profiler that
fails or hangs then costs no row after it). --profile-variants NAME[,NAME]: profile those variants too, each into FILE
with _NAME before its extension.
"""

import argparse
import contextlib
import functools
import gc
import importlib.metadata
import json
import logging
import os
import re
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone

import torch

from qwen2_dist.cli.train import build_model_and_optimizer, compose_job, resolve_device
from qwen2_dist.config import JobConfig, validate
from qwen2_dist.data.synthetic import SyntheticBatches
from qwen2_dist.errors import UserError
from qwen2_dist.model.args import ModelArgs
from qwen2_dist.model.hf import hf_config_from_args
from qwen2_dist.model.qwen2 import build_model, count_parameters
from qwen2_dist.parallel.mesh import build_mesh, init_distributed, world_from_env
from qwen2_dist.train.metrics import flops_per_token, memory_gib, peak_flops, profile_summary
from qwen2_dist.train.trainer import Trainer

BASELINES = ("hf", "hf-ac", "hf-liger")
"""In the order they run: hf-liger's patches to transformers stay for the rest of the process."""
DEFAULT_BASELINES = ["hf", "hf-liger"]
BENCH_LR = 3e-4
"""Ours and the baselines step at this constant learning rate (no warmup): sane for every size from random init."""
VARIANT_NAME = re.compile(r"[A-Za-z0-9_.+-]+")
INITIAL: dict[tuple, list[torch.Tensor]] = {}
"""The initial parameters of ours by (model shape, seed), on the CPU in parameter order, kept while more rows of ours
are to come (run_ours)."""


def parse_micro_batches(text: str, what: str) -> list[int]:
    """'2,4,8' -> [2, 4, 8]; anything else is one UserError naming the option."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"{what} {text!r}: give positive integers separated by commas, e.g. 2,4,8")
    return values


def parse_baselines(specs: list[str], default_micro_batches: list[int]) -> list[tuple[str, list[int]]]:
    """--baseline NAME[:MB,MB...] options -> [(name, micro-batches)] in running order."""
    chosen: dict[str, list[int]] = {}
    for spec in specs:
        name, _, micro = spec.partition(":")
        if name == "none":
            continue
        if name not in BASELINES:
            raise UserError(f"--baseline {spec}: choose hf, hf-ac, hf-liger or none, optionally with its own "
                            "micro-batches (e.g. hf:2,4)")
        for mb in parse_micro_batches(micro, f"--baseline {name}:") if micro else default_micro_batches:
            if mb not in chosen.setdefault(name, []):
                chosen[name].append(mb)
    return [(name, chosen[name]) for name in BASELINES if name in chosen]


def parse_variants(specs: list[str]) -> list[tuple[str, list[str]]]:
    """--variant NAME:KEY=VALUE[ KEY=VALUE...] options -> [(name, overrides)] in the order given."""
    variants: list[tuple[str, list[str]]] = []
    for spec in specs:
        name, _, rest = spec.partition(":")
        if not VARIANT_NAME.fullmatch(name) or not rest.split() or name in [n for n, _ in variants]:
            raise UserError(f"--variant {spec!r}: give NAME:KEY=VALUE[ KEY=VALUE...] with a NAME of its own made of "
                            "letters, digits and _.+- (e.g. --variant overlap:optim.overlap=true)")
        variants.append((name, rest.split()))
    return variants


def ours_overrides(size: str, seq_len: int, micro_batch: int, run_dir: str, extra: list[str],
                   accum: int = 1) -> list[str]:
    """The qwen2-train overrides of our configuration at one micro-batch, `accum` micro-batches per optimizer step;
    the user's --ours come last and win."""
    return [f"model={size}", f"train.seq_len={seq_len}", f"train.micro_batch_size={micro_batch}",
            f"train.global_batch_size={micro_batch * accum}", f"optim.lr={BENCH_LR}", f"run_dir={run_dir}", *extra]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step, warmup: int, steps: int, device: torch.device) -> tuple[float, list[float], dict]:
    """Seconds of `steps` calls of step() after `warmup` untimed ones, the loss each timed call returned, and the
    seconds of the warmup ({"warmup_s": ...}: compiling happens there)."""
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warmup_seconds = time.perf_counter() - started
    started = time.perf_counter()
    # The losses stay on the device until the clock stops: reading one would make the host wait every step.
    losses = [step() for _ in range(steps)]
    synchronize(device)
    seconds = time.perf_counter() - started
    return seconds, [float(loss) for loss in losses], {"warmup_s": warmup_seconds}


def copy_initial(model: torch.nn.Module, values: list[torch.Tensor]) -> bool:
    """Copy kept initial parameters into the model's, in parameter order; False (nothing copied) when they do not
    match its parameters one for one in shape."""
    params = list(model.parameters())
    if [tuple(p.shape) for p in params] != [tuple(v.shape) for v in values]:
        return False
    with torch.no_grad():
        for param, value in zip(params, values):
            param.copy_(value)
    return True


def run_ours(job: JobConfig, warmup: int, steps: int, seed: int, profile: str | None = None,
             keep_initial: bool = False, timed=None) -> tuple[float, list[float], dict]:
    """Time Trainer.train_step() of this job on random tokens, in this process; with `profile`, then profile 2 more
    steps (profile_steps) and write the summary to that file, after handing the timing to `timed` (so that a run cut
    during the profile keeps it). The model starts from the initial weights kept in INITIAL by an earlier row of the
    same shape and seed, if any (the values init_weights(job.seed) draws); keep_initial: keep this row's for the rows
    to come. Returns the timing of timed_steps, with the seconds the model and optimizer took to build ("build_s")
    and the number of steps, warmup included, whose update the trainer's StepGuard skipped ("skipped_steps")."""
    started = time.perf_counter()
    layout = validate(job, 1)
    if job.train.batch_rampup:  # the rows time steps of one size, the one the row's label gives
        raise UserError(f"--ours train.batch_rampup={list(job.train.batch_rampup)}: the benchmark times steps of one "
                        "global batch (--micro-batch x --accum); leave train.batch_rampup out")
    device_type = resolve_device(job.train.device)
    world = init_distributed(device_type, job.train.pg_timeout_minutes)
    mesh = build_mesh(world, layout["dp_replicate"], layout["dp_shard"], layout["tp"])  # None: one process
    args = job.model.args()
    key = (repr(args), job.seed)
    kept = INITIAL.get(key) if not (job.model.init_from_hf or job.model.init_from_checkpoint) else None
    model, optimizer = build_model_and_optimizer(job, world, mesh, device_type, load_weights=kept is None,
                                                 restoring=kept is not None)
    if kept is not None and not copy_initial(model, kept):
        print("warning: the kept initial weights do not fit this configuration's parameters; drawn again",
              flush=True)
        model.init_weights(job.seed)
    elif kept is None and keep_initial:
        INITIAL[key] = [p.detach().to("cpu", copy=True) for p in model.parameters()]
    synchronize(world.device)
    build_seconds = time.perf_counter() - started
    batches = SyntheticBatches(args.vocab_size, job.train.seq_len, job.train.micro_batch_size,
                               job.train.global_batch_size, seed=seed)
    trainer = Trainer(job, args, world, mesh, model, optimizer, batches, metadata={})
    result = timed_steps(lambda: trainer.train_step()[0], warmup, steps, world.device)
    result[2]["build_s"] = build_seconds
    # Read before the profiled steps: a step skipped for a non-finite or spiking loss or gradient (the fused AdamW's
    # found_inf) is faster than one that updates, so the row is not a measure of its setting (benchmarks/targets.py).
    result[2]["skipped_steps"] = trainer.guard.counts()[0]
    if profile:
        if timed is not None:
            timed(result)
        try:
            summary = profile_steps(trainer, world.device)
        except Exception as exc:  # the row's timing stands; only its profile is lost, and says why
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            summary = f"profile failed after the timed steps ({type(exc).__name__}: {first}); the timing stands"
            print(f"warning: {summary}", flush=True)
        with open(profile, "w") as f:
            f.write(f"throughput.py {' '.join(sys.argv[1:])}\n{summary}\n")
        print(summary, flush=True)
    return result


def profile_steps(trainer: Trainer, device: torch.device, steps: int = 2) -> str:
    """metrics.profile_summary of `steps` more training steps under torch.profiler, as logging.profile_steps
    summarizes them (kernel time by kind, the busiest kernels, the device's idle share), without StepProfiler's
    Chrome trace and recorded shapes, which the summary does not use: the trace went to the temporary run directory,
    deleted unread, and writing it was benchmark time spent for nothing."""
    synchronize(device)  # the wall clock covers the profiled steps' kernels only
    with torch.profiler.profile() as profiler:
        started = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        synchronize(device)
        seconds = time.perf_counter() - started
    return profile_summary(profiler, steps, seconds)


def sdpa_defaults() -> tuple[list[int] | None, bool]:
    """PyTorch's process-wide SDPA kernel order and cuDNN switch, as they are now."""
    order = list(torch._C._get_sdp_priority_order()) if hasattr(torch._C, "_get_sdp_priority_order") else None
    return order, torch.backends.cuda.cudnn_sdp_enabled()


def restore_sdpa(defaults: tuple[list[int] | None, bool]) -> None:
    """Undo a process-wide SDPA preference (ours may prefer cuDNN's kernel): the baseline gets PyTorch's default."""
    order, cudnn = defaults
    if order is not None:
        torch._C._set_sdp_priority_order(order)
    torch.backends.cuda.enable_cudnn_sdp(cudnn)


def apply_liger(device: torch.device) -> str | None:
    """Patch transformers' Qwen2 with Liger-Kernel; the reason when that cannot be done, else None."""
    if device.type != "cuda":
        return "Liger-Kernel's Triton kernels need CUDA"
    try:
        import liger_kernel  # noqa: F401  (the import alone says whether it is installed and loads)
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2
    except Exception as exc:  # ImportError, or a triton/transformers it cannot work with
        return f"import liger_kernel failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0]})"
    try:
        apply_liger_kernel_to_qwen2()
    except Exception as exc:
        return f"apply_liger_kernel_to_qwen2() failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0]})"
    return None


def run_baseline(variant: str, job: JobConfig, device: torch.device, warmup: int, steps: int,
                 seed: int) -> tuple[float, list[float], dict]:
    """Time the plain Hugging Face training step of a Qwen2ForCausalLM with the job's shape, in this process."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    started = time.perf_counter()
    args = job.model.args()
    config = Qwen2Config(**hf_config_from_args(args))
    config.use_cache = False
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.float().train()
    hf_parameters = sum(p.numel() for p in model.parameters())
    assert hf_parameters == count_parameters(build_model(args, "meta")), "the baseline must have our model's shape"
    if variant == "hf-ac":
        model.gradient_checkpointing_enable()
    o = job.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  weight_decay=o.weight_decay, fused=True)
    batches = SyntheticBatches(args.vocab_size, job.train.seq_len, job.train.micro_batch_size,
                               job.train.global_batch_size, seed=seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    max_norm = job.train.grad_clip if job.train.grad_clip > 0 else float("inf")

    def step() -> torch.Tensor:
        for _ in range(batches.grad_accum_steps):
            inputs = batches.next_batch().inputs
            if device.type == "cuda":  # from pinned memory, as the trainer copies ours: no wait for the GPU's queue
                inputs = inputs.pin_memory()
            inputs = inputs.to(device, non_blocking=True)
            with autocast:
                loss = model(input_ids=inputs, labels=inputs).loss  # shifted inside: seq_len - 1 targets
            (loss / batches.grad_accum_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    synchronize(device)
    build_seconds = time.perf_counter() - started
    result = timed_steps(step, warmup, steps, device)
    result[2]["build_s"] = build_seconds
    return result


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error, also when torch.compile wraps it in one of its own."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def release(device: torch.device) -> None:
    """Give the memory of a finished configuration back (its model and optimizer are already unreferenced)."""
    gc.collect()
    if device.type != "cuda":
        return
    torch.cuda.empty_cache()
    if torch.cuda.memory_allocated(device) > 2**28:
        # Something still holds tensors: torch.compile's caches are the usual suspect. Dropping them costs the next
        # configuration a fresh compile, which is better than measuring it next to a leftover model.
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
    left = torch.cuda.memory_allocated(device) / 2**30
    if left > 0.25:
        print(f"warning: {left:.2f} GiB still allocated after the configuration was released", flush=True)


def fill_ok(row: dict, result: tuple[float, list[float], dict], device: torch.device) -> None:
    """A row's fields from a timing of timed_steps (seconds, losses, phases)."""
    seconds, losses, phases = result
    tokens = row["global_batch"] * row["seq_len"] * row["steps"]
    row.update(status="ok", seconds=seconds, tokens_per_sec=tokens / seconds, first_loss=losses[0],
               last_loss=losses[-1], peak_mem_gib=memory_gib(device), **phases)


def measure(name: str, run, row: dict, device: torch.device) -> dict:
    """Run one configuration (a function returning (seconds, losses, phases) as run_ours does) and fill its row; OOM
    and failures too."""
    retries_before = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        retries_before = torch.cuda.memory_stats(device).get("num_alloc_retries", 0)
    try:
        seconds, losses, phases = run()
    except Exception as exc:
        if is_oom(exc):
            row["status"] = "OOM"
        else:
            traceback.print_exc()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            row["status"] = f"failed ({type(exc).__name__}: {first})"
    else:
        fill_ok(row, (seconds, losses, phases), device)
        if device.type == "cuda":
            # Near a full GPU the caching allocator frees its cache and retries cudaMalloc, which synchronizes:
            # a configuration that retried (warmup included) may be slower for it; expandable segments
            # (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, a gpu_check variant) are meant to avoid that.
            stats = torch.cuda.memory_stats(device)
            row["alloc_retries"] = stats.get("num_alloc_retries", 0) - retries_before
            row["peak_reserved_gib"] = stats.get("reserved_bytes.all.peak", 0) / 2**30
    release(device)
    label = f"{name} {row['variant']}" if row.get("variant") else name
    print(f"{label} mb {row['micro_batch']}: {row['status']}"
          + (f", {row['tokens_per_sec']:,.0f} tokens/s, {row['seconds'] / row['steps']:.3f} s/step, loss "
             f"{row['first_loss']:.4f} (first measured step) -> {row['last_loss']:.4f} (last); built in "
             f"{row['build_s']:.1f} s, warmup (compile) {row['warmup_s']:.1f} s" if row["status"] == "ok" else "")
          + (f"; {row['peak_reserved_gib']:.2f} GiB reserved at peak, {row['alloc_retries']} allocator retries"
             if "alloc_retries" in row else "")
          + (f"; {row['skipped_steps']} of its {row['warmup'] + row['steps']} steps skipped their update (non-finite "
             "or spiking loss or gradient)" if row.get("skipped_steps") else ""), flush=True)
    return row


def finish_rows(rows: list[dict], peak: float | None) -> None:
    """Fill MFU and the ratio to the best baseline of this run."""
    best = max((r["tokens_per_sec"] for r in rows if r["name"] != "ours" and r["status"] == "ok"), default=None)
    for row in rows:
        ok = row["status"] == "ok"
        row["mfu"] = row["tokens_per_sec"] * row["flops_per_token"] / peak if ok and peak else None
        row["vs_best_baseline"] = row["tokens_per_sec"] / best if ok and best else None


def render(rows: list[dict], device: torch.device) -> str:
    """The results table."""
    memory = "peak GiB" if device.type == "cuda" else "max RSS GiB"
    names = [f"{r['name']}:{r['variant']}" if r.get("variant") else r["name"] for r in rows]
    width = max([10] + [len(name) + 2 for name in names])
    out = [f"{'config':<{width}}{'size':<12}{'seq':>6}{'mb':>5}{'tokens/s':>12}{'MFU':>8}{memory:>13}"
           f"{'vs best baseline':>18}"]
    for name, r in zip(names, rows):
        head = f"{name:<{width}}{r['size']:<12}{r['seq_len']:>6}{r['micro_batch']:>5}"
        if r["status"] != "ok":
            out.append(f"{head}  {r['status']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        ratio = f"{r['vs_best_baseline']:.2f}x" if r["vs_best_baseline"] is not None else "n/a"
        out.append(f"{head}{r['tokens_per_sec']:>12,.0f}{mfu:>8}{r['peak_mem_gib']:>13.2f}{ratio:>18}")
    if device.type != "cuda":
        out.append("(CPU: memory is the process' max resident set size, which never goes down; MFU is n/a)")
    return "\n".join(out)


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def write_json(path: str, report: dict) -> None:
    """Write the report (rewritten after every configuration, so a run cut short keeps what it measured)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="qwen2-1.5b", help="model size (debug, qwen2-0.5b, qwen2-1.5b, ...)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", default="4", help="comma-separated micro-batches, e.g. 2,4,8 (default 4)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first; compile happens there (3)")
    parser.add_argument("--accum", type=int, default=1,
                        help="micro-batches per optimizer step, for ours and the baselines alike (default 1); a "
                             "pretraining batch of millions of tokens on few GPUs takes many")
    parser.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE",
                        help="a qwen2-train override for ours (repeatable), e.g. parallel.compile=true")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[ KEY=VALUE...]",
                        help="one more row of ours per micro-batch with these overrides after the --ours ones, "
                             "measured after the baselines (repeatable), e.g. overlap:optim.overlap=true")
    parser.add_argument("--baseline", action="append", default=None, metavar="NAME[:MB,...]",
                        help="hf, hf-ac, hf-liger or none, optionally with its own micro-batches (repeatable; "
                             "default hf and hf-liger)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by name)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write every row as JSON here")
    parser.add_argument("--profile", default=None, metavar="PATH",
                        help="after timing ours (one micro-batch), profile 2 more steps: kernel time by kind, the "
                             "busiest kernels and the device's idle share, printed and written here")
    parser.add_argument("--profile-row", default="", metavar="NAME",
                        help="with --profile: profile the --variant NAME into the --profile file instead of the "
                             "default row (e.g. the default measured again as the last variant)")
    parser.add_argument("--profile-variants", default="", metavar="NAME[,NAME...]",
                        help="with --profile: profile these variants too, each into the --profile file with _NAME "
                             "before its extension")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory(prefix="qwen2-throughput-") as run_dir:
        try:
            if world_from_env()[2] != 1:
                raise UserError("benchmarks/throughput.py measures one process on one device; start it with python, "
                                "not torchrun")
            if opts.steps < 1 or opts.warmup < 0 or opts.seq_len < 1 or opts.accum < 1:
                raise UserError(f"--steps {opts.steps}, --warmup {opts.warmup}, --seq-len {opts.seq_len}, --accum "
                                f"{opts.accum}: need steps >= 1, warmup >= 0, seq-len >= 1, accum >= 1")
            micro_batches = parse_micro_batches(opts.micro_batch, "--micro-batch")
            if opts.profile and len(micro_batches) > 1:
                raise UserError(f"--profile profiles one configuration of ours: give one --micro-batch, not "
                                f"{opts.micro_batch}")
            baselines = parse_baselines(DEFAULT_BASELINES if opts.baseline is None else opts.baseline, micro_batches)
            variants = parse_variants(opts.variant)
            profiled = [name for name in opts.profile_variants.split(",") if name]
            unknown = [name for name in profiled if name not in [n for n, _ in variants]]
            if unknown or (profiled and not opts.profile):
                raise UserError(f"--profile-variants {opts.profile_variants}: "
                                + (f"no --variant named {', '.join(unknown)}" if unknown else "needs --profile FILE"))
            profile_row = opts.profile_row or None  # the variant profiled into --profile's file; None: the default
            if profile_row and (profile_row not in [n for n, _ in variants] or not opts.profile):
                raise UserError(f"--profile-row {profile_row}: "
                                + ("needs --profile FILE" if not opts.profile else f"no --variant named {profile_row}"))
            try:
                compose_job(opts.ours)  # alone first, so that an error quotes only the user's overrides
            except UserError as exc:
                raise UserError(f"--ours: {exc}") from None
            # Every job composed and validated up front: a bad option fails in one line before any model exists.
            all_micro = sorted({mb for mbs in [micro_batches] + [m for _, m in baselines] for mb in mbs})
            jobs = {mb: compose_job(ours_overrides(opts.size, opts.seq_len, mb, run_dir, opts.ours, opts.accum))
                    for mb in all_micro}
            for job in jobs.values():
                validate(job, 1)
            variant_jobs = {}
            for name, overrides in variants:
                for mb in micro_batches:
                    try:
                        variant_jobs[name, mb] = job = compose_job(
                            ours_overrides(opts.size, opts.seq_len, mb, run_dir, opts.ours + overrides, opts.accum))
                        validate(job, 1)
                    except UserError as exc:
                        raise UserError(f"--variant {name}: {exc}") from None
            device_type = resolve_device(jobs[micro_batches[0]].train.device)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        # The device init_distributed() gives ours: local rank 0 of one process.
        device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        peak = peak_flops(device, opts.peak_tflops * 1e12 if opts.peak_tflops else None)
        defaults = sdpa_defaults()
        args: ModelArgs = jobs[micro_batches[0]].model.args()
        report = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": package_version("transformers"), "liger_kernel": package_version("liger-kernel"),
            "size": opts.size, "parameters": count_parameters(build_model(args, "meta")), "seq_len": opts.seq_len,
            "warmup": opts.warmup, "steps": opts.steps, "accum": opts.accum, "ours_overrides": opts.ours,
            "peak_flops": peak, "memory": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS",
            "rows": [],
        }
        print(f"device {report['device']}, torch {torch.__version__}, transformers {report['transformers']}, "
              f"liger-kernel {report['liger_kernel'] or 'not installed'}; {opts.size} ({report['parameters']:,} "
              f"parameters), seq {opts.seq_len}, {opts.warmup} warmup + {opts.steps} timed steps"
              f"{f' of {opts.accum} micro-batches each' if opts.accum > 1 else ''}; "
              f"peak {f'{peak / 1e12:.1f} TFLOP/s' if peak else 'unknown (MFU n/a)'}", flush=True)
        print(f"ours: {' '.join(opts.ours) or '(defaults)'}", flush=True)
        for variant, overrides in variants:
            print(f"variant {variant}: ours with {' '.join(overrides)}", flush=True)

        # (name, micro-batch, variant name or None, the variant's overrides)
        plan = [("ours", mb, None, []) for mb in micro_batches]
        plan += [(name, mb, None, []) for name, mbs in baselines for mb in mbs]
        plan += [("ours", mb, variant, overrides) for variant, overrides in variants for mb in micro_batches]
        liger_skipped = None
        ours_total, ours_done = sum(1 for name, *_ in plan if name == "ours"), 0
        for name, mb, variant, overrides in plan:
            job = jobs[mb] if variant is None else variant_jobs[variant, mb]
            row = {"name": name, "size": opts.size, "seq_len": opts.seq_len, "micro_batch": mb,
                   "global_batch": job.train.global_batch_size, "steps": opts.steps, "warmup": opts.warmup,
                   "flops_per_token": flops_per_token(job.model.args(), opts.seq_len)}
            if name == "ours":  # the job as qwen2-train (or qwen2-estimate) takes it, without the temporary run_dir
                row["overrides"] = [o for o in ours_overrides(opts.size, opts.seq_len, mb, run_dir,
                                                              opts.ours + overrides, opts.accum)
                                    if not o.startswith("run_dir=")]
                row["variant"], row["variant_overrides"] = variant, overrides
            if name == "hf-liger" and liger_skipped is None:
                liger_skipped = apply_liger(device) or ""
            if name == "hf-liger" and liger_skipped:
                row["status"] = f"skipped: {liger_skipped}"
                print(f"hf-liger mb {mb}: skipped: {liger_skipped}", flush=True)
            elif name == "ours":
                if ours_done:
                    torch._dynamo.reset()  # a row of ours already ran: nothing compiled for it is reused
                ours_done += 1
                profile = None
                if opts.profile and variant == profile_row:
                    profile = opts.profile
                elif opts.profile and variant in profiled:
                    stem, ext = os.path.splitext(opts.profile)
                    profile = f"{stem}_{variant}{ext}"
                def timed(result, row=row):  # written before the profile runs: a cut there keeps the timing
                    fill_ok(row, result, device)
                    if opts.json:
                        rows = report["rows"] + [row]
                        finish_rows(rows, peak)
                        write_json(opts.json, {**report, "rows": rows})

                measure(name, functools.partial(run_ours, job, opts.warmup, opts.steps, opts.seed, profile,
                                                keep_initial=ours_done < ours_total, timed=timed), row, device)
                if ours_done == ours_total:
                    INITIAL.clear()
            else:
                restore_sdpa(defaults)
                measure(name, functools.partial(run_baseline, name, job, device, opts.warmup, opts.steps, opts.seed),
                        row, device)
            report["rows"].append(row)
            finish_rows(report["rows"], peak)
            if opts.json:
                write_json(opts.json, report)
        print()
        print(render(report["rows"], device))
        return 1 if any(r["status"].startswith("failed") for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
