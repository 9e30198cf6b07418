"""benchmarks/pick_variants.py: which variants of ours the GPU check runs together against the baseline, decided on
made-up throughput reports (no model is run)."""

import json

import pytest

from benchmarks import pick_variants
from tests.helpers import run_python


def report(tokens_per_sec, *overrides, status="ok", micro_batch=4, size="qwen2-1.5b", seq_len=4096,
           last_loss=None):
    ours = {"name": "ours", "status": status, "micro_batch": micro_batch,
            "tokens_per_sec": tokens_per_sec if status == "ok" else None}
    if last_loss is not None:
        ours.update(first_loss=12.2353, last_loss=last_loss)
    return {"size": size, "seq_len": seq_len, "ours_overrides": ["parallel.compile=true", *overrides],
            "rows": [ours, {"name": "hf-liger", "status": "ok", "micro_batch": 4, "tokens_per_sec": 1.0}]}


DEFAULT = report(44000.0)
DEFAULT["rows"][0]["last_loss"] = 12.2110


def skipped(made: dict) -> dict:
    """made, with one step of its row of ours skipped by the trainer's StepGuard (throughput.py's skipped_steps)."""
    made["rows"][0]["skipped_steps"] = 1
    return made


def test_picks_the_variants_at_least_min_gain_faster_in_their_order(capsys):
    overlap = report(45500.0, "optim.overlap=true")  # +3.4%
    overlap["rows"][0]["last_loss"] = 12.2112
    variants = {
        "overlap.json": overlap,
        "chunk.json": report(44300.0, "model.loss_chunk_tokens=8192"),  # +0.7%: noise
        "both.json": report(46000.0, "model.loss_chunk_tokens=16384", "optim.overlap=true"),  # overlap only once
        "slower.json": report(40000.0, "model.fuse_projections=true"),
    }
    winners, wins = pick_variants.pick(DEFAULT, variants, 0.01, take_all=False)
    assert winners == ["optim.overlap=true", "model.loss_chunk_tokens=16384"]
    assert [w.label for w in wins] == ["overlap.json", "both.json"] and not any(w.in_default for w in wins)
    err = capsys.readouterr().err
    assert ("overlap.json: optim.overlap=true: 45,500 tokens/s against 44,000 (+3.4%): picked; last loss 12.2112 "
            "against 12.2110 (+0.0002)") in err
    assert "chunk.json: model.loss_chunk_tokens=8192: 44,300 tokens/s against 44,000 (+0.7%): not picked" in err
    # Both chunk sizes win at 0.5%: one key, so the faster variant's value is taken.
    assert pick_variants.pick(DEFAULT, variants, 0.005, take_all=False)[0] == [
        "optim.overlap=true", "model.loss_chunk_tokens=16384"]
    assert ("model.loss_chunk_tokens=8192 left out: both.json sets model.loss_chunk_tokens=16384 and was faster"
            in capsys.readouterr().err)
    assert pick_variants.pick(DEFAULT, variants, 0.01, take_all=True)[0][-1] == "model.fuse_projections=true"


def with_variants(default: dict, *rows: tuple) -> dict:
    """default plus --variant rows of ours: (name, tokens/s or None for an OOM, overrides...)."""
    report = json.loads(json.dumps(default))
    for name, tokens_per_sec, *overrides in rows:
        report["rows"].append({"name": "ours", "variant": name, "variant_overrides": overrides, "micro_batch": 4,
                               "status": "ok" if tokens_per_sec else "OOM", "tokens_per_sec": tokens_per_sec})
    return report


