"""torchrun (`python -m torch.distributed.run`, run in this process), ending with the exit code of a deliberate stop.

torchrun exits 1 whenever its workers failed, whatever the reason. When the trainers stopped on purpose (a config
or data error: 2; a training halt: 3) and recorded it in RUN_DIR/no_restart.json (qwen2_dist/train/no_restart.py),
this ends with that code and says why after torchrun's report, so that a script or scheduler around the launchers
can tell a stop that needs a person from a crash; a stop by a signal torchrun handled ends with 128 + its number and
one line, not torchrun's traceback and exit 1. Overrides that do not compose stop here with exit 2 before
torchrun starts (the trainers would stop on them, before they know the run directory to record it in); the
launchers' whole check of the job runs here too (LAUNCH_CHECK_ENV), before torchrun starts (its refusal, and a
stop by SIGUSR1, also recorded for slurm/train.sbatch: no_restart.record_refusal). Anything else (success, a
crash) is torchrun's own outcome. The launchers run this instead of torchrun unless
TORCHRUN names another one; since it is torchrun in the same process (not a parent of it), the signals a scheduler
sends reach torchrun as before. Only `-m qwen2_dist.cli.train` commands are read (not `--no-python qwen2-train` or
a script path).

    python -m qwen2_dist.cli.torchrun [torchrun options] -m qwen2_dist.cli.train [overrides]
"""

import os
import signal
import sys

from qwen2_dist.cli import exit_without_collecting


