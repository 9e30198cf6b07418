"""Shared fixtures: a per-test TMPDIR (streaming's lock files go there), one compile cache for the whole session,
and a small embedded corpus."""

import os
import sys

# One intra-op thread per test process. The suite runs two pytest workers on two cores (.ci/run), each running a test
# or a CLI child of its own: with torch's default of a thread per core, two such processes ran four threads on two
# cores, and a pair of concurrent 6-step CPU runs of the tiny model took 19.6 s instead of 14.8 s (2026-12-07, 2-core
# machine). Set before torch is imported (OpenMP reads it then), so the test zygote and its children have it too; a
# value set by the caller is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules and os.environ["OMP_NUM_THREADS"].isdigit():
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# glibc's malloc keeping freed memory (qwen2_dist/train/host_memory.py, which qwen2-train does on the CPU itself):
# in this process, and from their start in every process the tests start (the zygote and its children, torchrun's
# agents and workers, the benchmarks' scripts). With glibc's defaults each large temporary of a CPU step was
# page-faulted in again every time: the tests of tests/e2e/test_train.py and tests/unit/test_train_loop.py took
# 145 s, with freed memory kept 121 s (pytest -n 2, 2-core machine, 2026-12-07). Settings the caller made are kept.
from qwen2_dist.train import host_memory  # noqa: E402

if not any(key in os.environ for key in host_memory.ENV):
    host_memory.keep_freed_memory()
    os.environ.update(host_memory.ENV)

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _shared_compile_cache(tmp_path_factory):
    """One Inductor cache for every test of the session, both pytest workers and every child process: otherwise
    each test's own TMPDIR gave every compiling child process an empty cache, and the same kernels of the tiny model
    were compiled again in each (a cold compiled 3-step run: 43 s; with the kernels cached: 18 s). Inside the
    session's temporary root, which pytest removes with its old ones. Set before the test zygote starts, whose
    children must see the environment it started with (Inductor also writes the variable on its first compile)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the workers' basetemps share a parent
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor-cache"))


@pytest.fixture(autouse=True)
def _private_tmpdir(tmp_path_factory, monkeypatch):
    """Each test gets its own TMPDIR, so streaming's lock files never collide."""
    monkeypatch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmpdir")))


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory) -> str:
    """A cache dir holding a small embedded corpus (seq_len 32), built once per test session."""
    from qwen2_dist.data.corpus import embedded_corpus

    cache = str(tmp_path_factory.mktemp("corpus"))
    embedded_corpus(cache, seq_len=32, max_tokens=60_000)
    return cache


# Seconds each test file took, for those over 20 s: a run of the whole suite with two workers on a 2-core machine,
# 2026-12-07 afternoon, once the tests whose data does not matter trained on random ids (`pytest --durations=0`,
# setup + call + teardown summed per file); where two runs of that day differed much, between them (test_compile_dist
# 123 / 134 s, test_benchmarks 75 / 97 s, test_train_tp 14 / 33 s), and lowered by estimate for the files changed
# after it (test_launch 273 s, test_checkpoint_dist 93 s in it). Only their order matters. .ci/run hands whole files
# to two workers (--dist loadfile), each file to whichever worker runs short of tests: in collection order, the 100 s
# of tests/unit/test_train_loop.py came last, and the other worker sat idle for 80-90 s of a 14.5-minute run. Longest
# first, the last files handed out are the short ones. Files not named keep their order, after these.
SLOW_FILES = {
    "e2e/test_launch.py": 265, "dist/test_compile_dist.py": 125, "e2e/test_train.py": 107,
    "e2e/test_checkpoint_e2e.py": 94, "unit/test_config.py": 83, "e2e/test_benchmarks.py": 80,
    "unit/test_train_loop.py": 78, "dist/test_checkpoint_dist.py": 70, "unit/test_loader.py": 58,
    "dist/test_parity.py": 48, "e2e/test_s3.py": 38, "unit/test_checkpoint.py": 36, "dist/test_loader_dist.py": 35,
    "e2e/test_faults.py": 33, "unit/test_hf.py": 32, "unit/test_block_traffic.py": 32, "unit/test_estimate.py": 30,
    "unit/test_loss.py": 30, "unit/test_launch_scripts.py": 29, "unit/test_parallelize.py": 22,
    "dist/test_train_tp.py": 20,
}


def pytest_collection_modifyitems(session, config, items):
    """The files of SLOW_FILES first, longest first (a stable sort: each file's tests stay together, in order)."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    gone = [name for name in SLOW_FILES if not os.path.isfile(os.path.join(tests_dir, name))]
    assert not gone, f"tests/conftest.py SLOW_FILES names files that do not exist: {gone}"

    def seconds(item) -> float:
        return SLOW_FILES.get(os.path.relpath(str(item.path), tests_dir), 0)

    items.sort(key=lambda item: -seconds(item))
