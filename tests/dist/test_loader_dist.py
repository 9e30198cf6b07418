"""Loader resumption across processes: 2 -> 2 and 2 -> 1 ranks read the global sequence of an uninterrupted run."""

import json
import os

from qwen2_dist.data.loader import TokenBatches
from tests.datasets import make_dataset, sample_ids
from tests.helpers import run_torchrun, shm_leftovers, train_overrides

STEPS, STOP_AT = 10, 4


def read_steps(batches: TokenBatches, steps: int) -> list[list[int]]:
    return [sum((sample_ids(batches.next_batch()) for _ in range(batches.grad_accum_steps)), [])
            for _ in range(steps)]


def test_resume_on_2_ranks_and_on_1_rank_continues_the_same_sequence(tmp_path):
    a = make_dataset(tmp_path / "a", 30, 8, first_id=0, shard_bytes=256)
    b = make_dataset(tmp_path / "b", 7, 8, first_id=1000)
    sources = [(a, 0.7), (b, 0.3)]
    out = tmp_path / "out"
    out.mkdir()
    result = run_torchrun(2, "tests.dist.loader_worker",
                          [str(out), ",".join(f"{p}={w}" for p, w in sources), str(STEPS), str(STOP_AT)])
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = []
    for r in range(2):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            ranks.append(json.load(f))

    def global_steps(key: str) -> list[list[int]]:  # rank 0's slice, then rank 1's, of every step
        return [ranks[0][key][i] + ranks[1][key][i] for i in range(len(ranks[0][key]))]

    one_rank = TokenBatches(sources, seq_len=8, micro_batch_size=2, global_batch_size=8, seed=3)
    prefixes = {p for rank in ranks for p in rank["prefixes"]} | {one_rank.dataset._shm_prefix_int}
    uninterrupted = read_steps(one_rank, STEPS)
    one_rank.close()
    assert global_steps("straight") == uninterrupted  # 2 ranks read what 1 rank reads
    assert global_steps("first") + global_steps("resumed") == uninterrupted  # 2 -> 2
    assert ranks[0]["state"] == ranks[1]["state"]

    resumed = TokenBatches(sources, seq_len=8, micro_batch_size=2, global_batch_size=8, seed=3)
    resumed.load_state_dict(ranks[0]["state"])
    prefixes.add(resumed.dataset._shm_prefix_int)
    tail = read_steps(resumed, STEPS - STOP_AT)
    resumed.close()
    assert global_steps("first") + tail == uninterrupted  # 2 -> 1
    # neither the two ranks nor this process left a segment behind
    assert [p for p in prefixes if shm_leftovers(p)] == []


def test_two_ranks_train_and_evaluate_like_one(tmp_path, corpus_cache):
    """qwen2-train on 2 ranks and on 1: the same samples per step give the same losses, and the same eval loss
    (eval.samples=5: 6 held-out samples read on 1 rank, 8 on 2, the same 5 counted). With data.eod_mask_loss, whose
    count of targets the ranks sum."""
    data = make_dataset(tmp_path / "data", 64, 32, shard_bytes=2000, val_samples=8)
    records = {}
    for nproc in (1, 2):
        run_dir = tmp_path / f"run{nproc}"
        args = train_overrides(run_dir, corpus_cache, **{
            "data.path": data, "train.steps": 2, "eval.interval": 2, "eval.samples": 5, "checkpoint.interval": 0,
            "checkpoint.save_final": "false", "data.eod_mask_loss": "true",
        })
        result = run_torchrun(nproc, "qwen2_dist.cli.train", args)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "on 5 held-out samples" in result.stdout + result.stderr
        with open(run_dir / "metrics.jsonl") as f:
            records[nproc] = [json.loads(line) for line in f]
    assert [r["step"] for r in records[2]] == [1, 2] and "eval_loss" in records[2][-1]
    for one, two in zip(records[1], records[2]):
        assert abs(one["loss"] - two["loss"]) < 1e-4
    assert abs(records[1][-1]["eval_loss"] - records[2][-1]["eval_loss"]) < 1e-4
