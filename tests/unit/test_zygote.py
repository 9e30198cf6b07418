"""tests/helpers.run_python: a child forked from the zygote behaves as a fresh `python SCRIPT` would."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

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


PROCESS = textwrap.dedent("""
    import json, os, signal, time
    mask = os.umask(0)
    print(json.dumps({"umask": mask, "tz": [time.strftime("%z", time.localtime(0)), time.tzname[0]],
                      "usr1": str(signal.getsignal(signal.SIGUSR1)), "term": str(signal.getsignal(signal.SIGTERM)),
                      "int": str(signal.getsignal(signal.SIGINT))}))
""")


def test_a_forked_run_has_the_callers_umask_time_zone_and_ignored_signals(tmp_path):
    """The child had the zygote's umask (022), the time zone the zygote started with, and its signal dispositions:
    a test's umask, TZ, or a launcher's `trap '' USR1; exec $PYTHON` were not what the run saw."""
    script = tmp_path / "process.py"
    script.write_text(PROCESS)
    env = {"TZ": "JST-9"}  # POSIX form: no time zone database needed
    before = json.loads(helpers.run_python([str(script)]).stdout)  # (the zygote started before the changes)
    mask = os.umask(0o077)
    usr1 = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        forked = helpers.run_python([str(script)], env=env)
        fresh = subprocess.run([sys.executable, str(script)], cwd=helpers.REPO, capture_output=True, text=True,
                               env={**os.environ, **env})
    finally:
        os.umask(mask)
        signal.signal(signal.SIGUSR1, usr1)
    assert forked.returncode == fresh.returncode == 0, forked.stderr + fresh.stderr
    seen, expected = json.loads(forked.stdout), json.loads(fresh.stdout)
    assert seen == expected
    assert seen["umask"] == 0o077 and seen["tz"] == ["+0900", "JST"] and seen["usr1"] == str(signal.SIG_IGN)
    assert seen["term"] == str(signal.SIG_DFL) and "default_int_handler" in seen["int"]
    assert before["umask"] == mask != 0o077 and before["tz"] != ["+0900", "JST"]
    assert json.loads(helpers.run_python([str(script)]).stdout) == before  # nothing of it stays for the next run


def test_a_worker_keeps_a_signal_its_launcher_ignores_until_it_handles_it():
    """The launchers' `trap '' USR1; exec "$PYTHON"`: the worker forked for the client started with the zygote's
    default for SIGUSR1 and died of it; a real interpreter keeps it ignored, and gets it once it installs a handler."""
    zygote = helpers._started_zygote()
    code = ("import os, signal, sys, time\nprint(signal.getsignal(signal.SIGUSR1), os.getppid(), flush=True)\n"
            "sys.stdin.readline()\n"
            "signal.signal(signal.SIGUSR1, lambda *_: print('handled', flush=True))\n"
            "print('survived', flush=True)\nsys.stdin.readline()")
    proc = subprocess.Popen(["bash", "-c", f"trap '' USR1; exec {zygote.worker_python} -c \"$0\"", code],
                            env={**os.environ, **zygote.worker_env()}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, proc.kill)  # a line that never comes fails the test instead of hanging it
    watchdog.start()
    disposition, parent = proc.stdout.readline().split()
    assert (disposition, int(parent)) == (str(signal.SIG_IGN), zygote.proc.pid)  # forked, the signal ignored
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.5)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "survived\n"
    proc.send_signal(signal.SIGUSR1)  # the client's pid, as torchrun knows it: passed on to the worker's handler
    assert proc.stdout.readline() == "handled\n"
    out, _ = proc.communicate("end\n", timeout=60)
    watchdog.cancel()
    assert (proc.returncode, out) == (0, "")


SETTINGS = textwrap.dedent("""
    import json, logging, os, sys
    import torch
    print(json.dumps({"path": sys.path, "ppid": os.getppid(), "dynamo": logging.getLogger("torch._dynamo").level,
                      "recompiles": torch._logging._internal.log_state.is_artifact_enabled("recompiles")}),
          flush=True)
    print("unflushed")
    os._exit(0)  # what is still buffered is lost
""")


def test_a_forked_run_takes_up_python_path_unbuffered_and_torch_logs_as_a_fresh_interpreter_does(tmp_path):
    """PYTHONPATH, PYTHONUNBUFFERED and TORCH_LOGS, read when an interpreter (or torch) starts, are taken up by a
    forked child as a fresh interpreter takes them: the same sys.path, output written at once, torch's loggers set."""
    script = tmp_path / "settings.py"
    script.write_text(SETTINGS)
    env = {"PYTHONPATH": os.pathsep.join(["rel", str(tmp_path), ""]), "PYTHONUNBUFFERED": "1",
           "TORCH_LOGS": "recompiles,+dynamo"}
    forked = helpers.run_python([str(script)], env=env)
    fresh = subprocess.run([sys.executable, str(script)], cwd=helpers.REPO, capture_output=True, text=True,
                           env={**os.environ, **env})
    plain = helpers.run_python([str(script)], env={"PYTHONUNBUFFERED": ""})  # as if unset, whatever the zygote has
    seen = [json.loads(result.stdout.splitlines()[0]) for result in (forked, fresh, plain)]
    assert seen[0]["ppid"] == seen[2]["ppid"] == helpers._zygote.proc.pid != seen[1]["ppid"]  # two forks
    assert seen[0]["path"] == seen[1]["path"] and seen[0]["path"][1:4] == [
        os.path.join(helpers.REPO, "rel"), str(tmp_path), helpers.REPO]
    assert seen[2]["path"] == [seen[0]["path"][0], *seen[0]["path"][4:]]
    assert (seen[0]["dynamo"], seen[0]["recompiles"]) == (seen[1]["dynamo"], True) == (logging.DEBUG, True)
    assert not seen[2]["recompiles"] and seen[2]["dynamo"] != logging.DEBUG
    assert forked.stdout.endswith("unflushed\n") and fresh.stdout.endswith("unflushed\n")
    assert "unflushed" not in plain.stdout


