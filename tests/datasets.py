"""Small prepared datasets whose samples name themselves, for loader tests (order, mixture, resumption)."""

import hashlib
import json
import os

import numpy as np

from qwen2_dist.data.prepare import COLUMNS, FORMAT_VERSION, SUMMARY_NAME
from qwen2_dist.data.streaming_compat import import_streaming


def make_dataset(path, num_samples: int, seq_len: int, first_id: int = 0, shard_bytes: int = 1 << 12,
                 val_samples: int = 0, digest: bool = True) -> str:
    """A dataset directory in qwen2-prepare's layout whose sample i starts with its id first_id + i (the val split
    continues the numbering) and counts up from there (id, id + 1, ...: a shift between inputs and targets shows);
    each sample is two documents, split in the middle. digest=False: a summary without the digest of each split's
    tokens, as qwen2-prepare wrote before 2026-12-08."""
    streaming = import_streaming()
    splits = {}
    next_id = first_id
    for split, count in (("train", num_samples), ("val", val_samples)):
        if not count:
            continue
        with streaming.MDSWriter(out=os.path.join(path, split), columns=COLUMNS, compression="zstd",
                                 size_limit=shard_bytes) as writer:
            tokens = hashlib.blake2b(digest_size=8)
            for i in range(count):
                sample = next_id + i + np.arange(seq_len + 1, dtype=np.int32)
                writer.write({"tokens": sample, "doc_starts": np.array([0, (seq_len + 1) // 2], dtype=np.int32)})
                tokens.update(sample.astype("<i4").tobytes())
        next_id += count
        splits[split] = {"documents": 2 * count, "samples": count, "tokens": count * (seq_len + 1),
                         "dropped_tail_tokens": 0, **({"digest": tokens.hexdigest()} if digest else {})}
    summary = {"format": FORMAT_VERSION, "splits": splits, "seq_len": seq_len, "sample_tokens": seq_len + 1,
               "columns": sorted(COLUMNS)}
    with open(os.path.join(path, SUMMARY_NAME), "w") as f:
        json.dump(summary, f)
    return str(path)


def sample_ids(batch) -> list[int]:
    """The self-naming ids of a micro-batch's samples."""
    return batch.inputs[:, 0].tolist()
