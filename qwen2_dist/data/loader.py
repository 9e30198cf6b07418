"""Prepared shards (local or remote, one source or several mixed by weight) -> resumable micro-batches.

The order of samples is ours, not streaming's: sample number g of the run (g = 0, 1, 2, ... counted over all ranks)
is a pure function of the seed, the sources and their weights (SampleOrder). Optimizer step t reads the positions
[t*G, (t+1)*G) for a global batch of G samples; data-parallel rank r takes the r-th contiguous slice of them and
cuts it into micro-batches. So the samples of a step depend on neither the number of ranks nor the micro-batch x
accumulation split, tensor-parallel peers (same data-parallel rank) read the same batches, and the position saved
with a checkpoint is one number. (mosaicml-streaming's own partition is not enough: its sample-to-step assignment
changes with the number of DataLoader workers and at epoch ends, and its mixing resamples whole epochs.)

StreamingDataset serves the samples by index (get_item), downloading and caching the shards of remote sources.
"""

import filecmp
import functools
import gc
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import uuid
import weakref
from collections import OrderedDict
from multiprocessing import resource_tracker
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from qwen2_dist.config import BatchSchedule
from qwen2_dist.data import hygiene
from qwen2_dist.data.prepare import FORMAT_VERSION, SUMMARY_NAME, TRAIN, read_summary
from qwen2_dist.data.streaming_compat import import_streaming, install_stand_ins
from qwen2_dist.errors import ResumeMismatch, UserError
from qwen2_dist.fsutil import reads_in_place
from qwen2_dist.model.loss import IGNORE_INDEX
from qwen2_dist.parallel.mesh import world_from_env

log = logging.getLogger(__name__)

# Now, not only in import_streaming(): a DataLoader worker started by spawn or forkserver unpickles its dataset
# (_IndexedSamples), importing this module by the class's name and then streaming by its classes' names -- without
# the stand-ins streaming's __init__ would import torchvision, and the worker die.
install_stand_ins()

# Global positions per mixing block: each block holds every source's exact quota, in a shuffled order.
MIX_BLOCK = 4096
_MIX_TAG, _SHARDS_TAG, _BLOCK_TAG = 1, 2, 3
DOWNLOAD_TIMEOUT = 120.0


class Batch(NamedTuple):
    """One micro-batch: inputs and targets (batch, seq_len) int64 (a target of loss.IGNORE_INDEX counts for nothing:
    data.eod_mask_loss); positions restart at each document start when document masking is on (else None)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor | None


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


class _SourceOrder:
    """The samples of one source in the order they are read: epoch after epoch, each a seeded permutation.

    A permutation shuffles the shards, then shuffles samples within consecutive blocks of block_size samples: random
    enough for training, and a rank reading remote data needs only the shards of the current block.
    """

    def __init__(self, samples_per_shard: list[int], seed: int, source: int, shuffle: bool, block_size: int):
        self.samples_per_shard = np.asarray(samples_per_shard, dtype=np.int64)
        self.shard_offsets = np.concatenate([[0], np.cumsum(self.samples_per_shard)[:-1]])
        self.num_samples = int(self.samples_per_shard.sum())
        self.seed, self.source, self.shuffle, self.block_size = seed, source, shuffle, block_size
        self._blocks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _block(self, epoch: int, block: int) -> np.ndarray:
        key = (epoch, block)
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return self._blocks[key]
        order = _rng(self.seed, _SHARDS_TAG, self.source, epoch).permutation(len(self.samples_per_shard))
        sizes = self.samples_per_shard[order]
        ends = np.cumsum(sizes)
        starts = ends - sizes
        lo, hi = block * self.block_size, min((block + 1) * self.block_size, self.num_samples)
        pieces = []
        for i in range(int(np.searchsorted(ends, lo, side="right")), len(order)):
            if starts[i] >= hi:
                break
            first = self.shard_offsets[order[i]]
            pieces.append(np.arange(first + max(lo - starts[i], 0), first + min(hi - starts[i], sizes[i])))
        ids = np.concatenate(pieces)
        _rng(self.seed, _BLOCK_TAG, self.source, epoch, block).shuffle(ids)
        self._blocks[key] = ids
        if len(self._blocks) > 4:
            self._blocks.popitem(last=False)
        return ids

    def sample_ids(self, k: np.ndarray) -> np.ndarray:
        """Source sample index of the source's k-th read sample (k counts over epochs)."""
        epoch, j = np.divmod(k, self.num_samples)
        if not self.shuffle:
            return j
        out = np.empty_like(j)
        block = j // self.block_size
        for e, b in sorted(set(zip(epoch.tolist(), block.tolist()))):
            mask = (epoch == e) & (block == b)
            out[mask] = self._block(e, b)[j[mask] - b * self.block_size]
        return out


def mixture_quotas(sources: list[tuple[str, float]]) -> np.ndarray:
    """Positions of each source (path, weight) in every block of MIX_BLOCK: largest-remainder shares of the weights.
    UserError naming data.sources[i].weight for a weight that is not positive or too small for any share, which
    would leave the source unread."""
    for path, weight in sources:
        if weight <= 0:
            raise UserError(f"data source {path}: weight {weight} must be positive")
    weights = np.asarray([weight for _, weight in sources], dtype=np.float64)
    with np.errstate(over="ignore"):
        total = float(weights.sum())
    if not math.isfinite(total):
        raise UserError(f"data.sources' weights {', '.join(f'{w:g}' for _, w in sources)} add up past the largest "
                        "float; only their ratios matter: scale them down (e.g. to fractions of 1)")
    exact = weights / total * MIX_BLOCK
    quotas = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - quotas), kind="stable")[: MIX_BLOCK - int(quotas.sum())]:
        quotas[i] += 1
    for i, (path, weight) in enumerate(sources):
        if quotas[i] == 0:
            # The weight whose share is a whole position per block, whatever the others' remainders; shown 1% above,
            # so that its 3 digits are not below it.
            least = (total - weight) / (MIX_BLOCK - 1) * 1.01
            raise UserError(
                f"data.sources[{i}].weight={weight} ({path}) is too small: sources are mixed in blocks of {MIX_BLOCK} "
                f"samples and its share of a block rounds to 0, so it would never be read; set it to at least "
                f"{least:.3g} (with the other weights as they are) or remove the source"
            )
    return quotas


