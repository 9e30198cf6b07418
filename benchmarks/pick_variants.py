"""Which variants of ours beat the default row: the overrides to run together in one more invocation, with the
baseline, so that a combination that closes the gap is measured against the baseline in the same run.

    python benchmarks/pick_variants.py DEFAULT.json [VARIANT.json ...] [--min-gain 0.01] [--all]

DEFAULT.json and each VARIANT.json are `benchmarks/throughput.py --json` reports. The default row is DEFAULT.json's
first row of ours that ran without a --variant. The variants are the rows of DEFAULT.json made by --variant (their
own overrides: the variant's) and the first row of ours of each VARIANT.json (its own overrides: its
`ours_overrides` less the default's). A variant wins when its row (same micro-batch) ran and its tokens/s beat the
default's by at least --min-gain (a fraction; 0.01 by default: runs of the same setting differ by a fraction of a
percent). Where winners set the same key to different values (two loss chunk sizes), the faster one's value is
taken. A --variant row with no overrides beyond the default's is the default measured again after the variants:
where it differs from the default row by more than --min-gain, that difference is the threshold instead (a gain
within the run's own drift is not told apart from it). The winners' overrides go to stdout, one per line; what was
decided for each variant goes to stderr. A variant without overrides of its own (an environment variable only), a
missing or failed row, a report of another size or sequence length, or a row whose loss shows it did not train as
the default did (targets.loss_problem: not finite, or off the default's) is never picked, --all or not. --all picks
every variant that ran (the dry run uses it, so that the combined step is exercised on the CPU, where the timings
mean nothing).

Exit 0 with the winners, 3 when none won (nothing printed to stdout), 4 when the winners' overrides are exactly
those of one --variant row of DEFAULT.json (printed all the same), whether that row won, lost or did not run (OOM,
failed, refused for its loss): it already ran in the same invocation as DEFAULT.json's baselines, so there is
nothing to combine and no need to run it again (gpu_check.sh's step 2 has the combination most likely to win as a
row of its own); 2 for an unreadable default report.
"""

import argparse
import json
import sys
from typing import NamedTuple

try:
    from benchmarks.targets import loss_problem
except ImportError:  # run as a script: python benchmarks/pick_variants.py
    from targets import loss_problem

NO_WINNER = 3
ONE_WINNER_IN_DEFAULT = 4


def ours_row(report: dict) -> dict | None:
    """The first row of ours that ran and is not a --variant, or None."""
    return next((row for row in report.get("rows", []) if row.get("name") == "ours" and row.get("status") == "ok"
                 and not row.get("variant")), None)


def key_of(override: str) -> str:
    """The config key an override sets: 'model.loss_chunk_tokens=8192' -> 'model.loss_chunk_tokens'."""
    return override.partition("=")[0].lstrip("+")


def losses(row: dict, base: dict) -> str:
    """The last timed loss of both rows (the same seed and batches: a variant that computes the same update, such as
    optim.overlap, should match up to the GPU's run-to-run noise), when both have one."""
    if not isinstance(row.get("last_loss"), float) or not isinstance(base.get("last_loss"), float):
        return ""
    return (f"; last loss {row['last_loss']:.4f} against {base['last_loss']:.4f} "
            f"({row['last_loss'] - base['last_loss']:+.4f})")


