"""qwen2-estimate's memory report for each of our configurations in throughput.py JSON files, next to what was measured.

    python benchmarks/estimate_vs_measured.py gpu_out/throughput_1.5b.json [more.json ...] [--gpu-mem-gib 80]

For every `ours` row, the job is composed from the row's overrides (exactly what was measured), estimated for one
process as qwen2-estimate does it (qwen2_dist.cli.estimate), and printed with the measured peak: CUDA's
max_memory_allocated, which the estimate's "peak tensor memory" line predicts (on the CPU the measured number is the
process' max RSS, not comparable). A table of all rows closes the output.
"""

import argparse
import json
import os
import sys

from qwen2_dist.cli.estimate import GIB, estimate, render
from qwen2_dist.cli.train import compose_job
from qwen2_dist.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="JSON files written by benchmarks/throughput.py --json")
    parser.add_argument("--gpu-mem-gib", type=float, default=80.0, help="GPU memory for the fits/does-not-fit line")
    opts = parser.parse_args(argv)
    table, failed = [], 0
    for path in opts.reports:
        try:
            with open(path, encoding="utf-8") as f:
                report = json.load(f)
        except (OSError, ValueError) as exc:
            print(f"error: {path}: {exc}; run benchmarks/throughput.py --json {path} first", file=sys.stderr)
            return 2
        for row in report["rows"]:
            if row["name"] != "ours":
                continue
            try:
                job = compose_job(row["overrides"])
                info, lines = estimate(job, 1)
            except UserError as exc:  # this row only: the others are still estimated
                print(f"error: {path}: {' '.join(row['overrides'])}: {exc}", file=sys.stderr)
                failed += 1
                continue
            print(f"== {path}: ours, {' '.join(row['overrides'])}")
            print(render(job, info, lines, opts.gpu_mem_gib))
            estimated = info["peak"] / GIB
            on_cuda = report["memory"].startswith("cuda")  # a CPU's max RSS is not what the estimate predicts
            if row["status"] == "ok":
                measured = f"{row['peak_mem_gib']:.2f} GiB"
                delta = f"{(estimated / row['peak_mem_gib'] - 1):+.0%}" if on_cuda else "n/a"
            else:
                measured, delta = row["status"], "n/a"
            print(f"measured ({report['memory']}): {measured}; estimated peak tensor memory {estimated:.2f} GiB\n")
            table.append((os.path.basename(path), row["micro_batch"], estimated, measured, delta,
                          " ".join(report["ours_overrides"] + row.get("variant_overrides", [])) or "-"))
    print(f"{'report':<28}{'mb':>4}  {'estimate GiB':>12}  {'measured':>14}  {'estimate vs measured':>20}  --ours")
    for path, mb, estimated, measured, delta, ours in table:
        print(f"{path:<28}{mb:>4}  {estimated:>12.2f}  {measured:>14}  {delta:>20}  {ours}")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
