"""The memory traffic of one compiled decoder block, by kernel, as Inductor's scheduler counts it.

    python benchmarks/block_traffic.py --size qwen2-1.5b --step-tokens 16384 [--ours KEY=VALUE ...]
        [--probe-tokens 512,1024] [--top 25] [--json FILE]

One block of the job `qwen2-train model=SIZE parallel.compile=true` plus every --ours override would train (built,
checkpoint-wrapped and compiled by the same parallelize(), one process: e.g. --ours
parallel.activation_checkpointing=op counts what its backward recomputes, --ours model.fuse_projections=qkv the fused
projection) runs forward and backward under bf16 autocast with a bf16 input (the residual stream's dtype under
autocast) at two sequence lengths, batch 1, each compiled anew (static shapes). For every kernel of the two compiled
graphs Inductor reports the bytes it reads and writes (its `inductor_metrics` log: the sizes of the kernel's buffers,
whatever a hardware cache would spare). Kernels that compute the same ops in the same pass are one row (Inductor
orders them differently at another length); the two lengths split each row's bytes into a part per token and a fixed
part (weights). The table scales them to a step of --step-tokens tokens through every block of the size, and to
milliseconds at --bandwidth-tbs (3.0 TB/s by default: the device copy rate measured on an H100 on 2026-11-26,
shared/notes/gpu-measurements.md).

What it predicts: the time a step spends in the kernels Inductor generates (norms, RoPE, SwiGLU, residual adds, weight
casts), as a lower bound from bytes alone; matmuls and attention ("extern") are listed for completeness, their time is
set by FLOPs. Inductor fuses differently for the CPU (C++ loops) and CUDA (Triton), so on the CPU this is the CPU's
fusion: read it as an estimate of the GPU's, which a profile on the GPU replaces (throughput.py --profile).
"""

import argparse
import collections
import dataclasses
import json
import sys

import torch
import torch._inductor.metrics as inductor_metrics
from torch._inductor import compile_fx

from qwen2_dist.cli.train import compose_job
from qwen2_dist.config import JobConfig
from qwen2_dist.errors import UserError
from qwen2_dist.model.args import ModelArgs
from qwen2_dist.model.attention import resolve_backend
from qwen2_dist.model.qwen2 import build_model, rotary_cos_sin
from qwen2_dist.parallel.parallelize import parallelize

LAYOUT = {"permute", "reshape", "view", "clone", "expand", "squeeze", "unsqueeze", "slice", "select",
          "convert_element_type", "alias", "t", "transpose"}  # origins that name no computation


def kernel_label(node) -> str:
    """What a scheduler node computes: the extern kernel's op, or the computing ops fused into it."""
    names = set()
    for sub in getattr(node, "snodes", None) or [node]:
        ir = getattr(sub, "node", None)
        for origin in getattr(ir, "origins", ()) or ():
            names.add(getattr(origin.target, "__name__", str(origin.target)).split(".")[0])
    computing = [name for name in names if name not in LAYOUT]
    return ",".join(sorted(computing or names)) or type(node).__name__


def build_block(job: JobConfig, device: str) -> torch.nn.Module:
    """The job's first decoder block as training builds it for one process (qwen2_dist.cli.train), on the device,
    with random weights."""
    model = build_model(dataclasses.replace(job.model.args(), num_hidden_layers=1), "meta")
    model.set_attention_backend(resolve_backend(job.model.attention, device, job.data.document_masking))
    model = parallelize(model, None, job.parallel, torch.float32, device, float8=job.model.float8,
                        kernels=job.model.kernels)
    model.set_kernels(job.model.kernels, job.model.fuse_projections, device)
    block = model.layers[0].to_empty(device=device)
    torch.manual_seed(job.seed)
    for param in block.parameters():
        torch.nn.init.normal_(param, std=job.model.args().initializer_range)
    return block


