"""The launchers for real: torchrun on one node and on two, and sbatch on a real two-node Slurm cluster started
on this machine (tests/slurm/cluster.sh), with preemption, requeue and worker restarts.

Every job here is the same 4-process job (the tiny model with a 1,024-token vocabulary, global batch 4, on a small
prepared dataset), so each launcher is checked against one reference: the same job started by
launch/train_single_node.sh with 4 processes.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

from tests import helpers
from tests.datasets import make_dataset
from tests.helpers import REPO, train_overrides

# Checkpoints at steps 4 and 8 before the end: a worker killed after the first or a preemption at step 2 still
# leaves steps to resume (this file alone: 218 s with 16 steps, 206 s with 12; 2-core machine, 2026-12-07).
STEPS = 12
SLURM_PACKAGES = {"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client", "munged": "munge"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """A prepared dataset (qwen2-prepare's layout, read through streaming as any) of token ids under 1,024: the job's
    model has a vocabulary of 1,024, whose steps and checkpoints are a fraction of the Qwen2 vocabulary's (its output
    matrix was most of them). 64 samples of 32 tokens, the 48 the job reads and some."""
    return make_dataset(tmp_path_factory.mktemp("dataset"), 64, 32)


def job_overrides(dataset: str, run_dir=None) -> list[str]:
    """The job every test runs; without run_dir= when none is given (the Slurm script names it after the job)."""
    overrides = train_overrides(run_dir, "", **{
        "train.micro_batch_size": 1, "train.global_batch_size": 4, "train.steps": STEPS, "checkpoint.interval": 4,
        "data.path": dataset, "model.vocab_size": 1024,
    })
    unused = ("data.cache_dir=", "data.embedded_max_tokens=") + (() if run_dir else ("run_dir=",))
    return [o for o in overrides if not o.startswith(unused)]


def require(tools: dict[str, str], root: bool = False) -> None:
    """Skip when a tool (command -> Debian package) is missing or root is needed and absent; in CI, fail instead."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"  # where the daemons live, also for non-root users
    missing = sorted({package for command, package in tools.items() if shutil.which(command, path=path) is None})
    reasons = []
    if missing:
        reasons.append(f"needs the Debian packages {' '.join(missing)} (apt-get install {' '.join(missing)}; "
                       ".ci/run installs them)")
    if root and os.geteuid() != 0:
        reasons.append("needs root (it starts daemons and mounts a private /dev/shm per emulated node)")
    if reasons:
        if os.environ.get("CI") == "true":
            pytest.fail("; ".join(reasons) + " -- and CI=true, where this test must run")
        pytest.skip("; ".join(reasons))


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (the OS picks them; the sockets are closed before use)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_state(run_dir) -> dict:
    """train_state.json of the newest committed checkpoint (step, tokens seen, data position)."""
    ckpts = os.path.join(run_dir, "checkpoints")
    newest = sorted(d for d in os.listdir(ckpts) if os.path.exists(os.path.join(ckpts, d, "metadata.json")))[-1]
    with open(os.path.join(ckpts, newest, "train_state.json")) as f:
        return json.load(f)


def rank0_log(run_dir) -> str:
    """Rank 0's log file (appended to by every attempt of the run)."""
    with open(os.path.join(run_dir, "logs", "rank0.log")) as f:
        return f.read()