def load(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        print(f"{path}: not read ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None


class Variant(NamedTuple):
    label: str  # "variant NAME" for a --variant row of the default report, else the report's path
    report: dict
    row: dict | None  # None when it did not run
    own: list[str]  # its overrides beyond the default's
    in_default: bool  # a --variant row of the default report: measured with that report's baselines


def candidates(default: dict, variants: dict[str, dict | None]) -> list[Variant]:
    """Every variant: DEFAULT's --variant rows first, then the first row of ours of each other report."""
    found = []
    base_overrides = set(default.get("ours_overrides", []))
    for row in default.get("rows", []):
        if row.get("name") == "ours" and row.get("variant"):
            found.append(Variant(f"variant {row['variant']}", default, row if row.get("status") == "ok" else None,
                                 [o for o in row.get("variant_overrides", []) if o not in base_overrides], True))
    for path, report in variants.items():
        if report is not None:  # else load() said why
            found.append(Variant(path, report, ours_row(report),
                                 [o for o in report.get("ours_overrides", []) if o not in base_overrides], False))
    return found


def pick(default: dict, variants: dict[str, dict | None], min_gain: float,
         take_all: bool) -> tuple[list[str], list[Variant]]:
    """The winning overrides, in the variants' order, each once, a key set by several winners taking the fastest
    one's value, and the winning variants; the reasons are printed to stderr."""
    base = ours_row(default)
    if base is None:
        raise ValueError("the default report has no row of ours that ran")
    winners: list[str] = []
    chosen: dict[str, tuple[float, str, str]] = {}  # key -> (tokens/s, override, label) of the fastest winner
    wins: list[Variant] = []
    found = candidates(default, variants)
    # A --variant row with nothing of its own is the default measured again, later in the same process: how far the
    # same setting drifted over the run (the GPU warming up, its clocks) bounds the gains that can be told apart.
    repeats = [v for v in found if v.in_default and not v.own and v.row is not None]
    drift = max((abs(v.row["tokens_per_sec"] / base["tokens_per_sec"] - 1) for v in repeats), default=0.0)
    if drift > min_gain and not take_all:
        print(f"the default measured again differs by {drift:.1%}: a variant must gain that much to be picked",
              file=sys.stderr)
        min_gain = drift
    for variant in found:
        label, report, row, own = variant.label, variant.report, variant.row, variant.own
        if variant in repeats:
            gain = row["tokens_per_sec"] / base["tokens_per_sec"] - 1
            print(f"{label}: the default again, after the variants: {row['tokens_per_sec']:,.0f} tokens/s against "
                  f"{base['tokens_per_sec']:,.0f} ({gain:+.1%}){losses(row, base)}", file=sys.stderr)
            continue
        if (report.get("size"), report.get("seq_len")) != (default.get("size"), default.get("seq_len")):
            verdict = (f"not comparable ({report.get('size')} seq {report.get('seq_len')}, the default is "
                       f"{default.get('size')} seq {default.get('seq_len')})")
        elif row is None:
            verdict = "no row of ours ran"
        elif row["micro_batch"] != base["micro_batch"]:
            verdict = f"micro-batch {row['micro_batch']}, the default's is {base['micro_batch']}"
        elif not own:
            verdict = "no overrides of its own (an environment setting): not combinable here"
        elif (why := loss_problem(row, base)) is not None:
            verdict = f"not picked: {why} (it did not train as the default did)"
        else:
            gain = row["tokens_per_sec"] / base["tokens_per_sec"] - 1
            won = take_all or gain >= min_gain
            verdict = (f"{row['tokens_per_sec']:,.0f} tokens/s against {base['tokens_per_sec']:,.0f} ({gain:+.1%}): "
                       f"{'picked' if won else 'not picked'}{' (--all)' if take_all and gain < min_gain else ''}"
                       f"{losses(row, base)}")
            if won:
                winners += [o for o in own if o not in winners]
                wins.append(variant)
                for override in own:
                    if key_of(override) not in chosen or chosen[key_of(override)][0] < row["tokens_per_sec"]:
                        chosen[key_of(override)] = (row["tokens_per_sec"], override, label)
        print(f"{label}: {' '.join(own) or '(none)'}: {verdict}", file=sys.stderr)
    kept = [o for o in winners if chosen[key_of(o)][1] == o]
    for override in winners:
        if override not in kept:
            print(f"{override} left out: {chosen[key_of(override)][2]} sets {chosen[key_of(override)][1]} and was "
                  "faster", file=sys.stderr)
    return kept, wins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("default", help="throughput.py --json report of the default setting")
    parser.add_argument("variants", nargs="*", help="throughput.py --json reports of more variants")
    parser.add_argument("--min-gain", type=float, default=0.01,
                        help="smallest gain over the default that counts, as a fraction (default 0.01)")
    parser.add_argument("--all", action="store_true", help="pick every variant that ran, gain or not")
    opts = parser.parse_args(argv)
    default = load(opts.default)
    try:
        if default is None:
            raise ValueError("it could not be read")
        winners, wins = pick(default, {path: load(path) for path in opts.variants}, opts.min_gain, opts.all)
    except ValueError as exc:
        print(f"error: {opts.default}: {exc}; run the default step first", file=sys.stderr)
        return 2
    if not winners:
        print("no variant won", file=sys.stderr)
        return NO_WINNER
    print("\n".join(winners))
    # A row of the default report with exactly these overrides, a winner or not: running it again in a process of its
    # own would measure what already ran next to that report's baselines (a loser, an OOM or a failure again).
    measured = [v for v in wins + candidates(default, {}) if v.in_default and set(v.own) == set(winners)]
    if measured:
        state = ("it won" if measured[0] in wins else "it did not win" if measured[0].row is not None
                 else "it did not run")
        print(f"the winners' overrides are those of {measured[0].label}, measured in {opts.default} with that run's "
              f"baselines ({state}): nothing to combine", file=sys.stderr)
        return ONE_WINNER_IN_DEFAULT
    return 0


if __name__ == "__main__":
    sys.exit(main())
