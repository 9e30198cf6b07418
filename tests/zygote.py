"""A Python that has already imported torch and the CLIs, and forks one child per CLI run of the tests.

Every `python -m qwen2_dist.cli.train ...` of the end-to-end tests used to spend about 2 s of this machine's CPU
importing torch, Hydra and the package before doing a second of work. tests/helpers.run_cli starts this process
once per test session and sends it one JSON request per line on stdin:

    {"module": ... or "script": PATH or "code": ..., "args": [...], "cwd": ..., "env": {...}, "stdout": FILE,
     "stderr": FILE, "umask": N, "ignored": [signal numbers]}

It forks; the child becomes what `python -m module args` (or `python PATH args`, `python -c CODE args`) would be in
a fresh interpreter (the request's environment, time zone, working directory, umask, ignored signals, sys.argv and
sys.path[0], stdin from /dev/null, its output in the two files, fresh random draws, tempfile's cached directory
dropped) and runs the module, script or
code as __main__ (runpy; the code in a new __main__ module). The child ends as any interpreter does (SystemExit,
an uncaught exception's traceback and exit code 1, atexit handlers). This process answers {"pid": N} at once and
{"returncode": R} when the child has ended (-N: killed by signal N).

Only imports run here, never a computation: no CUDA context, process group or torch thread pool exists to be
inherited. (NumPy's OpenBLAS starts one thread at import; it stops and restarts its threads around a fork itself.)

Given a socket name (argv[1], Linux's abstract namespace), it also forks the workers of the torchruns it runs:
tests/helpers.run_torchrun gives torchrun's agent PYTHON_EXEC=a small script that calls client() below, which
torchrun starts as each worker's interpreter (only processes of this process' user are served: SO_PEERCRED).
client() sends its arguments, environment, working directory and standard streams (the file descriptors themselves)
here, forwards the signals it gets to the forked worker, and exits as the worker did (killed by the same signal, or
with its exit code); a worker whose client is gone (torchrun killed it) is killed, with its process group (its own
session, as torchrun starts a worker). A worker whose import-time environment differs from this process'
(OMP_NUM_THREADS, ...) gets the real interpreter instead; PYTHONPATH, PYTHONUNBUFFERED and TORCH_LOGS a child takes
up as a fresh interpreter would (become()). The agent itself, its rendezvous, monitoring, restarts and teardown are
torchrun's own: only the workers' imports are saved (about 4 s of CPU each on the 2-core machine). What a fork does
not give: every child, run or worker, shares this process' string hash seed (a set of strings iterates in the same
order in every child, which separate interpreters do not: a test of hash-order independence needs real ones); the
launcher tests (tests/e2e/test_launch.py, tests/unit/test_launch_scripts.py) run real worker interpreters.
"""

import io
import json
import os
import select
import signal
import socket
import struct
import sys

# Environment variables read when torch, NumPy or Python start (thread pools, allocators, paths): a run whose
# environment differs from the zygote's in one of these gets a fresh interpreter instead. (PYTHON itself, a script's
# choice of interpreter as in benchmarks/gpu_check.sh, is not one: Python reads PYTHON<NAME> only.)
IMPORT_TIME_ENV = ("OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "PYTHON", "LD_", "TORCH", "PYTORCH_", "CUDA_",
                   "HF_", "TRANSFORMERS_", "HYDRA_", "MALLOC_")