def probe(block: torch.nn.Module, args: ModelArgs, tokens: int, device: str) -> dict[tuple, list[int]]:
    """{(pass, computes, extern): [kernels, bytes]} of the block's compiled forward and backward at this length.
    Kernels are grouped by what they compute: Inductor orders, and at times splits, them differently for another
    length."""
    torch._dynamo.reset()  # compiled anew, for this length only
    inductor_metrics.reset()
    x = torch.randn(1, tokens, args.hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rotary_cos_sin(torch.arange(tokens, device=device)[None], args.head_dim, args.rope_theta)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = block(x, cos, sin)
    forward_kernels = len(inductor_metrics.nodes_num_elem)
    out.backward(torch.ones_like(out))
    groups = collections.defaultdict(lambda: [0, 0])
    for index, (node, elements) in enumerate(inductor_metrics.nodes_num_elem):  # count_bytes() keeps bytes // 4
        extern = type(node).__name__ == "ExternKernelSchedulerNode"
        group = groups[("forward" if index < forward_kernels else "backward", kernel_label(node), extern)]
        group[0] += 1
        group[1] += elements * 4
    return groups


def traffic(job: JobConfig, short: int, long: int, device: str) -> list[dict]:
    """One row per kernel group of the job's block: bytes = per_token x tokens + fixed (the weights' part)."""
    block = build_block(job, device)
    args = job.model.args()
    # Inductor counts the bytes only while its inductor_metrics log takes INFO: that log on, its lines (every
    # kernel's counts) kept out of the output. A graph served from Inductor's caches is not generated again, and so
    # not counted: no caches.
    torch._logging.set_logs(inductor_metrics=True)
    metrics_log = compile_fx.inductor_metrics_log
    metrics_log.propagate = False
    try:
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            small, large = probe(block, args, short, device), probe(block, args, long, device)
    finally:
        metrics_log.propagate = True
        torch._logging.set_logs()
        torch._dynamo.reset()
    if not small:
        raise RuntimeError("Inductor counted no kernel: is the block compiled (parallel.compile)?")
    if set(small) != set(large):
        raise RuntimeError(f"the block compiled to different kernels at {short} and {long} tokens (only at {short}: "
                           f"{sorted(set(small) - set(large))}; only at {long}: {sorted(set(large) - set(small))}); "
                           "try other --probe-tokens")
    rows = []
    for (phase, computes, extern), (kernels, short_bytes) in small.items():
        per_token = (large[phase, computes, extern][1] - short_bytes) / (long - short)
        rows.append({"pass": phase, "computes": computes, "extern": extern, "kernels": kernels,
                     "bytes_per_token": per_token, "fixed_bytes": short_bytes - per_token * short})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="qwen2-1.5b", help="a model size of conf/model (qwen2_dist.model.args)")
    parser.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE",
                        help="a job override (repeatable), as qwen2-train takes it")
    parser.add_argument("--step-tokens", type=int, default=16384, help="tokens per step (micro-batch x seq)")
    parser.add_argument("--probe-tokens", default="512,1024", help="the two sequence lengths compiled, a,b with a<b")
    parser.add_argument("--bandwidth-tbs", type=float, default=3.0, help="memory bandwidth for the ms column")
    parser.add_argument("--top", type=int, default=25, help="kernel groups listed, by bytes per step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write every row, and the totals, to this file")
    opts = parser.parse_args(argv)
    try:
        short, long = (int(v) for v in opts.probe_tokens.split(","))
        if not 0 < short < long:
            raise ValueError
    except ValueError:
        print(f"error: --probe-tokens {opts.probe_tokens!r}: give two lengths a,b with 0 < a < b, e.g. 512,1024",
              file=sys.stderr)
        return 2
    overrides = [f"model={opts.size}", "parallel.compile=true", *opts.ours]
    try:
        job = compose_job(overrides)
        rows = traffic(job, short, long, opts.device)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args = job.model.args()

    layers, ms = args.num_hidden_layers, 1e3 / (opts.bandwidth_tbs * 1e12)
    for row in rows:
        row["gb_per_step"] = layers * (row["bytes_per_token"] * opts.step_tokens + row["fixed_bytes"]) / 1e9
        row["ms_per_step"] = row["gb_per_step"] * 1e9 * ms
    print(f"{' '.join(overrides)}: {layers} blocks, {opts.step_tokens} tokens a step, device {opts.device}, torch "
          f"{torch.__version__}; {sum(r['kernels'] for r in rows)} kernels a block (forward + backward), those that "
          "compute the same ops in one row")
    print(f"{'pass':<9}{'computes':<50}{'kind':>7}{'kernels':>8}{'B/token':>9}{'fixed MiB':>10}{'GB/step':>9}"
          f"{'ms/step':>8}")
    for row in sorted(rows, key=lambda r: -r["gb_per_step"])[:opts.top]:
        print(f"{row['pass']:<9}{row['computes'][:49]:<50}{'extern' if row['extern'] else 'fused':>7}"
              f"{row['kernels']:>8}{row['bytes_per_token']:>9.0f}{row['fixed_bytes'] / 2**20:>10.1f}"
              f"{row['gb_per_step']:>9.2f}{row['ms_per_step']:>8.2f}")
    totals = {}
    for kind, extern in (("generated", False), ("extern", True)):
        part = [r for r in rows if r["extern"] == extern]
        totals[kind] = {key: sum(r[key] for r in part) for key in
                        ("kernels", "bytes_per_token", "fixed_bytes", "gb_per_step", "ms_per_step")}
        total = totals[kind]
        print(f"{kind} ({'matmul, attention' if extern else 'fused element-wise and reductions'}): "
              f"{total['kernels']} kernels, {total['bytes_per_token']:.0f} B/token and "
              f"{total['fixed_bytes'] / 2**20:.1f} MiB fixed a block; {total['gb_per_step']:.1f} GB a step, "
              f"{total['ms_per_step']:.1f} ms at {opts.bandwidth_tbs} TB/s")
    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as f:
            json.dump({"size": opts.size, "overrides": overrides, "layers": layers, "step_tokens": opts.step_tokens,
                       "device": opts.device, "torch": torch.__version__, "probe_tokens": [short, long],
                       "bandwidth_tbs": opts.bandwidth_tbs, "rows": rows, "totals": totals}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
