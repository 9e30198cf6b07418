"""data.synthetic: random global batches that every layout splits alike, and that resume where they stopped."""

import pytest
import torch

from qwen2_dist.config import BatchSchedule
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


def test_a_ramped_schedule_splits_alike_and_a_new_stage_goes_on_from_its_step():
    """Under train.batch_rampup (4 samples for steps 1-2, then 8), two ranks read together what one reads, each
    step its own size; data.new_stage from a checkpoint of other data at step 2 reads step 3's global batch."""
    schedule = BatchSchedule(GLOBAL, ((4, 2),))
    one = steps(SyntheticBatches(V, SEQ, 2, GLOBAL, seed=3, batch_schedule=schedule), 4)
    assert [len(rows) for rows in one] == [4, 4, 8, 8]
    ranks = [steps(SyntheticBatches(V, SEQ, 1, GLOBAL, rank, 2, seed=3, batch_schedule=schedule), 4)
             for rank in range(2)]
    assert all(torch.equal(torch.cat([r[step] for r in ranks]), one[step]) for step in range(4))
    stage = SyntheticBatches(V, SEQ, 2, GLOBAL, seed=3, batch_schedule=schedule)
    stage.start_stage(2)
    assert stage.data_change({"samples_seen": 16}) == "a dataset, not random tokens"
    assert all(torch.equal(a, b) for a, b in zip(steps(stage, 2), one[2:]))
