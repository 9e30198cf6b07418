"""Tokenize text files into fixed-length MDS samples for training (the library side of qwen2-prepare)."""

import glob
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np

from qwen2_dist.data.streaming_compat import import_streaming
from qwen2_dist.data.tokenizer import load_tokenizer
from qwen2_dist.errors import UserError
from qwen2_dist.fsutil import replace_dir

SUMMARY_NAME = "prepare_summary.json"
SKIP_REASONS = ("malformed_json", "missing_field", "not_utf8", "empty_document")
NUM_SKIPPED_EXAMPLES = 10
JSONL_SUFFIXES = (".jsonl", ".json")
# Uncompressed bytes per shard: large enough that the index stays small, small enough that a rank starts training
# after downloading one shard.
SHARD_SIZE_LIMIT = 1 << 26
# Characters of text handed to the tokenizer at once: big batches keep tiktoken's threads busy, bounded ones keep
# memory flat on corpora of any size.
BATCH_CHARS = 1 << 23


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
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise UserError(f"input file {path} cannot be read ({e.strerror}); fix its permissions") from None
    return files


class _Skips:
    """Counts of skipped records by reason, plus the first few as "file:line reason"."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(SKIP_REASONS, 0)
        self.examples: list[str] = []

    def add(self, path: str, line: int, reason: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < NUM_SKIPPED_EXAMPLES:
            self.examples.append(f"{path}:{line} {reason}")


def _jsonl_documents(path: str, text_field: str, skips: _Skips) -> Iterator[str]:
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                skips.add(path, line_number, "not_utf8")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skips.add(path, line_number, "malformed_json")
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                skips.add(path, line_number, "missing_field")
            elif not text.strip():
                skips.add(path, line_number, "empty_document")
            else:
                yield text


def _text_document(path: str, skips: _Skips) -> Iterator[str]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        skips.add(path, data.count(b"\n", 0, e.start) + 1, "not_utf8")
        return
    if not text.strip():
        skips.add(path, 1, "empty_document")
        return
    yield text


def _documents(files: list[str], text_field: str, skips: _Skips) -> Iterator[str]:
    for path in files:
        if path.endswith(JSONL_SUFFIXES):
            yield from _jsonl_documents(path, text_field, skips)
        else:
            yield from _text_document(path, skips)


def _batches(documents: Iterator[str], max_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    num_chars = 0
    for text in documents:
        batch.append(text)
        num_chars += len(text)
        if num_chars >= max_chars:
            yield batch
            batch, num_chars = [], 0
    if batch:
        yield batch


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


def prepare(
    inputs: list[str],
    output: str,
    seq_len: int,
    tokenizer: str = "qwen2",
    text_field: str = "text",
    overwrite: bool = False,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """Tokenize inputs into MDS samples of seq_len + 1 tokens under output and return its summary."""
    if seq_len < 1:
        raise UserError(f"seq_len={seq_len} must be at least 1")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max_tokens={max_tokens} must be positive, or null for no limit")
    files = _expand_inputs(inputs)
    output = _check_output(output, overwrite)
    tok = load_tokenizer(tokenizer)
    sample_tokens = seq_len + 1
    streaming = import_streaming()

    os.makedirs(os.path.dirname(output), exist_ok=True)
    # A sibling, so the final rename stays on one filesystem; its name never looks like the finished dataset.
    tmp = f"{output}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    skips = _Skips()
    num_documents = 0
    num_stream_tokens = 0
    num_samples = 0
    pending = np.empty(0, dtype=np.int32)
    try:
        writer = streaming.MDSWriter(
            out=tmp, columns={"tokens": "ndarray:int32"}, compression="zstd", size_limit=SHARD_SIZE_LIMIT
        )
        documents = _documents(files, text_field, skips)
        batch_chars = BATCH_CHARS if max_tokens is None else min(BATCH_CHARS, 8 * max_tokens)
        for batch in _batches(documents, batch_chars):
            flat: list[int] = []
            for ids in tok.encode_batch(batch):
                if max_tokens is not None and num_stream_tokens + len(flat) >= max_tokens:
                    break
                num_documents += 1
                flat.extend(ids)
                flat.append(tok.eos_id)
            if max_tokens is not None:
                del flat[max_tokens - num_stream_tokens :]
            num_stream_tokens += len(flat)
            stream = np.concatenate([pending, np.asarray(flat, dtype=np.int32)])
            num_full = len(stream) // sample_tokens
            for row in stream[: num_full * sample_tokens].reshape(num_full, sample_tokens):
                writer.write({"tokens": row})
            num_samples += num_full
            pending = stream[num_full * sample_tokens :]
            if max_tokens is not None and num_stream_tokens >= max_tokens:
                break
        writer.finish()
        if num_samples == 0:
            raise UserError(
                f"inputs gave {num_stream_tokens} tokens, fewer than one sample of seq_len+1={sample_tokens}; "
                "add data or lower seq_len"
            )
        summary = {
            "documents": num_documents,
            "tokens": num_samples * sample_tokens,
            "samples": num_samples,
            "seq_len": seq_len,
            "sample_tokens": sample_tokens,
            "dropped_tail_tokens": len(pending),
            "tokenizer": tok.name,
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
    return summary


def read_summary(path: str) -> dict[str, Any]:
    """The prepare_summary.json of a dataset directory written by prepare()."""
    summary_path = os.path.join(path, SUMMARY_NAME)
    try:
        with open(summary_path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(
            f"{summary_path} not found: {path} is not a finished dataset; run qwen2-prepare input=... output={path}"
        ) from None
    except json.JSONDecodeError as e:
        raise UserError(f"{summary_path} is corrupt ({e}); rerun qwen2-prepare with overwrite=true") from None
