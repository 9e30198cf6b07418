"""Checkpoints across processes: exact resume on 4 ranks, and resharding to other layouts on resume."""

import json
import math
import os
import shutil
import time

import pytest

from qwen2_dist.train.checkpoint import _share, file_checksum
from tests.helpers import RANDOM_IDS, read_metrics, run_torchrun, step_losses, train_overrides

TRAIN = "qwen2_dist.cli.train"
# Global batch 8 divides every data-parallel size used here (4, 2, 1). Random ids of a 1,024-token vocabulary (the
# same global batch at a step on any layout): what is checked is the checkpoint's weights, optimizer state and step
# across layouts; the data loader's position across world sizes is tests/dist/test_loader_dist.py's.
JOB = {"train.global_batch_size": 8, "train.micro_batch_size": 1, "train.steps": 6, "checkpoint.interval": 0,
       **RANDOM_IDS}


@pytest.fixture(scope="module")
def straight_4(tmp_path_factory, corpus_cache):
    run_dir = tmp_path_factory.mktemp("straight4")
    result = run_torchrun(4, TRAIN, train_overrides(run_dir, corpus_cache, **JOB, **{"logging.norms": "true"}))
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


@pytest.fixture(scope="module")
def half_4(tmp_path_factory, corpus_cache):
    """The same job on 4 ranks, stopped with a checkpoint after step 3."""
    run_dir = tmp_path_factory.mktemp("half4")
    result = run_torchrun(4, TRAIN, train_overrides(run_dir, corpus_cache, **JOB, **{"train.stop_at": 3}))
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def test_resume_on_4_ranks_is_bitwise_identical(tmp_path, straight_4, half_4, corpus_cache):
    run_dir = tmp_path / "run"
    shutil.copytree(half_4, run_dir)
    result = run_torchrun(4, TRAIN, train_overrides(run_dir, corpus_cache, **JOB))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "at step 3" in result.stdout
    assert step_losses(run_dir) == step_losses(straight_4)
    # logging.norms of FSDP's shards (straight_4): each block's reduced over the 4 ranks, together the grad_norm.
    for record in read_metrics(straight_4):
        grads = [value for key, value in record.items() if key.startswith("grad_norm/")]
        assert len(grads) == 4 and abs(math.hypot(*grads) - record["grad_norm"]) <= 1e-5 * record["grad_norm"]


@pytest.mark.parametrize("nproc, layout", [(2, {}), (2, {"parallel.tp": 2}), (1, {})],
                         ids=["fsdp4-to-fsdp2", "fsdp4-to-tp2", "fsdp4-to-1"])
def test_resume_on_another_layout_continues_the_same_run(tmp_path, straight_4, half_4, corpus_cache, nproc, layout):
    run_dir = tmp_path / "run"
    shutil.copytree(half_4, run_dir)
    result = run_torchrun(nproc, TRAIN, train_overrides(run_dir, corpus_cache, **JOB, **layout))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "at step 3" in result.stdout
    resumed, expected = step_losses(run_dir), step_losses(straight_4)
    for step in (4, 5, 6):
        assert abs(resumed[step] - expected[step]) <= 1e-5, (step, resumed[step], expected[step])
    assert read_metrics(run_dir)[-1]["tokens_seen"] == read_metrics(straight_4)[-1]["tokens_seen"]