class SampleOrder:
    """Global position -> (source, sample of that source): every block of MIX_BLOCK positions holds each source's
    exact quota (mixture_quotas) in a seeded order, each source in epochs."""

    def __init__(self, samples_per_shard: list[list[int]], quotas: np.ndarray, seed: int, shuffle: bool,
                 block_size: int):
        assert len(samples_per_shard) == len(quotas) > 0 and sum(quotas) == MIX_BLOCK and min(quotas) > 0
        self.sources = [_SourceOrder(s, seed, i, shuffle, block_size) for i, s in enumerate(samples_per_shard)]
        self.seed = seed
        self.quotas = np.asarray(quotas, dtype=np.int64)
        self._mix: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _mix_block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each position in the block, how many earlier positions of the block have that source)."""
        if block in self._mix:
            return self._mix[block]
        labels = np.repeat(np.arange(len(self.quotas)), self.quotas)
        _rng(self.seed, _MIX_TAG, block).shuffle(labels)
        ordinal = np.empty(MIX_BLOCK, dtype=np.int64)
        for source in range(len(self.quotas)):
            at = np.flatnonzero(labels == source)
            ordinal[at] = np.arange(len(at))
        self._mix[block] = labels, ordinal
        if len(self._mix) > 4:
            self._mix.popitem(last=False)
        return labels, ordinal

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source index, sample index within the source) of each global position."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(self.sources) == 1:
            return np.zeros_like(positions), self.sources[0].sample_ids(positions)
        source = np.empty_like(positions)
        k = np.empty_like(positions)
        block, offset = np.divmod(positions, MIX_BLOCK)
        for b in np.unique(block).tolist():
            mask = block == b
            labels, ordinal = self._mix_block(b)
            source[mask] = labels[offset[mask]]
            k[mask] = b * self.quotas[source[mask]] + ordinal[offset[mask]]
        samples = np.empty_like(positions)
        for s, order in enumerate(self.sources):
            mask = source == s
            if mask.any():
                samples[mask] = order.sample_ids(k[mask])
        return source, samples

    def epochs(self, position: int) -> list[int]:
        """The epoch each source is in at a global position."""
        block, offset = divmod(position, MIX_BLOCK)
        labels, _ = self._mix_block(block)
        counts = self.quotas * block + np.bincount(labels[:offset], minlength=len(self.sources))
        return [int(c // s.num_samples) for c, s in zip(counts, self.sources)]


def positions_from_starts(doc_starts: list[np.ndarray], seq_len: int) -> torch.Tensor:
    """(batch, seq_len) rotary positions that restart at 0 at every document start of each sample."""
    out = np.empty((len(doc_starts), seq_len), dtype=np.int64)
    index = np.arange(seq_len)
    for row, starts in enumerate(doc_starts):
        last_start = np.zeros(seq_len, dtype=np.int64)
        starts = starts[starts < seq_len]
        last_start[starts] = starts
        out[row] = index - np.maximum.accumulate(last_start)
    return torch.from_numpy(out)


def first_token_targets(doc_starts: list[np.ndarray], seq_len: int) -> torch.Tensor:
    """(batch, seq_len) True where the target is a document's first token (the token at index s of the sample, for
    a document start s >= 1, is target s - 1)."""
    out = np.zeros((len(doc_starts), seq_len), dtype=bool)
    for row, starts in enumerate(doc_starts):
        starts = np.asarray(starts, dtype=np.int64)
        out[row, starts[(starts >= 1) & (starts <= seq_len)] - 1] = True
    return torch.from_numpy(out)


def shards_spanned(samples_per_shard: list[int], window: int) -> int:
    """The most shards `window` consecutive samples can touch, whatever the order of the shards: the whole shards
    inside it (at most the smallest ones whose samples add up to no more than the window) and one partial shard at
    each end. Empty shards hold no sample and are not counted."""
    sizes = np.sort(np.asarray([c for c in samples_per_shard if c], dtype=np.int64))
    return int(np.searchsorted(np.cumsum(sizes), window, side="right")) + 2


def shards_read_together(samples_per_shard: list[int], global_batch_size: int, shuffle: bool, block_size: int,
                         steps: int = 2) -> int:
    """The most shards of one source that `steps` consecutive optimizer steps (steps x global_batch_size positions,
    at most as many samples of the source) can read from, which the cache must hold at once: those of as many
    consecutive samples without shuffling (shards_spanned). Shuffled, a step draws from the whole of every block it
    overlaps: W positions of an epoch, from blocks of at most W + 2 x (block_size - 1) consecutive samples of its
    shard order. Across an epoch's end, from the end of one epoch's shard order and the start of the next one's: the
    shards wholly inside either part (counted once) hold no more samples than that, and each part has a partial shard
    at one end only, so the bound is the same."""
    counts = [c for c in samples_per_shard if c]
    window = steps * global_batch_size + (2 * (block_size - 1) if shuffle else 0)
    return min(len(counts), shards_spanned(counts, window))


# Micro-batches each DataLoader worker reads ahead (torch's prefetch_factor, its default).
PREFETCH_FACTOR = 2


def samples_read_together(schedule: BatchSchedule, per_micro_step: int, num_workers: int) -> tuple[int, int, int]:
    """The most consecutive positions that a node's ranks can read from at once anywhere in the run, with how many
    optimizer steps they span and the first of them: the step being read and, as a margin, the next (the ranks read
    a step's micro-batches before computing it and meet at the step's end, the trainer's agree_any, so they read the
    same step), and with DataLoader workers the steps that the micro-batches they read ahead (PREFETCH_FACTOR per
    worker) reach. With one global batch B of A micro-batches per rank: 2 + ceil(PREFETCH_FACTOR x workers / A)
    steps of B samples; under train.batch_rampup, the widest such stretch of steps of its sizes. per_micro_step: the
    samples of one micro-batch of every data-parallel rank."""
    ahead = PREFETCH_FACTOR * num_workers
    # The window is the same all through a stage but for those reaching into the next stage: they start at most
    # 2 + ahead steps (of one micro-batch at least each) before it.
    starts = {1} | {last + 1 for _, last in schedule.stages}
    widest = (0, 0, -1)
    for first in sorted({step for start in starts for step in range(max(1, start - 2 - ahead), start + 1)}):
        samples, steps, read_ahead = schedule.at(first) + schedule.at(first + 1), 2, 0
        while read_ahead < ahead:
            size = schedule.at(first + steps)
            samples, steps, read_ahead = samples + size, steps + 1, read_ahead + size // per_micro_step
        widest = max(widest, (samples, steps, -first))  # the earliest of equal ones
    return widest[0], widest[1], -widest[2]


# A shuffle block should hold the samples of this many shards at least: a smaller one mixes the samples of one or
# two shards (neighbouring stretches of the prepared text) and steps see little of the rest of the data for a while.
SHUFFLE_SHARDS = 10


def acting_block_size(shuffle: bool, block_size: int, samples: list[int]) -> int | None:
    """The shuffle block size as it acts on sources of `samples` samples each (the data order depends on it, not on
    the size configured): None without shuffling; at most the largest source's samples, as a block that holds all
    of a source's samples shuffles each epoch of it whole, whatever its size."""
    return min(block_size, max(samples)) if shuffle else None


