"""Tokenize text, JSONL and Parquet files into fixed-length MDS samples (the library side of qwen2-prepare).

Layout of a prepared dataset directory:
  train/                 MDS shards (zstd) with columns `tokens` (seq_len + 1 int32 ids) and `doc_starts` (int32
                         offsets in the sample where a document starts; always begins with 0)
  val/                   the same for the held-out documents (present when val_fraction > 0 gave samples)
  prepare_summary.json   counts; written last, so its presence marks a finished dataset

Documents are read in input order by the main process, tokenized in batches by `workers` processes and packed in
the same order, so the output is byte-identical for any number of workers.
"""

import collections
import contextlib
import functools
import glob
import gzip
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from qwen2_dist.data.streaming_compat import import_streaming
from qwen2_dist.data.tokenizer import Tokenizer, load_tokenizer
from qwen2_dist.errors import UserError
from qwen2_dist.fsutil import replace_dir

log = logging.getLogger(__name__)

SUMMARY_NAME = "prepare_summary.json"
FORMAT_VERSION = 2
TRAIN, VAL = "train", "val"
COLUMNS = {"tokens": "ndarray:int32", "doc_starts": "ndarray:int32"}
SKIP_REASONS = ("malformed_json", "missing_field", "not_utf8", "empty_document", "corrupt_file")
NUM_SKIPPED_EXAMPLES = 10
JSONL_SUFFIXES = (".jsonl", ".json")
COMPRESSED_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
MAGIC = {"gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd"}
# Uncompressed bytes per shard: large enough that the index stays small, small enough that a rank starts training
# after downloading one shard.
SHARD_SIZE_LIMIT = 1 << 26
# Characters of text per tokenization task: ~40 ms of work, so workers stay busy and memory stays flat.
BATCH_CHARS = 1 << 20
PARQUET_BATCH_ROWS = 1024


def _input_kind(path: str) -> tuple[str, str | None]:
    """("jsonl" | "parquet" | "text", "gzip" | "zstd" | None) from the file name."""
    name, compression = path.lower(), None
    for suffix, kind in COMPRESSED_SUFFIXES.items():
        if name.endswith(suffix):
            name, compression = name[: -len(suffix)], kind
            break
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl", compression
    if name.endswith(".parquet"):
        return "parquet", compression
    return "text", compression


def _import_pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("Parquet inputs need the pyarrow package; pip install pyarrow") from None
    return pq


