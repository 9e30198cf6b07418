"""torchrun (`python -m torch.distributed.run`, run in this process), ending with the exit code of a deliberate stop.

torchrun exits 1 whenever its workers failed, whatever the reason. When the trainers stopped on purpose (a config
or data error: 2; a training halt: 3) and recorded it in RUN_DIR/no_restart.json (qwen2_dist/train/no_restart.py),
this ends with that code and says why after torchrun's report, so that a script or scheduler around the launchers
can tell a stop that needs a person from a crash. Anything else (success, a crash, a signal) is torchrun's own
outcome. The launchers run this instead of torchrun unless TORCHRUN names another one; since it is torchrun in the
same process (not a parent of it), the signals a scheduler sends reach torchrun as before.

    python -m qwen2_dist.cli.torchrun [torchrun options] -m qwen2_dist.cli.train [overrides]
"""

import sys
import time


def _run_dir(argv: list[str]) -> str | None:
    """The run_dir the trainers of torchrun's command line use, composed as they compose it; None when the command
    is not qwen2-train or its overrides do not compose."""
    from torch.distributed.run import parse_args

    from qwen2_dist.cli.train import compose_job
    from qwen2_dist.errors import UserError

    try:
        args = parse_args(argv)
        if not args.module or args.training_script != "qwen2_dist.cli.train":
            return None
        return compose_job(list(args.training_script_args)).run_dir
    except (UserError, SystemExit, ValueError):
        return None


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    from qwen2_dist.train import no_restart

    argv = sys.argv[1:] if argv is None else argv
    started = time.time()
    try:
        torchrun_main(argv)
    except ChildFailedError:
        run_dir = _run_dir(argv)
        stop = no_restart.stopped_since(run_dir, started) if run_dir is not None else None
        if stop is None:
            raise
        code, text = stop
        print(f"error: the trainers stopped on purpose with exit {code}, which torchrun reports as a failure "
              f"(exit 1); ending with {code}: {text}", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