def resumed_steps(log: str) -> list[int]:
    """The steps the run resumed at, from the log's "resumed from .../step_N at step N" lines."""
    return [int(m.group(2)) for m in re.finditer(r"resumed from \S+/step_(\d+) at step (\d+)", log)
            if m.group(1).lstrip("0") == m.group(2)]


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def assert_same_run(run_dir, reference) -> None:
    """The run went where the reference did: the same loss at every step (bit for bit: same world size, same
    layout, exact resume), and at the end the same tokens seen and data position."""
    records = {r["step"]: r for r in metrics(run_dir)}  # a step logged twice (before a restart) keeps the last
    assert sorted(records) == list(range(1, STEPS + 1))
    ref = {r["step"]: r for r in metrics(reference)}
    assert [records[step]["loss"] for step in records] == [ref[step]["loss"] for step in records]
    assert records[STEPS]["tokens_seen"] == ref[STEPS]["tokens_seen"] == STEPS * 4 * 32
    state, ref_state = final_state(run_dir), final_state(reference)
    assert (state["step"], state["tokens_seen"], state["loader"]) == (
        ref_state["step"], ref_state["tokens_seen"], ref_state["loader"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset):
    """The job on one node, 4 processes, through launch/train_single_node.sh; its run_dir. Its workers are forked by
    the test zygote (helpers.worker_env); every other launch here starts real interpreters."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    env = {**os.environ, "NPROC": "4", "TMPDIR": str(tmp_path_factory.mktemp("reference_tmp")),
           **helpers.worker_env()}
    started, (forked, fallbacks) = time.monotonic(), helpers.worker_starts()
    result = subprocess.run(["bash", "launch/train_single_node.sh", *job_overrides(dataset, run_dir)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert helpers.worker_starts() == (forked + 4, fallbacks)  # the launcher's environment let the zygote fork each
    print(f"reference (torchrun, 1 node x 4 processes): {time.monotonic() - started:.1f} s")
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, STEPS + 1))
    assert "world 4" in rank0_log(run_dir)
    return run_dir


def test_scripts_pass_shellcheck():
    require({"shellcheck": "shellcheck"})
    scripts = [os.path.join(d, f) for d, suffixes in (("launch", (".sh",)), ("slurm", ("",)), ("tests/slurm", (".sh",)),
                                                        ("benchmarks", (".sh",)))
               for f in sorted(os.listdir(os.path.join(REPO, d))) if f.endswith(suffixes) and not f.endswith(".md")]
    scripts.append(".ci/run")
    assert {"launch/train_single_node.sh", "launch/train_multi_node.sh", "slurm/train.sbatch",
            "tests/slurm/cluster.sh", "benchmarks/gpu_check.sh", "benchmarks/fetch_wheels.sh"} <= set(scripts)
    # Plain shellcheck, as anyone runs it: .shellcheckrc has it follow the launchers' `source` of launch/common.sh.
    result = subprocess.run(["shellcheck", *scripts], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def _agent(node_rank: int, port: int, run_dir, dataset: str, tmp_path) -> subprocess.Popen:
    """One torchrun agent of a 2-node job, as if on its own machine: its own /dev/shm (a private mount) and TMPDIR;
    its output goes to tmp_path/agentN.log."""
    env = {**os.environ, "NNODES": "2", "NODE_RANK": str(node_rank), "NPROC": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "MAX_RESTARTS": "1", "TMPDIR": str(tmp_path / f"tmp{node_rank}")}
    command = ["unshare", "--mount", "--propagation", "private", "bash", "-c",
               'mount -t tmpfs tmpfs /dev/shm && exec bash launch/train_multi_node.sh "$@"', "agent",
               *job_overrides(dataset, run_dir)]
    with open(tmp_path / f"agent{node_rank}.log", "w") as out:
        # unshare and both bash -c exec, so this pid is torchrun's and its children are the workers.
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def test_two_torchrun_agents_survive_a_killed_worker(tmp_path, dataset, reference):
    require({"unshare": "util-linux"}, root=True)
    run_dir = tmp_path / "run"
    (port,) = free_ports(1)
    started = time.monotonic()
    agents = [_agent(rank, port, run_dir, dataset, tmp_path) for rank in (0, 1)]
    try:
        ckpts = run_dir / "checkpoints"
        wait_for(lambda: ckpts.is_dir() and any((ckpts / d / "metadata.json").exists() for d in os.listdir(ckpts)),
                 240, "the first checkpoint")
        with open(f"/proc/{agents[1].pid}/task/{agents[1].pid}/children") as f:
            workers = [int(pid) for pid in f.read().split()]
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        killed_after = max(r["step"] for r in metrics(run_dir))
        for agent in agents:
            agent.wait(240)
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.terminate()  # torchrun stops its workers on SIGTERM
                agent.wait(30)
    print(f"two agents with a killed worker: {time.monotonic() - started:.1f} s")
    outputs = [(tmp_path / f"agent{rank}.log").read_text() for rank in (0, 1)]
    assert [agent.returncode for agent in agents] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert killed_after < STEPS, "the run finished before the worker was killed"
    assert "exitcode: -9" in outputs[1]  # the agent saw its worker die of SIGKILL (and restarted the group)
    resumed = resumed_steps(rank0_log(run_dir))
    assert len(resumed) == 1 and 4 <= resumed[0] <= killed_after, resumed
    assert_same_run(run_dir, reference)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A two-node Slurm cluster on this machine; the environment that points sbatch and friends at it."""
    require({**SLURM_PACKAGES, "unshare": "util-linux"}, root=True)
    state = tmp_path_factory.mktemp("slurm")
    ctld, n1, n2 = free_ports(3)
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf"), "SLURMCTLD_PORT": str(ctld),
           "SLURMD_PORTS": f"{n1} {n2}"}
    cluster = os.path.join(REPO, "tests", "slurm", "cluster.sh")
    try:
        started = subprocess.run(["bash", cluster, "start", str(state)], env=env, capture_output=True, text=True,
                                 timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        yield env
    finally:
        subprocess.run(["bash", cluster, "stop", str(state)], env=env, timeout=120)


def sbatch(env: dict, job_name: str, runs_root, dataset: str, *overrides: str, nodes: int = 2,
           nproc: int = 2, **job_env: str) -> str:
    """Submit slurm/train.sbatch on 2 nodes x 2 processes (or as told), the job plus overrides; the job id."""
    result = subprocess.run(
        ["sbatch", "--parsable", f"--nodes={nodes}", f"--job-name={job_name}", f"--output={runs_root}/slurm-%x-%j.out",
         "slurm/train.sbatch", *job_overrides(dataset), *overrides],
        cwd=REPO, env={**env, "NPROC": str(nproc), "RUNS_ROOT": str(runs_root), "RDZV_PORT": str(free_ports(1)[0]),
                       **job_env},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_fields(env: dict, job_id: str) -> dict[str, str]:
    """scontrol show job, as a dict (JobState, ExitCode, Restarts, ...)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_until_done(env: dict, job_id: str, timeout: float) -> dict[str, str]:
    return wait_for(lambda: (f := job_fields(env, job_id)) and f["JobState"] in
                    ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") and f, timeout,
                    f"job {job_id} to end", interval=0.5)


def test_preempted_sbatch_job_saves_requeues_and_resumes_exactly(slurm, tmp_path, dataset, reference):
    """sbatch on two nodes x 2 processes trains as torchrun on one node does, through a preemption and requeue.
    The same job submitted again (one name, so one run_dir) waits for the first to end, requeue included
    (#SBATCH --dependency=singleton; started together, the second would be refused by the first's run_dir lock),
    then finds the run complete."""
    started = time.monotonic()
    job_id, again = (sbatch(slurm, "preempted", tmp_path, dataset) for _ in range(2))
    held = job_fields(slurm, again)
    assert (held["JobState"], held["Reason"], held["Dependency"]) == ("PENDING", "Dependency",
                                                                      "singleton(unfulfilled)"), held
    run_dir = tmp_path / "preempted"
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 2, 240, "step 2")
    # What Slurm sends the batch script before the time limit (#SBATCH --signal=B:USR1@...), sent now.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm, check=True)
    fields = wait_until_done(slurm, job_id, 300)
    print(f"sbatch preempted and requeued: {time.monotonic() - started:.1f} s")
    out = (tmp_path / f"slurm-preempted-{job_id}.out").read_text()
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), out
    assert "SIGUSR1" in out and "attempt 1" in out and "2 nodes (n[1-2])" in out
    # The stopped attempt's last act was to commit a checkpoint after the signal; the requeued attempt resumed from
    # exactly that one.
    log = rank0_log(run_dir)
    after_signal = log[log.index("received SIGUSR1"):]
    (resumed,) = resumed_steps(log)
    committed = re.findall(r"committed \S+/step_(\d+)", after_signal[:after_signal.index("resumed from")])
    assert committed and int(committed[-1]) == resumed < STEPS, after_signal
    assert "world 4" in log
    assert_same_run(run_dir, reference)
    second = wait_until_done(slurm, again, 300)
    print(f"and the same job again: {time.monotonic() - started:.1f} s")
    assert (second["JobState"], second["ExitCode"]) == ("COMPLETED", "0:0")
    assert second["StartTime"] >= fields["EndTime"], (fields["EndTime"], second["StartTime"])
    # The batch script found the run complete before its job step: no node started, nor loaded the checkpoint.
    assert sorted(os.listdir(run_dir / "logs" / "slurm")) == [
        f"{job_id}-a0-node0.log", f"{job_id}-a0-node1.log", f"{job_id}-a1-node0.log", f"{job_id}-a1-node1.log"]
    again_out = (tmp_path / f"slurm-preempted-{again}.out").read_text()
    assert f"run already complete: its newest checkpoint {run_dir}/checkpoints/step_{STEPS:08d} is at step " \
           f"{STEPS} (train.steps={STEPS}); nothing to launch" in again_out, again_out
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, STEPS + 1))
    assert "run already complete" not in rank0_log(run_dir)


def test_a_halted_sbatch_job_is_not_restarted_and_ends_with_the_halts_exit_code(slurm, tmp_path, dataset):
    """train.nonfinite=halt under sbatch: torchrun's restart stops at once on the halt's record instead of training
    on, and the job ends FAILED with exit code 3 (the halt's), not torchrun's 1."""
    job_id = sbatch(slurm, "halted", tmp_path, dataset, "train.nonfinite=halt", nodes=1, nproc=1,
                    QWEN2_INJECT_NAN_STEP="3", MAX_RESTARTS="1")
    fields = wait_until_done(slurm, job_id, 300)
    out = (tmp_path / f"slurm-halted-{job_id}.out").read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("FAILED", "3:0"), out
    assert "the trainers stopped on purpose with exit 3, not restarted" in out
    node_log = (tmp_path / "halted" / "logs" / "slurm" / f"{job_id}-a0-node0.log").read_text()
    assert "error: not training on: torchrun restarted the workers (restart 1)" in node_log
    # The launcher's torchrun (qwen2_dist/cli/torchrun.py) ends with the halt's code itself.
    assert "which torchrun reports as a failure (exit 1); ending with 3: step 3: " in node_log
    assert "resumed from" not in node_log and [r["step"] for r in metrics(tmp_path / "halted")] == [1, 2, 3]


def test_launcher_refuses_an_impossible_job_before_torchrun(tmp_path):
    # The layout does not divide 3 processes: one line, exit 2, and torchrun never starts (it would restart the
    # failing workers MAX_RESTARTS times).
    env = {**os.environ, "NPROC": "3", "MAX_RESTARTS": "3"}
    result = subprocess.run(["bash", "launch/train_single_node.sh", "parallel.dp_shard=2", f"run_dir={tmp_path}/run"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: parallel.dp_replicate x dp_shard x tp = 1 x 2 x 1 does not equal the world size 3; set "
        "parallel.dp_shard=-1 to fill the rest"]
    assert "torch.distributed" not in result.stdout + result.stderr and not (tmp_path / "run").exists()