def narrow_shuffle(samples_per_shard: list[int], block_size: int) -> int | None:
    """The block size a source's shuffle needs (SHUFFLE_SHARDS shards' samples, or all of them when it has fewer)
    when block_size is below it; None when it is not."""
    counts = [c for c in samples_per_shard if c]
    if not counts:
        return None
    need = min(sum(counts), SHUFFLE_SHARDS * -(-sum(counts) // len(counts)))
    return need if block_size < need else None


def _human_bytes(n: int) -> str:
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def _cache_path(cache_dir: str, run_key: str, url: str) -> str:
    """A local cache directory for one remote source of one run on this node (a run never shares it with another
    run, nor a node with another node: streaming decompresses shards under one temporary name and evicts by its own
    node's reads, so two nodes in one directory, as under a default cache_dir in a shared home, would spoil each
    other's files): the host name, then the URL made safe for a file name and a hash of the whole URL, since
    s3://b/web/v1 and s3://b/web_v1 read the same."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", url.replace("://", "/")).strip("_")
    digest = hashlib.sha256(url.encode()).hexdigest()[:8]
    host = re.sub(r"[^A-Za-z0-9._-]+", "_", socket.gethostname()) or "host"
    return os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), "remote", run_key, host, f"{safe}-{digest}")


def _warn_other_hosts(run_cache: str, host: str) -> None:
    """A WARNING when a run's cache directory (remote/RUN_KEY of _cache_path) holds the copies of more other hosts
    than this job has other nodes: each node caches the run's data on its own, so a job requeued onto other nodes
    fetches it all again, and what the hosts it left cached stays, read by no job. Lists the directory only."""
    try:
        others = sorted(name for name in os.listdir(run_cache)
                        if name != host and os.path.isdir(os.path.join(run_cache, name)))
    except OSError:
        return
    nodes = max(1, int(os.environ.get("WORLD_SIZE", 1)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if len(others) < nodes:  # all may be this job's other nodes, reading theirs now
        return
    log.warning("data: %s holds this run's cached data for %d other host(s) (%s), more than this job's %d other "
                "node(s): each node keeps a copy of its own, and a job requeued onto other nodes leaves the copies "
                "of the nodes it ran on before; remove each such copy (rm -r %s/HOST) once no job on its host reads "
                "it", run_cache, len(others), ", ".join(others[:5]) + (", ..." if len(others) > 5 else ""),
                nodes - 1, run_cache)


# The remote caches whose summary this process has compared with the remote one: once per process is enough.
_compared_caches: set[str] = set()


def _source_summary(path: str, local: str | None) -> dict:
    """The prepare_summary.json of a source, downloaded into its cache when the source is remote. A cache that holds
    one already is checked against the remote's, once per process (_check_same_version)."""
    if local is None:
        return read_summary(path)
    target = os.path.join(local, SUMMARY_NAME)
    if local in _compared_caches and os.path.exists(target):
        return read_summary(local)
    import_streaming()  # first: the submodule's import runs the package's __init__
    from streaming.base.storage.download import CloudDownloader

    os.makedirs(local, exist_ok=True)
    tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        try:
            CloudDownloader.direct_download(f"{path.rstrip('/')}/{SUMMARY_NAME}", tmp, DOWNLOAD_TIMEOUT)
        except Exception as e:  # each storage client raises its own types; all mean "cannot fetch it"
            if not os.path.exists(target):
                raise UserError(f"data source {path}: cannot download {SUMMARY_NAME} ({e}); check the URL and "
                                "the credentials, and that the dataset was written by qwen2-prepare") from None
            log.warning("data source %s: cannot download %s to compare it with the copy cached in %s (%s); "
                        "reading on with the cached copy", path, SUMMARY_NAME, local, e)
        else:
            if os.path.exists(target):
                _check_same_version(path, local, read_summary(local), _read_json(tmp))
            else:
                os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _compared_caches.add(local)
    return read_summary(local)


def _read_json(path: str):
    """A JSON file's value, or None when it is not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError:
        return None


def _check_same_version(url: str, local: str, cached, remote) -> None:
    """UserError naming the fixes when a source's prepare summary (remote, or read-only local: _check_local_copy)
    is not the one its cache was filled from: the dataset was prepared again at the same place, and the shards and
    index cached would mix the two versions."""
    if cached == remote:
        return
    if not isinstance(cached, dict):
        changed = ["the cached copy is not JSON"]
    elif isinstance(remote, dict):
        changed = [f"{key} {cached.get(key)} -> {remote.get(key)}" for key in ("documents", "tokens", "samples",
                   "seq_len", "tokenizer") if cached.get(key) != remote.get(key)]
        old_splits, new_splits = (summary.get("splits") if isinstance(summary.get("splits"), dict) else {}
                                  for summary in (cached, remote))
        for split in sorted({*old_splits, *new_splits}):
            old, new = (splits.get(split) if isinstance(splits.get(split), dict) else {}
                        for splits in (old_splits, new_splits))
            if old != new:  # its first count that differs; the digest (of its tokens) where the counts agree
                key = next((k for k in ("samples", "documents", "tokens", "dropped_tail_tokens", "digest")
                            if old.get(k) != new.get(k)), "samples")
                empty = None if key == "digest" else 0
                changed.append(f"{split} {key} {old.get(key, empty)} -> {new.get(key, empty)}")
        changed += [key for key in ("inputs", "skipped", "max_token_id", "val_fraction", "format")
                    if cached.get(key) != remote.get(key)]
    else:
        changed = ["the source's copy is not JSON"]
    raise _other_version(url, local, SUMMARY_NAME, changed)


def _other_version(source: str, local: str, name: str, changed: list[str]) -> UserError:
    """The refusal to read a source through a cache filled from another version of it (file `name` differs)."""
    return UserError(
        f"data source {source} was prepared again since this run cached it in {local}: its {name} differs ("
        f"{'; '.join(changed) or 'other fields'}), and the shards cached there are of the old version, so the "
        f"samples read would mix the two. To go on with the old version, put it back at {source}. To train on the "
        f"new one, delete {local} (a resumed run's data order is then checked against the new data), or start a new "
        "run_dir with model.init_from_checkpoint set to this run's latest checkpoint"
    )


def _check_local_copy(source: str, local: str, split: str) -> None:
    """UserError naming the fixes (_other_version) when the run's copy of a read-only local source (_locations)
    was taken from another version of it: its prepare summary or the split's index.json (which streaming copies
    once, and reads thereafter) is not the source's. Both are small local files, compared at every start; the
    index tells apart versions whose summaries agree (the same counts of other text). The first start records the
    summary."""
    os.makedirs(local, exist_ok=True)
    cached = os.path.join(local, SUMMARY_NAME)
    if os.path.exists(cached):
        _check_same_version(source, local, _read_json(cached), _read_json(os.path.join(source, SUMMARY_NAME)))
    else:
        tmp = f"{cached}.tmp-{uuid.uuid4().hex[:8]}"  # the node's ranks start together: each renames a whole copy
        shutil.copyfile(os.path.join(source, SUMMARY_NAME), tmp)
        os.replace(tmp, cached)
    index = os.path.join(split, "index.json")
    ours, theirs = os.path.join(local, index), os.path.join(source, index)
    if os.path.exists(ours) and not filecmp.cmp(ours, theirs, shallow=False):
        counts = []
        for path in (ours, theirs):
            shards = _read_json(path) if os.path.exists(path) else None
            shards = shards.get("shards") if isinstance(shards, dict) else None
            counts.append(f"{len(shards)} shards of {sum(s.get('samples', 0) for s in shards)} samples"
                          if isinstance(shards, list) and all(isinstance(s, dict) for s in shards) else "unreadable")
        raise _other_version(source, local, index, [f"{counts[0]} -> {counts[1]}" if counts[0] != counts[1]
                                                    else "as many shards and samples, of other sizes"])


def run_cache_key(run_dir: str) -> str:
    """The key of a run's own cache of remote sources (_cache_path): a hash of its run_dir."""
    return hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:12]


def source_summary(path: str, cache_dir: str | None = None, run_key: str = "default") -> dict:
    """The prepare summary of a source: a local directory's own, a remote URL's downloaded into the run's cache."""
    remote = "://" in path
    if remote and cache_dir is None:
        raise UserError(f"data source {path} is remote; set data.cache_dir to a local directory for its cache")
    return _source_summary(os.path.expanduser(path) if not remote else path,
                           _cache_path(cache_dir, run_key, path) if remote else None)


