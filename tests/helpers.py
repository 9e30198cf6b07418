"""Helpers shared by the end-to-end tests: job overrides and running a CLI as a subprocess."""

import atexit
import glob
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

from qwen2_dist.fsutil import process_umask
from tests import zygote

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Random token ids of a 1,024-token vocabulary instead of data: the tiny model's steps and checkpoints without the
# Qwen2 vocabulary's output matrix, which was most of them. For a test whose data does not matter.
RANDOM_IDS = {"data.synthetic": "true", "model.vocab_size": 1024}


def train_overrides(run_dir, corpus_cache: str, random_ids: bool = False, **extra) -> list[str]:
    """Overrides of a seconds-long CPU job on the tiny model and the small embedded corpus; random_ids: RANDOM_IDS
    instead of the corpus (a checkpoint of under 1 MB, not 57 MB; in bf16 on a CPU without bf16 instructions, a
    3-step test on the corpus took 33 s: 2-core machine, 2026-12-07)."""
    base = {
        "model": "tiny", "run_dir": str(run_dir), "data.cache_dir": corpus_cache, "data.embedded_max_tokens": 60000,
        "train.seq_len": 32, "train.micro_batch_size": 2, "train.global_batch_size": 4, "train.steps": 6,
        "optim.warmup_steps": 2, "optim.lr": 0.02, "logging.interval": 1, "checkpoint.interval": 3,
    }
    if random_ids:
        base.update(RANDOM_IDS)
    base.update(extra)
    return [f"{key}={value}" for key, value in base.items()]


def read_metrics(run_dir) -> list[dict]:
    """The records of a run's metrics.jsonl, in order."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_losses(run_dir) -> dict[int, float]:
    """Step -> training loss, from a run's metrics.jsonl."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


