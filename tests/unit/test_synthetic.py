"""data.synthetic: random global batches that every layout splits alike, and that resume where they stopped."""

import pytest
import torch

from qwen2_dist.data.synthetic import SyntheticBatches
from qwen2_dist.errors import ResumeMismatch

V, SEQ, GLOBAL = 1000, 16, 8


def steps(batches: SyntheticBatches, n: int) -> list[torch.Tensor]:
    """Each optimizer step's micro-batches of one rank, joined: (rows of the rank, seq_len + 1)."""
    out = []
    for _ in range(n):
        parts = [batches.next_batch() for _ in range(batches.grad_accum_steps)]
        out.append(torch.cat([torch.cat([b.inputs, b.targets[:, -1:]], dim=1) for b in parts]))
    return out


def test_ranks_and_micro_batch_sizes_split_the_same_global_batches():
    one = steps(SyntheticBatches(V, SEQ, 4, GLOBAL, seed=3), 3)
    for mb, dp in ((1, 1), (2, 2), (1, 4)):
        ranks = [steps(SyntheticBatches(V, SEQ, mb, GLOBAL, rank, dp, seed=3), 3) for rank in range(dp)]
        for step in range(3):
            assert torch.equal(torch.cat([r[step] for r in ranks]), one[step])
    batch = SyntheticBatches(V, SEQ, 4, GLOBAL).next_batch()
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1]) and batch.positions is None
    assert not torch.equal(one[0], one[1])
    assert not torch.equal(one[0], steps(SyntheticBatches(V, SEQ, 4, GLOBAL, seed=4), 1)[0])


def test_resume_continues_and_refuses_other_data():
    straight = steps(SyntheticBatches(V, SEQ, 2, GLOBAL, seed=3), 5)
    first = SyntheticBatches(V, SEQ, 2, GLOBAL, seed=3)
    steps(first, 2)
    state = first.state_dict()
    resumed = SyntheticBatches(V, SEQ, 4, GLOBAL, seed=3)  # another micro-batch size: the same global batches
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(steps(resumed, 3), straight[2:]))
    with pytest.raises(ResumeMismatch, match="seed 3, this job's seed is 4"):
        SyntheticBatches(V, SEQ, 2, GLOBAL, seed=4).load_state_dict(state)
    with pytest.raises(ResumeMismatch, match="trained on a dataset"):
        SyntheticBatches(V, SEQ, 2, GLOBAL, seed=3).load_state_dict({"samples_seen": 16, "fingerprint": "x"})