def _stop_before_the_workers(signum: int, frame) -> None:
    """A stop signal before torchrun starts the workers (its imports, the run directory's compose, the
    rendezvous): end now, with nothing trained, so that the job step ends and slurm/train.sbatch requeues the job."""
    sys.stderr.write(f"torchrun: {signal.Signals(signum).name} before the workers started: stopping, nothing "
                     "trained yet\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def stop_on_signals_until_torchrun_handles_them() -> None:
    """The launchers ignore SIGUSR1 before they exec torchrun (a torchrun that does not take it over must not die
    of it), and torchrun takes over the signals of PET_SIGNALS_TO_HANDLE only once its workers start: until then a
    SIGUSR1 (Slurm's warning before the time limit) was lost, and the job ran into its time limit unsaved and was
    not requeued."""
    if "SIGUSR1" in _signals_to_handle():
        signal.signal(signal.SIGUSR1, _stop_before_the_workers)


def _signals_to_handle() -> set[str]:
    return {name.strip() for name in os.environ.get("PET_SIGNALS_TO_HANDLE", "").split(",")}


def ignore_sigusr1_where_torchrun_never_handles_it(argv: list[str]) -> None:
    """A torchrun that does not handle SIGUSR1 never replaces the handler above: one without --signals-to-handle
    (older torch; it reads no PET_SIGNALS_TO_HANDLE), or one whose command line's --signals-to-handle, which wins
    over PET_SIGNALS_TO_HANDLE, leaves it out. A SIGUSR1 while its workers train (Slurm's warning before the time
    limit) would then end torchrun, saying it came before the workers started, and leave them running unsaved.
    Ignored instead, as the launchers do (launch/common.sh): torchrun lives on, and the trainers, whose own handler
    replaces the inherited "ignore", save and stop when the signal reaches them (Slurm signals every process of the
    job step). One that comes before the workers start is then lost, as it is with such a torchrun run directly."""
    from torch.distributed.run import get_args_parser

    if "SIGUSR1" not in _signals_to_handle():
        return
    parser = get_args_parser()
    # A parser's default for an option it does not have is None; torchrun's --signals-to-handle has a default.
    if parser.get_default("signals_to_handle") is not None:
        handled, _ = parser.parse_known_args(argv)
        if "SIGUSR1" in {name.strip() for name in handled.signals_to_handle.split(",")}:
            return
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


LAUNCH_CHECK_ENV = "QWEN2_LAUNCH_CHECK"
"""Set by launch/common.sh to the job's world size: check the job as cli.train.launch_check does, here, before
torchrun starts, with QWEN2_LAUNCH_GPUS and QWEN2_LAUNCH_NPROC (what the launcher counted). In this process rather
than one of its own before it: a python start and a torch import less per node and launch (a 2-step launch of the
tiny model took 13.5-14.0 s instead of 15.8-17.5 s on the project's 2-core machine, 2026-12-07; more where torch is
imported from a network filesystem). None of the three reaches the workers."""

_LAUNCH_ENV = (LAUNCH_CHECK_ENV, "QWEN2_LAUNCH_GPUS", "QWEN2_LAUNCH_NPROC")


def job_run_dir(argv: list[str]) -> str | None:
    """The run_dir the trainers of torchrun's command line use, composed as they compose it (UserError when the
    overrides do not compose, or when the launchers' check, QWEN2_LAUNCH_CHECK, refuses the job); None when the
    command is not `-m qwen2_dist.cli.train`, or a Hydra flag or multirun leaves it to Hydra. A check that finds
    the run complete ends this process with 0 on one node; with several, this node does not decide alone."""
    from torch.distributed.run import parse_args

    from qwen2_dist.cli.train import _precheck, launch_check

    args = parse_args(argv)
    world = os.environ.get(LAUNCH_CHECK_ENV)
    try:
        if not args.module or args.training_script != "qwen2_dist.cli.train":
            return None
        train_args = list(args.training_script_args)
        if not world:
            job = _precheck(train_args)
        else:
            job, complete = launch_check(train_args, world)
            if complete:
                if args.nnodes in ("1", "1:1"):
                    sys.exit(0)
                print(f"launching all the same: with --nnodes={args.nnodes}, this node does not decide alone (the "
                      "trainers find the run complete together)")
        return None if job is None else job.run_dir
    finally:
        sys.stdout.flush()  # what the check printed, before torchrun's and the workers' output (a file under Slurm)
        for name in _LAUNCH_ENV:
            os.environ.pop(name, None)


def main(argv: list[str] | None = None) -> None:
    stop_on_signals_until_torchrun_handles_them()  # before the imports, which take seconds
    exit_without_collecting()
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    from qwen2_dist.errors import UserError
    from qwen2_dist.train import no_restart

    argv = sys.argv[1:] if argv is None else argv
    ignore_sigusr1_where_torchrun_never_handles_it(argv)
    try:
        run_dir = job_run_dir(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        no_restart.record_refusal(2, str(exc))  # for slurm/train.sbatch
        sys.exit(2)
    # The record as it is now (none, or an earlier torchrun's): only another one, written by this torchrun's
    # workers, says why they failed. Compared by file identity, not by time, so that no clocks of two nodes meet.
    before = no_restart.record_identity(run_dir) if run_dir is not None else None
    if before is not None:  # nor is it for the workers' restarts, whatever torchrun run id it names
        os.environ[no_restart.EARLIER_ENV] = ":".join(map(str, before))
    try:
        torchrun_main(argv)
    except SignalException as exc:
        # torchrun passed the signal on to its workers and waited for them; its traceback and exit 1 read as a
        # crash. One line, and the code of a process the signal ended (128 + N): a script can tell the stop.
        name = signal.Signals(int(exc.sigval)).name
        saves = name in ("SIGTERM", "SIGUSR1")  # the trainers' handlers (qwen2_dist/train/trainer.py)
        message = (f"torchrun: stopped by {name}, which it passed on to its workers"
                   + ("; they save a checkpoint and stop on it, and the next start resumes there" if saves else ""))
        print(message, file=sys.stderr)
        if name == "SIGUSR1":  # slurm/train.sbatch requeues the job for it
            no_restart.record_refusal(128 + int(exc.sigval), message, kind="sigusr1")
        sys.exit(128 + int(exc.sigval))
    except Exception as exc:  # ChildFailedError; on another node than the stopping one also a closed rendezvous
        stop = no_restart.recorded_since(run_dir, before) if run_dir is not None else None
        if stop is None:
            raise
        code, text = stop
        print(exc, file=sys.stderr)  # torchrun's report (which ranks failed, where), as an uncaught error shows it
        print(f"error: the trainers stopped on purpose with exit {code}, which torchrun reports as a failure "
              f"(exit 1); ending with {code}: {text} (see {os.path.join(run_dir, no_restart.NAME)})",
              file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
