"""Tokenize text, JSONL and Parquet files into fixed-length MDS samples (the library side of qwen2-prepare).

Layout of a prepared dataset directory:
  train/                 MDS shards (zstd) with columns `tokens` (seq_len + 1 int32 ids) and `doc_starts` (int32
                         offsets in the sample where a document starts; always begins with 0)
  val/                   the same for the held-out documents (present when val_fraction > 0 gave samples)
  prepare_summary.json   counts, the tokenizer (name, vocab_size) and the largest token id written; written last,
                         so its presence marks a finished dataset

The main process cuts the inputs into batches of work in input order (uncompressed JSONL as byte ranges, which the
workers read themselves; text files split into documents as blocks cut at a document boundary), `workers` processes
read, parse and tokenize them, and the main process packs the results in the same order, so the output is
byte-identical for any number of workers.
"""

import collections
import contextlib
import ctypes
import functools
import glob
import gzip
import hashlib
import io
import json
import logging
import mmap
import multiprocessing
import os
import re
import shutil
import signal
import struct
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from qwen2_dist.data.streaming_compat import import_streaming
from qwen2_dist.data.tokenizer import Tokenizer, load_tokenizer, nfc
from qwen2_dist.errors import UserError
from qwen2_dist.fsutil import check_writable_dir, fsync_path, replace_dir

log = logging.getLogger(__name__)

SUMMARY_NAME = "prepare_summary.json"
FORMAT_VERSION = 2
TRAIN, VAL = "train", "val"
COLUMNS = {"tokens": "ndarray:int32", "doc_starts": "ndarray:int32"}
MAX_SEQ_LEN = 2**28  # 1 GiB of ids in a sample; a Qwen2 model has 131,072 positions
SKIP_REASONS = ("malformed_json", "missing_field", "wrong_type", "not_utf8", "empty_document", "corrupt_file")
NUM_SKIPPED_EXAMPLES = 10
# How far into a file (decompressed) a line feed is looked for before its lines count as ended by carriage returns.
CR_SCAN_BYTES, CR_SCAN_BLOCK = 16 << 20, 1 << 16
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonlines")
COMPRESSED_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
MAGIC = {"gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd"}
# A zstd file may open with a skippable frame (pzstd writes one): magic 0x184D2A50-0x184D2A5F, little-endian.
ZSTD_SKIPPABLE_MAGICS = tuple(bytes([0x50 + k, 0x2A, 0x4D, 0x18]) for k in range(16))
# Containers qwen2-prepare cannot read, by name and by first bytes: refused, rather than read as one text document.
UNSUPPORTED_SUFFIXES = {".bz2": "bzip2", ".xz": "xz", ".lzma": "lzma", ".lz4": "lz4", ".zip": "zip", ".7z": "7z",
                        ".tar": "tar", ".tgz": "tar", ".br": "brotli"}
UNSUPPORTED_MAGICS = {rb"BZh[1-9]1AY&SY": "bzip2", rb"\xfd7zXZ\x00": "xz", rb"\x04\x22\x4d\x18": "lz4",
                      rb"PK\x03\x04": "zip", rb"7z\xbc\xaf\x27\x1c": "7z"}
# Uncompressed bytes per shard: large enough that the index stays small, small enough that a rank starts training
# after downloading one shard.
SHARD_SIZE_LIMIT = 1 << 26
# Characters of text per tokenization task: ~40 ms of work, so workers stay busy and memory stays flat.
BATCH_CHARS = 1 << 20
# Batches handed to each worker ahead of the one being packed.
PENDING_BATCHES_PER_WORKER = 8
PARQUET_BATCH_ROWS = 1024
# How a plain-text input is cut into documents: the whole file, each non-empty line, paragraphs between blank lines,
# or pieces between literal <|endoftext|> strings (TinyStories), which would otherwise be tokenized as plain text.
TEXT_SPLITS = ("file", "line", "paragraph", "endoftext")
ENDOFTEXT = b"<|endoftext|>"
BYTE_ORDER_MARK = b"\xef\xbb\xbf"
# A text file read as one document past this size most likely holds many: a warning names text_split=.
ONE_DOCUMENT_WARN_BYTES = 64 << 20
# A blank line (only ASCII whitespace) after a line end: where text_split=paragraph may cut a file.
_BLANK_LINE = re.compile(rb"\n[^\S\n]*\n")
# Bytes of the previous block searched again with a new one, so a boundary across two blocks is found (a blank line
# of more whitespace than this is only found later, which merely makes a larger batch).
_BOUNDARY_CONTEXT = 64
CGROUP_ROOT = "/sys/fs/cgroup"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


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


def _check_readable(path: str, text_split: str = "file") -> None:
    """Open the file and check its container (compression magic, Parquet footer); UserError if it is unusable. A
    compressed file too short for its magic (a truncated download) passes: its reading counts it corrupt."""
    kind, compression = _input_kind(path)
    try:
        with open(path, "rb") as f:
            head = f.read(10)
    except OSError as e:
        raise UserError(f"input file {path} cannot be read ({e.strerror}); fix its permissions") from None
    unsupported = next((name for magic, name in UNSUPPORTED_MAGICS.items() if re.match(magic, head)), None)
    if unsupported is None:  # by name: the whole name, or the name inside .gz / .zst (a .tar.gz)
        inner = path.lower()
        if compression is not None:
            inner = next(inner[: -len(suffix)] for suffix in COMPRESSED_SUFFIXES if inner.endswith(suffix))
        unsupported = next((name for suffix, name in UNSUPPORTED_SUFFIXES.items() if inner.endswith(suffix)), None)
    if unsupported:
        raise UserError(f"input file {path} is {unsupported}-compressed or archived, which qwen2-prepare does not "
                        "read; decompress it, or recompress it with gzip or zstd (.gz, .zst)")
    if compression is None:
        found = next((name for name, magic in MAGIC.items() if head.startswith(magic)), None)
        if found is not None:
            raise UserError(f"input file {path} is {found}-compressed but its name does not say so; rename it to "
                            f"end in {'.gz' if found == 'gzip' else '.zst'}")
    elif not (head.startswith(MAGIC[compression]) or MAGIC[compression].startswith(head)
              or (compression == "zstd" and head.startswith(ZSTD_SKIPPABLE_MAGICS))):
        raise UserError(f"input file {path} is not {compression}-compressed; rename it or recompress it")
    opening = _json_opening(path, compression) if kind == "jsonl" else None
    if opening == "[":
        raise UserError(f"input file {path} holds a JSON array, but qwen2-prepare reads JSON lines (one object per "
                        f"line); convert it, e.g. jq -c '.[]' {path} > {os.path.splitext(path)[0]}.jsonl")
    # (text_split is for plain text: a Parquet file's bytes are no lines.)
    if (kind == "jsonl" or (kind == "text" and text_split in ("line", "paragraph"))) \
            and _carriage_return_lines(path, compression):
        what = "JSON lines" if kind == "jsonl" else f"the lines of text_split={text_split}"
        base = path[: -len(next(x for x in COMPRESSED_SUFFIXES if path.lower().endswith(x)))] if compression else path
        converted = f"{os.path.splitext(base)[0]}.lf{'.jsonl' if kind == 'jsonl' else '.txt'}"
        source = f"{'gzip' if compression == 'gzip' else 'zstd'} -dc {path} | tr" if compression else "tr"
        raise UserError(f"input file {path} ends its lines with a carriage return alone (old Mac line endings), but "
                        f"qwen2-prepare reads {what} ended by a line feed (or CR LF); convert it, e.g. {source} "
                        f"'\\r' '\\n'{'' if compression else f' < {path}'} > {converted}")
    if opening == "{":
        raise UserError(f"input file {path} opens with a line holding only '{{': a JSON object written over several "
                        "lines, but qwen2-prepare reads JSON lines (one whole object per line); convert it, e.g. "
                        f"jq -c . {path} > {os.path.splitext(path)[0]}.jsonl")
    if kind == "parquet":
        if compression is not None:
            raise UserError(f"input file {path}: Parquet compresses internally; pass the .parquet file itself")
        pq = _import_pyarrow_parquet()
        try:
            pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError...; all mean "not a Parquet file".
            raise UserError(f"input file {path} is not a readable Parquet file ({e})") from None


