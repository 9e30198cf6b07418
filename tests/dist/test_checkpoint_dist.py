"""Checkpoints across processes: exact resume on 4 ranks, and resharding to other layouts on resume."""

import os
import shutil

import pytest

from tests.helpers import read_metrics, run_torchrun, step_losses, train_overrides

TRAIN = "qwen2_dist.cli.train"
# Global batch 8 divides every data-parallel size used here (4, 2, 1).
JOB = {"train.global_batch_size": 8, "train.micro_batch_size": 1, "train.steps": 6, "checkpoint.interval": 0}


@pytest.fixture(scope="module")
def straight_4(tmp_path_factory, corpus_cache):
    run_dir = tmp_path_factory.mktemp("straight4")
    result = run_torchrun(4, TRAIN, train_overrides(run_dir, corpus_cache, **JOB))
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


def test_one_rank_failing_mid_save_skips_that_checkpoint_on_every_rank(tmp_path, straight_4, corpus_cache):
    """Rank 1 writes its shard files of step 4's background save, then fails: no rank commits step 4, nothing of it
    is left, training goes on unchanged and later saves commit."""
    run_dir = tmp_path / "run"
    job = dict(JOB, **{"checkpoint.interval": 2, "checkpoint.async_save": "true"})
    result = run_torchrun(4, TRAIN, train_overrides(run_dir, corpus_cache, **job),
                          env={"QWEN2_INJECT_CKPT_FAIL_STEP": "4:1:write"})
    assert result.returncode == 0, result.stderr[-4000:]
    output = result.stdout + result.stderr
    assert "write failed: rank 1: OSError" in output and "after writing shards" in output
    assert "step_00000004 failed and was skipped" in output
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_00000002", "step_00000006"]
    assert step_losses(run_dir) == step_losses(straight_4)