def check_seq_len(path: str, sample_tokens: int, seq_len: int) -> None:
    """UserError naming the source and the fix unless its samples (sample_tokens, from its summary) fit seq_len."""
    if sample_tokens != seq_len + 1:
        raise UserError(f"data source {path}: samples hold {sample_tokens} tokens but train.seq_len={seq_len} needs "
                        f"{seq_len + 1}; set train.seq_len={sample_tokens - 1} or rerun qwen2-prepare with "
                        f"seq_len={seq_len}")


def check_vocab(sources: list[str], vocab_size: int) -> None:
    """check_summaries_vocab of the local sources among `sources` (validate(), before anything is downloaded; the
    loader checks remote ones once it has their summaries)."""
    check_summaries_vocab([(path, source_summary(path)) for path in sources if "://" not in path], vocab_size)


def check_summaries_vocab(summaries: list[tuple[str, dict]], vocab_size: int) -> None:
    """Refuse sources (path, prepare summary) prepared by different tokenizers, or holding token ids of vocab_size or
    more (UserError naming the source and the fix). Tokenizers are told apart by vocabulary size, as one tokenizer
    goes by several names (tokenizer=qwen2, or a directory holding a copy of it). Datasets whose summary predates
    the tokenizer's vocab_size are not checked."""
    first = None  # (path, tokenizer name, vocab size) of the first source checked
    for path, summary in summaries:
        name, size, largest = summary.get("tokenizer"), summary.get("vocab_size"), summary.get("max_token_id")
        if size is None:
            continue
        if first is None:
            first = (path, name, size)
        elif size != first[2]:
            raise UserError(
                f"data sources {first[0]} (tokenizer {first[1]}, {first[2]} tokens) and {path} (tokenizer {name}, "
                f"{size} tokens) were prepared by different tokenizers, so one token id means different text in each; "
                "re-prepare them with the model's tokenizer"
            )
        if largest is None:  # the tokenizer's vocabulary bounds the ids
            reach, needed = f"ids of tokenizer {name} ({size} tokens)", size
        else:
            reach, needed = f"token ids up to {largest}", largest + 1
        if needed > vocab_size:
            raise UserError(
                f"data source {path} holds {reach}, beyond model.vocab_size={vocab_size}; set model.vocab_size >= "
                f"{needed} or re-prepare the source with the model's tokenizer"
            )


def _check_split_index(path: str, split: str) -> None:
    """UserError naming the file and the fix when a local source's split has no readable index.json (a copy cut
    short, a split directory deleted): streaming's own errors said neither, and exited 1, so torchrun's restarts
    met it again (a missing split directory was also taken for a read-only one)."""
    index = os.path.join(path, split, "index.json")
    problem = None
    try:
        with open(index) as f:
            shards = json.load(f).get("shards")
        if not isinstance(shards, list):
            problem = "holds no list of shards"
    except FileNotFoundError:
        problem = "is missing" if os.path.isdir(os.path.join(path, split)) else f"is missing (no {split}/ directory)"
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror or exc})"
    except (ValueError, AttributeError):  # not JSON, or JSON that is not an object
        problem = "is not the JSON index streaming writes"
    if problem:
        raise UserError(f"data source {path}: {index} {problem}, though its {SUMMARY_NAME} names a {split} split; "
                        f"{_DAMAGED_FIX}")


_DAMAGED_FIX = ("the copy of the dataset is damaged or incomplete: copy it again from its source, or prepare it again "
                "with qwen2-prepare")


def _decompressed(path: str, compression: str, size: int, raw_size: int) -> bytes:
    """A compressed shard's contents; UserError naming the shard when the file is not what its index.json says (a
    copy cut short, a damaged disk): every later start would stop at the same step again."""
    from streaming.base.compression import decompress

    fix = _DAMAGED_FIX
    try:
        with open(path, "rb") as f:
            zipped = f.read()
    except OSError as exc:
        raise UserError(f"data shard {path}: cannot be read ({exc.strerror or exc}); {fix}") from None
    if len(zipped) != size:
        raise UserError(f"data shard {path}: {len(zipped):,} bytes, where the dataset's index.json says {size:,}; "
                        f"{fix}")
    try:
        data = decompress(compression, zipped)
    except Exception as exc:  # each codec raises its own kind
        raise UserError(f"data shard {path}: does not decompress as {compression} ({type(exc).__name__}: "
                        f"{str(exc).strip()[:200]}); {fix}") from None
    if len(data) != raw_size:
        raise UserError(f"data shard {path}: decompresses to {len(data):,} bytes, where the dataset's index.json "
                        f"says {raw_size:,}; {fix}")
    return data


def _damaged_shard(dataset, sample_id: int, exc: Exception) -> UserError | None:
    """The UserError naming the shard, its cached copy and the fix when reading a sample of a source read through
    the cache (remote, or a read-only local directory) failed as damaged data does: a missing shard, or one that its
    codec refuses (streaming's error named neither); None for any other failure (a network error, which a restart
    may get past)."""
    if isinstance(exc, UserError):
        return None
    codec = type(exc).__module__.split(".")[0] in ("zstd", "zstandard", "brotli", "snappy", "gzip", "zlib", "bz2")
    if not (codec or isinstance(exc, FileNotFoundError) or "decompress" in str(exc).lower()):
        return None
    shard_id, _ = dataset.spanner[sample_id]
    stream = dataset.streams[dataset.stream_per_shard[shard_id]]
    if stream.remote is None:
        return None  # read in place: _ensure_raw checked its shards
    names = [(zip_info or raw_info).basename for raw_info, zip_info in dataset.shards[shard_id].file_pairs]
    source = "/".join((stream.remote.rstrip("/"), stream.split, names[0]))
    cached = os.path.join(stream.local, stream.split)
    return UserError(f"data shard {source} (cached in {cached}) cannot be read ({type(exc).__name__}: "
                     f"{str(exc).strip()[:200]}): the source's shard is damaged or missing, or its cached copy is; "
                     f"delete {cached} (the run fetches it again), and if that fails, copy the dataset again from its "
                     "origin or prepare it again with qwen2-prepare")