def test_a_run_of_two_ranks_starts_from_another_runs_weights(tmp_path, half_4, corpus_cache):
    """model.init_from_checkpoint on more than one rank: the job's own check of it (rank 0, while the others wait for
    its verdict) was the collective one, and every rank hung until the process group's timeout (30 minutes, then
    torchrun's restarts). Its first loss is that of one process starting from the same weights."""
    job = {**JOB, "model.init_from_checkpoint": str(half_4 / "checkpoints" / "step_00000003"), "train.steps": 2,
           "optim.warmup_steps": 1, "train.pg_timeout_minutes": 1}
    two, one = tmp_path / "two", tmp_path / "one"
    result = run_torchrun(2, TRAIN, train_overrides(two, corpus_cache, **job), timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    result = run_torchrun(1, TRAIN, train_overrides(one, corpus_cache, **job), timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    assert abs(step_losses(two)[1] - step_losses(one)[1]) <= 1e-5


def test_one_rank_failing_mid_save_skips_that_checkpoint_on_every_rank(tmp_path, straight_4, corpus_cache):
    """Rank 2 fails to copy its state of step 2's background save to host memory, before the background write
    starts (where the other ranks' writes would otherwise wait in a collective forever); rank 1 writes its shard files
    of step 4's, then fails: no rank commits steps 2 and 4, nothing of them is left, training goes on unchanged and
    later saves commit."""
    run_dir = tmp_path / "run"
    job = dict(JOB, **{"checkpoint.interval": 2, "checkpoint.async_save": "true"})
    result = run_torchrun(4, TRAIN, train_overrides(run_dir, corpus_cache, **job),
                          env={"QWEN2_INJECT_CKPT_FAIL_STEP": "2:2:stage,4:1:write"})
    assert result.returncode == 0, result.stderr[-4000:]
    output = result.stdout + result.stderr
    assert "write failed on rank 2: MemoryError: staging failed" in output
    assert "step_00000002 failed and was skipped" in output
    assert "write failed: rank 1: OSError" in output and "after writing shards" in output
    assert "step_00000004 failed and was skipped" in output
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_00000006"]
    assert step_losses(run_dir) == step_losses(straight_4)
    # Each rank checksummed its own files in the background; rank 0 recorded them all, reading none of theirs.
    assert "without a checksum from the rank that wrote it" not in output
    path = run_dir / "checkpoints" / "step_00000006"
    meta = json.loads((path / "metadata.json").read_text())
    assert {f"__{r}_0.distcp" for r in range(4)} | {f"rng/rank{r}.pt" for r in range(4)} <= set(meta["checksums"])
    assert meta["checksums"] == {name: file_checksum(str(path / name)) for name in meta["files"]}


def test_a_changed_byte_in_any_ranks_shard_refuses_the_resume_on_every_rank(tmp_path, half_4, corpus_cache):
    """On 2 ranks each checks its share of the files; a shard file in rank 1's share is damaged, and both ranks stop
    with its name."""
    run_dir = tmp_path / "run"
    shutil.copytree(half_4, run_dir)
    path = run_dir / "checkpoints" / "step_00000003"
    meta = json.loads((path / "metadata.json").read_text())
    name = next(n for n in _share(meta["files"], meta["checksums"], 1, 2) if n.endswith(".distcp"))
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 1
    (path / name).write_bytes(bytes(data))
    result = run_torchrun(2, TRAIN, train_overrides(run_dir, corpus_cache, **JOB))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    assert output.count(f"{name}: checksum crc32:") >= 2, output[-4000:]  # logged by both ranks
    assert "no committed checkpoint under" in output and f"(1 tried; the newest, step_00000003: {path / name}: " \
        "checksum crc32:" in output, output[-4000:]
    assert not (run_dir / "metrics.jsonl").exists() or not step_losses(run_dir).get(4)


def _resume_worker(rank: int, root: str, store: str, out: str) -> None:
    import torch.distributed as dist

    from qwen2_dist.train import checkpoint

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    if rank == 1:  # a node whose view of the shared directory lags (NFS caches listings): it sees no checkpoint
        checkpoint.committed_checkpoints = lambda ckpt_root: []
    outcome = {"candidates": checkpoint.prepare_resume(root, "auto", checksums=False)}
    # What rank 0 finds wrong (here an unreadable rollback record) stops every rank, none left waiting.
    with open(os.path.join(root, checkpoint.ROLLBACK), "w") as f:
        f.write("{cut short")
    try:
        checkpoint.prepare_resume(root, os.path.join(root, "step_00000003"), checksums=False)
    except Exception as exc:
        outcome["error"] = type(exc).__name__
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(outcome, f)
    dist.destroy_process_group()


def test_every_rank_resumes_from_the_checkpoints_rank_0_sees(tmp_path):
    import torch.multiprocessing as mp

    root = tmp_path / "checkpoints"
    for step in (3, 6):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "metadata.json").write_text("{}")
    context = mp.start_processes(_resume_worker, args=(str(root), str(tmp_path / "store"), str(tmp_path)),
                                 nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        assert time.monotonic() < deadline, "a rank is still waiting"
    expected = [str(root / "step_00000006"), str(root / "step_00000003")]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {
            "candidates": expected, "error": "CheckpointNotLoadable"}
