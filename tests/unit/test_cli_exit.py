"""Each console script leaves its objects out of the garbage collector's passes at exit (qwen2_dist.cli:
exit_without_collecting), whether it ends by returning, by an error or by argparse's --help."""

import pytest

from tests.helpers import run_python

# Runs the CLI's main() with an atexit handler of its own registered first, so that it runs after the CLI's
# handlers (newest first) and sees what they did: how many objects gc.freeze() put out of the collector's reach.
SCRIPT = """
import atexit, gc, importlib, sys
module, args = sys.argv[1], sys.argv[2:]
before = gc.get_freeze_count()
atexit.register(lambda: print(f"frozen at start {before}, at exit {gc.get_freeze_count()}", flush=True))
sys.argv = [module, *args]
importlib.import_module(module).main()
"""


@pytest.mark.parametrize("module, args, code", [
    ("qwen2_dist.cli.train", ["model=tiny", "train.steps=0"], 2),
    ("qwen2_dist.cli.convert", ["--help"], 0),
    ("qwen2_dist.cli.prepare", ["--help"], 0),
    ("qwen2_dist.cli.estimate", ["--help"], 0),
    ("qwen2_dist.cli.torchrun", ["--help"], 0),
], ids=["train", "convert", "prepare", "estimate", "torchrun"])
def test_each_cli_freezes_its_objects_at_exit(tmp_path, module, args, code):
    script = tmp_path / "run_main.py"
    script.write_text(SCRIPT)
    result = run_python([str(script), module, *args], timeout=120)
    assert result.returncode == code, result.stderr[-2000:]
    before, at_exit = (int(word) for word in result.stdout.split("frozen at start ")[1].split(", at exit "))
    assert at_exit > before, result.stdout[-500:]


def test_a_log_path_that_cannot_be_a_file_is_one_error_naming_it(tmp_path):
    """run_dir/logs a file, or logs/rank0.log a directory: a FileExistsError or IsADirectoryError traceback on every
    rank, where the metrics files' faults were one line."""
    import logging

    from qwen2_dist.cli.train import setup_logging
    from qwen2_dist.errors import UserError

    handlers = logging.getLogger().handlers[:]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "logs").write_text("")
    (tmp_path / "b" / "logs" / "rank3.log").mkdir(parents=True)
    for run_dir, where, why in (("a", "logs", "EEXIST: File exists"),
                                ("b", "logs/rank3.log", "EISDIR: Is a directory")):
        with pytest.raises(UserError, match=rf"^cannot write the log of rank 3 at {tmp_path / run_dir / where}: "
                                            rf"{why}; run_dir=.*{run_dir} needs logs/ as a directory"):
            setup_logging(str(tmp_path / run_dir), 3)
    assert logging.getLogger().handlers == handlers
