"""tests/helpers.run_python: a child forked from the zygote behaves as a fresh `python SCRIPT` would."""

import json
import subprocess
import sys
import textwrap

import pytest

from tests import helpers

SCRIPT = textwrap.dedent("""
    import json, os, random, sys, tempfile
    import numpy
    print(json.dumps({"argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(), "name": __name__,
                      "env": os.environ.get("ZYGOTE_TEST"), "tmp": tempfile.gettempdir(),
                      "random": [random.random(), numpy.random.random()]}))
    print("to stderr", file=sys.stderr)
    if sys.argv[1] == "raise":
        raise ValueError("boom")
    if sys.argv[1] == "sleep":
        import time
        time.sleep(60)
    sys.exit(int(sys.argv[1]))
""")


def test_a_forked_run_is_what_a_fresh_interpreter_gives(tmp_path, monkeypatch):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    env = {"ZYGOTE_TEST": "yes"}
    forked = [helpers.run_python([str(script), "3"], env=env) for _ in range(2)]
    fresh = subprocess.run([sys.executable, str(script), "3"], cwd=helpers.REPO, capture_output=True, text=True,
                           env={**helpers.os.environ, **env})
    assert helpers._zygote is not None and helpers._zygote.fits({**helpers.os.environ, **env}, None)
    seen = [json.loads(result.stdout) for result in (*forked, fresh)]
    for result, values in zip((*forked, fresh), seen):
        assert result.returncode == 3 and result.stderr == "to stderr\n"
        values.pop("random")
    assert seen[0] == seen[1] == seen[2]
    assert seen[0]["tmp"] == str(tmp_path)  # the caller's TMPDIR, not the one the zygote started with
    # Each child draws its own random numbers (Python's and NumPy's), as separate interpreters do.
    draws = [json.loads(result.stdout)["random"] for result in forked]
    assert draws[0][0] != draws[1][0] and draws[0][1] != draws[1][1]

    crashed = helpers.run_python([str(script), "raise"])
    assert crashed.returncode == 1 and crashed.stderr.rstrip().endswith("ValueError: boom")

    with pytest.raises(subprocess.TimeoutExpired) as timed_out:
        helpers.run_python([str(script), "sleep"], timeout=2)
    assert "to stderr" in timed_out.value.stderr
    assert helpers.run_python([str(script), "0"]).returncode == 0  # the zygote serves on after a kill
