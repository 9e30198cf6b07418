"""A Python that has already imported torch and the CLIs, and forks one child per CLI run of the tests.

Every `python -m qwen2_dist.cli.train ...` of the end-to-end tests used to spend about 2 s of this machine's CPU
importing torch, Hydra and the package before doing a second of work. tests/helpers.run_cli starts this process
once per test session and sends it one JSON request per line on stdin:

    {"module": ... or "script": PATH, "args": [...], "cwd": ..., "env": {...}, "stdout": FILE, "stderr": FILE}

It forks; the child becomes what `python -m module args` (or `python PATH args`) would be in a fresh interpreter
(the request's environment, working directory, sys.argv and sys.path[0], stdin from /dev/null, its output in the
two files, fresh random draws, tempfile's cached directory dropped) and runs the module or script as __main__ with
runpy. The child ends as any interpreter does (SystemExit, an uncaught exception's traceback and exit code 1, atexit
handlers). This process answers {"pid": N} at once and {"returncode": R} when the child has ended (-N: killed by
signal N).

Only imports run here, never a computation: no CUDA context, process group or torch thread pool exists to be
inherited. (NumPy's OpenBLAS starts one thread at import; it stops and restarts its threads around a fork itself.)
"""

import json
import os
import sys

# What a CLI run imports first; anything else is imported by the child itself. torch._dynamo: a model's first
# initialization on the meta device imports it (torch._refs), and torch.optim's Optimizer would: 0.8 s of each
# forked training run (4.3 s to 3.5 s for a 6-step run of the tiny model, 2-core machine, 2026-12-06).
WARM = ("torch", "torch._dynamo", "torch.distributed.run", "qwen2_dist.cli.train", "qwen2_dist.cli.convert",
        "qwen2_dist.cli.prepare", "qwen2_dist.cli.estimate")


def serve() -> dict:
    """Answer requests until stdin closes (then exit); in a forked child, return its request."""
    requests = os.fdopen(os.dup(0), "rb", buffering=0)
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    import importlib

    for name in WARM:
        importlib.import_module(name)
    replies.write("ready\n")
    buffer = b""
    while True:
        while b"\n" not in buffer:
            chunk = requests.read(65536)
            if not chunk:
                sys.exit(0)
            buffer += chunk
        line, buffer = buffer.split(b"\n", 1)
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            requests.close()
            replies.close()
            return request
        replies.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


def become(request: dict) -> None:
    """Turn this forked child into a fresh `python -m` process of the request (before running it)."""
    import tempfile

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    os.close(stdin)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    tempfile.tempdir = None  # gettempdir() caches what TMPDIR was in this process; the request's TMPDIR wins
    # Python reseeds its random module in a forked child itself. NumPy's global generator, once imported (NumPy
    # loads numpy.random lazily, and no warm import does today), would repeat the zygote's numbers in every child.
    if "numpy.random" in sys.modules:
        sys.modules["numpy.random"].seed()
    if "script" in request:
        sys.argv = [request["script"], *request["args"]]
        sys.path[0] = os.path.dirname(os.path.abspath(request["script"]))  # as `python PATH` puts it first
    else:
        sys.argv = [request["module"], *request["args"]]  # runpy puts the module's path in argv[0], as -m does
        sys.path[0] = os.getcwd()  # -m puts the working directory first
        # -m runs a module that nothing has imported yet: its package stays imported, the module itself runs anew.
        sys.modules.pop(request["module"], None)


if __name__ == "__main__":
    child = serve()
    become(child)
    import runpy

    if "script" in child:
        runpy.run_path(child["script"], run_name="__main__")
    else:
        runpy.run_module(child["module"], run_name="__main__", alter_sys=True)
