"""qwen2_dist/cli/torchrun.py: torchrun in this process, ending with the exit code of a deliberate stop."""

import json
import time

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from qwen2_dist.cli import torchrun
from qwen2_dist.train import no_restart


def _failing_torchrun(monkeypatch, run_dir, record_code=None, record_age=0.0):
    """torch.distributed.run.main replaced by one whose worker recorded a stop (or not), then failed."""
    import torch.distributed.run

    def fake_main(argv):
        if record_code is not None:
            (run_dir / no_restart.NAME).write_text(json.dumps({
                "code": record_code, "error": "step 2: halted", "torchrun_run_id": "x", "restart": 0, "rank": 0,
                "time": time.time() - record_age}))
        raise ChildFailedError("qwen2_dist.cli.train", {0: ProcessFailure(0, 1, record_code or 1, "<N/A>")})

    monkeypatch.setattr(torch.distributed.run, "main", fake_main)


def _argv(run_dir, module="qwen2_dist.cli.train"):
    return ["--standalone", "--nproc-per-node=1", "-m", module, "model=tiny", f"run_dir={run_dir}"]


@pytest.mark.parametrize("code", [2, 3])
def test_a_recorded_stop_ends_torchrun_with_its_code(tmp_path, monkeypatch, capsys, code):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _failing_torchrun(monkeypatch, run_dir, record_code=code)
    with pytest.raises(SystemExit) as exc:
        torchrun.main(_argv(run_dir))
    assert exc.value.code == code
    err = capsys.readouterr().err
    assert f"error: the trainers stopped on purpose with exit {code}" in err and "step 2: halted" in err


@pytest.mark.parametrize("case", ["no record", "an earlier torchrun's record", "another program"])
def test_any_other_failure_stays_torchrun_s(tmp_path, monkeypatch, case):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _failing_torchrun(monkeypatch, run_dir, record_code=None if case == "no record" else 3,
                      record_age=60.0 if case == "an earlier torchrun's record" else 0.0)
    argv = _argv(run_dir, "some.other.module") if case == "another program" else _argv(run_dir)
    with pytest.raises(ChildFailedError):
        torchrun.main(argv)
