"""The launch scripts' own logic, with fake commands on PATH: the process count of launch/common.sh,
launch/install.sh's decisions (what it installs, when it does nothing), the run directory slurm/train.sbatch
picks and what it refuses, and how qwen2_dist/cli/torchrun.py treats SIGUSR1. The real launches are in
tests/e2e/test_launch.py."""

import os
import shutil
import stat
import subprocess
import sys

import pytest

from tests.helpers import REPO, forked_python


def write_script(path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def nproc(tmp_path, show="$NPROC", **env) -> str:
    """NPROC (or what `show` says) as launch/common.sh sets it, on a machine whose nvidia-smi lists 8 GPUs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    write_script(bin_dir / "nvidia-smi", "#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: H100\"; done\n")
    base = {k: v for k, v in os.environ.items() if k not in ("NPROC", "CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE")}
    result = subprocess.run(["bash", "-c", f'set -euo pipefail; source launch/common.sh; echo "{show}"'], cwd=REPO,
                            env={**base, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_nproc_is_the_gpus_cuda_visible_devices_leaves(tmp_path):
    assert nproc(tmp_path) == "8"
    assert nproc(tmp_path, CUDA_VISIBLE_DEVICES="0,1") == "2"
    assert nproc(tmp_path, CUDA_VISIBLE_DEVICES="GPU-5") == "1"
    assert nproc(tmp_path, CUDA_VISIBLE_DEVICES="") == "1"  # no GPU visible: one process on the CPU
    assert nproc(tmp_path, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7,8,9") == "8"  # never more than there are
    assert nproc(tmp_path, CUDA_VISIBLE_DEVICES="0,1", NPROC="3") == "3"  # an explicit NPROC wins
    # CUDA reads the list up to its first entry that names no GPU: -1 (the usual way to hide them all) leaves none,
    # where it counted as one GPU, and the launch check refused the CPU run for a torch that sees no GPU.
    gpus = "$NPROC $launch_gpus $nproc_from"
    assert nproc(tmp_path, gpus, CUDA_VISIBLE_DEVICES="-1") == "1 0 default"
    assert nproc(tmp_path, gpus, CUDA_VISIBLE_DEVICES="NoDevFiles") == "1 0 default"
    assert nproc(tmp_path, gpus, CUDA_VISIBLE_DEVICES="0,1,-1,2") == "2 2 nvidia-smi"
    assert nproc(tmp_path, gpus, CUDA_VISIBLE_DEVICES="3,9,1") == "1 1 nvidia-smi"  # 9: no such GPU here
    assert nproc(tmp_path, gpus, CUDA_VISIBLE_DEVICES="GPU-1a2b,MIG-3c4d") == "2 2 nvidia-smi"


def test_nproc_under_srun_is_the_gpus_slurm_gave_this_node(tmp_path):
    """Each node of a job takes its own step's count (8 and 4 under sbatch --gpus=12), not nvidia-smi's 8."""
    assert nproc(tmp_path, SLURM_GPUS_ON_NODE="4") == "4"
    assert nproc(tmp_path, SLURM_GPUS_ON_NODE="0") == "8"  # a node without Slurm GPUs: nvidia-smi's count
    assert nproc(tmp_path, SLURM_GPUS_ON_NODE="4", NPROC="2") == "2"


# What install.sh runs, faked: "python3 -m venv DIR" makes DIR with this python in it; the python logs every call
# and keeps torch and pip as marker files, so a test sees what was installed and when nothing ran at all.
FAKE_PYTHON3 = """#!/bin/bash
[ "$1" = -c ] && { echo "${FAKE_PYTHON3_VERSION:-3.12}"; exit 0; }  # the version check
[ "$1 $2" = "-m venv" ] || exit 1
echo "$(basename "$0") $*" >> "$FAKE_LOG"
venv=${!#}
[ "$3" != --clear ] || rm -rf "${venv:?}"/*
mkdir -p "$venv/bin" && touch "$venv/pyvenv.cfg" "$venv/has-pip" && cp "$FAKE_VENV_PYTHON" "$venv/bin/python"
"""
FAKE_VENV_PYTHON = """#!/bin/bash
venv=$(dirname "$0")/..
echo "python $*" >> "$FAKE_LOG"
if [ "$1" = -m ] && [ "$2" = pip ]; then
    [ -f "$venv/has-pip" ] || { echo "No module named pip" >&2; exit 1; }
    case "$3 $5" in
        "install torch"*) [ -z "${FAKE_PIP_FAIL:-}" ] || exit 1; echo "$5" > "$venv/has-torch" ;;
        "install --upgrade") [ -z "${FAKE_NO_INDEX:-}" ] || exit 1 ;;
        "uninstall -y") rm -f "$venv/has-torch" ;;
        "show "*) exit 1 ;;
    esac
    exit 0
fi
if [ "$1 $2" = "-I qwen2_dist/uv_install.py" ]; then
    [ -z "${FAKE_UV_FAIL:-}" ] || exit 3
    case "$4" in
        torch*) [ -z "${FAKE_PIP_FAIL:-}" ] || exit 1; echo "$4" > "$venv/has-torch" ;;
    esac
    exit 0
fi
case "$2" in
    "import torch") [ -f "$venv/has-torch" ] ;;
    "import sysconfig"*) mkdir -p "$venv/site-packages/torch" && echo "$(cd "$venv" && pwd)/site-packages" ;;
    "import importlib.metadata"*) [ -f "$venv/has-torch" ] && echo 2.13.0 ;;
esac
"""


@pytest.fixture
def install(tmp_path):
    """Run launch/install.sh with VENV=tmp_path/venv and the fakes; returns (run, venv, log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_script(bin_dir / "python3", FAKE_PYTHON3)
    write_script(tmp_path / "venv_python", FAKE_VENV_PYTHON)
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    log.touch()

    def run(torch_spec=None, cwd=REPO, venv_value=None, torch_download_fails=False, **fake_env) -> list[str]:
        """One run of install.sh (from cwd, VENV=venv_value or the absolute venv); the calls it made."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("TORCH_SPEC", "FAKE_PIP_FAIL", "FAKE_NO_INDEX", "FAKE_UV_FAIL", "INSTALLER")}
        env.update(fake_env)
        env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", VENV=venv_value or str(venv), FAKE_LOG=str(log),
                   FAKE_VENV_PYTHON=str(tmp_path / "venv_python"))
        if torch_spec is not None:
            env["TORCH_SPEC"] = torch_spec
        if torch_download_fails:
            env["FAKE_PIP_FAIL"] = "1"
        before = len(log.read_text().splitlines())
        result = subprocess.run(["bash", os.path.join(REPO, "launch", "install.sh")], cwd=cwd, env=env,
                                capture_output=True, text=True, timeout=30)
        assert (result.returncode != 0) == torch_download_fails, result.stdout + result.stderr
        run.last = result
        return log.read_text().splitlines()[before:]

    return run, venv, log


def pip_calls(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("python -m pip") and "--version" not in c]


def test_install_makes_the_venv_once_then_does_nothing(install):
    run, venv, _ = install
    calls = run()
    assert calls[0] == f"python3 -m venv {venv}"
    # The new venv's pip is upgraded first (uv_install.py reads pip's settings); torch and the dependencies go in
    # with uv.
    assert pip_calls(calls) == ["python -m pip install --quiet --upgrade pip>=25", "python -m pip show torchvision"]
    torch_at = calls.index("python -I qwen2_dist/uv_install.py --quiet torch==2.13.0")
    deps = f"python -I qwen2_dist/uv_install.py --quiet -c {venv}/torch-constraint.txt -e .[dev]"
    # Compiled to bytecode on every core, where the packages went: what was there before the dependencies (torch and
    # its own) while they install, the rest after them; all but oci, of which only what an oci:// source imports, and
    # transformers' models but Qwen2.
    purelib = "python -c import sysconfig; print(sysconfig.get_paths()[\"purelib\"])"
    at = calls.index(deps)
    assert torch_at < calls.index(purelib) < at
    first = f"python -m compileall -qq -j 0 {venv}/site-packages/torch"  # in the background
    assert first in calls[calls.index(purelib) + 1:]
    assert [c for c in calls[at + 1:] if c != first][:2] == [
        f"python -m compileall -qq -j 0 -x /site-packages/(oci/|transformers/models/(?!auto/|qwen2/)[^/]+/) "
        f"{venv}/site-packages",
        "python -c import oci.object_storage"]
    assert (venv / "torch-constraint.txt").read_text() == "torch==2.13.0\n"
    assert run() == []


def test_install_leaves_the_dependencies_to_pip_when_uv_cannot_or_is_not_chosen(install):
    run, venv, _ = install
    pip_deps = f"python -m pip install --quiet -c {venv}/torch-constraint.txt -e .[dev] --no-compile"
    # Without the compile in the background, whose call may come anywhere after torch's.
    calls = [c for c in run(FAKE_UV_FAIL="1") if not c.startswith(f"python -m compileall -qq -j 0 {venv}/")]
    assert "warning: uv did not install torch==2.13.0; installing it with pip" in run.last.stderr
    assert calls.index("python -m pip install --quiet torch==2.13.0 --no-compile") == calls.index(
        "python -I qwen2_dist/uv_install.py --quiet torch==2.13.0") + 1
    assert "warning: uv did not install the dependencies; installing them with pip" in run.last.stderr
    assert calls.index(pip_deps) == calls.index(f"python -I qwen2_dist/uv_install.py --quiet -c "
                                                f"{venv}/torch-constraint.txt -e .[dev]") + 1
    shutil.rmtree(venv)
    calls = run(INSTALLER="pip")
    assert pip_deps in calls and not any("uv_install" in c for c in calls)
    assert run.last.stderr == ""


def test_install_goes_on_with_the_venvs_own_pip_when_it_cannot_upgrade_it(install):
    """No package index for pip itself (a machine with a local wheelhouse only): a warning, then the install."""
    run, venv, _ = install
    calls = run(FAKE_NO_INDEX="1")
    assert f"warning: could not upgrade pip in {venv}; installing with " in run.last.stderr
    assert pip_calls(calls)[0] == "python -m pip install --quiet --upgrade pip>=25"
    assert "python -I qwen2_dist/uv_install.py --quiet torch==2.13.0" in calls
    assert (venv / ".qwen2-dist-installed").exists()


def test_install_takes_a_relative_venv_from_the_current_directory(install, tmp_path):
    run, venv, _ = install
    assert run(cwd=tmp_path, venv_value="venv")[0] == f"python3 -m venv {venv}"  # not REPO/venv
    assert run(venv_value=str(venv)) == []  # the same environment


def test_install_reinstalls_torch_when_torch_spec_changes(install):
    run, venv, _ = install
    run()
    assert run("torch==2.13.0") == []  # the spec torch came from
    calls = run("torch==2.12.0 --index-url https://example.invalid/cu126")
    assert calls.index("python -I qwen2_dist/uv_install.py --quiet torch==2.12.0 --index-url "
                       "https://example.invalid/cu126") == calls.index("python -m pip uninstall --quiet -y torch") + 1
    assert f"python -I qwen2_dist/uv_install.py --quiet -c {venv}/torch-constraint.txt -e .[dev]" in calls
    assert run("torch==2.12.0 --index-url https://example.invalid/cu126") == []
    assert run() == []  # without TORCH_SPEC the torch there is kept
    calls = run("torch==2.13.0")
    assert calls.index("python -I qwen2_dist/uv_install.py --quiet torch==2.13.0") == calls.index(
        "python -m pip uninstall --quiet -y torch") + 1


def test_install_after_a_torch_reinstall_that_failed_installs_the_recorded_torch(install):
    """A reinstall stopped between torch's uninstall and install (a failed download) left the stamp of the run
    before it: the next run without TORCH_SPEC did nothing, with no torch; or installed the default torch."""
    run, venv, _ = install
    cuda = "torch==2.12.0 --index-url https://example.invalid/cu126"
    run(cuda)
    run("torch==2.11.0", torch_download_fails=True)
    assert not (venv / "has-torch").exists()
    assert f"python -I qwen2_dist/uv_install.py --quiet {cuda}" in run()
    assert (venv / "has-torch").read_text().strip() == "torch==2.12.0" and run() == []


def test_install_refuses_a_python_older_than_3_10_before_making_the_venv(install, tmp_path):
    """python3 3.9 made the venv, and the first error was pip's "No matching distribution found for torch==2.13.0";
    PYTHON3 names another interpreter."""
    _, venv, log = install

    def run(**env) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", os.path.join(REPO, "launch", "install.sh")], cwd=REPO, capture_output=True,
                              text=True, timeout=30, env={
                                  **{k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "PYTHON3")},
                                  "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "VENV": str(venv),
                                  "FAKE_LOG": str(log), "FAKE_VENV_PYTHON": str(tmp_path / "venv_python"), **env})

    old = run(FAKE_PYTHON3_VERSION="3.9")
    assert old.returncode == 2 and not venv.exists() and log.read_text() == "", old.stdout + old.stderr
    assert old.stderr.startswith("error: PYTHON3=python3 is Python 3.9; qwen2-dist needs 3.10 or newer")
    missing = run(PYTHON3="python3.99")
    assert missing.returncode == 2 and "error: PYTHON3=python3.99: not found or does not run" in missing.stderr
    write_script(tmp_path / "bin" / "python3.12", FAKE_PYTHON3)
    chosen = run(PYTHON3="python3.12", FAKE_PYTHON3_VERSION="3.12")
    assert chosen.returncode == 0, chosen.stdout + chosen.stderr
    assert log.read_text().splitlines()[0] == f"python3.12 -m venv {venv}"


def test_install_takes_a_relative_python3_from_the_current_directory(install, tmp_path):
    """PYTHON3=./py was looked for in the repository (install.sh works from there): "not found or does not run"."""
    _, venv, log = install
    (tmp_path / "here").mkdir()
    write_script(tmp_path / "here" / "py", FAKE_PYTHON3)
    result = subprocess.run(["bash", os.path.join(REPO, "launch", "install.sh")], cwd=tmp_path / "here",
                            capture_output=True, text=True, timeout=30, env={
                                **{k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "PYTHON3")},
                                "PYTHON3": "./py", "VENV": str(venv), "FAKE_LOG": str(log),
                                "FAKE_VENV_PYTHON": str(tmp_path / "venv_python")})
    assert result.returncode == 0, result.stdout + result.stderr
    assert log.read_text().splitlines()[0] == f"py -m venv {venv}"


def test_install_refuses_an_unknown_installer_before_making_the_venv(install, tmp_path):
    _, venv, log = install
    result = subprocess.run(["bash", os.path.join(REPO, "launch", "install.sh")], cwd=REPO, capture_output=True,
                            text=True, timeout=30, env={**os.environ, "INSTALLER": "conda", "VENV": str(venv),
                                                        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
                                                        "FAKE_LOG": str(log)})
    assert result.returncode == 2 and not venv.exists() and log.read_text() == "", result.stdout + result.stderr
    assert result.stderr == "error: INSTALLER=conda: must be uv or pip (what installs the dependencies; default uv)\n"


def test_install_repairs_a_venv_whose_creation_failed(install):
    # What python3 -m venv leaves when ensurepip fails (Debian without python3-venv): a python, no pip.
    run, venv, _ = install
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").touch()
    write_script(venv / "bin" / "python", FAKE_VENV_PYTHON)
    (venv / "bin" / "python3.9").touch()  # what a venv of another Python left: cleared, not kept
    calls = run()
    assert f"python3 -m venv --clear {venv}" in calls and not (venv / "bin" / "python3.9").exists()
    assert "python -I qwen2_dist/uv_install.py --quiet torch==2.13.0" in calls
    assert run() == []


def sbatch_run_dir(tmp_path, *overrides: str, **env_changes: str | None) -> str:
    """Run slurm/train.sbatch outside Slurm (fake srun and scontrol); the directory its per-node logs went to
    (relative to tmp_path). env_changes: variables to set, or to unset (None)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    write_script(bin_dir / "srun", '#!/bin/bash\nprintf "%s\\n" "$@" > "$FAKE_SRUN_ARGS"\n'
                                   'echo "${NODE_RANK-unset}" > "$FAKE_SRUN_ARGS.node_rank"\n'
                                   'echo "${LOCAL_ADDR-unset} ${NPROC-unset}" > "$FAKE_SRUN_ARGS.env"\n')
    write_script(bin_dir / "scontrol", '#!/bin/bash\n[ "$2" = hostnames ] && echo n1 || echo "NodeAddr=127.0.0.1"\n')
    cwd = tmp_path / "submit"
    cwd.mkdir(exist_ok=True)
    env = {**os.environ, **forked_python(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "NPROC": "1",
           "SLURM_JOB_NAME": "exp1", "SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1",
           "SLURM_SUBMIT_DIR": REPO, "RUNS_ROOT": str(tmp_path / "runs"), "RUN_BASE": str(tmp_path),
           "FAKE_SRUN_ARGS": str(tmp_path / "srun_args")}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    env = {k: v for k, v in env.items() if env_changes.get(k, "") is not None}
    result = subprocess.run(["bash", os.path.join(REPO, "slurm", "train.sbatch"), "model=tiny", *overrides], cwd=cwd,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    args = (tmp_path / "srun_args").read_text().splitlines()
    assert args[-len(overrides) - 1:] == ["model=tiny", *overrides]  # the trainers get the overrides as given
    (output,) = [a for a in args if a.startswith("--output=")]
    assert os.listdir(cwd) == []  # nothing created where the job was started
    log_dir = os.path.dirname(output.removeprefix("--output="))
    # srun reads --output as a pattern (%j, %x, %n, ...): every % of the directory is written %%, which it makes %.
    assert "%" not in log_dir.replace("%%", ""), output
    log_dir = log_dir.replace("%%", "%")
    assert os.path.isdir(log_dir)
    return os.path.relpath(os.path.dirname(os.path.dirname(log_dir)), tmp_path)


@pytest.mark.parametrize("overrides, run_dir", [
    ((), "runs/exp1"),
    (("run_dir='{base}/with space'",), "with space"),
    (("++run_dir={base}/plus_plus",), "plus_plus"),
    (("run_dir=${{oc.env:RUN_BASE}}/from_env",), "from_env"),
    (("run_dir={base}/first", "run_dir={base}/last"), "last"),
])
def test_sbatch_logs_go_to_the_run_dir_the_trainer_uses(tmp_path, overrides, run_dir):
    assert sbatch_run_dir(tmp_path, *(o.format(base=tmp_path) for o in overrides)) == run_dir


def test_sbatch_takes_any_job_name_for_the_default_run_dir(tmp_path):
    """The default run_dir (RUNS_ROOT/JOB_NAME) reaches Hydra through the environment: a name with = , ( [ { ' \\
    or ${ is a directory name, not override syntax (lr=1e-4 made every job of that name exit 2); a % in it is no
    pattern of srun's --output (the node logs went to a directory never made)."""
    job_name = "lr=1e-4,exp(2)[1]{c}it's\\x${y}10%x"
    assert sbatch_run_dir(tmp_path, SLURM_JOB_NAME=job_name) == f"runs/{job_name}"


def test_sbatch_runs_root_defaults_to_the_submit_directory_and_node_ranks_are_slurm_s(tmp_path):
    """RUNS_ROOT's default is the submit directory's runs/ (as documented; it was the checkout's); a NODE_RANK
    exported at submission does not reach the nodes, which take theirs from SLURM_NODEID."""
    (tmp_path / "submitted_from").mkdir()
    assert sbatch_run_dir(tmp_path, RUNS_ROOT=None, QWEN2_DIST_HOME=REPO, NODE_RANK="1",
                          SLURM_SUBMIT_DIR=str(tmp_path / "submitted_from")) == "submitted_from/runs/exp1"
    assert (tmp_path / "srun_args.node_rank").read_text().strip() == "unset"


def test_sbatch_leaves_each_node_its_own_gpu_count_and_address(tmp_path):
    """NPROC was exported from the batch step's SLURM_GPUS_ON_NODE, so every node started as many workers as the
    first has GPUs (8 on a node with 4); a LOCAL_ADDR exported at submission became every node's --local-addr."""
    # GPUs per task with one task per node give the step all of them: not refused (see the test below).
    sbatch_run_dir(tmp_path, NPROC=None, SLURM_GPUS_ON_NODE="8", LOCAL_ADDR="10.9.9.9", SLURM_GPUS_PER_TASK="8",
                   SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1")
    assert (tmp_path / "srun_args.env").read_text().split() == ["unset", "unset"]


def sbatch_refusal(tmp_path, *overrides: str, **env_changes: str) -> subprocess.CompletedProcess:
    """slurm/train.sbatch outside Slurm, expected to stop with exit 2 before its step (srun) starts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    write_script(bin_dir / "srun", f"#!/bin/bash\ntouch {tmp_path}/srun_ran\n")
    env = {**os.environ, **forked_python(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "NPROC": "1",
           "SLURM_JOB_NAME": "exp1", "SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_SUBMIT_DIR": REPO, "RUNS_ROOT": str(tmp_path / "runs"), **env_changes}
    result = subprocess.run(["bash", os.path.join(REPO, "slurm", "train.sbatch"), "model=tiny", *overrides],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and not (tmp_path / "srun_ran").exists(), result.stdout + result.stderr
    return result


@pytest.mark.parametrize("flags", [("--config-name=other",), ("-cn", "other"), ("--config-dir", "/x")])
def test_sbatch_refuses_hydra_flags_naming_what_to_use_instead(tmp_path, flags):
    """The run directory's compose took a flag for an override: exit 2 with "bad override ... quote a value"."""
    result = sbatch_refusal(tmp_path, *flags)
    assert result.stderr.startswith(f"error: {flags[0]}: slurm/train.sbatch takes Hydra overrides only (KEY=VALUE")
    assert "QWEN2_DIST_CONF=DIR" in result.stderr and "bad override" not in result.stderr


@pytest.mark.parametrize("per_task", [{"SLURM_GPUS_PER_TASK": "1"}, {"SLURM_TRES_PER_TASK": "cpu=8,gres/gpu=1"}])
def test_sbatch_refuses_gpus_per_task_with_several_tasks_per_node(tmp_path, per_task):
    """srun passed the job's GPUs per task on to the step of one task per node: one GPU for NPROC=8 workers."""
    result = sbatch_refusal(tmp_path, SLURM_NTASKS="16", SLURM_NTASKS_PER_NODE="8", **per_task)
    assert result.stderr.startswith("error: sbatch --gpus-per-task (") and "--gpus-per-node=N" in result.stderr


def test_sbatch_requeues_on_a_stop_that_comes_before_its_step_started(tmp_path):
    """SIGUSR1 while the script works out the run directory (a python start; the trap was set only after it, so
    bash's default action killed the script and the job failed instead of coming back): no step is started, and
    the job is requeued at once."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_script(bin_dir / "srun", f'#!/bin/bash\ntouch {tmp_path}/srun_ran\n')
    write_script(bin_dir / "scontrol", f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol_calls\n'
                                       '[ "$2" = hostnames ] && echo n1 || echo "NodeAddr=127.0.0.1"\n')
    # The python that composes the run directory signals the batch script first: the topmost of its ancestors
    # running train.sbatch (a $(...) subshell runs it too).
    write_script(bin_dir / "python_signalling", f"""#!/bin/bash
pid=$PPID
target=
while [ "$pid" -gt 1 ]; do
    if tr '\\0' ' ' < /proc/$pid/cmdline | grep -q train.sbatch; then target=$pid; fi
    pid=$(ps -o ppid= -p "$pid" | tr -d ' ')
done
kill -USR1 "$target"
sleep 0.5
exec {forked_python()["PYTHON"]} "$@"
""")
    env = {**os.environ, **forked_python(), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "PYTHON": str(bin_dir / "python_signalling"),
           "NPROC": "1", "SLURM_JOB_NAME": "exp1", "SLURM_JOB_ID": "7", "SLURM_NNODES": "1",
           "SLURM_JOB_NODELIST": "n1", "SLURM_SUBMIT_DIR": REPO, "RUNS_ROOT": str(tmp_path / "runs")}
    result = subprocess.run(["bash", os.path.join(REPO, "slurm", "train.sbatch"), "model=tiny"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "requeueing job 7 before its step started" in result.stdout
    assert not (tmp_path / "srun_ran").exists() and "requeue 7" in (tmp_path / "scontrol_calls").read_text()


def test_each_node_gives_torchrun_its_slurm_address_for_the_workers_store(tmp_path):
    """Without --local-addr the first node's workers host init_process_group's store at torchrun's host name, which
    need not resolve on the network the nodes share: under srun each node passes its NodeAddr (LOCAL_ADDR wins)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_script(bin_dir / "fake_torchrun", '#!/bin/bash\nprintf "%s\\n" "$@"\n')
    write_script(bin_dir / "scontrol", '#!/bin/bash\n[ "$3" = n2 ] && echo "NodeName=n2 NodeAddr=10.1.2.3 Port=0"\n')
    base = {k: v for k, v in os.environ.items() if k not in ("SLURMD_NODENAME", "LOCAL_ADDR", "TORCHRUN")}

    def torchrun_args(**env) -> list[str]:
        result = subprocess.run(["bash", os.path.join(REPO, "launch", "train_multi_node.sh"), "model=tiny"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=30, env={
                                    **base, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TORCHRUN": "fake_torchrun",
                                    "PRECHECK": "0", "NPROC": "1", "NNODES": "2", "NODE_RANK": "1",
                                    "MASTER_ADDR": "10.0.0.1", **env})
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout.splitlines()

    assert "--local-addr=10.1.2.3" in torchrun_args(SLURMD_NODENAME="n2")
    assert "--local-addr=10.9.9.9" in torchrun_args(SLURMD_NODENAME="n2", LOCAL_ADDR="10.9.9.9")
    assert not any(a.startswith("--local-addr") for a in torchrun_args())  # outside Slurm: torchrun's choice
    assert not any(a.startswith("--local-addr") for a in torchrun_args(SLURMD_NODENAME="n9"))  # no NodeAddr


def test_the_launchers_check_the_job_with_the_python_of_their_torchrun_or_venv(tmp_path):
    """TORCHRUN=torchrun (found on PATH) checks with the python beside that torchrun (it looked for ./python); VENV,
    as given to install.sh, is the launchers' environment too."""
    bin_dir = tmp_path / "env" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("torchrun", "python"):
        write_script(bin_dir / name, "#!/bin/bash\n")

    def python_of(**env) -> str:
        result = subprocess.run(["bash", "-c", f"source {REPO}/launch/common.sh; echo $python"], cwd=tmp_path,
                                env={**{k: v for k, v in os.environ.items() if k not in ("PYTHON", "TORCHRUN", "VENV")},
                                     "PATH": f"{bin_dir}:{os.environ['PATH']}", **env},
                                capture_output=True, text=True, timeout=30)
        return result.stdout.strip()

    assert python_of(TORCHRUN="torchrun") == str(bin_dir / "python")
    assert python_of(VENV=str(tmp_path / "env")) == str(bin_dir / "python")


FAKE_TORCHRUN = """import os, signal, sys
import torch.distributed.run
from qwen2_dist.cli import torchrun, train
torch.distributed.run.main = lambda argv: print("torchrun started", flush=True)
if os.environ.get("FAKE_SIGNAL_CHECK") == "1":
    check_machine = train.check_machine
    def signalled(job):
        os.kill(os.getpid(), signal.SIGUSR1)
        return check_machine(job)
    train.check_machine = signalled
torchrun.main(sys.argv[1:])
"""


def launch_single_node(tmp_path, *overrides: str, **env_changes: str) -> subprocess.CompletedProcess:
    """launch/train_single_node.sh on a machine whose nvidia-smi lists 8 GPUs, with this (CPU) torch, PYTHON a
    wrapper: our torchrun runs, the launch check in it for real, and torch's torchrun only says that it started
    ("torchrun started" in the output). FAKE_SIGNAL_CHECK=1: a SIGUSR1 comes during the check."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    write_script(bin_dir / "nvidia-smi", "#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: H100\"; done\n")
    (bin_dir / "fake_torchrun.py").write_text(FAKE_TORCHRUN)
    write_script(bin_dir / "python_wrapper", f"""#!/bin/bash
[ "$1 $2" = "-m qwen2_dist.cli.torchrun" ] || {{ echo "not our torchrun: $*" >&2; exit 99; }}
shift 2
exec {forked_python()["PYTHON"]} {bin_dir / "fake_torchrun.py"} "$@"
""")
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "CUDA_VISIBLE_DEVICES", "TORCHRUN", "PRECHECK")}
    env.update({**forked_python(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python_wrapper"),
                **env_changes})
    return subprocess.run(["bash", os.path.join(REPO, "launch", "train_single_node.sh"), "model=tiny",
                           f"run_dir={tmp_path}/run", *overrides], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)


def test_gpus_counted_for_the_processes_but_a_torch_that_sees_none_is_refused_before_torchrun(tmp_path):
    """One process per GPU nvidia-smi lists, with a torch that sees no CUDA device (a CPU build, an old driver),
    would train every process on the CPU, and the check said the config was ok."""
    result = launch_single_node(tmp_path, "train.global_batch_size=32")
    assert result.returncode == 2 and "torchrun started" not in result.stdout, result.stdout + result.stderr
    import torch  # the reason given depends on the build: CPU (CI), or CUDA with no device (a rehearsal's)

    why = "a build without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build, 0 device(s)"
    assert "the launcher counted 8 GPU(s) on this node" in result.stderr and why in result.stderr
    assert "TORCH_SPEC=" in result.stderr
    # On purpose: the device and NPROC named (the default global batch, 8, a multiple of micro-batch 4 x 2 ranks).
    chosen = launch_single_node(tmp_path, "train.device=cpu", NPROC="2")
    assert chosen.returncode == 0 and "torchrun started" in chosen.stdout, chosen.stdout + chosen.stderr
    assert "config ok for 2 process(es) on cpu" in chosen.stdout


def test_a_stop_signal_during_the_launch_check_ends_the_launcher_instead_of_being_lost(tmp_path):
    """SIGUSR1 (Slurm's warning before the time limit, or scancel --signal=USR1) while the check runs: ignored
    there, it was lost, and the run trained on to the time limit without a checkpoint; now the launcher (our
    torchrun, which runs the check) ends, so slurm/train.sbatch requeues the job. Once torchrun's workers run, the
    trainers handle it."""
    result = launch_single_node(tmp_path, "train.device=cpu", NPROC="1", FAKE_SIGNAL_CHECK="1")
    assert result.returncode == 128 + 10 and "torchrun started" not in result.stdout, result.stdout + result.stderr
    assert "SIGUSR1 before the workers started" in result.stderr


@pytest.mark.parametrize("nodes, check_exit, launcher_exit, launched", [
    (1, 0, 0, True), (1, 10, 0, False), (1, 2, 2, False), (2, 10, 0, True), (2, 2, 2, False)])
def test_a_run_the_check_finds_complete_launches_nothing_on_one_node(tmp_path, nodes, check_exit, launcher_exit,
                                                                      launched):
    """With a TORCHRUN of its own, the launchers' check is `QWEN2_CHECK_ONLY=N python -m qwen2_dist.cli.train`
    (the python beside that torchrun), which exits 10 for a run whose newest checkpoint is at train.steps
    (cli.train.completed_run): on one node no torchrun then, and the launcher's exit is 0 (Slurm: COMPLETED, not
    requeued); with several nodes, each deciding alone could disagree, so they launch (the trainers find the run
    complete together); other codes stay as they are. (Our torchrun's own check: tests/unit/test_torchrun.py.)"""
    write_script(tmp_path / "python", f"""#!/bin/bash
if [ -n "${{QWEN2_CHECK_ONLY:-}}" ]; then exit {check_exit}; fi
exit 99
""")
    write_script(tmp_path / "torchrun", '#!/bin/bash\necho "torchrun started"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("NODE_RANK", "NNODES")}
    env.update({"TORCHRUN": str(tmp_path / "torchrun"), "NPROC": "1"})
    script = "train_single_node.sh"
    if nodes > 1:
        env.update({"NNODES": str(nodes), "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"})
        script = "train_multi_node.sh"
    result = subprocess.run(["bash", os.path.join(REPO, "launch", script), "model=tiny"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=30)
    assert (result.returncode, "torchrun started" in result.stdout) == (launcher_exit, launched), result.stderr


@pytest.mark.parametrize("value", ["gpu", "0", "auto", "2x"])
def test_an_nproc_that_is_not_a_count_is_refused_naming_it(tmp_path, value):
    result = subprocess.run(["bash", "-c", "set -euo pipefail; source launch/common.sh"], cwd=REPO,
                            env={**os.environ, "NPROC": value}, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and f"error: NPROC={value}: give the number of processes per node" in result.stderr


@pytest.mark.parametrize("name, value, message", [
    ("SHUTDOWN_TIMEOUT", "5m", "error: SHUTDOWN_TIMEOUT=5m: give whole seconds torchrun waits for its workers"),
    ("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "1.5", "error: TORCH_ELASTIC_SHUTDOWN_TIMEOUT=1.5: give whole seconds"),
    ("MAX_RESTARTS", "3x", "error: MAX_RESTARTS=3x: give how many times torchrun restarts failed workers"),
    ("MAX_RESTARTS", "-1", "error: MAX_RESTARTS=-1: give how many times"),
])
def test_a_shutdown_timeout_or_restart_count_that_is_not_a_whole_number_is_refused_naming_it(name, value, message):
    """They were a traceback of torchrun's (int('5m')) or its usage text naming --max-restarts, never the variable."""
    env = {k: v for k, v in os.environ.items() if k not in ("SHUTDOWN_TIMEOUT", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
                                                             "MAX_RESTARTS")}
    result = subprocess.run(["bash", "-c", "set -euo pipefail; source launch/common.sh; echo sourced"], cwd=REPO,
                            env={**env, "NPROC": "1", name: value}, capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (2, "") and message in result.stderr, result.stderr
    result = subprocess.run(["bash", "-c", "set -euo pipefail; source launch/common.sh; echo sourced"], cwd=REPO,
                            env={**env, "NPROC": "1", name: "7"}, capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (0, "sourced\n"), result.stderr


def test_sbatch_requeues_attempts_without_a_new_checkpoint_only_a_few_times_in_a_row(tmp_path):
    """Every SIGUSR1 requeued the job: with a time limit hardly longer than the signal's lead (the signal comes
    during the start) or a save that keeps failing, it came back forever without training. Attempts that save no
    new checkpoint are requeued MAX_IDLE_REQUEUES times in a row; one that saves resets the count."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    run_dir = tmp_path / "runs" / "exp1"
    # The step: saves a checkpoint when FAKE_STEP (its name) is set, then Slurm's warning reaches the batch script.
    write_script(bin_dir / "srun", f"""#!/bin/bash
if [ -n "${{FAKE_STEP:-}}" ]; then
    mkdir -p {run_dir}/checkpoints/$FAKE_STEP && touch {run_dir}/checkpoints/$FAKE_STEP/metadata.json
fi
kill -USR1 $PPID
exec sleep 5
""")
    write_script(bin_dir / "scontrol", f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol_calls\n'
                                       '[ "$2" = hostnames ] && echo n1 || echo "NodeAddr=127.0.0.1"\n')
    env = {**os.environ, **forked_python(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "NPROC": "1",
           "SLURM_JOB_NAME": "exp1", "SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1",
           "SLURM_SUBMIT_DIR": REPO, "RUNS_ROOT": str(tmp_path / "runs"), "MAX_IDLE_REQUEUES": "2"}

    def attempt(step: str | None = None) -> tuple[subprocess.CompletedProcess, int]:
        result = subprocess.run(["bash", os.path.join(REPO, "slurm", "train.sbatch"), "model=tiny"], cwd=tmp_path,
                                env={**env, **({"FAKE_STEP": step} if step else {})}, capture_output=True,
                                text=True, timeout=60)
        calls = (tmp_path / "scontrol_calls").read_text().count("requeue 7")
        return result, calls

    for expected, step, idle in ((1, None, 1), (2, "step_00000010", None), (3, None, 1), (4, None, 2)):
        result, calls = attempt(step)
        assert result.returncode == 0 and calls == expected, result.stdout + result.stderr
        assert (f"no new checkpoint in this attempt ({idle} in a row; at most 2)" in result.stdout if idle else
                "in a row" not in result.stdout), result.stdout
    result, calls = attempt()
    assert result.returncode == 1 and calls == 4, result.stdout + result.stderr
    assert "error: not requeueing job 7: its last 3 attempts ended without a new checkpoint" in result.stderr
    assert f"(newest: {run_dir}/checkpoints/step_00000010/metadata.json)" in result.stderr
    result, calls = attempt("step_00000020")  # submitted again: it trains and saves, and the count starts afresh
    assert result.returncode == 0 and calls == 5 and "in a row" not in result.stdout, result.stdout + result.stderr
    assert not os.path.exists(run_dir / "logs" / "slurm" / ".idle-requeues-7")


def test_sbatch_does_not_requeue_a_job_whose_trainers_stopped_on_purpose_when_a_stop_signal_came_too(tmp_path):
    """A halt (exit 3) and Slurm's warning before the time limit in one attempt: the requeue won, and the next
    attempt's start cleared the halt's record and trained past it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    run_dir = tmp_path / "runs" / "exp1"
    write_script(bin_dir / "srun", f"""#!/bin/bash
echo '{{"code": 3, "error": "step 5: halted (test)"}}' > {run_dir}/no_restart.json
kill -USR1 $PPID
sleep 0.5
exit 1
""")
    write_script(bin_dir / "scontrol", f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol_calls\n'
                                       '[ "$2" = hostnames ] && echo n1 || echo "NodeAddr=127.0.0.1"\n')
    env = {**os.environ, **forked_python(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "NPROC": "1",
           "SLURM_JOB_NAME": "exp1", "SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1",
           "SLURM_SUBMIT_DIR": REPO, "RUNS_ROOT": str(tmp_path / "runs")}
    result = subprocess.run(["bash", os.path.join(REPO, "slurm", "train.sbatch"), "model=tiny"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "the trainers stopped on purpose with exit 3, not restarted" in result.stdout
    assert "not requeueing job 7 for the stop signal that came too" in result.stdout
    assert "requeue 7" not in (tmp_path / "scontrol_calls").read_text()


def sbatch_with_step(tmp_path, step: str, **env_changes: str) -> tuple[subprocess.CompletedProcess, str]:
    """slurm/train.sbatch outside Slurm with a fake step (srun running `step`, bash); what it asked scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    write_script(bin_dir / "srun", f"#!/bin/bash\n{step}\n")
    write_script(bin_dir / "scontrol", f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol_calls\n'
                                       '[ "$2" = hostnames ] && echo n1 || echo "NodeAddr=127.0.0.1"\n')
    env = {**os.environ, **forked_python(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "NPROC": "1",
           "SLURM_JOB_NAME": "exp1", "SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_SUBMIT_DIR": REPO, "RUNS_ROOT": str(tmp_path / "runs"), **env_changes}
    result = subprocess.run(["bash", os.path.join(REPO, "slurm", "train.sbatch"), "model=tiny"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    calls = tmp_path / "scontrol_calls"
    return result, calls.read_text() if calls.exists() else ""


def test_sbatch_ends_with_the_launch_checks_refusal_on_several_nodes(tmp_path):
    """On 2 nodes the first refused node (exit 2) ended the step and srun stopped the other (SIGTERM, 143): the job
    ended 143, as if cancelled, and the refusal's line was in one node's log only. The check writes its refusal
    (no_restart.record_refusal) where the script reads it; the job ends 2 with it, not requeued."""
    step = (f"SLURM_NODEID=1 {sys.executable} -c 'from qwen2_dist.train import no_restart; "
            'no_restart.record_refusal(2, "train.global_batch_size=3 is not\\n divisible")\'; exit 143')
    result, calls = sbatch_with_step(tmp_path, step, PYTHONPATH=REPO)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "the launch check refused the job (exit 2): train.global_batch_size=3 is not divisible" in result.stderr
    assert "requeue" not in calls and not list((tmp_path / "runs" / "exp1" / "logs" / "slurm").glob(".check-*"))
    # A step that failed without a refusal keeps its code.
    result, _ = sbatch_with_step(tmp_path, "exit 1")
    assert result.returncode == 1 and "refused" not in result.stderr, result.stdout + result.stderr


@pytest.mark.parametrize("nodes", ["one", "several"])
def test_sbatch_requeues_a_step_stopped_by_sigusr1_sent_to_it(tmp_path, nodes):
    """scancel --signal=USR1 without --batch (or --signal=USR1@N without B:) reaches the step: the trainers saved and
    every torchrun ended with 128 + 10, and the job failed without a requeue. On several nodes the first torchrun to
    end has srun stop the others (143): its record (cli/torchrun.py) says what it was."""
    step = "exit 138" if nodes == "one" else (
        f"SLURM_NODEID=0 {sys.executable} -c 'from qwen2_dist.train import no_restart; "
        'no_restart.record_refusal(138, "torchrun: stopped by SIGUSR1", kind="sigusr1")\'; exit 143')
    result, calls = sbatch_with_step(tmp_path, step, PYTHONPATH=REPO)
    assert result.returncode == 0 and "requeue 7" in calls, result.stdout + result.stderr
    assert "the job step stopped on SIGUSR1 (sent to the step, not to this script)" in result.stdout
    (tmp_path / "cancelled").mkdir()
    result, calls = sbatch_with_step(tmp_path / "cancelled", "exit 143")  # a SIGTERM (scancel): not requeued
    assert result.returncode == 143 and "requeue" not in calls, result.stdout + result.stderr


@pytest.mark.parametrize("env, message", [
    ({"MAX_IDLE_REQUEUES": "abc"}, "error: MAX_IDLE_REQUEUES=abc: give how many attempts in a row without a new "
                                   "checkpoint are requeued"),
    ({"SLURM_HET_SIZE": "2"}, "error: a heterogeneous job (2 components): this script trains on the nodes of one job"),
])
def test_sbatch_refuses_what_it_cannot_run_before_its_step(tmp_path, env, message):
    """MAX_IDLE_REQUEUES=abc made every test of it false: requeued forever. A heterogeneous job never started (its
    components waited for each other under singleton), or trained on its first component's nodes alone."""
    assert sbatch_refusal(tmp_path, **env).stderr.startswith(message)


def test_sbatch_names_a_run_dir_it_cannot_make(tmp_path):
    """mkdir's own message and exit 1, under set -e, before the launch check that names run_dir."""
    (tmp_path / "afile").write_text("")
    result = sbatch_refusal(tmp_path, RUNS_ROOT=str(tmp_path / "afile"))
    assert result.stderr.startswith(f"error: run_dir={tmp_path}/afile/exp1 cannot be made or written")
    assert f"set RUNS_ROOT (now {tmp_path}/afile) or run_dir=" in result.stderr


def test_sbatch_goes_on_without_the_node_record_and_says_how_to_run_it(tmp_path):
    """A controller that does not answer `scontrol show node` (or hides node records) killed the job (set -e) before
    its step: the rendezvous takes the host name instead. Run by hand, outside sbatch, it says so."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_script(bin_dir / "srun", f'#!/bin/bash\necho "$RDZV_ENDPOINT" > {tmp_path}/endpoint\n')
    write_script(bin_dir / "scontrol", '#!/bin/bash\n[ "$2" = hostnames ] && { echo n1; exit 0; }\n'
                                       'echo "slurm_load_node error: Socket timed out" >&2; exit 1\n')
    env = {**os.environ, **forked_python(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "NPROC": "1",
           "SLURM_JOB_NAME": "exp1", "SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1",
           "SLURM_SUBMIT_DIR": REPO, "RUNS_ROOT": str(tmp_path / "runs")}
    sbatch = os.path.join(REPO, "slurm", "train.sbatch")
    result = subprocess.run(["bash", sbatch, "model=tiny"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and (tmp_path / "endpoint").read_text().strip() == "n1:10007", result.stderr
    by_hand = subprocess.run(["bash", sbatch, "model=tiny"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in env.items() if k != "SLURM_JOB_ID"})
    assert by_hand.returncode == 1 and "SLURM_JOB_ID: is not set: submit this script with sbatch" in by_hand.stderr


def launch_multi_node_checked(tmp_path, **env_changes: str) -> subprocess.CompletedProcess:
    """launch/train_multi_node.sh (2 nodes) with a fake python as our torchrun: it prints the check it was asked
    for (QWEN2_LAUNCH_CHECK, "none" when none) and torchrun's arguments. nvidia-smi lists 8 GPUs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    write_script(bin_dir / "nvidia-smi", "#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: H100\"; done\n")
    write_script(bin_dir / "fake_python", """#!/bin/bash
echo "checked world=${QWEN2_LAUNCH_CHECK:-none} nproc=${QWEN2_LAUNCH_NPROC:-none}"
echo "torchrun $*"
""")
    env = {k: v for k, v in os.environ.items()
           if k not in ("NPROC", "CUDA_VISIBLE_DEVICES", "TORCHRUN", "PRECHECK", "SLURMD_NODENAME", "LOCAL_ADDR")
           and not k.startswith("SLURM_")}
    env.update({"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "fake_python"), "NNODES": "2",
                "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", **env_changes})
    return subprocess.run(["bash", os.path.join(REPO, "launch", "train_multi_node.sh"), "model=tiny"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=30)


def test_the_multi_node_check_counts_the_gpus_of_all_nodes_when_slurm_gives_them_unevenly(tmp_path):
    """sbatch --gpus=12 on two nodes may give them 8 and 4: the 4-GPU node checked the job for 4 x 2 = 8 processes
    (and the 8-GPU node for 16), so one refused what the other let through; the world is the 12 GPUs."""
    result = launch_multi_node_checked(tmp_path, SLURM_GPUS_ON_NODE="4", SLURM_GPUS="h100:12")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checked world=12 nproc=4" in result.stdout and "--nproc-per-node=4" in result.stdout
    even = launch_multi_node_checked(tmp_path, SLURM_GPUS_ON_NODE="4", SLURM_GPUS_PER_NODE="4")
    assert "checked world=8 nproc=4" in even.stdout, even.stdout + even.stderr
    given = launch_multi_node_checked(tmp_path, SLURM_GPUS_ON_NODE="4", SLURM_GPUS="12", NPROC="2")
    assert "checked world=4 nproc=2" in given.stdout, given.stdout + given.stderr  # NPROC given: the same on all
    # No check asked for where it is off, or where the rendezvous decides the world (elastic), whatever the
    # environment held.
    for changes in ({"PRECHECK": "0"}, {"NNODES": "1:2"}):
        unchecked = launch_multi_node_checked(tmp_path, QWEN2_LAUNCH_CHECK="99", **changes)
        assert "checked world=none nproc=none" in unchecked.stdout, unchecked.stdout + unchecked.stderr


def test_torchrun_without_signals_to_handle_ignores_sigusr1_instead_of_dying_of_it(monkeypatch):
    """The wrapper ends on SIGUSR1 until torchrun takes the signal over once its workers start; a torchrun without
    --signals-to-handle (older torch) never does, so Slurm's warning before the time limit killed it at once and the
    workers with it, unsaved. Ignored there: torchrun lives on and the trainers, signalled by Slurm, save."""
    import argparse
    import signal

    import torch.distributed.run

    from qwen2_dist.cli import torchrun

    def parser_without_the_option() -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser()
        parser.add_argument("--nproc-per-node")
        parser.add_argument("-m", "--module", action="store_true")
        parser.add_argument("training_script")
        parser.add_argument("training_script_args", nargs=argparse.REMAINDER)
        return parser

    seen = []
    monkeypatch.setattr(torch.distributed.run, "main", lambda argv: seen.append(signal.getsignal(signal.SIGUSR1)))
    monkeypatch.setenv("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGUSR1")
    before = signal.getsignal(signal.SIGUSR1)
    try:
        torchrun.main(["--nproc-per-node=1", "train.py"])  # this torch's torchrun takes the signal over itself
        monkeypatch.setattr(torch.distributed.run, "get_args_parser", parser_without_the_option)
        torchrun.main(["--nproc-per-node=1", "train.py"])
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert seen == [torchrun._stop_before_the_workers, signal.SIG_IGN]