def _json_opening(path: str, compression: str | None) -> str | None:
    """How a JSON file opens when it is not JSON lines: "[" (an array: its first character after whitespace and a
    BOM), "{" (an object written over several lines, as json.dump(indent=...) and jq write it: a first line of "{"
    alone, which no line of JSON lines is), else None."""
    try:
        with open(path, "rb") as raw:
            head = _decompressed(raw, compression).read(4096)
    except (OSError, *_CORRUPT_ERRORS):
        return None  # its reading counts it corrupt
    text = head.decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
    if text.startswith("["):
        return "["
    return "{" if text.split("\n", 1)[0].strip() == "{" else None


def _carriage_return_lines(path: str, compression: str | None) -> bool:
    """Whether the file's lines end in a carriage return alone (old Mac line endings): two or more of them and no
    line feed in its first CR_SCAN_BYTES. Read as lines, such a file is one line: one malformed JSON record, or one
    document under text_split=line or paragraph. (JSON lines hold no raw carriage return inside a string.)"""
    found = 0
    try:
        with open(path, "rb") as raw:
            stream = _decompressed(raw, compression)
            for _ in range(CR_SCAN_BYTES // CR_SCAN_BLOCK):
                block = stream.read(CR_SCAN_BLOCK)
                if b"\n" in block:
                    return False
                if not block:
                    break
                found += block.count(b"\r")
    except (OSError, *_CORRUPT_ERRORS):
        return False  # its reading counts it corrupt
    return found >= 2


def _expand_inputs(inputs: list[str], text_split: str = "file") -> list[str]:
    """Files named by inputs (paths or glob patterns, globs sorted), checked to exist and be readable."""
    if not inputs:
        raise UserError("input= is empty; pass one or more files or glob patterns, e.g. input=data/*.jsonl")
    files = []
    for pattern in inputs:
        pattern = os.path.expanduser(pattern)
        # A file whose name holds * ? or [ is itself (as a pattern it could match another file, or none).
        if any(c in pattern for c in "*?[") and not os.path.exists(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise UserError(f"input pattern {pattern} matches no files; check the path or quote the glob")
            files.extend(matches)
            continue
        if not os.path.exists(pattern):
            raise UserError(f"input file {pattern} does not exist; check the path")
        if os.path.isdir(pattern):
            inside = os.path.join(pattern, "*.jsonl")  # dir/ and dir alike: one slash
            raise UserError(f"input {pattern} is a directory; pass the files inside it, e.g. input={inside}")
        if not os.path.isfile(pattern):  # a pipe (input=<(...)) would be read up by the checks before its records
            raise UserError(f"input {pattern} is not a regular file (a pipe or a device); write it to a file first")
        files.append(pattern)
    unique, seen = [], {}
    for path in files:
        real = os.path.realpath(path)
        if real in seen:
            log.warning("input file %s is named twice (also as %s); reading it once", path, seen[real])
            continue
        seen[real] = path
        unique.append(path)
    for path in unique:
        _check_readable(path, text_split)
    return unique


@dataclass
class _Skips:
    """Counts of skipped records by reason, plus the first few as "file:line reason"."""

    counts: dict = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    examples: list = field(default_factory=list)

    def add(self, path: str, line: int, reason: str, count: int = 1) -> None:
        self.counts[reason] += count
        if len(self.examples) < NUM_SKIPPED_EXAMPLES:
            self.examples.append(f"{path}:{line} {reason}")


# A tokenization batch is a list of work items, built by the main process and read by a worker:
#   ("range", file index, start, end)   lines in bytes [start, end) of an uncompressed JSONL file; the worker reads
#                                       them itself, so the text never passes through the main process
#   ("lines", file index, first line, data)  whole lines of a compressed JSONL file, decompressed by the main process
#   ("text", file index)                a whole text file (one document), read and decompressed by the worker
#   ("split", file index, first line, data)  whole documents of a text file (text_split other than file), read and
#                                       decompressed by the main process; data may start and end inside a line
#   ("row", file index, text)           one document (a Parquet row, read by the main process)
# Line numbers inside a range are only known relative to its start; the main process makes them absolute (it sees
# the results in input order), so it never has to read the text to count lines.
_Item = tuple


def _json_text(raw: bytes, text_field: str) -> tuple[str | None, str | None]:
    """(document text, None) of one JSON line, or (None, the reason to skip it)."""
    try:
        record = json.loads(raw.decode("utf-8-sig"))  # a byte-order mark opens some files' first line
    except UnicodeDecodeError:
        return None, "not_utf8"
    except (ValueError, RecursionError):  # not JSON; also an integer of over 4300 digits, or nesting too deep
        return None, "malformed_json"
    if not isinstance(record, dict) or record.get(text_field) is None:  # null: no value, as a Parquet null
        return None, "missing_field"
    text = record[text_field]
    if not isinstance(text, str):
        return None, "wrong_type"  # a number, a list: as a Parquet column of another type
    if not text.strip():
        return None, "empty_document"
    if not _encodable(text):
        return None, "not_utf8"  # a lone surrogate escape such as "\ud800"
    return text, None


def _split_lines(data: bytes) -> list[bytes]:
    """The lines of data (split at b"\\n", as a binary file iterates them), without a phantom last one."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return lines


def _last_boundary(data: bytes, text_split: str) -> int:
    """The offset just after the last place in data where text_split ends a document (0 if there is none)."""
    if text_split == "line":
        return data.rfind(b"\n") + 1
    if text_split == "endoftext":
        at = data.rfind(ENDOFTEXT)
        return at + len(ENDOFTEXT) if at >= 0 else 0
    return max((m.end() for m in _BLANK_LINE.finditer(data)), default=0)


def _text_pieces(data: bytes, text_split: str) -> Iterator[tuple[int, bytes]]:
    """(offset in data, bytes) of each document of data, which starts where a document may start (a line, or after
    a separator) and ends where one ends. Blank lines separate documents and are none; between two <|endoftext|>
    an empty piece is an empty document, after the last one only text is a document."""
    if text_split == "endoftext":
        pieces = data.split(ENDOFTEXT)
        offset = 0
        for k, piece in enumerate(pieces):
            text = piece.strip()
            if text or k < len(pieces) - 1:
                yield offset + len(piece) - len(piece.lstrip()), text
            offset += len(piece) + len(ENDOFTEXT)
        return
    offset, start, end = 0, -1, 0  # start, end: the paragraph being gathered (start -1: none)
    for line in data.split(b"\n"):
        if line.strip():
            if text_split == "line":
                yield offset, line.removesuffix(b"\r")
            elif start < 0:
                start = offset
            end = offset + len(line)
        elif start >= 0:
            yield start, data[start:end].removesuffix(b"\r")
            start = -1
        offset += len(line) + 1
    if start >= 0:
        yield start, data[start:end].removesuffix(b"\r")


class _Reader:
    """Work items (see _Item) of the input files in order, each with its size in input bytes. Skipped records found
    here (corrupt compressed files, Parquet rows) are queued as (file index, line, reason, count) events for the
    batch they fall in."""

    def __init__(self, files: list[str], batch_bytes: int):
        self.files = files
        self.batch_bytes = batch_bytes
        self.events: list[tuple[int, int, str, int]] = []
        # Files read to their end, taken with the events: a batch carries them no earlier than their last item.
        self.finished: list[int] = []
        # Files whose whole loss a warning has named already (an empty compressed file, a missing Parquet column).
        self.reported: set[int] = set()
        self._done_bytes = 0
        self._position = 0
        self._raw: BinaryIO | None = None

    def bytes_read(self) -> int:
        """Input bytes (as stored on disk) handed out so far."""
        try:
            current = self._raw.tell() if self._raw is not None else self._position
        except (OSError, ValueError):
            current = 0
        return self._done_bytes + current

    def take_events(self) -> tuple[list[tuple[int, int, str, int]], list[int]]:
        """The skip events and the finished files since the last call."""
        events, self.events = self.events, []
        finished, self.finished = self.finished, []
        return events, finished

    def _skip(self, index: int, line: int, reason: str, count: int = 1) -> None:
        self.events.append((index, line, reason, count))

    def items(self, text_field: str, text_split: str) -> Iterator[tuple[_Item, int]]:
        for index, path in enumerate(self.files):
            kind, compression = _input_kind(path)
            if compression is not None and os.path.getsize(path) == 0:
                # Not even a header (an empty gzip file is 20 bytes): a failed download, not an empty dataset.
                self._skip(index, 1, "corrupt_file")
                self.reported.add(index)
                log.warning("input %s: an empty file, not %s data (corrupt_file)", path, compression)
            elif kind == "text" and text_split == "file":
                yield ("text", index), os.path.getsize(path)
            elif kind == "jsonl" and compression is None:
                yield from self._ranges(index, path)
            else:
                with open(path, "rb") as raw:
                    self._raw = raw
                    if kind == "parquet":
                        yield from ((("row", index, doc), len(doc)) for doc in self._parquet(index, path, text_field))
                    elif kind == "text":
                        yield from self._split_text(index, _decompressed(raw, compression), text_split)
                    else:
                        yield from self._compressed_lines(index, _decompressed(raw, compression))
                self._raw = None
            self._position = 0
            self._done_bytes += os.path.getsize(path)
            self.finished.append(index)

    def _ranges(self, index: int, path: str) -> Iterator[tuple[_Item, int]]:
        # Cut at the first line end after every batch_bytes: a seek and one short read per batch.
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            start = 0
            while start < size:
                end = start + self.batch_bytes
                if end >= size:
                    end = size
                else:
                    f.seek(end)
                    end += len(f.readline())
                self._position = end
                yield ("range", index, start, end), end - start
                start = end

    def _compressed_lines(self, index: int, stream: BinaryIO) -> Iterator[tuple[_Item, int]]:
        lines: list[bytes] = []
        first, size, line_number = 1, 0, 0
        try:
            for line_number, raw in enumerate(stream, start=1):
                lines.append(raw)
                size += len(raw)
                if size >= self.batch_bytes:
                    yield ("lines", index, first, b"".join(lines)), size
                    lines, first, size = [], line_number + 1, 0
        except _CORRUPT_ERRORS as e:
            # A truncated or damaged compressed file: keep what was read, count the rest as one skip.
            self._skip(index, line_number + 1, "corrupt_file")
            log.warning("input %s: cannot be read past line %d (%s: %s); the rest of the file is skipped "
                        "(corrupt_file)", self.files[index], line_number, type(e).__name__, e)
        if lines:
            yield ("lines", index, first, b"".join(lines)), size

    def _split_text(self, index: int, stream: BinaryIO, text_split: str) -> Iterator[tuple[_Item, int]]:
        # Blocks of batch_bytes, cut after the last document boundary in each: a multi-GB file streams through in
        # bounded items, and no document is split between two of them.
        parts: list[bytes] = []  # read since the last cut
        first_line, tail, at_start = 1, b"", True
        while True:
            try:
                block = stream.read(max(self.batch_bytes, len(BYTE_ORDER_MARK)))
            except _CORRUPT_ERRORS as e:
                line = first_line + sum(part.count(b"\n") for part in parts)
                self._skip(index, line, "corrupt_file")
                log.warning("input %s: cannot be read past line %d (%s: %s); the rest of the file is skipped "
                            "(corrupt_file)", self.files[index], line, type(e).__name__, e)
                break
            if not block:
                break
            if at_start:  # a byte-order mark (Windows editors write one) is not text
                block, at_start = block.removeprefix(BYTE_ORDER_MARK), False
            window = tail + block
            cut = _last_boundary(window, text_split) - len(tail)
            tail = window[-_BOUNDARY_CONTEXT:]
            if cut <= 0:
                parts.append(block)
                continue
            parts.append(block[:cut])
            data = b"".join(parts)
            yield ("split", index, first_line, data), len(data)
            first_line += data.count(b"\n")
            parts = [block[cut:]]
        data = b"".join(parts)
        if data:
            yield ("split", index, first_line, data), len(data)

    def _parquet(self, index: int, path: str, column: str) -> Iterator[str]:
        import pyarrow as pa

        parquet = _import_pyarrow_parquet().ParquetFile(path)
        num_rows = parquet.metadata.num_rows
        names = parquet.schema_arrow.names
        if column not in names:
            if num_rows:
                self._skip(index, 1, "missing_field", num_rows)
            self.reported.add(index)
            log.warning("input %s has no column %r (its columns: %s), so its %d rows are skipped (missing_field); "
                        "set text_field= to the column that holds the text", path, column,
                        ", ".join(names[:20]) + (" ..." if len(names) > 20 else ""), num_rows)
            return
        column_type = parquet.schema_arrow.field(column).type
        if pa.types.is_dictionary(column_type):  # e.g. a pandas categorical: the values' type counts
            column_type = column_type.value_type
        text_types = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary,
                      getattr(pa.types, "is_string_view", None), getattr(pa.types, "is_binary_view", None))
        if not any(is_type and is_type(column_type) for is_type in text_types):
            if num_rows:
                self._skip(index, 1, "wrong_type", num_rows)
            self.reported.add(index)
            log.warning("input %s: column %r holds %s, not text, so its %d rows are skipped (wrong_type); set "
                        "text_field= to a string column, or convert this one", path, column, column_type, num_rows)
            return
        row = 0
        for group in range(parquet.num_row_groups):
            # One row group at a time: a damaged one loses its own rows, and reading goes on with the next.
            group_end = row + parquet.metadata.row_group(group).num_rows
            batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group], columns=[column])
            while True:
                try:
                    batch = next(batches, None)
                except (pa.ArrowException, OSError) as e:  # a damaged page: the rest of the row group is lost
                    self._skip(index, row + 1, "corrupt_file", group_end - row)
                    log.warning("input %s: rows %d-%d (row group %d) cannot be read (%s) and are skipped "
                                "(corrupt_file)", path, row + 1, group_end, group, e)
                    row = group_end
                    break
                if batch is None:
                    break
                row = yield from self._parquet_values(index, row, batch.column(0))

    def _parquet_values(self, index: int, row: int, values) -> Iterator[str]:
        """The documents of a Parquet column batch whose first value is row `row + 1`; returns the last row."""
        import pyarrow as pa

        if pa.types.is_dictionary(values.type):
            values = values.dictionary_decode()
        # As bytes, decoded here: pyarrow does not check a string column's UTF-8 when it reads one, so a file
        # from another writer can hold bytes that would fail in to_pylist() as strings.
        for value in values.cast(pa.large_binary()).to_pylist():
            row += 1
            if value is None:
                self._skip(index, row, "missing_field")
                continue
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                self._skip(index, row, "not_utf8")
                continue
            if not value.strip():
                self._skip(index, row, "empty_document")
            else:
                yield value
        return row


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
    # Windows up to 2 GiB, as `zstd --long=31` writes them (zstandard refuses over 128 MiB by default).
    return io.BufferedReader(_ZstdFrames(raw, zstandard.ZstdDecompressor(max_window_size=1 << 31)),
                             buffer_size=1 << 20)


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a zstd file, frame after frame (as `zstd -d` reads concatenated frames), raising
    EOFError where the file ends inside a frame: zstandard's stream_reader returns what it has then, and a truncated
    file would pass for a shorter one."""

    def __init__(self, raw: BinaryIO, decompressor):
        self._raw, self._decompressor = raw, decompressor
        self._frame = None  # the current frame's decompressobj
        self._input = b""  # input after the end of the last frame, not yet decompressed
        self._out, self._at = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._at == len(self._out):
            data = self._input or self._raw.read(1 << 20)
            self._input = b""
            if not data:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                return 0
            if self._frame is None or self._frame.eof:
                self._frame = self._decompressor.decompressobj()
            self._out, self._at = self._frame.decompress(data), 0
            if self._frame.eof:
                self._input = self._frame.unused_data
        n = min(len(buffer), len(self._out) - self._at)
        buffer[:n] = memoryview(self._out)[self._at : self._at + n]
        self._at += n
        return n


def _batches(reader: _Reader, text_field: str, text_split: str) -> Iterator[tuple[list, tuple, int]]:
    """(work items, (skip events, finished files), input bytes read) in chunks of about reader.batch_bytes input
    bytes."""
    batch: list[_Item] = []
    num_bytes = 0
    for item, size in reader.items(text_field, text_split):
        batch.append(item)
        num_bytes += size
        if num_bytes >= reader.batch_bytes:
            yield batch, reader.take_events(), reader.bytes_read()
            batch, num_bytes = [], 0
    yield batch, reader.take_events(), reader.bytes_read()


def in_val_split(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to the held-out split: a stable hash of its text, compared with val_fraction.

    Hashed in NFC as the Qwen2 tokenizer normalizes (tokenizer.nfc), the form it encodes: the same document saved
    composed and decomposed (é as one code point or as e and an accent) gives the same tokens, and goes to the same
    split, on every Python version. Most text is NFC already, and hashes as before."""
    digest = hashlib.blake2b(nfc(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


@dataclass
class _Encoded:
    """One batch, tokenized: all documents' tokens (each followed by eos), tokens per document (eos included), whether
    each document is held out, skip events as (item position, line, reason, count) -- the line relative to the start
    of a "range" item, absolute otherwise -- the number of lines in each "range" item by position, the largest
    token id in chunk (-1 when empty; found by the worker, so the main process does not scan the tokens), the number
    of documents from each file (by index), and warnings for the main process to log."""

    chunk: np.ndarray
    sizes: np.ndarray
    is_val: np.ndarray
    events: list
    range_lines: dict
    max_id: int
    file_docs: collections.Counter
    warnings: list


class _DocumentEncoder:
    """Work items -> _Encoded. Runs in the tokenizer workers: reading, decoding, JSON parsing, tokenization and
    the held-out hash all happen there, so the main process only packs and writes."""

    def __init__(self, tokenizer: Tokenizer, val_fraction: float, text_field: str, text_split: str,
                 files: list[str]):
        self.tokenizer = tokenizer
        self.val_fraction = val_fraction
        self.text_field = text_field
        self.text_split = text_split
        self.files = files

    def __call__(self, items: list[_Item]) -> _Encoded:
        texts: list[str] = []
        events: list[tuple[int, int, str, int]] = []
        range_lines: dict[int, int] = {}
        file_docs: collections.Counter = collections.Counter()
        warnings: list[str] = []
        for pos, item in enumerate(items):
            before = len(texts)
            if item[0] == "row":
                texts.append(item[2])
            elif item[0] == "text":
                self._text_file(pos, self.files[item[1]], texts, events, warnings)
            elif item[0] == "split":
                _, _, first, data = item
                self._text_documents(pos, data, first, texts, events)
            elif item[0] == "range":
                _, index, start, end = item
                with open(self.files[index], "rb") as f:
                    f.seek(start)
                    lines = _split_lines(f.read(end - start))
                range_lines[pos] = len(lines)
                self._json_lines(pos, lines, 1, texts, events)
            else:
                _, index, first, data = item
                self._json_lines(pos, _split_lines(data), first, texts, events)
            file_docs[item[1]] += len(texts) - before
        flat, lengths = self.tokenizer.encode_flat(texts)
        chunk, sizes = _with_eos(flat, lengths, self.tokenizer.eos_id)
        is_val = np.zeros(len(texts), dtype=bool)
        if self.val_fraction > 0:
            is_val[:] = [in_val_split(t, self.val_fraction) for t in texts]
        return _Encoded(chunk, sizes, is_val, events, range_lines, int(chunk.max()) if len(chunk) else -1,
                        file_docs, warnings)

    def _json_lines(self, pos: int, lines: list[bytes], first: int, texts: list, events: list) -> None:
        for line, raw in enumerate(lines, start=first):
            if not raw.strip():
                continue  # a blank line is no record
            text, reason = _json_text(raw, self.text_field)
            if reason is None:
                texts.append(text)
            else:
                events.append((pos, line, reason, 1))

    def _text_documents(self, pos: int, data: bytes, first: int, texts: list, events: list) -> None:
        line, counted = first, 0  # the line at offset `counted`, found only for a skip (a rare event)

        def line_at(offset: int) -> int:
            nonlocal line, counted
            line += data.count(b"\n", counted, offset)
            counted = offset
            return line

        for offset, piece in _text_pieces(data, self.text_split):
            try:
                text = piece.decode("utf-8")
            except UnicodeDecodeError as e:
                events.append((pos, line_at(offset + e.start), "not_utf8", 1))
                continue
            if not text.strip():
                events.append((pos, line_at(offset), "empty_document", 1))
                continue
            texts.append(text)

    def _text_file(self, pos: int, path: str, texts: list, events: list, warnings: list) -> None:
        _, compression = _input_kind(path)
        with open(path, "rb") as raw:
            try:
                data = _decompressed(raw, compression).read()
            except _CORRUPT_ERRORS:
                events.append((pos, 1, "corrupt_file", 1))
                return
        try:
            text = data.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is not text
        except UnicodeDecodeError as e:
            events.append((pos, data.count(b"\n", 0, e.start) + 1, "not_utf8", 1))
            return
        if not text.strip():
            events.append((pos, 1, "empty_document", 1))
            return
        causes = []
        if len(data) > ONE_DOCUMENT_WARN_BYTES:
            causes.append(f"is {len(data) / (1 << 20):.0f} MiB long")
        if ENDOFTEXT in data:
            causes.append(f"holds the literal {ENDOFTEXT.decode()}, which is tokenized as text, not as a document end")
        if causes:
            warnings.append(f"input {path} is read as one document (text_split=file) but {' and '.join(causes)}; "
                            "if it holds many documents, pass text_split=line (one per line), paragraph (separated "
                            "by blank lines) or endoftext (separated by <|endoftext|>)")
        texts.append(text)


def _absolute_events(items: list[_Item], encoded: _Encoded, next_line: collections.Counter) -> list:
    """The worker's skip events as (file index, absolute line, reason, count); advances next_line (lines of each
    JSONL file before the next range) past this batch's ranges."""
    base = {}
    for pos, lines in sorted(encoded.range_lines.items()):
        index = items[pos][1]
        base[pos] = next_line[index]
        next_line[index] += lines
    return [(items[pos][1], line + base.get(pos, 0), reason, count) for pos, line, reason, count in encoded.events]


_WORKER_ENCODER: _DocumentEncoder | None = None
# Results travel back from forked workers through this anonymous shared mapping (one slot per batch in flight)
# instead of being pickled through a pipe: the tokens are the bulk of all bytes moved, and copying them through the
# pipe cost about as much CPU as packing them. Anonymous, so nothing can be left behind in /dev/shm.
_RESULT_RING: mmap.mmap | None = None
_SLOT_TOKENS = BATCH_CHARS  # int32 tokens per slot: a batch of BATCH_CHARS characters has fewer unless it is mostly
                            # one oversized document, which then comes back through the pipe instead.


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this worker when its parent dies: after a SIGKILLed qwen2-prepare (the out-of-memory
    killer, kill -9) its workers would wait for work forever, each holding its memory."""
    if sys.platform.startswith("linux"):
        # The signal comes when the parent's thread that forked this worker ends: the one running prepare(), which
        # closes the pool before it returns.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _init_worker(parent: int, tokenizer: str, val_fraction: float, text_field: str, text_split: str,
                 files: list[str]) -> None:
    global _WORKER_ENCODER
    _die_with_parent(parent)
    _WORKER_ENCODER = _DocumentEncoder(load_tokenizer(tokenizer), val_fraction, text_field, text_split, files)


def _encode_in_worker(items: list[_Item], slot: int | None) -> _Encoded:
    assert _WORKER_ENCODER is not None, "_init_worker runs first in every worker"
    encoded = _WORKER_ENCODER(items)
    if _RESULT_RING is not None and slot is not None and len(encoded.chunk) <= _SLOT_TOKENS:
        view = np.frombuffer(_RESULT_RING, np.int32, len(encoded.chunk), slot * _SLOT_TOKENS * 4)
        view[:] = encoded.chunk
        encoded.chunk = ("slot", slot, len(encoded.chunk))  # type: ignore[assignment]
    return encoded


@contextlib.contextmanager
def _worker_pool(workers: int, encoder: _DocumentEncoder, tokenizer: str) -> Iterator:
    """`workers` tokenizer processes (None for 1: the main process tokenizes). Forked when this process runs no other
    thread, so the children inherit the loaded vocabulary and the result slots and start at once; spawned otherwise
    (forking a threaded process can deadlock the child), each loading the tokenizer itself, results pickled.

    A ProcessPoolExecutor, not a multiprocessing.Pool: when a worker dies (the out-of-memory killer, a crash), Pool
    starts another and the dead one's batch is lost, so the wait for its result never ends; here every pending result
    raises BrokenProcessPool."""
    global _WORKER_ENCODER, _RESULT_RING
    if workers == 1:
        yield None
        return
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        encoder.tokenizer.encode_flat(["load the vocabulary once, before forking"])
        _WORKER_ENCODER = encoder
        _RESULT_RING = mmap.mmap(-1, _num_slots(workers) * _SLOT_TOKENS * 4)
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_die_with_parent, initargs=(os.getpid(),))
        # The first task forks every worker, now, while this process has no other thread (the pool's own
        # management thread starts after the forks).
        pool.submit(int).result()
    else:
        pool = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
            initargs=(os.getpid(), tokenizer, encoder.val_fraction, encoder.text_field, encoder.text_split,
                      encoder.files),
        )
    try:
        yield pool
    finally:
        # Stopped at once: after a failure a worker may be deep in a huge document, and shutdown() alone would wait
        # for it (Python 3.14 has pool.terminate_workers() for this).
        for process in list((pool._processes or {}).values()):  # None once shut down
            process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        _WORKER_ENCODER = None
        if _RESULT_RING is not None:
            _RESULT_RING.close()
            _RESULT_RING = None


def _window(workers: int) -> int:
    """Batches in flight ahead of the one being packed: deep enough (about a third of a second of work per worker)
    that the workers stay busy while this process packs and writes, bounded so memory stays flat."""
    return PENDING_BATCHES_PER_WORKER * workers


def _num_slots(workers: int) -> int:
    # Slot k % slots serves batch k: by the time batch k is handed out, batch k - slots has been packed.
    return _window(workers) + 2


def _exit_causes(pool: ProcessPoolExecutor) -> str:
    """How the pool's workers that ended by themselves ended ("killed by SIGKILL", "exit code 1"), for an error
    message, once one has died (the pool then stops the others with SIGTERM)."""
    processes = list(pool._processes.values())
    pool.shutdown(wait=True)  # returns once the pool has reaped every worker, so each exit status is known
    causes = []
    for code in sorted({process.exitcode for process in processes} - {None, 0, -signal.SIGTERM}):
        try:
            causes.append(f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}")
        except ValueError:
            causes.append(f"killed by signal {-code}")
    return ", ".join(causes) or "cause unknown"


def _encoded(batches: Iterator, encoder: _DocumentEncoder, pool, workers: int) -> Iterator:
    """(work items, _Encoded, skip events, bytes read) per batch, in input order, computed by the pool's workers."""
    if pool is None:
        for items, events, done in batches:
            yield items, encoder(items), events, done
        return
    slots = _num_slots(workers)
    pending: collections.deque = collections.deque()

    def take():
        future, items, events, done = pending.popleft()
        encoded = future.result()
        if isinstance(encoded.chunk, tuple):
            _, slot, length = encoded.chunk
            # Copied out at once (about a millisecond per batch), so no view of the slot outlives this step.
            encoded.chunk = np.frombuffer(_RESULT_RING, np.int32, length, slot * _SLOT_TOKENS * 4).copy()
        return items, encoded, events, done

    try:
        for k, (items, events, done) in enumerate(batches):
            pending.append((pool.submit(_encode_in_worker, items, k % slots), items, events, done))
            if len(pending) > _window(workers):
                yield take()
        while pending:
            yield take()
    except BrokenProcessPool:
        raise UserError(
            f"a tokenizer worker process died ({_exit_causes(pool)}), so its batch is lost; the usual cause is the "
            "out-of-memory killer (SIGKILL) on very large documents: rerun with fewer workers= or with more memory"
        ) from None


def _int32_array_bytes(values: np.ndarray) -> bytes:
    """MDS's "ndarray:int32" encoding of a non-empty 1-d int32 array: [ndim << 2 | shape dtype] [shape] [values]."""
    n = len(values)
    code, fmt = (0, "B") if n < 1 << 8 else (1, "H") if n < 1 << 16 else (2, "I")
    return struct.pack("<B" + fmt, 4 | code, n) + values.tobytes()


@functools.cache
def token_writer_class() -> type:
    """MDSWriter with a fast encode_sample for COLUMNS (the same bytes as MDSWriter's generic per-column encoding,
    checked by the tests, in a tenth of its time, which was most of the main process's work), shards compressed and
    written on a background thread, and a finish() without a one-second poll."""
    mds_writer = import_streaming().MDSWriter

    class TokenMDSWriter(mds_writer):
        # Shards being compressed at once: each holds its raw bytes (up to SHARD_SIZE_LIMIT) until written.
        max_pending_shards = 2

        def encode_sample(self, sample: dict[str, Any]) -> bytes:
            # Columns in sorted order (doc_starts, tokens), both variable-size: a uint32 size each, then the data.
            starts, tokens = _int32_array_bytes(sample["doc_starts"]), _int32_array_bytes(sample["tokens"])
            return struct.pack("<II", len(starts), len(tokens)) + starts + tokens

        def flush_shard(self) -> None:
            # streaming compresses (zstd, which releases the GIL) and writes each shard on the calling thread; the
            # main process of qwen2-prepare then stops handing batches to the tokenizer workers for the ~0.3 s a
            # 64 MB shard takes, and they go idle. Here the shard's bytes are built on the caller's thread (cheap)
            # and compressed and written on one background thread, in order; the index entry is completed when
            # that finishes. The bytes on disk are the same as streaming's.
            if not hasattr(self, "_compressor"):
                self._compressor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mds-compress")
                self._pending_shards = collections.deque()
            raw_basename, zip_basename = self._name_next_shard()
            raw_data = self.encode_joint_shard()
            entry = {"samples": len(self.new_samples), "raw_data": None, "zip_data": None, **self.get_config()}
            self.shards.append(entry)
            future = self._compressor.submit(self._process_file, raw_data, raw_basename, zip_basename)
            self._pending_shards.append((future, entry, zip_basename or raw_basename))
            while len(self._pending_shards) > self.max_pending_shards:
                self._complete_oldest_shard()

        def _complete_oldest_shard(self) -> None:
            future, entry, basename = self._pending_shards.popleft()
            entry["raw_data"], entry["zip_data"] = future.result()  # re-raises a failed write here
            upload = self.executor.submit(self.cloud_writer.upload_file, basename)
            upload.add_done_callback(self.exception_callback)

        def finish(self) -> None:
            if self.new_samples:
                self.flush_shard()
                self._reset_cache()
            if hasattr(self, "_compressor"):
                try:
                    while self._pending_shards:
                        self._complete_oldest_shard()
                finally:
                    self._compressor.shutdown(wait=True, cancel_futures=True)
            # streaming's finish() polls its upload queue once a second before it writes the index: with a local
            # output (no-op uploads) that is up to a second per split for nothing. Wait in milliseconds instead.
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
        # Of the samples' tokens: what a resume compares to tell this data from other data of the same counts.
        self.digest = hashlib.blake2b(digest_size=8)

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
        self.digest.update(np.ascontiguousarray(stream[: num_full * size], dtype="<i4").tobytes())
        self.samples += num_full
        self.pending = stream[num_full * size :]
        self.pending_starts = starts[bounds[num_full] :] - num_full * size

    def abort(self) -> None:
        """Stop writing after a failure: drop the shards still being compressed."""
        compressor = getattr(self.writer, "_compressor", None)
        if compressor is not None:
            compressor.shutdown(wait=True, cancel_futures=True)

    def finish(self) -> dict[str, int | str]:
        """Close the shards (an empty split leaves no directory) and return the split's counts."""
        self.writer.finish()
        if self.samples == 0:
            shutil.rmtree(self.out, ignore_errors=True)
        return {
            "documents": self.documents,
            "samples": self.samples,
            "tokens": self.samples * self.sample_tokens,
            "dropped_tail_tokens": len(self.pending),
            "digest": self.digest.hexdigest(),
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


# What a directory qwen2-prepare wrote holds: overwrite=true replaces nothing else. In its splits: streaming's
# index, the shards, and the raw shards (with their temporary names) a loader decompresses beside them.
DATASET_ENTRIES = (SUMMARY_NAME, TRAIN, VAL)
_SPLIT_ENTRY = re.compile(r"index\.json|shard\.\d+\.mds(\.zstd)?(\.tmp-[\w-]+)?")


def _foreign_entries(output: str, entries: list[str]) -> list[str]:
    """The entries of an existing output (and of its train/ and val/) that a prepared dataset does not hold."""
    foreign = [name for name in entries if name not in DATASET_ENTRIES]
    for split in (TRAIN, VAL):
        path = os.path.join(output, split)
        if split not in entries:
            continue
        if not os.path.isdir(path) or os.path.islink(path):
            foreign.append(split)
            continue
        foreign += [f"{split}/{name}" for name in sorted(os.listdir(path))
                    if not (_SPLIT_ENTRY.fullmatch(name) and os.path.isfile(os.path.join(path, name)))]
    return foreign


def _check_output(output: str, overwrite: bool, files: list[str]) -> str:
    if "://" in output:
        raise UserError(f"output={output} must be a local directory; upload the finished directory afterwards")
    # Its real path: through a symlink, the dataset goes to the link's target (renamed into its place there).
    output = os.path.realpath(os.path.expanduser(output))
    inside = [f for f in files if os.path.realpath(f).startswith(output + os.sep)]
    if inside:
        raise UserError(f"output={output} holds the input {inside[0]}, which the finished dataset would replace; "
                        "choose an output directory outside the inputs")
    if os.path.exists(output):
        if not os.path.isdir(output):
            raise UserError(f"output={output} is a file; choose a directory path")
        entries = sorted(os.listdir(output))
        if entries and not overwrite:
            raise UserError(f"output={output} exists and is not empty; pass overwrite=true or choose another output")
        others = _foreign_entries(output, entries)
        if others:
            raise UserError(f"output={output} holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}, "
                            f"which is not part of a prepared dataset ({', '.join(DATASET_ENTRIES)}, and shards in "
                            "the splits): overwrite=true replaces only a directory qwen2-prepare wrote; choose "
                            "another output")
        if os.path.ismount(output):
            raise UserError(f"output={output} is a mount point; the dataset is written beside its directory and "
                            "renamed into its place, which a mount point cannot take: name a new directory inside "
                            f"it, e.g. output={os.path.join(output, 'dataset')}")
    try:
        os.makedirs(os.path.dirname(output), exist_ok=True)
    except OSError as e:
        raise UserError(f"output={output}: its parent directory cannot be created ({e.strerror}: {e.filename}); "
                        "choose another output") from None
    check_writable_dir(os.path.dirname(output), f"output={output}", "choose another output")  # the copy goes beside
    return output


def cgroup_cpu_limit(root: str = CGROUP_ROOT) -> int | None:
    """CPUs the cgroup CPU quota under root allows (a container's CPU limit, rounded up); None without a quota."""
    try:  # cgroup v2: "QUOTA PERIOD" in microseconds, or "max PERIOD"
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()
        if quota == "max":
            return None
        quota, period = int(quota), int(period)
    except (OSError, ValueError):
        try:  # cgroup v1: the quota (-1: none) and the period in files of their own
            with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
                quota = int(f.read())
            with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
                period = int(f.read())
        except (OSError, ValueError):
            return None
    if quota <= 0 or period <= 0:
        return None
    return -(-quota // period)


def available_cpus(cgroup_root: str = CGROUP_ROOT) -> int:
    """CPU cores this process may use: those it may run on, capped by the cgroup CPU quota (a container's limit),
    which the scheduler enforces however many cores the host has."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root)
    if limit is not None and limit < cores:
        log.info("the cgroup CPU quota (%s) allows %d CPUs of the %d cores this process may run on", cgroup_root,
                 limit, cores)
        return limit
    return cores


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
    text_split: str = "file",
    overwrite: bool = False,
    max_tokens: int | None = None,
    workers: int = 1,
    val_fraction: float = 0.0,
    progress: bool = False,
    held_out_fix: str | None = None,
) -> dict[str, Any]:
    """Tokenize inputs into train (and val) MDS samples of seq_len + 1 tokens under output; return the summary.
    text_split: how a plain-text input is cut into documents (one of TEXT_SPLITS). held_out_fix: what the warning for
    a held-out split too small for one sample says to do (default: raise val_fraction, or max_tokens when it is
    set)."""
    if not 1 <= seq_len <= MAX_SEQ_LEN:
        raise UserError(f"seq_len={seq_len} must lie in [1, {MAX_SEQ_LEN}]: a sample's 4-byte token ids are one MDS "
                        "column, whose size is a 32-bit number")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max_tokens={max_tokens} must be positive, or null for no limit")
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction={val_fraction} must lie in [0, 1), e.g. 0.005 for 0.5% held out")
    if workers < 0:
        raise UserError(f"workers={workers} must be >= 0 (0 = one per available CPU core)")
    if text_split not in TEXT_SPLITS:
        raise UserError(f"text_split={text_split} is not one of {', '.join(TEXT_SPLITS)}: file (a text file is one "
                        "document), line (each non-empty line), paragraph (separated by blank lines) or endoftext "
                        "(separated by <|endoftext|>)")
    if workers == 0:
        workers = available_cpus(CGROUP_ROOT)
        log.info("workers=0: %d tokenizer processes, one per available CPU core", workers)
    files = _expand_inputs(inputs, text_split)
    output = _check_output(output, overwrite, files)
    tok = load_tokenizer(tokenizer)
    sample_tokens = seq_len + 1

    # A sibling, so the final rename stays on one filesystem; its name never looks like the finished dataset.
    tmp = f"{output}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    for leftover in sorted(glob.glob(f"{glob.escape(output)}.tmp-*")):
        log.warning("%s: the partial output of an interrupted qwen2-prepare (killed, or still running elsewhere); "
                    "delete it when no qwen2-prepare writes there", leftover)
    skips = _Skips()
    bar = None
    encoder = _DocumentEncoder(tok, val_fraction, text_field, text_split, files)
    stack = contextlib.ExitStack()
    writers: dict[str, _SplitWriter] = {}
    try:
        # The pool first: before the writers (streaming imports torch) and the progress bar (a thread).
        pool = stack.enter_context(_worker_pool(workers, encoder, tokenizer))
        writers[TRAIN] = _SplitWriter(os.path.join(tmp, TRAIN), sample_tokens)
        if val_fraction > 0:
            writers[VAL] = _SplitWriter(os.path.join(tmp, VAL), sample_tokens)
        bar = _progress_bar(progress, sum(os.path.getsize(f) for f in files))
        started = time.monotonic()
        remaining = max_tokens
        max_token_id = -1
        reader = _Reader(files, BATCH_CHARS)
        batches = _batches(reader, text_field, text_split)
        next_line: collections.Counter = collections.Counter()
        file_docs: collections.Counter = collections.Counter()
        file_skips: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        for items, encoded, (events, finished), done in _encoded(batches, encoder, pool, workers):
            chunk, sizes, is_val = encoded.chunk, encoded.sizes, encoded.is_val
            # In file and line order: the reader's events and the workers' interleave.
            for index, line, reason, count in sorted(events + _absolute_events(items, encoded, next_line)):
                skips.add(files[index], line, reason, count)
                file_skips[index][reason] += count
            for message in encoded.warnings:
                log.warning("%s", message)
            # Counted before a max_tokens cut: a file whose documents fall after the cut did give documents.
            file_docs.update(encoded.file_docs)
            for index in finished:
                if not file_docs[index] and index not in reader.reported:
                    skipped = ", ".join(f"{reason}={count}" for reason, count in file_skips[index].items())
                    empty = os.path.getsize(files[index]) == 0
                    log.warning("input %s gave no documents (%s)", files[index],
                                skipped or ("an empty file" if empty else "no records in it"))
            if remaining is not None and len(chunk) >= remaining:
                # Cut the stream at max_tokens: later documents go, the one that crosses the limit is truncated.
                last = int(np.searchsorted(np.cumsum(sizes), remaining))
                sizes, is_val = sizes[: last + 1].copy(), is_val[: last + 1]
                sizes[last] -= int(sizes.sum()) - remaining
                chunk = chunk[:remaining]
                max_token_id = max(max_token_id, int(chunk.max()))  # once: the worker's max_id counts the cut tokens
            else:
                max_token_id = max(max_token_id, encoded.max_id)
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
            raise UserError(_no_sample_message(splits, skips, sample_tokens, text_field))
        if VAL in splits and splits[VAL]["samples"] == 0:
            fix = held_out_fix or ("raise val_fraction" + (" or max_tokens" if max_tokens is not None else ""))
            log.warning("val_fraction=%s held out %d tokens, fewer than one sample of seq_len+1=%d: the dataset has "
                        "no held-out split (training evaluates nothing); %s", val_fraction,
                        splits[VAL]["tokens"] + splits[VAL]["dropped_tail_tokens"], sample_tokens, fix)
        summary = {
            "format": FORMAT_VERSION,
            **{key: sum(s[key] for s in splits.values()) for key in
               ("documents", "tokens", "samples", "dropped_tail_tokens")},
            "splits": splits,
            "seq_len": seq_len,
            "sample_tokens": sample_tokens,
            "columns": sorted(COLUMNS),
            "tokenizer": tok.name,
            "vocab_size": tok.vocab_size,
            # The largest id in the packed stream (the last partial sample's tokens included): what the model's
            # vocabulary must cover (loader.check_vocab).
            "max_token_id": max_token_id,
            "val_fraction": val_fraction,
            "text_split": text_split,
            "inputs": files,
            "skipped": skips.counts,
            "skipped_examples": skips.examples,
        }
        # On disk before the summary names them complete: after a crash, a dataset with a summary has its shards.
        for root, _, names in os.walk(tmp):
            for name in names:
                fsync_path(os.path.join(root, name))
            fsync_path(root)
        # Written last: its presence marks a complete dataset.
        with open(os.path.join(tmp, SUMMARY_NAME), "w") as f:
            json.dump(summary, f, indent=2)
        fsync_path(os.path.join(tmp, SUMMARY_NAME))
        fsync_path(tmp)
        replace_dir(tmp, output)
        fsync_path(os.path.dirname(output))
    except BaseException:
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        stack.close()
        if bar is not None:
            bar.close()
    return summary


def _no_sample_message(splits: dict, skips: _Skips, sample_tokens: int, text_field: str) -> str:
    """Why the training split came out empty: its tokens and the held-out ones apart, and the records skipped."""
    train, val = (splits[k]["tokens"] + splits[k]["dropped_tail_tokens"] if k in splits else 0 for k in (TRAIN, VAL))
    message = (f"inputs gave {train} training tokens{f' ({val} more held out by val_fraction)' if val else ''}, "
               f"fewer than one training sample of seq_len+1={sample_tokens}; add data, lower seq_len or lower "
               "val_fraction")
    skipped = {reason: count for reason, count in skips.counts.items() if count}
    if skipped:
        message += (f". Records skipped: {', '.join(f'{reason}={count}' for reason, count in skipped.items())} "
                    f"(first: {'; '.join(skips.examples[:3])})")
    if skipped.get("missing_field") or skipped.get("wrong_type"):
        message += f"; check text_field={text_field} (the JSON field or Parquet column that holds the text)"
    return message


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