class _IndexedSamples(Dataset):
    """Samples of a StreamingDataset by global index (a map-style dataset for torch's DataLoader)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self._ready: set[int] = set()

    def __len__(self) -> int:
        return self.dataset.num_samples

    def __setstate__(self, state: dict) -> None:
        """Unpickled in a DataLoader worker started by spawn or forkserver: the dataset's shared-memory segments were
        attached again by name, which registers them with Python's resource tracker -- that of the training
        process, which would unlink them by name when it ends, maybe from a later run reusing the prefix (as
        _untrack says). The owner records decide instead; a forked worker attaches nothing."""
        self.__dict__.update(state)
        from streaming.base.shared.memory import SharedMemory

        for memory in _shared_memories(vars(self.dataset).values(), SharedMemory):
            # Once per name: the tracker holds a set of names, and a second unregister would print its KeyError.
            for name in {s._name for s in (memory.shm, *memory.created_shms, *memory.opened_shms)}:
                resource_tracker.unregister(name, "shared_memory")

    def _ensure_raw(self, sample_id: int) -> None:
        """Decompress a shard of a local source (read in place) under a private temporary name, then rename it.

        StreamingDataset would write the raw shard to one fixed `.tmp` name, which two runs reading the same
        local dataset could interleave; a rename of a complete private file cannot be seen half-written. (Remote
        sources are downloaded into a cache private to the run, where streaming's own locking suffices.)
        """
        shard_id, _ = self.dataset.spanner[sample_id]
        if shard_id in self._ready:
            return
        shard = self.dataset.shards[shard_id]
        stream = self.dataset.streams[self.dataset.stream_per_shard[shard_id]]
        for raw_info, zip_info in shard.file_pairs if stream.remote is None else []:
            raw = os.path.join(stream.local, stream.split, raw_info.basename)
            size = os.path.getsize(raw) if os.path.exists(raw) else None
            if size == raw_info.bytes:
                continue
            if zip_info is None:  # stored uncompressed: nothing to make it from
                raise UserError(f"data shard {raw}: " + ("missing" if size is None else f"{size:,} bytes, where the "
                                f"dataset's index.json says {raw_info.bytes:,}") + f"; {_DAMAGED_FIX}")
            if size is not None:  # cut short in a copy of a dataset already read (raw shards are derived data)
                log.warning("data shard %s: %s bytes, where the dataset's index.json says %s; decompressing it again "
                            "from %s", raw, f"{size:,}", f"{raw_info.bytes:,}", zip_info.basename)
            data = _decompressed(os.path.join(stream.local, stream.split, zip_info.basename), shard.compression,
                                 zip_info.bytes, raw_info.bytes)
            tmp = f"{raw}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, raw)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        self._ready.add(shard_id)

    def __getitem__(self, sample_id: int) -> dict:
        self._ensure_raw(sample_id)
        try:
            return self.dataset.get_item(sample_id)
        except Exception as exc:
            damage = _damaged_shard(self.dataset, sample_id, exc)
            if damage is None:
                raise
            raise damage from exc


class _RankSampler:
    """Endless global-index micro-batches of one data-parallel rank, from a global position on."""

    def __init__(self, batches: "TokenBatches", start: int, step: int):
        """start: the global position of optimizer step `step`'s first sample."""
        self.batches, self.start, self.step = batches, start, step

    def __iter__(self):
        b = self.batches
        step_start, step = self.start, self.step
        while True:
            batch = b.schedule.at(step)
            for micro in range(batch // (b.micro_batch_size * b.dp_size)):
                yield b.global_ids(step_start + b.rows_in_step(micro, batch)).tolist()
            step_start += batch
            step += 1


def _fingerprint(key: dict) -> str:
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def content_identity(summary: dict, split: str) -> dict:
    """What tells a source's split from other data of the same shards and samples, from its prepare_summary.json:
    the number of its documents and, for data prepared since 2026-12-08, a digest of its tokens. Unlike a path, it
    stays when the data moves."""
    counts = summary.get("splits", {}).get(split, {})
    return {key: counts[key] for key in ("documents", "digest") if key in counts}


def order_changes(saved: dict | None, now: dict) -> str:
    """What differs between a checkpoint's order summary and this loader's, as 'seed 3 -> 4; source 0 (PATH):
    samples 240 -> 480', or '' when the summaries agree (a checkpoint of an older release has none; or the shards
    and samples add up the same but are split differently)."""
    if not isinstance(saved, dict) or not saved:
        return ""
    changes = [f"{key} {saved.get(key)} -> {now[key]}" for key in ("seed", "shuffle", "shuffle_block_size", "split")
               if saved.get(key) != now[key] and (key != "shuffle_block_size" or _block_changes_order(saved, now))]
    if "seq_len" in saved and "seq_len" in now and saved["seq_len"] != now["seq_len"]:
        changes.append(f"train.seq_len {saved['seq_len']} -> {now['seq_len']}")
    before, after = saved.get("sources"), now["sources"]
    before = before if isinstance(before, list) else []
    if len(before) != len(after):
        changes.append(f"{len(before)} source(s) -> {len(after)}")
    for index, (old, new) in enumerate(zip(before, after)):
        old = old if isinstance(old, dict) else {}
        for key in ("weight", "shards", "samples", "documents", "digest"):
            if key == "weight" and "quota" in old and old.get("quota") == new.get("quota"):
                continue  # another weight, the same share of every block (the weights scaled by one factor)
            if key in ("documents", "digest") and key not in old:
                continue  # a checkpoint of an older release, or data prepared before the digest
            if key in new and old.get(key) != new[key]:  # a summary without shard counts (check_saved) skips them
                changes.append(f"source {index} ({new['path']}): {key} {old.get(key)} -> {new[key]}")
    return "; ".join(changes)


def _block_changes_order(saved: dict, now: dict) -> bool:
    """Whether another shuffle_block_size between order summaries changes the order of this job's data: not without
    shuffling (or where shuffle changed, named itself), nor between sizes that act the same on its sources."""
    if not (saved.get("shuffle") is True and now["shuffle"] is True):
        return False  # no blocks, or another shuffle, named itself
    samples = [source.get("samples") for source in now["sources"] if isinstance(source, dict)]
    blocks = (saved.get("shuffle_block_size"), now["shuffle_block_size"])
    if not samples or not all(isinstance(n, int) and n > 0 for n in samples + list(blocks)):
        return True  # cannot tell: as configured
    return len({acting_block_size(True, block, samples) for block in blocks}) > 1


# The fix a refusal to resume on other data names, besides restoring the data config: new data (another mixture,
# a longer context) is a new stage, which starts from the weights.
NEW_DATA_FIX = ("or, to train on the new data, set data.new_stage=true (this checkpoint's weights, optimizer, step "
                "and schedule continued on the new data from its first sample), or start a new run_dir with "
                "model.init_from_checkpoint set to this checkpoint (its weights; a fresh optimizer, schedule and "
                "data order)")


def order_mismatch(saved: dict | None, now: dict) -> str:
    """The refusal to resume a data position saved with order summary `saved` on a loader with `now`."""
    changed = order_changes(saved, now)
    return ("the checkpoint was trained on other data or another data order ("
            + (f"changed since: {changed}" if changed else "sources, their shards, weights, seed or shuffle")
            + f"), so the samples after it are undefined; restore the data config it was trained with, {NEW_DATA_FIX}")


class TokenBatches:
    """Endless, resumable micro-batches of one data-parallel rank over one split of one or more sources.

    next_batch() is called grad_accum_steps times per optimizer step; state_dict() (between steps) is the number
    of samples consumed by all ranks together, plus a fingerprint of the data and order it counts in. With a
    batch_schedule (train.batch_rampup), global_batch_size, samples_per_rank and grad_accum_steps are those of the
    next step; the samples are read in the same order whatever the steps' sizes.
    """

    def __init__(
        self,
        sources: list[tuple[str, float]],
        *,
        seq_len: int,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_block_size: int = 1 << 18,
        document_masking: bool = False,
        eod_mask_loss: bool = False,
        split: str = TRAIN,
        cache_dir: str | None = None,
        run_key: str = "default",
        num_workers: int = 0,
        cache_limit: int | None = None,
        vocab_size: int | None = None,
        batch_schedule: BatchSchedule | None = None,
        evaluation: bool = False,
    ):
        """vocab_size: the model's; token ids of the sources must lie below it (check_summaries_vocab).
        eod_mask_loss: the target that is a document's first token is IGNORE_INDEX. batch_schedule: each step's
        global batch (train.batch_rampup); None: global_batch_size for every step. evaluation: read for evaluation
        only (eval.datasets' train split): none of the training data's log lines (epochs, caching, shuffle)."""
        self.schedule = batch_schedule or BatchSchedule(global_batch_size)
        assert self.schedule.final == global_batch_size, "the schedule ends with the job's global batch"
        for size in self.schedule.sizes():
            if size % (micro_batch_size * dp_size):
                raise UserError(
                    f"global batch {size} (train.global_batch_size, or a stage of train.batch_rampup) is not "
                    f"divisible by micro-batch {micro_batch_size} x data-parallel size {dp_size}: make it a multiple "
                    f"of {micro_batch_size * dp_size}"
                )
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.steps_read = 0  # optimizer steps whose samples were read: the next one is steps_read + 1
        self._size_step()
        self.document_masking = document_masking
        self.eod_mask_loss = eod_mask_loss
        self.split = split
        training = split == TRAIN and not evaluation  # the training data's log lines
        self._training = training
        self.num_workers = num_workers
        self.paths = [path for path, _ in sources]
        quotas = mixture_quotas(sources)
        if len(sources) > 1 and training:
            total = sum(weight for _, weight in sources)
            log.info("data: mixing %d sources, samples per block of %d: %s", len(sources), MIX_BLOCK, ", ".join(
                f"{path} {quota} (share {quota / MIX_BLOCK:.4g} for weight share {weight / total:.4g})"
                for (path, weight), quota in zip(sources, quotas)))

        streaming = import_streaming()
        from streaming.base.shared.memory import SharedMemory

        streams, summaries, run_caches = [], [], set()
        for path, _ in sources:
            if "://" in path and cache_dir is None:
                raise UserError(f"data source {path} is remote; set data.cache_dir to a local directory for its cache")
            cache = _cache_path(cache_dir, run_key, path) if cache_dir is not None else None
            summaries.append((path, _source_summary(path, cache if "://" in path else None)))
            self._check_summary(*summaries[-1])
            if "://" not in path:
                _check_split_index(os.path.abspath(os.path.expanduser(path)), split)
            remote, local = self._locations(path, cache)
            if remote is not None and "://" not in remote:
                _check_local_copy(remote, local, split)
            if cache_limit and remote is None:
                raise UserError(f"data.cache_limit is set, but data source {path} is a local directory read in "
                                "place: to stay under the limit streaming would delete its shards. Unset "
                                "data.cache_limit, or read the source from its remote URL")
            if remote is not None:
                run_caches.add(os.path.split(os.path.dirname(local)))  # (remote/RUN_KEY, this host)
            if remote is not None and training:
                log.info("data: %s is cached in %s (%s; kept after the run, for a resume)", path, local,
                         f"at most {_human_bytes(cache_limit)} of it" if cache_limit else "whole")
            streams.append(streaming.Stream(remote=remote, local=local, split=split))
        if vocab_size is not None:  # remote sources are checked here first, their summaries downloaded
            check_summaries_vocab(summaries, vocab_size)
        leader = world_from_env()[1] == 0
        for run_cache, host in sorted(run_caches) if leader and training else []:
            _warn_other_hosts(run_cache, host)
        with hygiene.prefix_lock(leader):
            # Under the lock, so no other run is choosing a prefix while dead runs' segments are removed; by the
            # local leader only (the other ranks would repeat the same work).
            if leader:
                hygiene.clean_stale(tempfile.gettempdir())
            # streaming picks the shared-memory prefix on every rank separately, from what exists in /dev/shm: the
            # ranks must look only after the cleaning and the closing of earlier datasets, or they disagree -- and
            # only when no other run on this machine is picking one (prefix_lock).
            if dist.is_initialized():
                dist.barrier()
            # Only get_item is used: StreamingDataset's own iteration (shuffle, predownload) never runs.
            self.dataset = streaming.StreamingDataset(streams=streams, batch_size=micro_batch_size, shuffle=False,
                                                      predownload=micro_batch_size)
            self._lock_dir = os.path.dirname(self.dataset._cache_filelock_path)
            record = hygiene.register(self.dataset._shm_prefix_int, self._lock_dir)
        # Also at exit (an exception anywhere in the job): drop the owner record, and the segments when last out.
        self._release = weakref.finalize(self, hygiene.release, self.dataset._shm_prefix_int, record, self._lock_dir)
        self._shared_memory = _shared_memories(vars(self.dataset).values(), SharedMemory)
        self._created = _untrack(self._shared_memory)
        self.samples = _IndexedSamples(self.dataset)
        shard_counts = [
            [int(n) for n in self.dataset.samples_per_shard[first : first + count]]
            for first, count in zip(self.dataset.shard_offset_per_stream, self.dataset.shards_per_stream)
        ]
        self._stream_offsets = np.asarray(self.dataset.sample_offset_per_stream, dtype=np.int64)
        if cache_limit:
            self._limit_cache(cache_limit, shard_counts, shuffle, shuffle_block_size)
        if shuffle and training and dp_rank == 0:
            for path, counts in zip(self.paths, shard_counts):
                need = narrow_shuffle(counts, shuffle_block_size)
                if need:
                    shards = sum(1 for c in counts if c)
                    log.warning("data: data.shuffle_block_size=%d holds fewer samples than %d of the %d shards of %s "
                                "(%.3g samples each on average): each stretch of the run reads few shards, so its "
                                "batches mix little of the data; use data.shuffle_block_size >= %d",
                                shuffle_block_size, min(SHUFFLE_SHARDS, shards), shards, path, sum(counts) / shards,
                                need)
        self.order = SampleOrder(shard_counts, quotas, seed, shuffle, shuffle_block_size)
        # The order is a function of the sources' quotas, not of their weights: weights scaled by one factor (0.7
        # and 0.3 as 70 and 30) give the same order and the same fingerprint. Likewise the shuffle block counts as it
        # acts (acting_block_size), not as configured.
        self._order_parts = (shard_counts, quotas.tolist(), [w for _, w in sources], seed, shuffle, split)
        self._acting_block = acting_block_size(shuffle, shuffle_block_size, [sum(c) for c in shard_counts])
        self.fingerprint = self._fingerprint(self._acting_block)
        # What the fingerprint covers, in a few numbers, saved beside it: a mismatch on resume can then say what
        # changed. The paths are for the message only: data that moved is the same data.
        # Not in the fingerprint, but compared on resume all the same (order_changes): seq_len (the samples are in
        # it, and named when they changed with it) and what tells the sources' data from other data of the same
        # counts (content_identity).
        self.order_summary = {
            "seed": seed, "shuffle": shuffle, "shuffle_block_size": shuffle_block_size, "split": split,
            "seq_len": seq_len,
            "sources": [{"path": path, "weight": weight, "quota": int(quota), "shards": len(counts),
                         "samples": sum(counts), **content_identity(summary, split)}
                        for (path, weight), quota, counts, (_, summary) in zip(sources, quotas, shard_counts,
                                                                                 summaries)],
        }
        self.position = 0
        self.micro_index = 0
        self._epochs = self.order.epochs(0)
        self._iterator = None
        self._loader = None

    def _size_step(self) -> None:
        """The next step's global batch, samples per rank and micro-batches per rank."""
        self.global_batch_size = self.schedule.at(self.steps_read + 1)
        self.samples_per_rank = self.global_batch_size // self.dp_size
        self.grad_accum_steps = self.samples_per_rank // self.micro_batch_size

    def _limit_cache(self, limit: int, shard_counts: list[list[int]], shuffle: bool, block_size: int) -> None:
        """Bound the node's cache of this dataset's shards to `limit` bytes (streaming evicts the least recently read
        shards), once it is known to hold what the read order needs at once: per source, the shards that the steps
        read together (samples_read_together: two, and those the DataLoader's workers read ahead) can read from
        (shards_read_together), plus one shard in flight per other reading process of this node (streaming checks
        the limit before a download and counts the shard after it), each at the source's largest shard size
        (compressed and raw forms), plus the indexes. UserError naming data.cache_limit otherwise, and what else
        lowers the need: data.num_workers, and for a new run (not a resumed one, whose data order must stay)
        data.shuffle_block_size. Under train.batch_rampup, for the stretch of steps of its sizes that spans the most
        samples (samples_read_together)."""
        batch = max(self.schedule.sizes())
        largest_shards = [max(shard.get_max_size() for shard in self.dataset.shards[first:first + len(counts)])
                          for counts, first in zip(shard_counts, self.dataset.shard_offset_per_stream)]
        indexes = sum(stream.get_index_size() for stream in self.dataset.streams)

        def need_with(num_workers: int) -> tuple[int, list[int], int, int, int, int]:
            """Bytes, shards per source, reading processes, and the samples, steps and first step of the window."""
            readers = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) * max(1, num_workers)
            window, steps, first = samples_read_together(self.schedule, self.micro_batch_size * self.dp_size,
                                                         num_workers)
            shards = [shards_read_together(counts, window, shuffle, block_size, steps=1) + readers - 1
                      for counts in shard_counts]
            return (indexes + sum(n * size for n, size in zip(shards, largest_shards)), shards, readers, window, steps,
                    first)

        need, shards, readers, samples, steps, first = need_with(self.num_workers)
        if limit < need:
            parts = [f"{path}: {n} x {_human_bytes(size)}" for path, n, size in zip(self.paths, shards, largest_shards)]
            by_block = shuffle and block_size > batch  # else the global batch sets most of the window
            # The smallest shuffle block that still mixes enough shards (narrow_shuffle).
            floor = max(narrow_shuffle(counts, 0) or 1 for counts in shard_counts)
            ahead = f"{steps - 2} of them read ahead by the {self.num_workers} DataLoader workers, {PREFETCH_FACTOR} " \
                    "micro-batches each"
            if self.schedule.stages:
                batches = (f"the {steps} global batches of steps {first}-{first + steps - 1} ({samples} samples in "
                           "train.batch_rampup's sizes" + (f"; {ahead})" if steps > 2 else ")"))
            elif steps == 2:
                batches = f"two global batches of {batch} samples"
            else:
                batches = f"{steps} global batches of {batch} samples ({ahead})"
            if not shuffle:
                window = batches
            elif by_block:
                window = f"two shuffle blocks of {block_size} samples and {samples - 2} more" + (
                    f" ({batches})" if self.schedule.stages else f" ({steps} global batches, {ahead})" if steps > 2
                    else "")
            else:
                window = f"{batches} and {2 * block_size - 2} more"
            # Fewer workers, where that lowers the need (a window over all of a source's shards stays that).
            fewer, floor_need = [], need
            for n in (1, 0):
                lower = need_with(n)[0] if n < self.num_workers else need
                if lower < floor_need:
                    floor_need = lower
                    fewer.append(f"to {n}: {_human_bytes(need - floor_need)} less"
                                 + (", reading in the training process" if n == 0 else ""))
            workers = f", or lower data.num_workers ({'; '.join(fewer)})" if fewer else ""
            if by_block and block_size > floor:
                fix = (f"to resume a run, raise data.cache_limit{workers}: another data.shuffle_block_size changes "
                       "the data order, and the checkpoint's position would be refused (or, with data.new_stage, the "
                       "data read again from its first sample); for a new run, raise "
                       f"data.cache_limit or lower data.shuffle_block_size (to no less than {floor}, "
                       f"{SHUFFLE_SHARDS} shards' samples: a smaller block mixes few shards)")
            else:
                fix = f"raise data.cache_limit (or prepare the data in smaller shards){workers}"
            raise UserError(
                f"data.cache_limit={_human_bytes(limit)} is below the {_human_bytes(need)} the read order needs in the "
                f"cache at once ({'; '.join(parts)}: the shards that {window} can span"
                + (", as a step reads from every shuffle block it overlaps, also across an epoch's end" if shuffle
                   else "")
                + f", and one being fetched by each of the node's {readers} reading processes, each at its source's "
                f"largest shard); {fix}"
            )
        # streaming's own cache_limit argument: set after its set-up, whose check (4 shards) ours replaces.
        self.dataset.cache_limit = limit
        self.cache_need = need
        log.info("data: cache of remote shards limited to %s (the read order needs %s at once)",
                 _human_bytes(limit), _human_bytes(need))

    def _locations(self, path: str, cache: str | None) -> tuple[str | None, str]:
        """(remote, local) of a source for streaming: a remote URL is cached in `cache` (private to the run); a local
        directory is read in place, or copied into the cache when it is read-only (streaming writes decompressed
        shards beside the compressed ones)."""
        if "://" in path:
            return path, cache
        path = os.path.abspath(os.path.expanduser(path))
        if reads_in_place(path, self.split):
            return None, path
        if cache is None:
            raise UserError(f"data source {path} is read-only; set data.cache_dir for a decompressed copy")
        return path, cache

    def _fingerprint(self, block_size: int | None, by: str = "quotas") -> str:
        """The fingerprint of this loader's order with the block size given, of the sources' quotas or weights."""
        shards, quotas, weights, seed, shuffle, split = self._order_parts
        return _fingerprint({"format": FORMAT_VERSION, "shards": shards, by: quotas if by == "quotas" else weights,
                             "seed": seed, "shuffle": shuffle, "shuffle_block_size": block_size, "split": split})

    def _fingerprints(self, saved_order) -> set[str]:
        """The fingerprints that name this loader's order: its own, and those of checkpoints of earlier releases,
        which hashed the block size as configured (this job's, or the checkpoint's where it acts the same: its order
        summary says), with the sources' quotas or, before 2026-12-05, their raw weights (in this key order)."""
        shards, shuffle = self._order_parts[0], self._order_parts[4]
        blocks = {self.order_summary["shuffle_block_size"]}
        saved = saved_order.get("shuffle_block_size") if isinstance(saved_order, dict) else None
        if isinstance(saved, int) and saved > 0 \
                and acting_block_size(shuffle, saved, [sum(c) for c in shards]) == self._acting_block:
            blocks.add(saved)
        return {self.fingerprint} | {self._fingerprint(block, by) for block in blocks for by in ("quotas", "weights")}

    def _check_summary(self, path: str, summary: dict) -> None:
        split = summary["splits"].get(self.split, {})
        if not split.get("samples"):
            raise UserError(f"data source {path} has no samples in its {self.split} split; "
                            + ("prepare it with val_fraction > 0" if self.split != TRAIN else "rerun qwen2-prepare"))
        check_seq_len(path, summary["sample_tokens"], self.seq_len)

    def global_ids(self, positions: np.ndarray) -> np.ndarray:
        """StreamingDataset sample ids of global positions."""
        source, sample = self.order.lookup(positions)
        return self._stream_offsets[source] + sample

    def state_dict(self) -> dict:
        """Position of the next optimizer step's samples, to be saved with a checkpoint."""
        assert self.micro_index == 0, "the loader position is saved between optimizer steps"
        return {"samples_seen": self.position, "fingerprint": self.fingerprint, "order": self.order_summary}

    def state_problem(self, state: dict) -> str | None:
        """Why a saved data position cannot continue on this loader (a ResumeMismatch's message), or None. Raises
        nothing: read before the checkpoint is loaded, from a train state not yet verified."""
        if state.get("synthetic"):
            return ("the checkpoint was trained on random tokens (data.synthetic=true), not on this data; set "
                    "data.synthetic=true to continue it, or start a new run_dir")
        if "samples_seen" not in state:  # refused before the weights load: auto-resume would call it damaged
            return ("the checkpoint's data position was written by an older loader (epoch and samples of "
                    "streaming's order); resume it with the release that wrote it, or start a new run_dir")
        # The order summary besides: the same counts of other data, or of another train.seq_len, fingerprint alike.
        if state.get("fingerprint") not in self._fingerprints(state.get("order")) \
                or order_changes(state.get("order"), self.order_summary):
            return order_mismatch(state.get("order"), self.order_summary)
        return None

    def load_state_dict(self, state: dict, steps_done: int = 0) -> None:
        """Continue from a saved position, after optimizer step `steps_done`: the next batch is the one an
        uninterrupted run would have seen (one whose batch schedule changed: the next samples, in the new sizes)."""
        problem = self.state_problem(state)
        if problem:
            raise ResumeMismatch(problem)
        self.seek(state["samples_seen"], steps_done)

    def start_stage(self, steps_done: int) -> None:
        """data.new_stage: step steps_done + 1 reads this data from its first sample."""
        self.seek(0, steps_done)

    def data_change(self, state: dict) -> str | None:
        """What a saved data position that state_problem refuses was read from, against this data, in a few words;
        None for a position of an older loader, which may be of this very data (data.new_stage refuses it too)."""
        if state.get("synthetic"):
            return "random tokens (data.synthetic=true)"
        if "samples_seen" not in state:
            return None
        changed = order_changes(state.get("order"), self.order_summary)
        return f"changed since: {changed}" if changed else "other sources, shards, weights or order"

    def seek(self, position: int, steps_done: int = 0) -> None:
        """Make the next optimizer step, step steps_done + 1, read global positions from `position` on."""
        self.position, self.micro_index, self.steps_read = position, 0, steps_done
        self._size_step()
        self._epochs = self.order.epochs(position)
        self._iterator = None

    def rows_in_step(self, micro: int, batch: int | None = None) -> np.ndarray:
        """Where the rows of this rank's micro-batch `micro` (0 .. grad_accum_steps - 1) lie among a step's `batch`
        samples (None: the next step's global_batch_size): the ranks take consecutive slices, each cut into its
        micro-batches."""
        per_rank = self.samples_per_rank if batch is None else batch // self.dp_size
        first = self.dp_rank * per_rank + micro * self.micro_batch_size
        return np.arange(first, first + self.micro_batch_size)

    def next_batch(self) -> Batch:
        """The next micro-batch of this rank."""
        if self._iterator is None:
            # The collate function is pickled for each worker under spawn or forkserver: a few settings, not self.
            collate = functools.partial(_collate, seq_len=self.seq_len, document_masking=self.document_masking,
                                        eod_mask_loss=self.eod_mask_loss)
            self._loader = DataLoader(
                self.samples, batch_sampler=_RankSampler(self, self.position, self.steps_read + 1),
                num_workers=self.num_workers,
                collate_fn=collate, prefetch_factor=PREFETCH_FACTOR if self.num_workers else None,
                worker_init_fn=_enable_gc if self.num_workers else None,
            )
            self._iterator = iter(self._loader)
        batch = next(self._iterator)
        self.micro_index += 1
        if self.micro_index == self.grad_accum_steps:
            self.micro_index = 0
            self.position += self.global_batch_size
            self.steps_read += 1
            self._size_step()
            epochs = self.order.epochs(self.position)
            for path, before, now in zip(self.paths, self._epochs, epochs):
                # Not for what is evaluated, whose rows that pad an evaluation read on past its end every time.
                if now != before and self._training:
                    log.info("data: %s (%s split) starts epoch %d", path, self.split, now)
            self._epochs = epochs
        return batch

    def close(self) -> None:
        """Stop the workers and release the dataset's shared memory and lock files."""
        self._iterator = None
        self._loader = None
        if getattr(self, "dataset", None) is None:
            return
        for segment in self._created:
            segment.close()  # the names are removed by release(), when the last live owner of the prefix leaves
        for memory in self._shared_memory:
            memory.cleanup()  # closes the segments this process attached to
        self._release()
        self.dataset = None
        self.samples = None


def _enable_gc(_worker_id: int) -> None:
    """A DataLoader worker collects its garbage as Python does: one forked while the trainer had switched automatic
    collection off (train.gc_interval) would otherwise never collect."""
    gc.enable()


def _collate(samples: list[dict], seq_len: int, document_masking: bool, eod_mask_loss: bool) -> Batch:
    """A micro-batch of samples (TokenBatches' settings)."""
    tokens = torch.from_numpy(np.stack([sample["tokens"] for sample in samples]).astype(np.int64))
    assert tokens.shape[1] == seq_len + 1, "the summary's sample_tokens was checked against seq_len"
    positions = None
    if document_masking:
        positions = positions_from_starts([sample["doc_starts"] for sample in samples], seq_len)
    targets = tokens[:, 1:]
    if eod_mask_loss:
        targets = targets.masked_fill(first_token_targets([sample["doc_starts"] for sample in samples], seq_len),
                                      IGNORE_INDEX)
    return Batch(tokens[:, :-1], targets, positions)


def _untrack(memories: list) -> list:
    """Take the segments this process created away from Python's resource tracker (and from streaming's exit
    cleanup); return them. When a process dies, its tracker unlinks what it created BY NAME, possibly much later
    (it lives on while any child holds its pipe) -- by then the prefix may be reused by a live run, whose segments
    would vanish. Owner records (hygiene) decide instead: close() here, the last live owner, or the next start."""
    created = []
    for memory in memories:
        for segment in memory.created_shms:
            resource_tracker.unregister(segment._name, "shared_memory")
        created += memory.created_shms
        memory.created_shms = []
    return created


def _shared_memories(values, shared_memory_type) -> list:
    """The streaming SharedMemory objects held by a StreamingDataset's attributes (directly or one or two levels
    down: SharedArray.shm, SharedScalar.arr.shm, SharedBarrier._arr.shm)."""
    found = []
    for value in values:
        for candidate in (value, getattr(value, "shm", None), getattr(getattr(value, "arr", None), "shm", None),
                          getattr(getattr(value, "_arr", None), "shm", None)):
            if isinstance(candidate, shared_memory_type):
                found.append(candidate)
                break
    return found