class _Zygote:
    """tests/zygote.py: one pre-imported Python per test session that forks each CLI run (about 2 s of imports
    saved per run on the CI machine) and the workers of the torchruns of run_torchrun."""

    def __init__(self):
        self.env = dict(os.environ)
        self.log = tempfile.NamedTemporaryFile(prefix="zygote-", suffix=".log", delete=False)
        self.socket = f"qwen2-dist-tests-zygote-{os.getpid()}-{time.monotonic_ns()}"
        # The interpreter torchrun starts for each worker (PYTHON_EXEC): a client of this zygote (zygote.client).
        self.worker_python = self.log.name[:-len(".log")] + "-python"
        with open(self.worker_python, "w") as f:
            f.write(f"#!{os.path.realpath(sys.executable)} -IS\nimport sys\nsys.path.insert(0, "
                    f"{os.path.join(REPO, 'tests')!r})\nimport zygote\nzygote.client()\n")
        os.chmod(self.worker_python, 0o755)
        self.proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "zygote.py"), self.socket],
                                     cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     bufsize=0)
        self.buffer = b""
        if self._line(120) != "ready":
            raise RuntimeError(f"tests/zygote.py did not start; its log: {self.log.name}")

    def worker_env(self) -> dict:
        """The environment that has a torchrun's agent start its workers as forks of this zygote."""
        return {"PYTHON_EXEC": self.worker_python, zygote.SOCKET_ENV: self.socket,
                zygote.REAL_PYTHON_ENV: sys.executable}

    def _line(self, timeout: float | None) -> str | None:
        """The next reply line, or None after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"tests/zygote.py exited; its log: {self.log.name}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def fits(self, env: dict, module: str | None) -> bool:
        """Whether a child forked here starts as a fresh interpreter with `env` would. torchrun's agent only
        starts fresh workers (which read their environment themselves), so its own import-time environment does
        not matter."""
        if module in ("torch.distributed.run", "qwen2_dist.cli.torchrun"):
            return True
        return not zygote.import_time_differences(env, self.env)

    def run(self, command: list[str], timeout: float, env: dict) -> subprocess.CompletedProcess:
        """Run `python -m MODULE ARGS` or `python SCRIPT ARGS` (command without the interpreter) in a child."""
        target = {"module": command[1]} if command[0] == "-m" else {"script": command[0]}
        args = command[2:] if command[0] == "-m" else command[1:]
        command = [sys.executable, *command]
        with tempfile.TemporaryDirectory(prefix="cli-") as out:
            files = {name: os.path.join(out, name) for name in ("stdout", "stderr")}
            request = {**target, "args": list(args), "cwd": REPO, "env": env, **files,
                       "umask": process_umask(), "ignored": zygote.ignored_signals()}
            data = (json.dumps(request) + "\n").encode()
            while data:
                data = data[os.write(self.proc.stdin.fileno(), data):]
            pid = json.loads(self._line(60))["pid"]
            reply = self._line(timeout)
            if reply is None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # it ended just now
                self._line(60)
            outputs = {}
            for name, path in files.items():
                with open(path, errors="replace") as f:
                    outputs[name] = f.read()
        if reply is None:
            raise subprocess.TimeoutExpired(command, timeout, output=outputs["stdout"], stderr=outputs["stderr"])
        return subprocess.CompletedProcess(command, json.loads(reply)["returncode"], **outputs)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(30)
        self.log.close()
        os.unlink(self.log.name)
        os.unlink(self.worker_python)


_zygote: _Zygote | None = None


def _started_zygote() -> _Zygote:
    global _zygote
    if _zygote is None:
        _zygote = _Zygote()
        atexit.register(_zygote.close)
    return _zygote


def run_python(command: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python *command` (`-m MODULE ARGS` or `SCRIPT ARGS`) from the repository root and capture its output:
    a child forked from the session's zygote (tests/zygote.py), or a new interpreter for an environment the zygote
    cannot give."""
    full_env = {**os.environ, **(env or {})}
    forker = _started_zygote()
    if forker.fits(full_env, command[1] if command[0] == "-m" else None):
        return forker.run(command, timeout, full_env)
    return subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def run_cli(module: str, args: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m module args` from the repository root and capture its output (see run_python)."""
    return run_python(["-m", module, *args], timeout, env)


def worker_env() -> dict:
    """The environment under which torchrun's workers are forks of the session's zygote (tests/zygote.py) where
    their environment allows."""
    return _started_zygote().worker_env()


def forked_python() -> dict:
    """PYTHON for a script that runs `"$PYTHON" ...` (benchmarks/gpu_check.sh, the launchers, slurm/train.sbatch), and
    what it needs: the zygote's client (worker_env), which has `-m`, `-c` and script runs forked (torch and Hydra
    imported already: about 4 s of CPU saved each on the 2-core machine) and runs anything else in the real
    interpreter."""
    workers = worker_env()
    return {**workers, "PYTHON": workers["PYTHON_EXEC"]}


def worker_starts() -> tuple[int, int]:
    """How many torchrun workers of this session the zygote forked, and how many got a real interpreter instead (it
    logs each)."""
    with open(_started_zygote().log.name, errors="replace") as f:
        text = f.read()
    return text.count("zygote: forked a worker: "), text.count("a worker's interpreter instead of a fork")


def run_torchrun(nproc: int, module: str, args: list[str], timeout: float = 300,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `torchrun --standalone --nproc-per-node=nproc -m module args` (gloo on CPU) and capture its output. Its
    workers are forked by the session's zygote (tests/zygote.py), where their environment allows."""
    return run_cli("torch.distributed.run", ["--standalone", f"--nproc-per-node={nproc}", "-m", module, *args],
                   timeout=timeout, env={"OMP_NUM_THREADS": "1", **worker_env(), **(env or {})})


def first_error(stderr: str, size: int = 4000) -> str:
    """The first traceback in a multi-process run's stderr and its end: the rank that failed first is the cause, and
    the others' errors (a closed connection to it) come after and would fill a tail alone."""
    start = stderr.find("Traceback (most recent call last)")
    if start < 0 or start >= len(stderr) - size:
        return stderr[-size:]
    return stderr[start:start + size] + "\n[...]\n" + stderr[-size:]


def save_pickle_hf(model, path) -> None:
    """An old-style Hugging Face directory: config.json and pytorch_model.bin (transformers 5 no longer writes the
    pickle format, so it is made from what save_pretrained writes)."""
    import torch
    from safetensors.torch import load_file

    model.save_pretrained(path)
    weights = os.path.join(path, "model.safetensors")
    torch.save(load_file(weights), os.path.join(path, "pytorch_model.bin"))
    os.remove(weights)


def cpu_trainer(run_dir, *overrides: str, qwen2_vocab: bool = False):
    """A Trainer of one CPU process as qwen2-train builds it, on random token ids: the tiny model at seq 16 with a
    vocabulary of 1,024 (data.synthetic=true), micro-batch 2, no warmup, blocking saves, then the overrides (the last
    value of a key wins); the global batch over micro-batch 2 sets the accumulation. qwen2_vocab: the Qwen2
    vocabulary of 151,936 instead, which a job that reads data (data.path, evaluation) needs; its steps take several
    times as long, most of it the output matrix (a test of these trainers took 2.3 s on average, with 1,024 ids
    1.3 s: 2-core machine, 2026-12-07)."""
    from qwen2_dist.cli.train import build_model_and_optimizer, compose_job
    from qwen2_dist.config import BatchSchedule, validate
    from qwen2_dist.data.synthetic import SyntheticBatches
    from qwen2_dist.parallel.mesh import init_distributed
    from qwen2_dist.train.trainer import Trainer

    vocab = [] if qwen2_vocab else [f"{key}={value}" for key, value in RANDOM_IDS.items()]
    job = compose_job(["model=tiny", *vocab, f"run_dir={run_dir}", "train.device=cpu", "train.seq_len=16",
                       "train.micro_batch_size=2", "optim.warmup_steps=0", "checkpoint.async_save=false", *overrides])
    validate(job, 1)
    world = init_distributed("cpu")
    model, optimizer = build_model_and_optimizer(job, world, None, "cpu")
    args, train = job.model.args(), job.train
    batches = SyntheticBatches(args.vocab_size, train.seq_len, train.micro_batch_size, train.global_batch_size, seed=0,
                               batch_schedule=BatchSchedule.of(train))
    return Trainer(job, args, world, None, model, optimizer, batches, {})


def record_fsyncs(monkeypatch) -> list[str]:
    """The base names of the files and directories os.fsync is called on from now on, in call order (the fsyncs
    still happen)."""
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return synced


def shm_segments(prefix: int) -> list[str]:
    """mosaicml-streaming's shared-memory segments of one prefix in /dev/shm."""
    return glob.glob(f"/dev/shm/{prefix:06d}_*")


def shm_leftovers(prefix: int) -> list[str]:
    """Segments of a prefix that no live process other than this one has taken since (tests run beside other jobs,
    also in the other pytest worker). Looked at under the prefix lock, as no run is then between creating a prefix's
    segments and recording itself as their owner; and again a moment later if any are found, as a run that is ending
    drops its record just before it unlinks its segments. A real leftover stays."""
    for attempt in range(2):
        if attempt:
            time.sleep(1.0)
        from qwen2_dist.data import hygiene

        with hygiene.prefix_lock(True):
            others = [pid for _, _, pid, start in hygiene._records(prefix)
                      if pid != os.getpid() and hygiene._alive(pid, start)]
            found = [] if others else shm_segments(prefix)
        if not found:
            return found
    return found
