"""The console scripts (qwen2-train, qwen2-convert, qwen2-prepare, qwen2-estimate) and the launchers' torchrun."""

import atexit
import gc


def exit_without_collecting() -> None:
    """At this process' exit, leave its objects out of the garbage collector's last passes: the interpreter's
    finalization runs full collections, which walked every object torch and the package had made, about 1 s of CPU
    for each process that imported torch (a qwen2-train refused at its config check spent 1.0 s after its exit
    handlers, 0.27 s with its objects frozen; a torchrun worker, agent or launch check alike; 2-core machine,
    2026-12-07). What the run holds at its end is not freed by them anyway: the process ends. Registered first thing
    in each CLI's main(), so it runs after the exit handlers of what the run started (atexit runs the newest first),
    logging's flush still after it."""
    atexit.register(gc.freeze)