def test_picks_among_the_variant_rows_of_the_default_report(capsys):
    made = with_variants(DEFAULT, ("overlap", 45000.0, "optim.overlap=true"),
                         ("chunk_8192", 44500.0, "model.loss_chunk_tokens=8192"),
                         ("chunk_16384", 44800.0, "model.loss_chunk_tokens=16384"),
                         ("float8", None, "model.float8=true"))
    # The default row is the first row of ours without a variant, wherever the variant rows are.
    made["rows"].insert(0, made["rows"].pop())
    winners, wins = pick_variants.pick(made, {"chunk.json": report(44900.0, "model.loss_chunk_tokens=4096")},
                                       0.005, take_all=False)
    assert winners == ["optim.overlap=true", "model.loss_chunk_tokens=4096"]
    assert [w.label for w in wins] == ["variant overlap", "variant chunk_8192", "variant chunk_16384", "chunk.json"]
    assert [w.in_default for w in wins] == [True, True, True, False]
    err = capsys.readouterr().err
    assert "variant overlap: optim.overlap=true: 45,000 tokens/s against 44,000 (+2.3%): picked" in err
    assert "variant float8: model.float8=true: no row of ours ran" in err
    assert "model.loss_chunk_tokens=16384 left out: chunk.json sets model.loss_chunk_tokens=4096" in err


@pytest.mark.parametrize("variant, why", [
    (report(50000.0, "optim.overlap=true", status="OOM"), "no row of ours ran"),
    (report(50000.0, "optim.overlap=true", micro_batch=6), "micro-batch 6, the default's is 4"),
    (report(50000.0, "optim.overlap=true", size="qwen2-0.5b"), "not comparable (qwen2-0.5b seq 4096"),
    (report(50000.0, "optim.overlap=true", seq_len=2048), "not comparable (qwen2-1.5b seq 2048"),
    (report(50000.0), "no overrides of its own (an environment setting)"),
    # Faster because it did not train (a non-finite gradient: every update skipped), or trained otherwise.
    (report(46100.0, "parallel.fp32_weight_grads=true", last_loss=float("nan")),
     "not picked: its loss is not finite (12.2353, nan)"),
    (report(46100.0, "parallel.fp32_weight_grads=true", last_loss=12.2353),
     "not picked: its last loss 12.2353 differs from the default row's 12.2110 by more than 0.02 nats"),
    # One skipped update of 13 barely moves the loss, but the row is faster for it.
    (skipped(report(46100.0, "parallel.fp32_weight_grads=true", last_loss=12.2112)),
     "not picked: 1 of its steps skipped their update"),
])
def test_never_picks_what_is_not_comparable_or_not_combinable(variant, why, capsys):
    assert pick_variants.pick(DEFAULT, {"v.json": variant}, 0.01, take_all=True) == ([], [])
    assert why in capsys.readouterr().err


def test_command_line_exit_codes(tmp_path, capsys):
    paths = {}
    for name, content in (
        ("default", DEFAULT), ("win", report(46000.0, "optim.overlap=true")),
        ("lose", report(43000.0, "model.loss_chunk_tokens=8192")),
        ("bad_default", {"rows": [{"name": "ours", "status": "OOM"}]}),
        # One winning --variant row of the default report: it already ran next to that report's baselines.
        ("one", with_variants(DEFAULT, ("overlap", 46000.0, "optim.overlap=true"),
                              ("chunk", 43000.0, "model.loss_chunk_tokens=8192"))),
        # Two chunk sizes won, the faster one's value is kept: that is one row already measured too.
        ("chunks", with_variants(DEFAULT, ("c8192", 45000.0, "model.loss_chunk_tokens=8192"),
                                 ("c16384", 45500.0, "model.loss_chunk_tokens=16384"))),
        ("other", report(45000.0, "model.loss_chunk_tokens=16384")),
    ):
        paths[name] = str(tmp_path / f"{name}.json")
        (tmp_path / f"{name}.json").write_text(json.dumps(content))

    def cli(*names: str) -> tuple[int, list[str], list[str]]:
        """pick_variants' exit code, stdout lines and stderr lines for these reports."""
        code = pick_variants.main([paths.get(name, str(tmp_path / name)) for name in names])
        out, err = capsys.readouterr()
        return code, out.splitlines(), err.splitlines()

    # The script itself, once: what gpu_check.sh runs.
    result = run_python(["benchmarks/pick_variants.py", paths["default"], paths["win"], paths["lose"],
                         str(tmp_path / "missing.json")], timeout=60)
    assert result.returncode == 0 and result.stdout.splitlines() == ["optim.overlap=true"], result.stderr
    assert "missing.json: not read (FileNotFoundError" in result.stderr  # a variant step that wrote nothing

    code, out, err = cli("default", "lose")
    assert code == pick_variants.NO_WINNER and out == [] and err[-1] == "no variant won"

    code, out, err = cli("bad_default", "win")
    assert code == 2 and "no row of ours that ran; run the default step first" in err[-1]

    code, out, err = cli("one")
    assert (code, out) == (pick_variants.ONE_WINNER_IN_DEFAULT, ["optim.overlap=true"]), err
    assert "the winners' overrides are those of variant overlap, measured in" in err[-1]
    code, out, err = cli("chunks")
    assert (code, out) == (pick_variants.ONE_WINNER_IN_DEFAULT, ["model.loss_chunk_tokens=16384"]), err
    assert "those of variant c16384" in err[-1]
    # The same override won in another report too: still that one row.
    assert cli("one", "win")[:2] == (pick_variants.ONE_WINNER_IN_DEFAULT, ["optim.overlap=true"])
    # Another report's winner makes a combination no row measured yet.
    assert cli("one", "other")[:2] == (0, ["optim.overlap=true", "model.loss_chunk_tokens=16384"])