def _check_readable(path: str) -> None:
    """Open the file and check its container (compression magic, Parquet footer); UserError if it is unusable."""
    kind, compression = _input_kind(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise UserError(f"input file {path} cannot be read ({e.strerror}); fix its permissions") from None
    if compression is not None and not head.startswith(MAGIC[compression]):
        raise UserError(f"input file {path} is not {compression}-compressed; rename it or recompress it")
    if kind == "parquet":
        if compression is not None:
            raise UserError(f"input file {path}: Parquet compresses internally; pass the .parquet file itself")
        pq = _import_pyarrow_parquet()
        try:
            pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError...; all mean "not a Parquet file".
            raise UserError(f"input file {path} is not a readable Parquet file ({e})") from None


def _expand_inputs(inputs: list[str]) -> list[str]:
    """Files named by inputs (paths or glob patterns, globs sorted), checked to exist and be readable."""
    if not inputs:
        raise UserError("input= is empty; pass one or more files or glob patterns, e.g. input=data/*.jsonl")
    files = []
    for pattern in inputs:
        pattern = os.path.expanduser(pattern)
        if any(c in pattern for c in "*?["):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise UserError(f"input pattern {pattern} matches no files; check the path or quote the glob")
            files.extend(matches)
            continue
        if not os.path.exists(pattern):
            raise UserError(f"input file {pattern} does not exist; check the path")
        if os.path.isdir(pattern):
            raise UserError(f"input {pattern} is a directory; pass the files inside it, e.g. input={pattern}/*.jsonl")
        files.append(pattern)
    for path in files:
        _check_readable(path)
    return files


@dataclass
class _Skips:
    """Counts of skipped records by reason, plus the first few as "file:line reason"."""

    counts: dict = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    examples: list = field(default_factory=list)

    def add(self, path: str, line: int, reason: str, count: int = 1) -> None:
        self.counts[reason] += count
        if len(self.examples) < NUM_SKIPPED_EXAMPLES:
            self.examples.append(f"{path}:{line} {reason}")


# A JSON line still to be parsed (by a tokenizer worker): (input file index, line number, raw bytes).
_JsonLine = tuple[int, int, bytes]


def _json_text(raw: bytes, text_field: str) -> tuple[str | None, str | None]:
    """(document text, None) of one JSON line, or (None, the reason to skip it)."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not_utf8"
    except json.JSONDecodeError:
        return None, "malformed_json"
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        return None, "missing_field"
    if not text.strip():
        return None, "empty_document"
    if not _encodable(text):
        return None, "not_utf8"  # a lone surrogate escape such as "\ud800"
    return text, None


class _Reader:
    """Documents of the input files in order: texts, or JSON lines left for the workers to parse. Skipped records
    are queued as (file index, line, reason, count) events for the batch they fall in."""

    def __init__(self, files: list[str]):
        self.files = files
        self.events: list[tuple[int, int, str, int]] = []
        self._done_bytes = 0
        self._raw: BinaryIO | None = None

    def bytes_read(self) -> int:
        """Input bytes (as stored on disk) consumed so far."""
        try:
            current = self._raw.tell() if self._raw is not None else 0
        except (OSError, ValueError):
            current = 0
        return self._done_bytes + current

    def take_events(self) -> list[tuple[int, int, str, int]]:
        events, self.events = self.events, []
        return events

    def _skip(self, index: int, line: int, reason: str, count: int = 1) -> None:
        self.events.append((index, line, reason, count))

    def documents(self, text_field: str) -> Iterator[str | _JsonLine]:
        for index, path in enumerate(self.files):
            kind, compression = _input_kind(path)
            with open(path, "rb") as raw:
                self._raw = raw
                if kind == "parquet":
                    yield from self._parquet(index, path, text_field)
                else:
                    stream = _decompressed(raw, compression)
                    if kind == "jsonl":
                        yield from self._jsonl(index, stream)
                    else:
                        yield from self._text(index, stream)
            self._raw = None
            self._done_bytes += os.path.getsize(path)

    def _jsonl(self, index: int, stream: BinaryIO) -> Iterator[_JsonLine]:
        # Only split into lines here: decoding and parsing run in the workers (_json_text), in parallel.
        line_number = 0
        try:
            for line_number, raw in enumerate(stream, start=1):
                if raw.strip():
                    yield index, line_number, raw
        except _CORRUPT_ERRORS:
            # A truncated or damaged compressed file: keep what was read, count the rest as one skip.
            self._skip(index, line_number + 1, "corrupt_file")

    def _text(self, index: int, stream: BinaryIO) -> Iterator[str]:
        try:
            data = stream.read()
        except _CORRUPT_ERRORS:
            self._skip(index, 1, "corrupt_file")
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            self._skip(index, data.count(b"\n", 0, e.start) + 1, "not_utf8")
            return
        if not text.strip():
            self._skip(index, 1, "empty_document")
            return
        yield text

    def _parquet(self, index: int, path: str, column: str) -> Iterator[str]:
        import pyarrow as pa

        parquet = _import_pyarrow_parquet().ParquetFile(path)
        num_rows = parquet.metadata.num_rows
        if column not in parquet.schema_arrow.names:
            if num_rows:
                self._skip(index, 1, "missing_field", num_rows)
            return
        column_type = parquet.schema_arrow.field(column).type
        is_text = pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
        is_binary = pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type)
        if not (is_text or is_binary):
            if num_rows:
                self._skip(index, 1, "missing_field", num_rows)
            return
        row = 0
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
            for value in batch.column(0).to_pylist():
                row += 1
                if value is None:
                    self._skip(index, row, "missing_field")
                    continue
                if is_binary:
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError:
                        self._skip(index, row, "not_utf8")
                        continue
                if not value.strip():
                    self._skip(index, row, "empty_document")
                else:
                    yield value


def _encodable(text: str) -> bool:
    """False for text with lone surrogates (valid JSON escapes, but not Unicode text a tokenizer accepts)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _zstd_errors() -> tuple[type[BaseException], ...]:
    try:
        import zstandard
    except ImportError:
        return ()
    return (zstandard.ZstdError,)


_CORRUPT_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error, *_zstd_errors())


def _decompressed(raw: BinaryIO, compression: str | None) -> BinaryIO:
    if compression is None:
        return raw
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    try:
        import zstandard
    except ImportError:
        raise UserError(".zst inputs need the zstandard package; pip install zstandard") from None
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))


