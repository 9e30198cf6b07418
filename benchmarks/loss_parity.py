"""Loss curves of the fast path (per-block compile, chunked linear cross-entropy, SDPA preferring cuDNN) against the
plain path (eager, logits then cross_entropy) over 20 training steps, both in bf16 autocast, from the same weights on
the same batches -- and against an fp32 run of the plain path, which sets the scale of "bf16 noise".

    python benchmarks/loss_parity.py [--size qwen2-0.5b] [--layers 8] [--seq-len 2048] [--steps 20] [--out F.json]

The fast path clips its gradients as the trainer does (inside the fused AdamW). With --float8, one more curve: the
fast path with its decoder-block linears in float8 (model.float8); with --overlap, the fast path with AdamW stepped
on a side stream during the next forward (optim.overlap; the same update, so its curve should sit on the fast one).
Each has its own verdict; one that cannot run is reported and the bf16 verdict is still printed and written. The
overlap curve runs before the float8 one (a timeout then cuts float8, which the bf16 targets do not need).

Verdict: a fast curve may not stray from the fp32 curve by more than 2x as far as the plain bf16 curve does, plus
0.02 (max over steps, absolute, in nats). Exit 1 when one does (or an extra curve asked for did not run). On a CPU
(--no-compile) it dry-runs the script with the debug size.
"""

import argparse
import json
import os
import sys
import time

import torch

from qwen2_dist.config import ModelConfig, OptimConfig, ParallelConfig
from qwen2_dist.model.args import get_model_args
from qwen2_dist.model.attention import resolve_backend
from qwen2_dist.model.qwen2 import build_model
from qwen2_dist.parallel.parallelize import parallelize
from qwen2_dist.train.optim import build_optimizer, clip_gradients

TOLERANCE_FACTOR, TOLERANCE_FLOOR = 2.0, 0.02