WORKER = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time
    print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "rank": os.environ.get("RANK"), "pid": os.getpid(),
                      "ppid": os.getppid(), "torch": "torch" in sys.modules}), flush=True)
    print("to stderr", file=sys.stderr)
    if sys.argv[1] == "term":
        signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), sys.exit(5)))
    if sys.argv[1] == "sleep":
        print(subprocess.Popen(["sleep", "60"]).pid)
    if sys.argv[1] in ("term", "sleep"):
        print("ready")  # unflushed: python -u writes it at once
        time.sleep(60)
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(int(sys.argv[1]))
""")


def test_a_torchrun_worker_forked_by_the_zygote_is_what_its_own_interpreter_would_be(tmp_path):
    """The interpreter run_torchrun gives torchrun for its workers (PYTHON_EXEC): the worker, forked by the zygote,
    gets the arguments, working directory, environment and standard streams torchrun started it with; its exit
    code or the signal that killed it is the interpreter's; signals sent to the interpreter reach it; killing the
    interpreter kills it; an import-time setting the zygote lacks gets a real interpreter."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    zygote = helpers._started_zygote()
    env = {**helpers.os.environ, **zygote.worker_env(), "RANK": "3", "TORCHELASTIC_RUN_ID": "any"}

    def start(mode: str, **extra) -> tuple[subprocess.Popen, dict]:
        proc = subprocess.Popen([zygote.worker_python, "-u", str(script), mode], cwd=tmp_path, env={**env, **extra},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return proc, json.loads(proc.stdout.readline())

    started = helpers.worker_starts()
    proc, seen = start("4")
    assert proc.wait(60) == 4 and proc.stderr.read() == "to stderr\n"
    assert helpers.worker_starts() == (started[0] + 1, started[1])  # counted as a fork
    assert (seen["argv"], seen["cwd"], seen["rank"]) == ([str(script), "4"], str(tmp_path), "3")
    assert seen["ppid"] == zygote.proc.pid and seen["torch"]  # forked, with torch imported already
    # python -c CODE ARGS (the launchers' checks run one): forked too, as the interpreter would run it.
    code = ("import json, os, sys\nprint(json.dumps([sys.argv, sys.path[0], __name__, os.getppid(), 'torch' in "
            "sys.modules]))\nraise SystemExit(6)")
    ran = subprocess.run([zygote.worker_python, "-c", code, "a", "b"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    fresh = subprocess.run([sys.executable, "-c", code, "a", "b"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=60)
    assert ran.returncode == fresh.returncode == 6, ran.stderr
    assert json.loads(ran.stdout)[:3] == json.loads(fresh.stdout)[:3] == [["-c", "a", "b"], "", "__main__"]
    assert json.loads(ran.stdout)[3:] == [zygote.proc.pid, True]
    assert helpers.worker_starts() == (started[0] + 2, started[1])
    proc, _ = start("kill")
    assert proc.wait(60) == -signal.SIGKILL
    proc, _ = start("term")
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 5 and proc.stdout.read() == "got SIGTERM\n"
    proc, seen = start("sleep")
    grandchild = int(proc.stdout.readline())
    assert proc.stdout.readline() == "ready\n"
    proc.kill()
    proc.wait(60)

    def alive(pid: int) -> bool:  # neither gone nor a zombie
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):  # gone before the open, or between the open and the read
            return False

    deadline = time.monotonic() + 30
    while (alive(seen["pid"]) or alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(seen["pid"]) and not alive(grandchild)  # the worker and its own children, as a group
    forked, fallbacks = helpers.worker_starts()
    proc, seen = start("0", OMP_NUM_THREADS="3")
    assert proc.wait(60) == 0 and seen["ppid"] == os.getpid() and not seen["torch"]  # the real interpreter
    assert helpers.worker_starts() == (forked, fallbacks + 1)


def test_the_zygote_serves_no_other_user(tmp_path):
    """Its socket's name, in the abstract namespace, has no permissions: a process of another user that connects
    (here as nobody, 65534) with a request the zygote would fork for its own user gets no fork, no answer, a closed
    connection."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("needs root (to connect as another user) -- and CI=true, where this test must run")
        pytest.skip("needs root (to connect as another user)")
    zygote = helpers._started_zygote()
    request = {"code": f"open({str(tmp_path / 'ran')!r}, 'w').close()", "args": [], "cwd": str(tmp_path),
               "env": dict(os.environ), "unbuffered": False}
    started = helpers.worker_starts()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # as nobody: connect, send the request as zygote.client() does, and pass on the reply
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect("\0" + zygote.socket)
            message = json.dumps(request).encode() + b"\n"
            conn.sendall(message[socket.send_fds(conn, [message], [0, 1, 2]):])
            conn.settimeout(30)
            os.write(write, conn.makefile("rb").readline() or b"closed")
        except (BrokenPipeError, ConnectionResetError):  # closed before the request was all sent
            os.write(write, b"closed")
        except BaseException as e:
            os.write(write, repr(e).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        reply = f.read()
    os.waitpid(pid, 0)
    assert reply == b"closed"  # unanswered
    assert helpers.worker_starts() == started and not (tmp_path / "ran").exists()
    with open(zygote.log.name) as f:
        assert "zygote: refused a connection of uid 65534" in f.read()