def _batches(reader: _Reader, text_field: str) -> Iterator[tuple[list, list, int]]:
    """(documents or JSON lines, skip events, input bytes read) in chunks of about BATCH_CHARS characters."""
    batch: list[str | _JsonLine] = []
    num_chars = 0
    for item in reader.documents(text_field):
        batch.append(item)
        num_chars += len(item) if isinstance(item, str) else len(item[2])
        if num_chars >= BATCH_CHARS:
            yield batch, reader.take_events(), reader.bytes_read()
            batch, num_chars = [], 0
    yield batch, reader.take_events(), reader.bytes_read()


def in_val_split(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to the held-out split: a stable hash of its text, compared with val_fraction."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


class _DocumentEncoder:
    """A batch of texts and JSON lines -> (tokens of all documents concatenated, tokens per document, whether each
    document is held out, skip events of the JSON lines that hold no document)."""

    def __init__(self, tokenizer: Tokenizer, val_fraction: float, text_field: str):
        self.tokenizer = tokenizer
        self.val_fraction = val_fraction
        self.text_field = text_field

    def __call__(self, items: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        texts, events = [], []
        for item in items:
            if isinstance(item, str):
                texts.append(item)
                continue
            index, line, raw = item
            text, reason = _json_text(raw, self.text_field)
            if reason is None:
                texts.append(text)
            else:
                events.append((index, line, reason, 1))
        flat, lengths = self.tokenizer.encode_flat(texts)
        is_val = np.zeros(len(texts), dtype=bool)
        if self.val_fraction > 0:
            is_val[:] = [in_val_split(t, self.val_fraction) for t in texts]
        return flat, lengths, is_val, events


_WORKER_ENCODER: _DocumentEncoder | None = None


def _init_worker(tokenizer: str, val_fraction: float, text_field: str) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = _DocumentEncoder(load_tokenizer(tokenizer), val_fraction, text_field)


def _encode_in_worker(items: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    assert _WORKER_ENCODER is not None, "_init_worker runs first in every worker"
    return _WORKER_ENCODER(items)


@contextlib.contextmanager
def _worker_pool(workers: int, encoder: _DocumentEncoder, tokenizer: str) -> Iterator:
    """`workers` tokenizer processes (None for 1: the main process tokenizes). Forked when this process runs no other
    thread, so the children inherit the loaded vocabulary and start at once; spawned otherwise (forking a threaded
    process can deadlock the child), each loading the tokenizer itself."""
    global _WORKER_ENCODER
    if workers == 1:
        yield None
        return
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        encoder.tokenizer.encode_flat(["load the vocabulary once, before forking"])
        _WORKER_ENCODER = encoder
        pool = multiprocessing.get_context("fork").Pool(workers)
    else:
        pool = multiprocessing.get_context("spawn").Pool(
            workers, initializer=_init_worker, initargs=(tokenizer, encoder.val_fraction, encoder.text_field)
        )
    try:
        with pool:
            yield pool
    finally:
        _WORKER_ENCODER = None


def _encoded(batches: Iterator, encoder: _DocumentEncoder, pool, workers: int) -> Iterator:
    """(encoded documents, skip events, bytes read) per batch, in input order, computed by the pool's workers."""
    if pool is None:
        for items, events, done in batches:
            yield encoder(items), events, done
        return
    pending: collections.deque = collections.deque()
    for items, events, done in batches:
        pending.append((pool.apply_async(_encode_in_worker, (items,)), events, done))
        # A bounded window keeps memory flat however large the corpus is.
        if len(pending) > 2 * workers:
            result, events, done = pending.popleft()
            yield result.get(), events, done
    while pending:
        result, events, done = pending.popleft()
        yield result.get(), events, done


def _int32_array_bytes(values: np.ndarray) -> bytes:
    """MDS's "ndarray:int32" encoding of a non-empty 1-d int32 array: [ndim << 2 | shape dtype] [shape] [values]."""
    n = len(values)
    code, fmt = (0, "B") if n < 1 << 8 else (1, "H") if n < 1 << 16 else (2, "I")
    return struct.pack("<B" + fmt, 4 | code, n) + values.tobytes()


@functools.cache
def token_writer_class() -> type:
    """MDSWriter with a fast encode_sample for COLUMNS (the same bytes as MDSWriter's generic per-column encoding,
    checked by the tests, in a tenth of its time, which was most of the main process's work) and a finish() without
    a one-second poll."""
    mds_writer = import_streaming().MDSWriter

    class TokenMDSWriter(mds_writer):
        def encode_sample(self, sample: dict[str, Any]) -> bytes:
            # Columns in sorted order (doc_starts, tokens), both variable-size: a uint32 size each, then the data.
            starts, tokens = _int32_array_bytes(sample["doc_starts"]), _int32_array_bytes(sample["tokens"])
            return struct.pack("<II", len(starts), len(tokens)) + starts + tokens

        def finish(self) -> None:
            # streaming's finish() polls its upload queue once a second before it writes the index: with a local
            # output (no-op uploads) that is up to a second per split for nothing. Wait in milliseconds instead.
            if self.new_samples:
                self.flush_shard()
                self._reset_cache()
            while self.executor._work_queue.qsize():
                time.sleep(0.001)
            super().finish()

    return TokenMDSWriter


class _SplitWriter:
    """Packs one split's token stream into samples of sample_tokens, each with its document start offsets."""

    def __init__(self, out: str, sample_tokens: int):
        self.out = out
        self.sample_tokens = sample_tokens
        self.writer = token_writer_class()(out=out, columns=COLUMNS, compression="zstd", size_limit=SHARD_SIZE_LIMIT)
        self.pending = np.empty(0, dtype=np.int32)
        self.pending_starts = np.empty(0, dtype=np.int64)
        self.documents = 0
        self.samples = 0

    def add(self, chunk: np.ndarray, starts: np.ndarray) -> None:
        """Append documents: their tokens (eos included) and where each one starts in chunk."""
        self.documents += len(starts)
        stream = np.concatenate([self.pending, chunk])
        starts = np.concatenate([self.pending_starts, starts + len(self.pending)])
        size = self.sample_tokens
        num_full = len(stream) // size
        bounds = np.searchsorted(starts, np.arange(num_full + 1) * size)
        for k in range(num_full):
            sample_starts = (starts[bounds[k] : bounds[k + 1]] - k * size).astype(np.int32)
            if not len(sample_starts) or sample_starts[0] != 0:
                # The sample opens in the middle of a document: that part is a segment of its own.
                sample_starts = np.concatenate([np.zeros(1, np.int32), sample_starts])
            self.writer.write({"tokens": stream[k * size : (k + 1) * size], "doc_starts": sample_starts})
        self.samples += num_full
        self.pending = stream[num_full * size :]
        self.pending_starts = starts[bounds[num_full] :] - num_full * size

    def finish(self) -> dict[str, int]:
        """Close the shards (an empty split leaves no directory) and return the split's counts."""
        self.writer.finish()
        if self.samples == 0:
            shutil.rmtree(self.out, ignore_errors=True)
        return {
            "documents": self.documents,
            "samples": self.samples,
            "tokens": self.samples * self.sample_tokens,
            "dropped_tail_tokens": len(self.pending),
        }


def _with_eos(flat: np.ndarray, lengths: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The documents' tokens, each document followed by eos, and each document's size there (length + 1)."""
    sizes = lengths + 1
    chunk = np.empty(int(sizes.sum()), dtype=np.int32)
    eos_at = np.cumsum(sizes) - 1
    is_text = np.ones(len(chunk), dtype=bool)
    is_text[eos_at] = False
    chunk[is_text] = flat
    chunk[eos_at] = eos_id
    return chunk, sizes


def _check_output(output: str, overwrite: bool) -> str:
    if "://" in output:
        raise UserError(f"output={output} must be a local directory; upload the finished directory afterwards")
    output = os.path.abspath(os.path.expanduser(output))
    if os.path.exists(output):
        if not os.path.isdir(output):
            raise UserError(f"output={output} is a file; choose a directory path")
        if os.listdir(output) and not overwrite:
            raise UserError(f"output={output} exists and is not empty; pass overwrite=true or choose another output")
    return output


def available_cpus() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _progress_bar(enabled: bool, total_bytes: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", dynamic_ncols=True)


def prepare(
    inputs: list[str],
    output: str,
    seq_len: int,
    tokenizer: str = "qwen2",
    text_field: str = "text",
    overwrite: bool = False,
    max_tokens: int | None = None,
    workers: int = 1,
    val_fraction: float = 0.0,
    progress: bool = False,
) -> dict[str, Any]:
    """Tokenize inputs into train (and val) MDS samples of seq_len + 1 tokens under output; return the summary."""
    if seq_len < 1:
        raise UserError(f"seq_len={seq_len} must be at least 1")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max_tokens={max_tokens} must be positive, or null for no limit")
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction={val_fraction} must lie in [0, 1), e.g. 0.005 for 0.5% held out")
    if workers < 0:
        raise UserError(f"workers={workers} must be >= 0 (0 = one per available CPU core)")
    workers = workers or available_cpus()
    files = _expand_inputs(inputs)
    output = _check_output(output, overwrite)
    tok = load_tokenizer(tokenizer)
    sample_tokens = seq_len + 1

    os.makedirs(os.path.dirname(output), exist_ok=True)
    # A sibling, so the final rename stays on one filesystem; its name never looks like the finished dataset.
    tmp = f"{output}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    skips = _Skips()
    bar = None
    encoder = _DocumentEncoder(tok, val_fraction, text_field)
    stack = contextlib.ExitStack()
    try:
        # The pool first: before the writers (streaming imports torch) and the progress bar (a thread).
        pool = stack.enter_context(_worker_pool(workers, encoder, tokenizer))
        writers = {TRAIN: _SplitWriter(os.path.join(tmp, TRAIN), sample_tokens)}
        if val_fraction > 0:
            writers[VAL] = _SplitWriter(os.path.join(tmp, VAL), sample_tokens)
        bar = _progress_bar(progress, sum(os.path.getsize(f) for f in files))
        started = time.monotonic()
        remaining = max_tokens
        batches = _batches(_Reader(files), text_field)
        for (flat, lengths, is_val, parse_events), events, done in _encoded(batches, encoder, pool, workers):
            # In file and line order: the reader's events and the workers' (JSON lines) interleave.
            for index, line, reason, count in sorted(events + parse_events):
                skips.add(files[index], line, reason, count)
            chunk, sizes = _with_eos(flat, lengths, tok.eos_id)
            if remaining is not None and len(chunk) >= remaining:
                # Cut the stream at max_tokens: later documents go, the one that crosses the limit is truncated.
                last = int(np.searchsorted(np.cumsum(sizes), remaining))
                sizes, is_val = sizes[: last + 1].copy(), is_val[: last + 1]
                sizes[last] -= int(sizes.sum()) - remaining
                chunk = chunk[:remaining]
            for split, writer in writers.items():
                mine = is_val if split == VAL else ~is_val
                split_sizes = sizes[mine]
                writer.add(chunk[np.repeat(mine, sizes)], np.cumsum(split_sizes) - split_sizes)
            if bar is not None:
                tokens_per_sec = sum(w.samples for w in writers.values()) * sample_tokens / (time.monotonic() - started)
                bar.update(done - bar.n)
                bar.set_postfix_str(f"{tokens_per_sec:,.0f} tokens/s")
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    break
        splits = {split: writer.finish() for split, writer in writers.items()}
        if splits[TRAIN]["samples"] == 0:
            num_tokens = sum(s["tokens"] + s["dropped_tail_tokens"] for s in splits.values())
            raise UserError(
                f"inputs gave {num_tokens} tokens, fewer than one training sample of seq_len+1={sample_tokens}; "
                "add data, lower seq_len or lower val_fraction"
            )
        summary = {
            "format": FORMAT_VERSION,
            **{key: sum(s[key] for s in splits.values()) for key in
               ("documents", "tokens", "samples", "dropped_tail_tokens")},
            "splits": splits,
            "seq_len": seq_len,
            "sample_tokens": sample_tokens,
            "columns": sorted(COLUMNS),
            "tokenizer": tok.name,
            "val_fraction": val_fraction,
            "inputs": files,
            "skipped": skips.counts,
            "skipped_examples": skips.examples,
        }
        # Written last: its presence marks a complete dataset.
        with open(os.path.join(tmp, SUMMARY_NAME), "w") as f:
            json.dump(summary, f, indent=2)
        replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        stack.close()
        if bar is not None:
            bar.close()
    return summary


def read_summary(path: str) -> dict[str, Any]:
    """The prepare_summary.json of a dataset directory written by prepare()."""
    summary_path = os.path.join(path, SUMMARY_NAME)
    try:
        with open(summary_path) as f:
            summary = json.load(f)
    except FileNotFoundError:
        raise UserError(
            f"{summary_path} not found: {path} is not a finished dataset; run qwen2-prepare input=... output={path}"
        ) from None
    except json.JSONDecodeError as e:
        raise UserError(f"{summary_path} is corrupt ({e}); rerun qwen2-prepare with overwrite=true") from None
    if summary.get("format") != FORMAT_VERSION:
        raise UserError(
            f"{summary_path}: dataset format {summary.get('format', 1)} is not {FORMAT_VERSION} (train/ and val/ "
            "splits with document starts); rerun qwen2-prepare with overwrite=true"
        )
    return summary