# Import-time variables a forked child takes up as a fresh interpreter would (become()): PYTHONPATH's entries put
# after sys.path[0], PYTHONUNBUFFERED as -u, and torch's logging settings read again.
EMULATED = ("PYTHONPATH", "PYTHONUNBUFFERED", "TORCH_LOGS")
SOCKET_ENV = "QWEN2_TEST_ZYGOTE"  # the socket's name, for client()
REAL_PYTHON_ENV = "QWEN2_TEST_PYTHON"  # the interpreter client() runs instead when the zygote cannot fork the worker
# What torchrun's agent adds to its workers' environment (local_elastic_agent.py; its import of torch's compile
# machinery sets Inductor's cache directory, read at each compile), the agent's own settings the launchers export
# (launch/common.sh), and the client's own variables: none of them is read by a worker at import.
WORKER_ENV = ("TORCHELASTIC_", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCHINDUCTOR_CACHE_DIR", "TORCH_ELASTIC_SHUTDOWN_",
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "PYTHON_EXEC", SOCKET_ENV, REAL_PYTHON_ENV, *EMULATED)
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def import_time_differences(env: dict, base: dict, ignore: tuple = EMULATED) -> list[str]:
    """The import-time variables whose values differ between two environments (those starting with `ignore` aside)."""
    keys = {k for k in (*env, *base) if k.startswith(IMPORT_TIME_ENV) and not k.startswith(ignore) and k != "PYTHON"}
    return sorted(k for k in keys if env.get(k) != base.get(k))


_STARTED: dict = {}  # serve(): this process' environment at start, and the sys.path entries its PYTHONPATH gave


def _python_path(env: dict) -> list[str]:
    """The sys.path entries a PYTHONPATH gives a fresh interpreter started in this working directory (an empty one:
    the directory itself)."""
    value = env.get("PYTHONPATH", "")
    return [os.path.abspath(entry) for entry in value.split(os.pathsep)] if value else []


# What a CLI run imports first; anything else is imported by the child itself. torch._dynamo: a model's first
# initialization on the meta device imports it (torch._refs), and torch.optim's Optimizer would: 0.8 s of each
# forked training run (4.3 s to 3.5 s for a 6-step run of the tiny model, 2-core machine, 2026-12-06).
WARM = ("torch", "torch._dynamo", "torch.distributed.run", "qwen2_dist.cli.train", "qwen2_dist.cli.convert",
        "qwen2_dist.cli.prepare", "qwen2_dist.cli.estimate")


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    """A client's request (one JSON line) and the file descriptors sent with it (closed here if the request fails;
    a client that stalls for 10 s fails, so the zygote never waits on one)."""
    conn.settimeout(10)
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    try:
        while not data.endswith(b"\n"):
            chunk = conn.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the client left before its request ended")
            data += chunk
        request = json.loads(data)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    conn.settimeout(None)
    return request, fds