def curve(args, batches, device, bf16: bool, fast: bool, compile_blocks: bool, float8: bool = False,
          overlap: bool = False) -> list[float]:
    """Per-step training losses of one path; the same initial weights (seed 0) every time. The fast path clips as
    the trainer does (inside the fused AdamW); with float8, its blocks' linears run in float8 (torchao); with
    overlap, its AdamW steps on a side stream (optim.overlap)."""
    model = build_model(args, "meta")
    model.set_attention_backend(resolve_backend("auto" if fast else "sdpa", device.type))
    parallel = ParallelConfig(compile=str(fast and compile_blocks).lower())
    model = parallelize(model, None, parallel, device_type=device.type, float8=fast and float8)
    model.to_empty(device=device)
    model.init_weights(0)
    # The trainer's default chunk (model.loss_chunk_tokens), so that a new default is what this checks.
    model.set_loss("chunked" if fast else "plain", chunk_tokens=ModelConfig.loss_chunk_tokens,
                   compiled=fast and compile_blocks)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=0, overlap=fast and overlap), device.type)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    losses = []
    for batch in batches:
        inputs, targets = batch[:, :-1].to(device), batch[:, 1:].to(device)
        with autocast:
            loss = model(inputs, targets=targets) / targets.numel()
        loss.backward()
        if fast:
            clip_gradients(model, optimizer, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if device.type == "cuda":
        torch.cuda.synchronize()  # optim.overlap's last update may still run on its side stream: not freed under it
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default=None, help="model size (default qwen2-0.5b on CUDA, debug on CPU)")
    parser.add_argument("--layers", type=int, default=8, help="decoder blocks (fewer than the size's, for speed)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--distinct-batches", type=int, default=4, help="batches cycled through (so the loss falls)")
    parser.add_argument("--no-compile", action="store_true", help="fast path without torch.compile (CPU dry run)")
    parser.add_argument("--out", help="write the curves and the verdict as JSON here")
    parser.add_argument("--float8", action="store_true",
                        help="also the fast path with float8 linears (model.float8; torchao, CUDA compute capability "
                             "8.9+), one more curve with its own verdict")
    parser.add_argument("--overlap", action="store_true",
                        help="also the fast path with optim.overlap (AdamW on a side stream), one more curve with its "
                             "own verdict")
    opts = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = opts.size or ("qwen2-0.5b" if device.type == "cuda" else "debug")
    seq_len = opts.seq_len or (2048 if device.type == "cuda" else 64)
    args = get_model_args(size, num_hidden_layers=opts.layers)
    generator = torch.Generator().manual_seed(0)
    distinct = [torch.randint(0, args.vocab_size, (opts.micro_batch, seq_len + 1), generator=generator)
                for _ in range(opts.distinct_batches)]
    batches = [distinct[i % len(distinct)] for i in range(opts.steps)]
    compile_blocks = not opts.no_compile
    started = time.perf_counter()
    curves = {
        "fp32 plain": curve(args, batches, device, bf16=False, fast=False, compile_blocks=compile_blocks),
        "bf16 plain": curve(args, batches, device, bf16=True, fast=False, compile_blocks=compile_blocks),
        "bf16 fast": curve(args, batches, device, bf16=True, fast=True, compile_blocks=compile_blocks),
    }
    truth = curves["fp32 plain"]
    noise = max(abs(a - b) for a, b in zip(curves["bf16 plain"], truth))
    tolerance = TOLERANCE_FACTOR * noise + TOLERANCE_FLOOR

    def verdict(name: str) -> dict:
        error = max(abs(a - b) for a, b in zip(curves[name], truth))
        vs_plain = max(abs(a - b) for a, b in zip(curves[name], curves["bf16 plain"]))
        return {"error": error, "vs_plain": vs_plain, "ok": error <= tolerance}

    # The overlap curve first: its verdict decides whether optim.overlap's throughput rows count (benchmarks/
    # targets.py), while float8 is not needed for the bf16 targets, so a timeout should cut float8's curve.
    wanted = [(name, option) for name, want, option in (("fast overlap", opts.overlap, "overlap"),
                                                        ("fast float8", opts.float8, "float8")) if want]
    # Extra curve -> why it could not run. Until it has run: that the check stopped before it (a timeout kills this
    # process, perhaps in a cold compile), so the core verdict is written first, and again after every extra curve.
    errors = {name: "not run: the check was stopped before this curve" for name, _ in wanted}

    def write_report() -> bool:
        """Write --out (atomically) from the curves so far; whether everything run and wanted is within tolerance."""
        fast, extras = verdict("bf16 fast"), {name: verdict(name) for name, _ in wanted if name in curves}
        ok = fast["ok"] and not errors and all(result["ok"] for result in extras.values())
        if opts.out:
            with open(f"{opts.out}.tmp", "w") as f:
                json.dump({"size": size, "layers": opts.layers, "seq_len": seq_len, "micro_batch": opts.micro_batch,
                           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                           "torch": torch.__version__, "curves": curves, "noise": noise, "tolerance": tolerance,
                           "fast_error": fast["error"], "fast_vs_plain": fast["vs_plain"], "fast_ok": fast["ok"],
                           "float8": extras.get("fast float8"), "float8_error": errors.get("fast float8"),
                           "overlap": extras.get("fast overlap"), "overlap_error": errors.get("fast overlap"),
                           "ok": ok}, f, indent=2)
            os.replace(f"{opts.out}.tmp", opts.out)
        return ok

    write_report()
    for name, option in wanted:
        try:
            curves[name] = curve(args, batches, device, bf16=True, fast=True, compile_blocks=compile_blocks,
                                 **{option: True})
            del errors[name]
        except Exception as exc:  # reported, and the bf16 verdict still printed and written
            errors[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        write_report()

    fast = verdict("bf16 fast")
    extras = {name: verdict(name) for name, _ in wanted if name in curves}
    print(f"{size} ({opts.layers} blocks), seq {seq_len}, micro-batch {opts.micro_batch}, {opts.steps} steps on "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, compile {compile_blocks}")
    print("step  " + "  ".join(f"{name:>11}" for name in curves))
    for step in range(opts.steps):
        print(f"{step + 1:4d}  " + "  ".join(f"{c[step]:11.4f}" for c in curves.values()))
    print(f"max |bf16 plain - fp32| = {noise:.4f} (bf16 noise); tolerance {TOLERANCE_FACTOR} x noise + "
          f"{TOLERANCE_FLOOR} = {tolerance:.4f}")
    print(f"bf16 fast: max |fast - fp32| = {fast['error']:.4f}, max |fast - plain| = {fast['vs_plain']:.4f}: "
          f"{'ok' if fast['ok'] else 'FAILED'}")
    for name, result in extras.items():
        short = name.split()[1]
        vs_fast = max(abs(a - b) for a, b in zip(curves[name], curves["bf16 fast"]))
        print(f"{name}: max |{short} - fp32| = {result['error']:.4f}, max |{short} - plain| = "
              f"{result['vs_plain']:.4f}, max |{short} - fast| = {vs_fast:.4f}: {'ok' if result['ok'] else 'FAILED'}")
    for name, error in errors.items():
        print(f"{name}: FAILED to run ({error})")
    print(f"({time.perf_counter() - started:.0f} s)")
    sys.exit(0 if write_report() else 1)

if __name__ == "__main__":
    main()
