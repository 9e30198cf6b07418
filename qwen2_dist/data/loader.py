"""Token shards (MDS, local or remote) -> resumable (inputs, targets) micro-batches for one data-parallel rank."""

import logging
import os

import numpy as np
import torch
from torch.utils.data import DataLoader

from qwen2_dist.data.streaming_compat import import_streaming
from qwen2_dist.errors import UserError

log = logging.getLogger(__name__)


def _stack_tokens(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Collate MDS samples (read-only numpy arrays) into one int32 tensor without a per-sample copy warning."""
    return {"tokens": torch.from_numpy(np.stack([sample["tokens"] for sample in samples]))}


class TokenBatches:
    """Endless iterator over micro-batches that knows its position (epoch, samples consumed) for checkpoints.

    The position counts samples over all data-parallel ranks, so a resumed run skips exactly what was consumed.
    """

    def __init__(
        self,
        path: str,
        seq_len: int,
        micro_batch_size: int,
        dp_size: int,
        shuffle: bool,
        seed: int,
        cache_dir: str | None = None,
        num_workers: int = 0,
    ):
        streaming = import_streaming()
        remote = path if "://" in path else None
        local = path if remote is None else os.path.join(cache_dir or os.path.expanduser("~/.cache/qwen2_dist"),
                                                         "remote", remote.replace("://", "/").strip("/"))
        self.dataset = streaming.StreamingDataset(
            remote=remote,
            local=local,
            shuffle=shuffle,
            shuffle_seed=seed,
            batch_size=micro_batch_size,
            # Fixed so the sample order does not depend on the number of nodes running the job.
            num_canonical_nodes=1,
        )
        self.loader = DataLoader(
            self.dataset, batch_size=micro_batch_size, num_workers=num_workers, drop_last=True,
            collate_fn=_stack_tokens,
        )
        self.path = path
        self.seq_len = seq_len
        self.samples_per_batch = micro_batch_size * dp_size
        self.epoch = 0
        self.samples_in_epoch = 0
        self._iterator = None

    def state_dict(self) -> dict:
        """Position of the next sample, to be saved with a checkpoint."""
        return {"epoch": self.epoch, "samples_in_epoch": self.samples_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position: the next batch is the one an uninterrupted run would have seen."""
        self.epoch, self.samples_in_epoch = state["epoch"], state["samples_in_epoch"]
        resume = self.dataset.state_dict(self.samples_in_epoch, from_beginning=True)
        resume["epoch"] = self.epoch
        self.dataset.load_state_dict(resume)
        self._iterator = None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (micro_batch, seq_len) int64."""
        if self._iterator is None:
            self._iterator = iter(self.loader)
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch += 1
            self.samples_in_epoch = 0
            log.info("data: epoch %d starts", self.epoch)
            self._iterator = iter(self.loader)
            batch = next(self._iterator)
        tokens = batch["tokens"]
        if tokens.shape[1] != self.seq_len + 1:
            raise UserError(
                f"data.path={self.path}: samples hold {tokens.shape[1]} tokens but train.seq_len={self.seq_len} "
                f"needs {self.seq_len + 1}; set train.seq_len={tokens.shape[1] - 1} or re-run qwen2-prepare "
                f"with seq_len={self.seq_len}"
            )
        self.samples_in_epoch += self.samples_per_batch
        tokens = tokens.long()
        return tokens[:, :-1], tokens[:, 1:]

    def close(self) -> None:
        """Release the dataset's shared memory."""
        self._iterator = None
        self.loader = None
        self.dataset = None