def serve() -> dict:
    """Answer requests until stdin closes (then exit); in a forked child, return its request."""
    requests = os.fdopen(os.dup(0), "rb", buffering=0)
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    listener = None
    if len(sys.argv) > 1:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind("\0" + sys.argv[1])
        listener.listen(64)
    import importlib

    for name in WARM:
        importlib.import_module(name)
    # The imported objects out of the collector's reach: otherwise each child's exit, whose interpreter finalization
    # runs full collections, walked them all (and so copied their pages from this process): a forked script that
    # does nothing took 1.8 s, 0.5 s with them frozen (2-core machine, 2026-12-07). They are never garbage here.
    import gc

    gc.freeze()
    start_env = dict(os.environ)
    _STARTED.update(env=start_env, path=_python_path(start_env))
    replies.write("ready\n")
    buffer = b""
    children: dict[int, socket.socket | None] = {}  # pid -> its client's connection (None: a request on stdin)
    clients: dict[socket.socket, int] = {}

    def fork(request: dict, fds: list[int] = ()) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            for fd, target in zip(fds, (0, 1, 2)):
                os.dup2(fd, target)
            for fd in fds:
                os.close(fd)
            for conn in (requests, replies, listener, *clients):
                if conn is not None:
                    conn.close()
        return pid

    while True:
        watched = [requests, *clients] + ([listener] if listener is not None else [])
        ready = select.select(watched, [], [], 0.05)[0]
        for source in ready:
            if source is requests:
                chunk = requests.read(65536)
                if not chunk:
                    for pid in children:
                        os.kill(pid, signal.SIGKILL)
                    sys.exit(0)
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    request = json.loads(line)
                    pid = fork(request)
                    if pid == 0:
                        return request
                    children[pid] = None
                    replies.write(json.dumps({"pid": pid}) + "\n")
            elif source is listener:
                conn = listener.accept()[0]
                # A name in the abstract namespace has no file permissions: any user of the machine may connect, and
                # a fork runs the request's code as this process' user. Only this user's processes are served.
                uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))[1]
                if uid != os.getuid():
                    print(f"zygote: refused a connection of uid {uid}", file=sys.stderr, flush=True)
                    conn.close()
                    continue
                try:
                    request, fds = _receive(conn)
                except (OSError, ValueError):
                    conn.close()
                    continue
                differences = import_time_differences(request["env"], start_env, WORKER_ENV)
                if differences or len(fds) != 3:
                    print(f"zygote: a worker's interpreter instead of a fork: {differences} differ", file=sys.stderr,
                          flush=True)
                    for fd in fds:
                        os.close(fd)
                    try:
                        conn.sendall(b'{"fallback": true}\n')
                    except OSError:
                        pass  # the client is gone
                    conn.close()
                    continue
                pid = fork({**request, "fds": True}, fds)
                if pid == 0:
                    conn.close()
                    os.setsid()  # as torchrun starts its workers (start_new_session): signalled as a group
                    return {**request, "fds": True}
                for fd in fds:
                    os.close(fd)
                children[pid], clients[conn] = conn, pid
                print(f"zygote: forked a worker: {pid}", file=sys.stderr, flush=True)
                try:
                    conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
                except OSError:
                    pass  # the client is gone: select() sees it next, and the worker is killed
            elif not source.recv(1):  # a client is gone (killed): so is its worker's group (reaped below)
                try:
                    os.killpg(clients.pop(source), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            reply = json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n"
            conn = children.pop(pid, None)
            if conn is None:
                replies.write(reply)
                continue
            clients.pop(conn, None)
            try:
                conn.sendall(reply.encode())
            except OSError:
                pass  # the client is gone
            conn.close()


def caller_umask() -> int:
    """This process' umask (read by setting it, then set back: a single-threaded caller sees no other value)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ignored_signals() -> list[int]:
    """The signals of FORWARDED this process ignores (inherited: an interpreter keeps an ignored SIGINT too)."""
    return [int(signum) for signum in FORWARDED if signal.getsignal(signum) == signal.SIG_IGN]


def client() -> None:
    """A torchrun worker's interpreter (PYTHON_EXEC): `python [-u] -m MODULE ARGS`, `python [-u] -c CODE ARGS` or
    `python [-u] SCRIPT ARGS` forked by the zygote named in the environment, or the real interpreter for anything
    else (see the module's doc)."""
    args, unbuffered = sys.argv[1:], False
    ignored = ignored_signals()  # inherited from the agent: the worker starts ignoring them too
    while args[:1] == ["-u"]:
        args, unbuffered = args[1:], True
    if args[:1] == ["-m"] and len(args) > 1:
        target, rest = {"module": args[1]}, args[2:]
    elif args[:1] == ["-c"] and len(args) > 1:
        target, rest = {"code": args[1]}, args[2:]
    elif args and not args[0].startswith("-"):
        target, rest = {"script": os.path.abspath(args[0])}, args[1:]
    else:
        target = None
    real = os.environ[REAL_PYTHON_ENV]
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if target is None:
            raise ConnectionError("not a run the zygote forks")
        conn.connect("\0" + os.environ[SOCKET_ENV])
        request = {**target, "args": rest, "cwd": os.getcwd(), "env": dict(os.environ), "unbuffered": unbuffered,
                   "umask": caller_umask(), "ignored": ignored}
        message = json.dumps(request).encode() + b"\n"
        conn.sendall(message[socket.send_fds(conn, [message], [0, 1, 2]):])
        replies = conn.makefile("rb")
        reply = json.loads(replies.readline())
    except (OSError, ValueError):
        reply = {"fallback": True}
    if reply.get("fallback"):
        conn.close()
        os.execv(real, [real, *sys.argv[1:]])
    pid = reply["pid"]

    def forward(signum, _frame):  # to the worker's process group, as torchrun signals a worker's (os.killpg)
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            pass

    # Every one forwarded, also one inherited as ignored: the worker starts ignoring it too (become()), as a real
    # interpreter would, and receives it once it installs a handler of its own (the trainer's, for SIGUSR1).
    for signum in FORWARDED:
        signal.signal(signum, forward)
    line = replies.readline()
    code = json.loads(line)["returncode"] if line else 1
    if code < 0:  # killed by a signal: so is this process, as torchrun would see of the worker itself
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code if code >= 0 else 128 - code)


def become(request: dict) -> None:
    """Turn this forked child into a fresh `python -m` process of the request (before running it)."""
    import tempfile

    import time

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    time.tzset()  # the request's TZ, which the C library read from this process' environment when it started
    if "umask" in request:
        os.umask(request["umask"])
    # The dispositions a fresh interpreter starts with: the caller's ignored signals stay ignored (a launcher's
    # `trap '' USR1; exec python`), the others as Python sets them (its KeyboardInterrupt for SIGINT).
    for signum in FORWARDED:
        ignored = signum in request.get("ignored", ())
        default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        signal.signal(signum, signal.SIG_IGN if ignored else default)
    if not request.get("fds"):  # a client's worker has the client's standard streams already
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        os.close(stdin)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
    # The standard streams as a fresh interpreter makes them for these descriptors: with -u or PYTHONUNBUFFERED
    # every write goes out at once; else stdout is line-buffered on a terminal only, stderr always.
    unbuffered = bool(request.get("unbuffered") or os.environ.get("PYTHONUNBUFFERED"))
    for name, fd in (("stdout", 1), ("stderr", 2)):
        old, raw = getattr(sys, name), io.FileIO(fd, "w", closefd=False)
        stream = io.TextIOWrapper(raw if unbuffered else io.BufferedWriter(raw), encoding=old.encoding,
                                  errors=old.errors, write_through=unbuffered,
                                  line_buffering=not unbuffered and (name == "stderr" or raw.isatty()))
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    started = _STARTED.get("env", {})
    if os.environ.get("PYTHONPATH") != started.get("PYTHONPATH"):  # its entries right after sys.path[0]
        for entry in _STARTED["path"]:
            if entry in sys.path[1:]:
                del sys.path[sys.path.index(entry, 1)]
        sys.path[1:1] = _python_path(os.environ)
    logs = [key for key in {*os.environ, *started} if key.startswith("TORCH_LOGS")]  # and _OUT, _FORMAT
    if any(os.environ.get(key) != started.get(key) for key in logs):
        sys.modules["torch._logging._internal"]._init_logs()  # what `import torch` did with the zygote's settings
    tempfile.tempdir = None  # gettempdir() caches what TMPDIR was in this process; the request's TMPDIR wins
    # Python reseeds its random module in a forked child itself. NumPy's global generator, once imported (NumPy
    # loads numpy.random lazily, and no warm import does today), would repeat the zygote's numbers in every child.
    if "numpy.random" in sys.modules:
        sys.modules["numpy.random"].seed()
    if "script" in request:
        sys.argv = [request["script"], *request["args"]]
        sys.path[0] = os.path.dirname(os.path.abspath(request["script"]))  # as `python PATH` puts it first
    elif "code" in request:
        sys.argv = ["-c", *request["args"]]
        sys.path[0] = ""  # -c puts the working directory first, as ''
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
    elif "code" in child:  # python -c CODE: run in a __main__ of its own, as the interpreter runs it
        import types

        main = sys.modules["__main__"] = types.ModuleType("__main__")
        exec(compile(child["code"], "<string>", "exec"), main.__dict__)
    else:
        runpy.run_module(child["module"], run_name="__main__", alter_sys=True)