@pytest.mark.parametrize("combination, state", [(43900.0, "it did not win"), (None, "it did not run")])
def test_winners_that_are_a_row_of_the_default_report_that_did_not_win_are_not_run_again(
        tmp_path, capsys, combination, state):
    """gpu_check.sh's step 2 has overlap + the 16384-token chunk + fp32 weight gradients as a row of its own: when
    each won alone and that row lost (or OOMed), the combined step would only run that row again."""
    made = with_variants(DEFAULT, ("both", combination, "optim.overlap=true", "model.loss_chunk_tokens=16384"),
                         ("overlap", 44800.0, "optim.overlap=true"),
                         ("chunk_16384", 44600.0, "model.loss_chunk_tokens=16384"))
    (tmp_path / "default.json").write_text(json.dumps(made))
    assert pick_variants.main([str(tmp_path / "default.json")]) == pick_variants.ONE_WINNER_IN_DEFAULT
    out, err = capsys.readouterr()
    assert out.splitlines() == ["optim.overlap=true", "model.loss_chunk_tokens=16384"]
    assert f"the winners' overrides are those of variant both, measured in {tmp_path / 'default.json'} with that " \
        f"run's baselines ({state}): nothing to combine" in err.splitlines()[-1]


def test_the_default_measured_again_sets_the_threshold_when_it_drifted_more(capsys):
    """A --variant row with only the default's own overrides is the default again, after the variants: a gain
    smaller than its drift is not picked."""
    rows = [("small", 44264.0, "model.loss_chunk_tokens=8192"),  # +0.6%
            ("large", 45012.0, "optim.overlap=true"),  # +2.3%
            ("default_again", 44352.0, "parallel.compile=true")]  # +0.8%: the run's drift
    winners, wins = pick_variants.pick(with_variants(DEFAULT, *rows), {}, 0.005, take_all=False)
    assert winners == ["optim.overlap=true"] and [w.label for w in wins] == ["variant large"]
    err = capsys.readouterr().err
    assert "the default measured again differs by 0.8%: a variant must gain that much to be picked" in err
    assert "variant small: model.loss_chunk_tokens=8192: 44,264 tokens/s against 44,000 (+0.6%): not picked" in err
    assert "variant default_again: the default again, after the variants: 44,352 tokens/s against 44,000 (+0.8%)" in err
    # Drift within --min-gain leaves the threshold as it was.
    rows[2] = ("default_again", 44088.0, "parallel.compile=true")  # +0.2%
    assert pick_variants.pick(with_variants(DEFAULT, *rows), {}, 0.005, take_all=False)[0] == [
        "model.loss_chunk_tokens=8192", "optim.overlap=true"]
    assert "differs by" not in capsys.readouterr().err
