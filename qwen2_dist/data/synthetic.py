"""Random token ids in place of a dataset (data.synthetic=true): speed and memory of a layout without any data.

Row r of global batch k is drawn from (seed, k, r) alone and each data-parallel rank makes only its own rows,
micro-batch by micro-batch, as TokenBatches reads them; so every layout and micro-batch size of a job trains on the
same global batches (the parity tests rely on it), a rank's work does not grow with the number of ranks, and a resumed
run continues with the batches an uninterrupted one would have read.
"""

import torch

from qwen2_dist.config import BatchSchedule
from qwen2_dist.data.loader import Batch
from qwen2_dist.errors import ResumeMismatch


class SyntheticBatches:
    """What the Trainer reads from a TokenBatches, with uniformly random token ids."""

    def __init__(self, vocab_size: int, seq_len: int, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, batch_schedule: BatchSchedule | None = None):
        """batch_schedule: each step's global batch (train.batch_rampup); None: global_batch_size throughout."""
        self.schedule = batch_schedule or BatchSchedule(global_batch_size)
        assert all(size % (micro_batch_size * dp_size) == 0 for size in self.schedule.sizes()), \
            "validate() checks the batch split"
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seek(0)

    def _size_step(self) -> None:
        """The next step's global batch and micro-batches per rank."""
        self.global_batch_size = self.schedule.at(self.batches_read + 1)
        self.grad_accum_steps = self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def rows(self, index: int, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 of global batch `index`: (stop - start, seq_len + 1) token ids, the same on every rank."""
        out = torch.empty(stop - start, self.seq_len + 1, dtype=torch.int64)
        generator = torch.Generator()
        for i, row in enumerate(range(start, stop)):
            generator.manual_seed(((self.seed * 1_000_003 + index) * 1_000_033 + row) % 2**63)
            torch.randint(0, self.vocab_size, (self.seq_len + 1,), generator=generator, out=out[i])
        return out

    def global_batch(self, index: int) -> torch.Tensor:
        """Global batch `index` (of step index + 1): (its global batch size, seq_len + 1) token ids."""
        return self.rows(index, 0, self.schedule.at(index + 1))

    def next_batch(self) -> Batch:
        """This rank's next micro-batch: inputs and targets (micro_batch_size, seq_len) int64 on the CPU."""
        if not self._rows:
            per_rank = self.global_batch_size // self.dp_size
            mine = self.rows(self.batches_read, self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank)
            self._rows = list(mine.split(self.micro_batch_size))
            self.batches_read += 1
            self._size_step()
        tokens = self._rows.pop(0)
        return Batch(tokens[:, :-1], tokens[:, 1:], None)

    def state_dict(self) -> dict:
        assert not self._rows, "the position is saved between optimizer steps"
        return {"synthetic": True, "batches_read": self.batches_read, "seed": self.seed}

    def state_problem(self, state: dict) -> str | None:
        """Why a saved position cannot continue here (see TokenBatches.state_problem), or None."""
        if not state.get("synthetic"):
            return ("the checkpoint was trained on a dataset, this job reads random tokens (data.synthetic=true); "
                    "set data.synthetic=false, or data.new_stage=true to go on with random tokens, or start a new "
                    "run_dir")
        if state.get("seed") != self.seed:
            return (f"the checkpoint read random tokens of seed {state.get('seed')}, this job's seed is {self.seed}; "
                    "restore the seed, or set data.new_stage=true to go on with this seed's, or start a new run_dir")
        return None

    def load_state_dict(self, state: dict, steps_done: int = 0) -> None:
        """Continue after the saved global batch (steps_done: the trainer's step, which it equals)."""
        problem = self.state_problem(state)
        if problem:
            raise ResumeMismatch(problem)
        self.seek(state["batches_read"])

    def start_stage(self, steps_done: int) -> None:
        """data.new_stage: step steps_done + 1 reads global batch steps_done (random tokens have no first sample)."""
        self.seek(steps_done)

    def data_change(self, state: dict) -> str:
        """What a saved position that state_problem refuses was read from, in a few words."""
        if state.get("synthetic"):
            return f"random tokens of seed {state.get('seed')}"
        return "a dataset, not random tokens"

    def seek(self, batches_read: int) -> None:
        """Make global batch `batches_read` (that of step batches_read + 1) the next one."""
        self.batches_read, self._rows = batches_read, []
        self._size_step()

    def close(self) -> None:
        pass
