"""prepare() turns text into exact seq_len+1 token samples, skips bad records, and never leaves a half dataset."""

import bz2
import gzip
import json
import logging
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from qwen2_dist.cli.prepare import main
from qwen2_dist.data import corpus, prepare as prepare_module
from qwen2_dist.data.corpus import embedded_corpus
from qwen2_dist.data.prepare import SUMMARY_NAME, prepare, read_summary
from qwen2_dist.data.streaming_compat import import_streaming
from qwen2_dist.data.tokenizer import load_tokenizer
from qwen2_dist.errors import UserError
from tests.helpers import record_fsyncs, run_python

GOOD_DOCS = ["Hello world", "你好，世界", "12345 <|endoftext|> tail"]
TXT_DOC = "Plain text file.\nSecond line, with more words in it.\n"


def read_samples(path) -> list[dict]:
    """Every sample of an MDS directory in index order, read with streaming's own MDS reader."""
    import_streaming()
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    with open(os.path.join(path, "index.json")) as f:
        shards = json.load(f)["shards"]
    samples = []
    for shard in shards:
        # The reader wants the raw shard next to the compressed one, as StreamingDataset leaves it after download.
        with open(os.path.join(path, shard["zip_data"]["basename"]), "rb") as f:
            raw = decompress(shard["compression"], f.read())
        with open(os.path.join(path, shard["raw_data"]["basename"]), "wb") as f:
            f.write(raw)
        reader = reader_from_json(str(path), None, shard)
        samples.extend(reader.get_item(i) for i in range(len(reader)))
    return samples


def read_tokens(path) -> list[np.ndarray]:
    """The token arrays of every sample of a dataset's train split (or of an MDS directory)."""
    path = os.path.join(path, "train") if os.path.isdir(os.path.join(path, "train")) else path
    return [sample["tokens"] for sample in read_samples(path)]


def expected_samples(docs: list[str], sample_tokens: int, max_tokens: int | None = None) -> list[list[int]]:
    tok = load_tokenizer("qwen2")
    stream = [i for doc in docs for i in tok.encode(doc) + [tok.eos_id]][:max_tokens]
    return [stream[i : i + sample_tokens] for i in range(0, len(stream) - sample_tokens + 1, sample_tokens)]


@pytest.fixture
def work(tmp_path):
    """A directory that only this test writes (tmp_path itself may hold conftest's per-test TMPDIR)."""
    path = tmp_path / "work"
    path.mkdir()
    return path


_FORKED_PREPARE = """
import json, sys
from qwen2_dist.data import prepare as module

methods, real = [], module.ProcessPoolExecutor


def recording(workers, mp_context, **kwargs):
    methods.append(mp_context.get_start_method())
    return real(workers, mp_context=mp_context, **kwargs)


module.ProcessPoolExecutor = recording
settings = json.loads(sys.argv[1])
for name, value in settings.pop("module").items():
    setattr(module, name, value)
summary = module.prepare(**settings)
print(json.dumps({"methods": methods, "summary": summary}))
"""


def prepare_in_a_fresh_process(work, module_settings: dict, **kwargs) -> tuple[list[str], dict]:
    """(the start method of each worker pool, the summary) of prepare(**kwargs) in a new process of no other thread,
    as qwen2-prepare's is, with module_settings set on qwen2_dist.data.prepare first. prepare() forks its workers
    only in such a process (else it spawns them): this one may hold threads of earlier tests (tqdm's monitor, which
    main()'s progress bar starts; torch's), which made every workers=2 run here spawn, and the fork path, with its
    shared result slots, went untested."""
    script = work / "forked_prepare.py"
    script.write_text(_FORKED_PREPARE)
    result = run_python([str(script), json.dumps({"module": module_settings, **kwargs})], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reply = json.loads(result.stdout.strip().splitlines()[-1])
    return reply["methods"], reply["summary"]


def pool_start_methods(monkeypatch) -> list[str]:
    """The start method of each worker pool prepare() makes in this process from now on, in order."""
    methods = []
    real = prepare_module.ProcessPoolExecutor

    def recording(workers, mp_context, **kwargs):
        methods.append(mp_context.get_start_method())
        return real(workers, mp_context=mp_context, **kwargs)

    monkeypatch.setattr(prepare_module, "ProcessPoolExecutor", recording)
    return methods


@pytest.fixture
def inputs(work):
    """a.jsonl with one good record per GOOD_DOCS between bad ones, and b.txt (one document)."""
    lines = [
        json.dumps({"text": GOOD_DOCS[0]}).encode(),
        b'{"text": "truncated',  # line 2: malformed_json
        json.dumps({"text": GOOD_DOCS[1]}, ensure_ascii=False).encode(),
        json.dumps({"title": "no text field"}).encode(),  # line 4: missing_field
        '{"text": "café"}'.encode("latin-1"),  # line 5: not_utf8
        json.dumps({"text": "  \n"}).encode(),  # line 6: empty_document
        json.dumps({"text": 5}).encode(),  # line 7: wrong_type (not a string)
        json.dumps({"text": None}).encode(),  # line 8: missing_field (null, as a Parquet null)
        b"",  # a blank line is no record
        json.dumps({"text": GOOD_DOCS[2]}).encode(),
    ]
    src = work / "src"
    src.mkdir()
    (src / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (src / "b.txt").write_text(TXT_DOC)
    return src


def test_prepare_writes_exact_samples_and_counts_skips(work, inputs):
    out = work / "out"
    summary = prepare([str(inputs / "*.jsonl"), str(inputs / "b.txt")], str(out), seq_len=4)

    a = str(inputs / "a.jsonl")
    assert summary["skipped"] == {
        "malformed_json": 1, "missing_field": 2, "wrong_type": 1, "not_utf8": 1, "empty_document": 1,
        "corrupt_file": 0,
    }
    assert summary["skipped_examples"] == [
        f"{a}:2 malformed_json",
        f"{a}:4 missing_field",
        f"{a}:5 not_utf8",
        f"{a}:6 empty_document",
        f"{a}:7 wrong_type",
        f"{a}:8 missing_field",
    ]
    expected = expected_samples(GOOD_DOCS + [TXT_DOC], sample_tokens=5)
    num_stream = sum(len(load_tokenizer().encode(d)) + 1 for d in GOOD_DOCS + [TXT_DOC])
    assert summary["documents"] == 4
    assert summary["samples"] == len(expected) > 3
    assert (summary["seq_len"], summary["sample_tokens"]) == (4, 5)
    assert summary["tokens"] == 5 * len(expected)
    assert summary["dropped_tail_tokens"] == num_stream - 5 * len(expected)
    assert (summary["tokenizer"], summary["vocab_size"]) == ("qwen2", 151_646)
    assert summary["inputs"] == [a, str(inputs / "b.txt")]
    assert read_summary(str(out)) == summary

    samples = read_tokens(out)
    assert all(s.dtype == np.int32 for s in samples)
    assert [s.tolist() for s in samples] == expected
    assert sorted(os.listdir(work)) == ["out", "src"]  # no temporary directory left behind
    assert sorted(os.listdir(out)) == [SUMMARY_NAME, "train"]  # no val split without val_fraction


def test_samples_keep_order_across_shards(work, inputs, monkeypatch):
    monkeypatch.setattr(prepare_module, "SHARD_SIZE_LIMIT", 64)  # a few samples per shard
    out = work / "out"
    summary = prepare([str(inputs / "a.jsonl"), str(inputs / "b.txt")], str(out), seq_len=4)
    with open(out / "train" / "index.json") as f:
        assert len(json.load(f)["shards"]) > 2
    assert [s.tolist() for s in read_tokens(out)] == expected_samples(GOOD_DOCS + [TXT_DOC], 5)
    assert summary["samples"] == len(expected_samples(GOOD_DOCS + [TXT_DOC], 5))


def test_max_tokens_stops_the_stream(work, inputs):
    out = work / "out"
    summary = prepare([str(inputs / "a.jsonl"), str(inputs / "b.txt")], str(out), seq_len=4, max_tokens=12)
    assert [s.tolist() for s in read_tokens(out)] == expected_samples(GOOD_DOCS + [TXT_DOC], 5, max_tokens=12)
    assert (summary["samples"], summary["tokens"], summary["dropped_tail_tokens"]) == (2, 10, 2)
    assert summary["documents"] == 3  # the third document is cut; b.txt is never reached
    # The largest token id counts the stream up to the cut only: the first 2 tokens, not the eos that follows.
    tokens = load_tokenizer().encode(GOOD_DOCS[0])
    assert len(tokens) == 2
    cut = prepare([str(inputs / "a.jsonl")], str(work / "cut"), seq_len=1, max_tokens=2)
    assert cut["max_token_id"] == max(tokens) < load_tokenizer().eos_id


@pytest.mark.parametrize("slash", ["", "/"])
def test_a_directory_input_is_refused_with_the_pattern_of_its_files(work, slash):
    (work / "shards").mkdir()
    with pytest.raises(UserError, match=rf"input .*shards{slash} is a directory; pass the files inside it, e.g. "
                                        rf"input=.*[^/]/shards/\*\.jsonl$"):
        prepare([f"{work / 'shards'}{slash}"], str(work / "out"), seq_len=4)


@pytest.mark.parametrize("seq_len", [0, 2**28 + 1, 10**20])
def test_a_seq_len_no_sample_can_hold_is_refused_before_tokenizing(work, inputs, seq_len):
    """10**20 overflowed numpy after the whole input was tokenized; a sample over 2**28 ids overflows MDS's size."""
    with pytest.raises(UserError, match=rf"^seq_len={seq_len} must lie in \[1, 268435456\]"):
        prepare([str(inputs / "a.jsonl")], str(work / "out"), seq_len=seq_len)
    assert not (work / "out").exists()


def test_refuses_existing_output_without_overwrite(work, inputs):
    out = work / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match=r"output=.*out exists and is not empty; pass overwrite=true"):
        prepare([str(inputs / "a.jsonl")], str(out), seq_len=4)
    assert os.listdir(out) == ["keep.txt"]

    # overwrite=true replaces a dataset qwen2-prepare wrote, nothing else: not a directory of other files (a slip
    # such as output=. or output=~), not the directory of the inputs.
    with pytest.raises(UserError, match=r"output=.*out holds keep.txt, which is not part of a prepared dataset "
                                        r"\(prepare_summary.json, train, val, and shards in the splits\): "
                                        "overwrite=true replaces only"):
        prepare([str(inputs / "a.jsonl")], str(out), seq_len=4, overwrite=True)
    with pytest.raises(UserError, match=r"output=.*src holds the input .*a.jsonl, which the finished dataset would "
                                        "replace"):
        prepare([str(inputs / "a.jsonl")], str(inputs), seq_len=4, overwrite=True)
    assert (out / "keep.txt").read_text() == "precious" and (inputs / "a.jsonl").exists()
    os.remove(out / "keep.txt")
    prepare([str(inputs / "b.txt")], str(out), seq_len=4)
    prepare([str(inputs / "a.jsonl")], str(out), seq_len=4, overwrite=True)
    assert read_summary(str(out))["documents"] == 3
    assert sorted(os.listdir(work)) == ["out", "src"]
    # Nor a directory whose train/ or val/ holds other files (a project's raw data split the same way).
    project = work / "project"
    (project / "train").mkdir(parents=True)
    (project / "train" / "raw.jsonl").write_text("precious")
    with pytest.raises(UserError, match=r"output=.*project holds train/raw.jsonl, which is not part of a prepared "
                                        "dataset"):
        prepare([str(inputs / "a.jsonl")], str(project), seq_len=4, overwrite=True)
    assert (project / "train" / "raw.jsonl").read_text() == "precious"
    shutil.rmtree(project)


def test_an_output_through_a_symlink_lands_in_its_target_and_a_mount_point_is_refused(work, inputs, monkeypatch):
    """The dataset is written beside the output and renamed into its place: through a symlink it must land in the
    link's target (it replaced the link, and the target stayed empty), and a mount point, which a rename cannot
    replace, is refused before the work (it failed after all of it)."""
    (work / "disk" / "shards").mkdir(parents=True)
    (work / "links").mkdir()
    (work / "links" / "shards").symlink_to(work / "disk" / "shards")
    prepare([str(inputs / "a.jsonl")], str(work / "links" / "shards"), seq_len=4)
    assert (work / "links" / "shards").is_symlink() and os.listdir(work / "links") == ["shards"]
    assert read_summary(str(work / "disk" / "shards"))["documents"] == 3
    mount = work / "volume"
    mount.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda path: str(path) == str(mount))
    with pytest.raises(UserError, match=rf"output={mount} is a mount point; .* e.g. output={mount}/dataset"):
        prepare([str(inputs / "a.jsonl")], str(mount), seq_len=4)
    assert os.listdir(mount) == []


def test_records_json_cannot_hold_are_skipped_and_inputs_are_the_files_named(work):
    """An integer of over 4300 digits (Python's limit) or nesting deeper than the recursion limit raised out of
    json.loads and ended the run; a file named with [ ] is that file, not a pattern matching another one; a pipe is
    refused."""
    good = {"text": "kept document"}
    (work / "part[1].jsonl").write_text("\n".join([
        json.dumps(good), '{"text": "x", "id": ' + "9" * 5000 + "}", "[" * 100_000, json.dumps(good)]) + "\n")
    (work / "part1.jsonl").write_text(json.dumps({"text": "the other file"}) + "\n")
    summary = prepare([str(work / "part[1].jsonl")], str(work / "out"), seq_len=2)
    assert summary["inputs"] == [str(work / "part[1].jsonl")] and summary["documents"] == 2
    assert summary["skipped"]["malformed_json"] == 2
    assert summary["skipped_examples"] == [f"{work}/part[1].jsonl:2 malformed_json",
                                           f"{work}/part[1].jsonl:3 malformed_json"]
    os.mkfifo(work / "pipe")  # as input=<(zcat ...) gives: its records would be read up by the checks
    with pytest.raises(UserError, match=r"input .*pipe is not a regular file \(a pipe or a device\)"):
        prepare([str(work / "pipe")], str(work / "out2"), seq_len=2)  # (without the check: blocks on the pipe)


def test_max_token_id_is_the_largest_id_written(work, inputs):
    summary = prepare([str(inputs / "a.jsonl"), str(inputs / "b.txt")], str(work / "out"), seq_len=4)
    assert summary["max_token_id"] == max(int(t.max()) for t in read_tokens(work / "out")) == load_tokenizer().eos_id


def test_a_dead_worker_is_an_error_not_a_hang(work, monkeypatch):
    # A worker killed in the middle of a batch (by the out-of-memory killer, say) lost the batch, and prepare waited
    # for its result forever, leaving output.tmp-* behind.
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 2_000)
    src = work / "src"
    src.mkdir()
    (src / "a.jsonl").write_bytes(_jsonl_bytes([f"document {j} " * 20 for j in range(300)]))
    encoded = prepare_module._encoded

    def workers_killed_after_the_first_batch(batches, encoder, pool, workers):
        # From outside, as the out-of-memory killer does: the workers may be forked or spawned (spawned when this
        # process runs other threads, as in the whole test suite), and a spawned one never sees a monkeypatch.
        for k, result in enumerate(encoded(batches, encoder, pool, workers)):
            if k == 0:
                for process in list(pool._processes.values()):
                    os.kill(process.pid, signal.SIGKILL)
            yield result

    def hung(*_):
        raise TimeoutError("prepare still waits for the dead worker's batch")

    monkeypatch.setattr(prepare_module, "_encoded", workers_killed_after_the_first_batch)
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        with pytest.raises(UserError, match=r"a tokenizer worker process died \(killed by SIGKILL\), so its batch is "
                                            r"lost; .* rerun with fewer workers= or with more memory"):
            prepare([str(src / "a.jsonl")], str(work / "out"), seq_len=16, workers=2)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert sorted(os.listdir(work)) == ["src"]


def test_interrupted_prepare_leaves_nothing(work, inputs, monkeypatch):
    tok = load_tokenizer("qwen2")
    calls = []

    encode_flat = tok.encode_flat

    def encode_flat_then_die(texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode_flat(texts)

    monkeypatch.setattr(tok, "encode_flat", encode_flat_then_die)
    monkeypatch.setattr(prepare_module, "load_tokenizer", lambda spec: tok)
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 1)  # one document per batch
    with pytest.raises(KeyboardInterrupt):
        prepare([str(inputs / "a.jsonl")], str(work / "out"), seq_len=1)
    assert len(calls) == 2
    assert sorted(os.listdir(work)) == ["src"]


@pytest.mark.parametrize(
    "bad, message",
    [("missing.jsonl", r"input file .*missing\.jsonl does not exist"), ("*.parquet", r"\*\.parquet matches no files")],
)
def test_bad_input_errors_before_writing(work, inputs, bad, message):
    with pytest.raises(UserError, match=message):
        prepare([str(inputs / "a.jsonl"), str(inputs / bad)], str(work / "out"), seq_len=4)
    assert sorted(os.listdir(work)) == ["src"]


def test_too_little_data_leaves_nothing(work, inputs):
    with pytest.raises(UserError, match=r"fewer than one training sample of seq_len\+1=1001"):
        prepare([str(inputs / "a.jsonl")], str(work / "out"), seq_len=1000)
    assert sorted(os.listdir(work)) == ["src"]


def test_read_summary_of_unfinished_directory(work):
    with pytest.raises(UserError, match=r"prepare_summary\.json not found.*run qwen2-prepare"):
        read_summary(str(work))


def test_cli_prepares_and_prints_summary_path(work, inputs, capsys):
    out = work / "out"
    assert main([f"input={inputs}/*.jsonl,{inputs}/b.txt", f"output={out}", "seq_len=4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("prepared ")
    assert lines[1] == str(out / SUMMARY_NAME)
    assert read_summary(str(out))["samples"] == len(expected_samples(GOOD_DOCS + [TXT_DOC], 5))


@pytest.mark.parametrize(
    "arg, message",
    [
        ("bogus=1", "error: unknown key 'bogus'; valid keys: input, output, seq_len,"),
        ("seq_len=abc", "error: bad value 'seq_len=abc'"),
        ("overwrite", "error: argument 'overwrite' is not key=value"),
    ],
)
def test_cli_bad_argument_is_one_line_exit_2(work, inputs, capsys, arg, message):
    assert main([f"input={inputs}/a.jsonl", f"output={work / 'out'}", arg]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert "valid keys" in err
    assert not (work / "out").exists()


def test_cli_user_error_exit_2(work, capsys):
    assert main([f"input={work}/none.jsonl", f"output={work / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: input file ") and "none.jsonl" in err and err.count("\n") == 1


def test_embedded_corpus_builds_once(work, caplog):
    with caplog.at_level(logging.INFO, logger="qwen2_dist.data.corpus"):
        path = embedded_corpus(str(work), seq_len=32, max_tokens=20_000)
    assert len([r for r in caplog.records if r.name == "qwen2_dist.data.corpus"]) == 1 and path in caplog.text
    summary = read_summary(path)
    assert summary["tokens"] == summary["samples"] * 33 > 19_000
    assert (summary["tokenizer"], summary["vocab_size"], summary["max_token_id"]) == ("qwen2", 151_646, 151_643)
    assert summary["tokens"] + summary["dropped_tail_tokens"] == 20_000
    assert os.path.basename(path).startswith("stdlib-")
    assert os.listdir(work) == [os.path.basename(path)]
    mtime = os.stat(os.path.join(path, SUMMARY_NAME)).st_mtime_ns

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qwen2_dist.data.corpus"):
        assert embedded_corpus(str(work), seq_len=32, max_tokens=20_000) == path
    assert not caplog.records
    assert os.stat(os.path.join(path, SUMMARY_NAME)).st_mtime_ns == mtime
    assert embedded_corpus(str(work), seq_len=64, max_tokens=20_000) != path


def test_embedded_corpus_race_loser_discards_its_copy(work, monkeypatch):
    def prepare_then_lose_the_race(inputs, output, **kwargs):
        summary = prepare(inputs, output, **kwargs)
        shutil.copytree(output, output.split(".build-")[0])  # another process renamed its copy in first
        return summary

    monkeypatch.setattr(corpus, "prepare", prepare_then_lose_the_race)
    path = embedded_corpus(str(work), seq_len=32, max_tokens=2_000)
    summary = read_summary(path)
    assert summary["tokens"] + summary["dropped_tail_tokens"] == 2_000
    assert os.listdir(work) == [os.path.basename(path)]


def test_an_embedded_corpus_too_small_for_a_held_out_sample_names_its_own_setting(work, caplog):
    """The embedded corpus holds out a fixed share: the fix is data.embedded_max_tokens, not val_fraction, which a
    user cannot set there."""
    with caplog.at_level(logging.WARNING):
        embedded_corpus(str(work), seq_len=128, max_tokens=258)
    assert "no held-out split" in caplog.text and "raise data.embedded_max_tokens" in caplog.text
    assert "raise val_fraction" not in caplog.text


def _jsonl_bytes(docs: list[str], field: str = "text") -> bytes:
    return b"".join(json.dumps({field: d}, ensure_ascii=False).encode() + b"\n" for d in docs)


def test_compressed_and_parquet_inputs_give_the_same_samples(work):
    import gzip

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    zstandard = pytest.importorskip("zstandard")
    src = work / "src"
    src.mkdir()
    (src / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(GOOD_DOCS[:2])))
    (src / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl_bytes(GOOD_DOCS[2:])))
    pq.write_table(pa.table({"text": [TXT_DOC], "id": [1]}), src / "c.parquet")
    (src / "d.txt.gz").write_bytes(gzip.compress(TXT_DOC.encode()))
    summary = prepare([str(src / "*")], str(work / "out"), seq_len=4)
    expected = expected_samples(GOOD_DOCS + [TXT_DOC, TXT_DOC], 5)
    assert [s.tolist() for s in read_tokens(work / "out")] == expected
    assert summary["documents"] == 5 and sum(summary["skipped"].values()) == 0


def test_zstd_files_are_read_frame_after_frame_and_a_truncated_one_is_counted(work):
    zstandard = pytest.importorskip("zstandard")
    src = work / "src"
    src.mkdir()
    docs = [f"document number {i} with some words" for i in range(8000)]  # 3 blocks of zstd's 128 KiB
    compress = zstandard.ZstdCompressor().compress
    # Two frames, as `cat a.zst b.zst` or pzstd writes them: every record is read.
    (src / "a.jsonl.zst").write_bytes(compress(_jsonl_bytes(docs[:400])) + compress(_jsonl_bytes(docs[400:800])))
    # Cut short (zstandard's stream reader would have passed these for shorter files): the JSONL file keeps the
    # records of the blocks before the cut and counts the rest as one corrupt_file; the text file is one.
    whole = compress(_jsonl_bytes(docs))
    (src / "b.jsonl.zst").write_bytes(whole[: len(whole) // 2])
    whole = compress(" ".join(docs).encode())
    (src / "c.txt.zst").write_bytes(whole[: len(whole) // 2])
    summary = prepare([str(src / "*")], str(work / "out"), seq_len=8)
    assert summary["skipped"]["corrupt_file"] == 2 and sum(summary["skipped"].values()) == 2
    assert [e.rsplit(":", 1)[0] for e in summary["skipped_examples"]] == [str(src / "b.jsonl.zst"),
                                                                          str(src / "c.txt.zst")]
    assert 800 < summary["documents"] < 800 + 8000


def test_every_kind_of_bad_input_is_counted_and_the_rest_is_usable(work):
    import gzip

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    src = work / "src"
    src.mkdir()
    good = [f"document number {i} with some words" for i in range(6)]
    (src / "a.jsonl").write_bytes(b"\n".join([
        json.dumps({"text": good[0]}).encode(),
        b"{not json",                                  # 2 malformed_json
        json.dumps({"other": "x"}).encode(),           # 3 missing_field
        json.dumps(["text"]).encode(),                 # 4 missing_field (not an object)
        b'{"text": "caf\xe9"}',                        # 5 not_utf8 (latin-1 byte)
        b'{"text": "\\ud800 lone surrogate"}',         # 6 not_utf8 (valid JSON, not Unicode text)
        json.dumps({"text": " \t\n"}).encode(),        # 7 empty_document
        json.dumps({"text": good[1]}).encode(),
    ]) + b"\n")
    # A gzip file cut short: the records before the cut are kept, the rest counts as one corrupt_file.
    whole = gzip.compress(_jsonl_bytes(good[2:4] * 400))
    (src / "b.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    pq.write_table(pa.table({"text": [good[4], None, ""]}), src / "c.parquet")  # row 2 null, row 3 empty
    pq.write_table(pa.table({"body": [good[5]] * 3}), src / "d.parquet")  # no text column: 3 missing_field
    (src / "e.txt").write_bytes(b"\xff\xfe binary")  # not_utf8
    (src / "f.txt").write_text("")  # empty_document
    summary = prepare([str(src / "*")], str(work / "out"), seq_len=8)

    assert summary["skipped"] == {
        "malformed_json": 1, "missing_field": 2 + 1 + 3, "wrong_type": 0, "not_utf8": 2 + 1,
        "empty_document": 1 + 1 + 1, "corrupt_file": 1,
    }
    a, b = str(src / "a.jsonl"), str(src / "b.jsonl.gz")
    assert summary["skipped_examples"][:6] == [
        f"{a}:2 malformed_json", f"{a}:3 missing_field", f"{a}:4 missing_field", f"{a}:5 not_utf8",
        f"{a}:6 not_utf8", f"{a}:7 empty_document",
    ]
    assert summary["skipped_examples"][6].startswith(f"{b}:") and summary["skipped_examples"][6].endswith(
        " corrupt_file")
    assert len(summary["skipped_examples"]) == 10
    kept_from_gz = summary["documents"] - 3  # a.jsonl gives 2, c.parquet 1
    assert 0 < kept_from_gz < 800

    from qwen2_dist.data.loader import TokenBatches

    batches = TokenBatches([(str(work / "out"), 1.0)], seq_len=8, micro_batch_size=2, global_batch_size=2)
    try:
        text = load_tokenizer().decode(batches.next_batch().inputs[0].tolist())
    finally:
        batches.close()
    assert "document number" in text


def test_output_is_identical_for_any_number_of_workers(work, monkeypatch):
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 2_000)  # many small tasks, so workers interleave
    src = work / "src"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.jsonl").write_bytes(_jsonl_bytes([f"doc {i}.{j} " * (1 + j % 7) + "{bad" for j in range(150)])
                                         + b"{broken\n")
    kwargs = dict(seq_len=16, val_fraction=0.2, max_tokens=12_000)
    one = json.loads(json.dumps(prepare([str(src / "*.jsonl")], str(work / "one"), workers=1, **kwargs)))
    forked, two = prepare_in_a_fresh_process(work, {"BATCH_CHARS": 2_000}, inputs=[str(src / "*.jsonl")],
                                             output=str(work / "two"), workers=2, **kwargs)
    # With another thread alive the workers are spawned instead of forked (and load the tokenizer themselves).
    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    methods = pool_start_methods(monkeypatch)
    try:
        spawned = json.loads(json.dumps(prepare([str(src / "*.jsonl")], str(work / "spawned"), workers=2, **kwargs)))
    finally:
        release.set()
        thread.join()
    assert forked == ["fork"] and methods == ["spawn"]
    assert one == two == spawned and one["skipped"]["malformed_json"] > 0 and one["splits"]["val"]["samples"] > 0
    for other in ("two", "spawned"):
        for split in ("train", "val"):
            names = sorted(os.listdir(work / "one" / split))
            assert names == sorted(os.listdir(work / other / split))
            for name in names:
                assert (work / "one" / split / name).read_bytes() == (work / other / split / name).read_bytes()


@pytest.mark.parametrize("workers", [1, 2])
def test_skip_locations_are_exact_lines_across_batches(work, monkeypatch, workers):
    # Batches of ~300 bytes: the workers read an uncompressed file in byte ranges and the main process turns their
    # range-relative line numbers into file lines; a compressed copy of the same file takes the other path.
    import gzip

    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 300)
    lines = [json.dumps({"text": f"record {i} " + "word " * (i % 9)}).encode() for i in range(200)]
    bad_at = [3, 50, 51, 99, 150, 200]  # 1-based line numbers
    for line in bad_at:
        lines[line - 1] = b"{broken %d" % line
    lines.insert(120, b"")  # a blank line counts as a line but is no record: later bad lines move down by one
    expected_lines = [line if line < 121 else line + 1 for line in bad_at]
    src = work / "src"
    src.mkdir()
    (src / "a.jsonl").write_bytes(b"\n".join(lines))  # no newline at the end
    (src / "b.jsonl.gz").write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    monkeypatch.setattr(prepare_module, "NUM_SKIPPED_EXAMPLES", 100)
    summary = prepare([str(src / "*")], str(work / "out"), seq_len=8, workers=workers)
    a, b = str(src / "a.jsonl"), str(src / "b.jsonl.gz")
    assert summary["skipped_examples"] == [
        f"{path}:{line} malformed_json" for path in (a, b) for line in expected_lines]
    assert summary["documents"] == 2 * (200 - len(bad_at))


def test_results_too_large_for_a_shared_slot_come_through_the_pipe(work, monkeypatch):
    # Forked workers hand tokens back through shared slots; a batch with more tokens than a slot holds is pickled.
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 2_000)
    src = work / "src"
    src.mkdir()
    docs = [f"doc {j} " + "token " * (j % 400) for j in range(300)]
    (src / "a.jsonl").write_bytes(_jsonl_bytes(docs))
    one = prepare([str(src / "a.jsonl")], str(work / "one"), seq_len=16, workers=1)
    # Some batches fit a slot of 450 tokens, some do not; the shared slots are the forked workers'.
    methods, two = prepare_in_a_fresh_process(work, {"BATCH_CHARS": 2_000, "_SLOT_TOKENS": 450},
                                              inputs=[str(src / "a.jsonl")], output=str(work / "two"), seq_len=16,
                                              workers=2)
    assert methods == ["fork"]
    assert json.loads(json.dumps(one)) == two
    assert [t.tolist() for t in read_tokens(work / "one")] == [t.tolist() for t in read_tokens(work / "two")]


def test_val_split_is_a_stable_hash_of_each_document(work):
    docs = [f"held out or not, document {i}: " + "words " * (i % 5) for i in range(300)]
    src = work / "src"
    src.mkdir()
    (src / "a.jsonl").write_bytes(_jsonl_bytes(docs))
    (src / "b.jsonl").write_bytes(_jsonl_bytes(docs[::-1][:100]))  # other order, fewer: same verdict per document
    summary = prepare([str(src / "a.jsonl")], str(work / "out"), seq_len=8, val_fraction=0.1)
    val_docs = [d for d in docs if prepare_module.in_val_split(d, 0.1)]
    assert summary["splits"]["val"]["documents"] == len(val_docs)
    assert 15 < len(val_docs) < 45
    assert summary["splits"]["train"]["documents"] == len(docs) - len(val_docs)
    assert [s["tokens"].tolist() for s in read_samples(work / "out" / "val")] == expected_samples(val_docs, 9)
    assert [s.tolist() for s in read_tokens(work / "out")] == expected_samples(
        [d for d in docs if d not in val_docs], 9)
    again = prepare([str(src / "b.jsonl")], str(work / "again"), seq_len=8, val_fraction=0.1)
    assert again["splits"]["val"]["documents"] == sum(d in val_docs for d in docs[::-1][:100])


def test_doc_starts_mark_where_each_document_begins(work):
    docs = ["one two three", "four", "five six seven eight nine ten eleven twelve", "x"]
    src = work / "src"
    src.mkdir()
    (src / "a.jsonl").write_bytes(_jsonl_bytes(docs))
    prepare([str(src / "a.jsonl")], str(work / "out"), seq_len=4)
    tok = load_tokenizer()
    stream_starts, offset = [], 0
    for doc in docs:
        stream_starts.append(offset)
        offset += len(tok.encode(doc)) + 1
    samples = read_samples(work / "out" / "train")
    for k, sample in enumerate(samples):
        inside = [s - 5 * k for s in stream_starts if 5 * k <= s < 5 * (k + 1)]
        assert sample["doc_starts"].tolist() == ([0] if 0 not in inside else []) + inside, k
        assert sample["doc_starts"].dtype == np.int32


@pytest.mark.parametrize("name, content, message", [
    ("a.jsonl.gz", b"plain text", r"a\.jsonl\.gz is not gzip-compressed"),
    ("a.jsonl.zst", b"plain text", r"a\.jsonl\.zst is not zstd-compressed"),
    ("a.parquet", b"PAR1 not really", r"a\.parquet is not a readable Parquet file"),
    # Containers it cannot read are refused, not read as one text document (whose records would vanish).
    ("a.jsonl.bz2", bz2.compress(b'{"text": "x"}\n'), r"a\.jsonl\.bz2 is bzip2-compressed or archived"),
    ("a.jsonl.xz", lzma.compress(b'{"text": "x"}\n'), r"a\.jsonl\.xz is xz-compressed or archived"),
    ("a.txt", lzma.compress(b"text"), r"a\.txt is xz-compressed or archived, .* recompress it with gzip or zstd"),
    # A tar archive inside gzip: the gzip is readable, the tar headers and padding would be trained on as text.
    ("docs.tar.gz", gzip.compress(b"docs/" + bytes(507) + b"text", mtime=0), r"docs\.tar\.gz is tar-compressed"),
    ("a.jsonl", gzip.compress(b'{"text": "x"}\n', mtime=0), r"a\.jsonl is gzip-compressed but its name does not "
                                                                r"say so; rename it to end in \.gz"),
], ids=["not-gzip", "not-zstd", "not-parquet", "bzip2", "xz", "xz-as-txt", "tar-in-gzip", "gzip-without-suffix"])
def test_unreadable_container_is_an_error_before_work(work, name, content, message):
    pytest.importorskip("pyarrow")
    (work / name).write_bytes(content)
    with pytest.raises(UserError, match=message):
        prepare([str(work / name)], str(work / "out"), seq_len=4)
    assert not (work / "out").exists()


def test_fast_sample_encoding_matches_streaming_generic_encoding(work):
    streaming = import_streaming()
    generic = streaming.MDSWriter(out=str(work / "generic"), columns=prepare_module.COLUMNS)
    fast = prepare_module.token_writer_class()(out=str(work / "fast"), columns=prepare_module.COLUMNS)
    gen = np.random.default_rng(0)
    for tokens_len, starts_len in [(1, 1), (255, 3), (256, 255), (2049, 256), (70_000, 2)]:
        sample = {"tokens": gen.integers(0, 151_646, tokens_len).astype(np.int32),
                  "doc_starts": np.sort(gen.integers(0, tokens_len, starts_len)).astype(np.int32)}
        assert fast.encode_sample(sample) == generic.encode_sample(sample), (tokens_len, starts_len)
    generic.finish()
    fast.finish()


def test_containers_and_texts_that_only_look_alike_are_read(work):
    """A zstd file opening with a skippable frame (as pzstd writes it) is read; a compressed file cut to fewer
    bytes than its magic is counted corrupt, not refused; a text that starts with "BZh" is text."""
    zstandard = pytest.importorskip("zstandard")
    src = work / "src"
    src.mkdir()
    skippable = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"meta"
    (src / "a.jsonl.zst").write_bytes(skippable + zstandard.ZstdCompressor().compress(_jsonl_bytes(GOOD_DOCS)))
    (src / "b.jsonl.gz").write_bytes(b"\x1f")
    (src / "c.txt").write_text("BZh is how a bzip2 file starts, and this is text")
    summary = prepare([str(src / "*")], str(work / "out"), seq_len=4)
    assert summary["documents"] == len(GOOD_DOCS) + 1
    assert summary["skipped"]["corrupt_file"] == 1 and summary["skipped_examples"][0].startswith(str(src / "b"))


def test_parquet_text_of_every_arrow_string_type_and_bad_bytes_in_it(work):
    """Dictionary-encoded strings (a pandas categorical) are text; bytes that are not UTF-8 in a string column
    (pyarrow does not check them when reading) are a not_utf8 skip, not a crash."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    src = work / "src"
    src.mkdir()
    pq.write_table(pa.table({"text": pa.array(GOOD_DOCS[:2] + GOOD_DOCS[:1]).dictionary_encode()}),
                   src / "a.parquet")
    rows = [GOOD_DOCS[2].encode(), b"\xff\xfe bad", TXT_DOC.encode()]
    offsets = np.cumsum([0] + [len(r) for r in rows]).astype(np.int32)
    column = pa.StringArray.from_buffers(len(rows), pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(rows)))
    pq.write_table(pa.table({"text": column}), src / "b.parquet")
    summary = prepare([str(src / "*")], str(work / "out"), seq_len=4)
    assert summary["skipped"]["not_utf8"] == 1 and summary["skipped_examples"] == [f"{src / 'b.parquet'}:2 not_utf8"]
    expected = expected_samples(GOOD_DOCS[:2] + GOOD_DOCS[:1] + [GOOD_DOCS[2], TXT_DOC], 5)
    assert [t.tolist() for t in read_tokens(work / "out")] == expected


def test_an_input_named_twice_is_read_once_and_a_byte_order_mark_is_no_error(work, caplog):
    src = work / "src"
    src.mkdir()
    (src / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + _jsonl_bytes(GOOD_DOCS))
    (src / "b.txt").write_bytes(b"\xef\xbb\xbf" + TXT_DOC.encode())
    with caplog.at_level(logging.WARNING, logger="qwen2_dist.data.prepare"):
        summary = prepare([str(src / "*"), str(src / "a.jsonl")], str(work / "out"), seq_len=4)
    assert summary["inputs"] == [str(src / "a.jsonl"), str(src / "b.txt")] and "named twice" in caplog.text
    assert summary["documents"] == len(GOOD_DOCS) + 1 and sum(summary["skipped"].values()) == 0
    # The mark is not part of either file's first document.
    assert [t.tolist() for t in read_tokens(work / "out")] == expected_samples(GOOD_DOCS + [TXT_DOC], 5)


def test_no_training_sample_says_what_was_skipped_and_an_unusable_output_is_named(work):
    src = work / "src"
    src.mkdir()
    (src / "a.jsonl").write_bytes(_jsonl_bytes(GOOD_DOCS, field="content"))
    with pytest.raises(UserError, match=r"inputs gave 0 training tokens, .*missing_field=3 .*a\.jsonl:1 "
                                        r"missing_field.*check text_field=text"):
        prepare([str(src / "a.jsonl")], str(work / "out"), seq_len=4)
    with pytest.raises(UserError, match=r"output=.*a\.jsonl/sub/out: its parent directory cannot be created"):
        prepare([str(src / "a.jsonl")], str(src / "a.jsonl" / "sub" / "out"), seq_len=4, text_field="content")
    # A parent this user cannot write (as root, the mode bits would not stop the test: os.access says it instead):
    # named before the tokenizer loads, not a traceback where the partial copy is first made beside the output.
    access = os.access
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "access", lambda path, mode: path != str(work / "ro") and access(path, mode))
        (work / "ro").mkdir()
        with pytest.raises(UserError, match=rf"^output={re.escape(str(work / 'ro' / 'out'))}: "
                                            rf"{re.escape(str(work / 'ro'))} cannot be written by this user"):
            prepare([str(src / "a.jsonl")], str(work / "ro" / "out"), seq_len=4, text_field="content")


def test_inputs_that_are_easy_to_get_wrong_are_read_or_named(work, caplog):
    """.ndjson is JSON lines; a JSON array is refused naming the conversion; an empty compressed file (a failed
    download) is counted corrupt; a zstd file with a 256 MiB window (zstd --long) is read; a val_fraction that held
    out less than one sample says so; the partial output an interrupted run left is named."""
    zstandard = pytest.importorskip("zstandard")
    src = work / "src"
    src.mkdir()
    docs = [f"document number {i} with some words" for i in range(50)]
    (src / "a.ndjson").write_bytes(_jsonl_bytes(docs[:20]))
    (src / "b.jsonl.gz").write_bytes(b"")
    # A 256 MiB window (zstandard refuses over 128 MiB by default) and no content size, as `zstd --long=28` writes.
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=28, write_content_size=False)
    compressor = zstandard.ZstdCompressor(compression_params=params).compressobj()
    (src / "c.jsonl.zst").write_bytes(compressor.compress(_jsonl_bytes(docs[20:])) + compressor.flush())
    (work / "out.tmp-1-dead").mkdir()
    with caplog.at_level(logging.WARNING):
        summary = prepare([str(src / "*")], str(work / "out"), seq_len=8, val_fraction=0.001)
    assert summary["documents"] == 50 and summary["skipped"]["corrupt_file"] == 1
    assert summary["skipped_examples"] == [f"{src / 'b.jsonl.gz'}:1 corrupt_file"]
    assert "an empty file, not gzip data" in caplog.text
    assert "no held-out split (training evaluates nothing); raise val_fraction" in caplog.text
    assert f"{work / 'out.tmp-1-dead'}: the partial output of an interrupted qwen2-prepare" in caplog.text

    for name, content in (("d.json", b'[{"text": "a"}, {"text": "b"}]'), ("e.jsonl.gz", gzip.compress(
            b'\n  [\n  {"text": "a"}\n]\n', mtime=0))):
        (src / name).write_bytes(content)
        with pytest.raises(UserError, match=rf"input file .*{name} holds a JSON array, but qwen2-prepare reads JSON "
                                            r"lines .*jq -c '\.\[\]'"):
            prepare([str(src / name)], str(work / "refused"), seq_len=8)
    # json.dump(indent=2): each line was counted malformed_json, and the run ended with "0 training tokens".
    (src / "f.json").write_text(json.dumps({"text": "one document"}, indent=2))
    with pytest.raises(UserError, match=r"input file .*f.json opens with a line holding only '\{': a JSON object "
                                        r"written over several lines.*jq -c \. "):
        prepare([str(src / "f.json")], str(work / "refused"), seq_len=8)
    # Lines ended by CR alone: read as one line, the file was one malformed_json record and the run had no tokens.
    (src / "g.jsonl").write_bytes(b"\r".join(json.dumps({"text": f"doc {i}"}).encode() for i in range(3)) + b"\r")
    with pytest.raises(UserError, match=r"input file .*g.jsonl ends its lines with a carriage return alone .*tr "):
        prepare([str(src / "g.jsonl")], str(work / "refused"), seq_len=8)
    (src / "h.jsonl").write_bytes(b"\r\n".join(json.dumps({"text": f"doc {i}"}).encode() for i in range(3)))
    assert prepare([str(src / "h.jsonl")], str(work / "crlf"), seq_len=2, val_fraction=0)["documents"] == 3
    # The same with a first record past the 4 KiB that were once all looked at, and compressed.
    records = [json.dumps({"text": "x" * 5000}).encode()] + [json.dumps({"text": f"doc {i}"}).encode() for i in (1, 2)]
    (src / "i.jsonl.gz").write_bytes(gzip.compress(b"\r".join(records) + b"\r", mtime=0))
    with pytest.raises(UserError, match=r"input file .*i.jsonl.gz ends its lines with a carriage return alone .*e\.g\. "
                                        r"gzip -dc \S*i\.jsonl\.gz \| tr '\\r' '\\n' > \S*/i\.lf\.jsonl$"):
        prepare([str(src / "i.jsonl.gz")], str(work / "refused"), seq_len=8)
    # Plain text cut at lines or paragraphs: such a file was one document. Read whole (text_split=file), it is one.
    (src / "j.txt").write_bytes(b"first line\rsecond line\r\rthird\r")
    for text_split in ("line", "paragraph"):
        with pytest.raises(UserError, match=r"j.txt ends its lines with a carriage return alone .*reads the lines of "
                                            rf"text_split={text_split} ended by a line feed .*j\.lf\.txt"):
            prepare([str(src / "j.txt")], str(work / "refused"), seq_len=2, text_split=text_split)
    assert prepare([str(src / "j.txt")], str(work / "whole"), seq_len=2, val_fraction=0)["documents"] == 1
    # text_split is for plain text: a small Parquet file with a carriage return in its text and no byte 10 is read.
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["one\rtwo\rthree"]}), src / "l.parquet", compression="none")
    assert b"\n" not in (src / "l.parquet").read_bytes()
    assert prepare([str(src / "l.parquet")], str(work / "parquet"), seq_len=2, val_fraction=0,
                   text_split="line")["documents"] == 1
    # Two carriage returns before each line feed (CR CR LF) are line feed endings all the same.
    (src / "k.jsonl").write_bytes(b"\r\r\n".join(json.dumps({"text": f"doc {i}"}).encode() for i in range(3)))
    assert prepare([str(src / "k.jsonl")], str(work / "crcrlf"), seq_len=2, val_fraction=0)["documents"] == 3


def test_a_parquet_row_group_damaged_inside_is_counted_and_the_rest_read(work, caplog):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = work / "a.parquet"
    docs = [f"document number {i} with some words" for i in range(50)]
    pq.write_table(pa.table({"text": docs}), path, row_group_size=10, compression="none")
    offset = pq.ParquetFile(path).metadata.row_group(2).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset:offset + 64] = bytes(b ^ 0xA5 for b in data[offset:offset + 64])  # its page header
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        summary = prepare([str(path)], str(work / "out"), seq_len=8)
    # Its row group is lost; the ones after it are read.
    assert summary["skipped"]["corrupt_file"] == 10 and summary["documents"] == 40
    assert summary["skipped_examples"] == [f"{path}:21 corrupt_file"]
    assert f"input {path}: rows 21-30 (row group 2) cannot be read" in caplog.text


def test_sigterm_removes_the_partial_output(work, inputs, monkeypatch):
    """kill (or a Slurm time limit) ends qwen2-prepare as an exception does: no OUTPUT.tmp-* is left behind."""
    tok = load_tokenizer("qwen2")
    encode_flat = tok.encode_flat
    calls = []

    def encode_flat_then_terminated(texts):
        calls.append(len(texts))
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return encode_flat(texts)

    monkeypatch.setattr(tok, "encode_flat", encode_flat_then_terminated)
    monkeypatch.setattr(prepare_module, "load_tokenizer", lambda spec: tok)
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 1)  # one document per batch
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        main([f"input={inputs / 'a.jsonl'}", f"output={work / 'out'}", "seq_len=1", "workers=1", "progress=false"])
    assert stopped.value.code == 128 + signal.SIGTERM and len(calls) == 2
    assert sorted(os.listdir(work)) == ["src"] and signal.getsignal(signal.SIGTERM) == previous


def test_every_file_of_a_dataset_is_on_disk_before_its_summary(work, inputs, monkeypatch):
    """The summary marks a dataset complete: after a crash, a dataset with a summary must have its shards (nothing
    was synced, and a power loss could leave the summary beside empty shards)."""
    synced = record_fsyncs(monkeypatch)
    prepare([str(inputs / "a.jsonl")], str(work / "out"), seq_len=2, val_fraction=0.5)
    summary = synced.index(SUMMARY_NAME)
    written = {name for _, _, names in os.walk(work / "out") for name in names} - {SUMMARY_NAME}
    assert written and written <= set(synced[:summary]), (written, synced)


# One text, cut three ways. Lines: 1 "Once..." (CRLF, after a byte-order mark), 3 and 4 blank, 5 and 8 separators,
# 9 blank, 10 a separator after an empty piece, 11 not UTF-8, 13 text, a separator and trailing whitespace.
SPLIT_TEXT = b"\xef\xbb\xbf" + (
    b"Once upon a time.\r\nShe smiled.\n\r\n  \t\n<|endoftext|>\nA second story,\nin two lines.\n<|endoftext|>\n\n"
    b"<|endoftext|>\nbad \xff byte\n<|endoftext|>\ntail<|endoftext|>  \n")
SPLIT_DOCS = {
    "line": (["Once upon a time.", "She smiled.", "<|endoftext|>", "A second story,", "in two lines.",
              "<|endoftext|>", "<|endoftext|>", "<|endoftext|>", "tail<|endoftext|>  "], [(11, "not_utf8")]),
    "paragraph": (["Once upon a time.\r\nShe smiled.", "<|endoftext|>\nA second story,\nin two lines.\n<|endoftext|>"],
                  [(11, "not_utf8")]),
    "endoftext": (["Once upon a time.\r\nShe smiled.", "A second story,\nin two lines.", "tail"],
                  [(10, "empty_document"), (11, "not_utf8")]),
}


@pytest.mark.parametrize("text_split", ["line", "paragraph", "endoftext"])
def test_text_split_cuts_text_files_into_documents_however_they_are_read(work, monkeypatch, text_split):
    """Each document gets its own eos; the documents are the same whatever the block size the file is read in (a
    separator or a blank line across two blocks), compressed or not, and the output is byte-identical for any
    number of workers."""
    src = work / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(SPLIT_TEXT)
    (src / "b.txt.gz").write_bytes(gzip.compress(SPLIT_TEXT, mtime=0))
    docs, skipped = SPLIT_DOCS[text_split]
    whole = prepare([str(src / "*")], str(work / "whole"), seq_len=4, text_split=text_split)
    assert [t.tolist() for t in read_tokens(work / "whole")] == expected_samples(docs + docs, 5)
    assert whole["documents"] == 2 * len(docs) and whole["text_split"] == text_split
    assert whole["skipped_examples"] == [f"{src / name}:{line} {reason}" for name in ("a.txt", "b.txt.gz")
                                         for line, reason in skipped]
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 7)
    one = prepare([str(src / "*")], str(work / "one"), seq_len=4, text_split=text_split, workers=1)
    two = prepare([str(src / "*")], str(work / "two"), seq_len=4, text_split=text_split, workers=2)
    assert whole == one == two
    names = sorted(os.listdir(work / "one" / "train"))
    assert names == sorted(os.listdir(work / "two" / "train"))
    for name in names:
        assert (work / "one" / "train" / name).read_bytes() == (work / "two" / "train" / name).read_bytes()


def test_a_text_file_read_whole_says_when_it_looks_like_many_documents(work, monkeypatch, caplog):
    """text_split=file (the default) keeps a text file one document, as before; one holding the literal
    <|endoftext|> (tokenized as text, so no eos between its stories) or a very large one is named with the fix, once;
    a text_split it does not know is refused naming the choices."""
    monkeypatch.setattr(prepare_module, "ONE_DOCUMENT_WARN_BYTES", 1000)
    src = work / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(SPLIT_TEXT.replace(b"\xff", b"x"))
    (src / "b.txt").write_text("x" * 1001)
    (src / "c.txt").write_text(TXT_DOC)
    with caplog.at_level(logging.WARNING):
        summary = prepare([str(src / "*")], str(work / "out"), seq_len=4)
    assert summary["documents"] == 3 and summary["text_split"] == "file"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert warnings[0].startswith(f"input {src / 'a.txt'} is read as one document (text_split=file) but holds the "
                                  "literal <|endoftext|>, which is tokenized as text")
    assert warnings[1].startswith(f"input {src / 'b.txt'} is read as one document (text_split=file) but is 0 MiB long")
    assert all("pass text_split=line (one per line), paragraph" in w for w in warnings)
    with pytest.raises(UserError, match=r"text_split=lines is not one of file, line, paragraph, endoftext"):
        prepare([str(src / "*")], str(work / "refused"), seq_len=4, text_split="lines")
    assert main([f"input={src / 'c.txt'}", f"output={work / 'cli'}", "seq_len=4", "text_split=line"]) == 0
    assert read_summary(str(work / "cli"))["documents"] == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_a_file_that_gives_no_documents_is_named_with_its_cause(work, caplog, workers):
    """A Parquet file without the text column (its columns are listed) or with one that is not text (its type is
    named; counted wrong_type), an empty or wholly broken JSON lines file, an empty text file: each was lost without a
    word. An empty .txt.gz is a failed download (corrupt_file), not an empty document."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    src = work / "src"
    src.mkdir()
    (src / "a.jsonl").write_bytes(_jsonl_bytes(GOOD_DOCS))
    pq.write_table(pa.table({"body": ["x", "y"], "id": [1, 2]}), src / "b.parquet")
    pq.write_table(pa.table({"text": [["x", "y"], ["z"], []]}), src / "c.parquet")
    (src / "d.jsonl").write_bytes(b"")
    (src / "e.jsonl").write_bytes(b"{broken\n" + json.dumps({"other": 1}).encode() + b"\n")
    (src / "f.txt.gz").write_bytes(b"")
    (src / "g.txt").write_text("\n  \n\n")
    with caplog.at_level(logging.WARNING):
        summary = prepare([str(src / "*")], str(work / "out"), seq_len=4, workers=workers)
    assert summary["skipped"] == {"malformed_json": 1, "missing_field": 2 + 1, "wrong_type": 3, "not_utf8": 0,
                                  "empty_document": 1, "corrupt_file": 1}
    assert summary["documents"] == len(GOOD_DOCS)
    # In file order (the reader's warnings come as it reads, ahead of the workers' results by a number of batches).
    assert sorted(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == [
        f"input {src / 'b.parquet'} has no column 'text' (its columns: body, id), so its 2 rows are skipped "
        "(missing_field); set text_field= to the column that holds the text",
        f"input {src / 'c.parquet'}: column 'text' holds list<element: string>, not text, so its 3 rows are skipped "
        "(wrong_type); set text_field= to a string column, or convert this one",
        f"input {src / 'd.jsonl'} gave no documents (an empty file)",
        f"input {src / 'e.jsonl'} gave no documents (malformed_json=1, missing_field=1)",
        f"input {src / 'f.txt.gz'}: an empty file, not gzip data (corrupt_file)",
        f"input {src / 'g.txt'} gave no documents (empty_document=1)",
    ]
    assert f"{src / 'f.txt.gz'}:1 corrupt_file" in summary["skipped_examples"]


def test_workers_0_is_capped_by_the_cgroup_cpu_quota(work, inputs, monkeypatch, caplog):
    """A container limited to 4 CPUs on a 192-core host started 192 workers (and a shared buffer for each)."""
    def cgroup(files: dict) -> str:
        root = work / f"cgroup{len(os.listdir(work))}"
        for name, content in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(content + "\n")
        return str(root)

    limit = prepare_module.cgroup_cpu_limit
    assert limit(cgroup({"cpu.max": "max 100000"})) is None
    assert limit(cgroup({"cpu.max": "400000 100000"})) == 4
    assert limit(cgroup({"cpu.max": "150000 100000"})) == 2  # 1.5 CPUs: rounded up
    assert limit(cgroup({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})) is None
    assert limit(cgroup({"cpu/cpu.cfs_quota_us": "250000", "cpu/cpu.cfs_period_us": "100000"})) == 3
    assert limit(cgroup({})) is None
    cores = len(os.sched_getaffinity(0))
    assert prepare_module.available_cpus(cgroup({"cpu.max": "max 100000"})) == cores
    assert prepare_module.available_cpus(cgroup({"cpu.max": f"{100000 * (cores + 8)} 100000"})) == cores
    one_cpu = cgroup({"cpu.max": "100000 100000"})
    assert prepare_module.available_cpus(one_cpu) == 1
    monkeypatch.setattr(prepare_module, "CGROUP_ROOT", one_cpu)
    with caplog.at_level(logging.INFO, logger="qwen2_dist.data.prepare"):
        prepare([str(inputs / "a.jsonl")], str(work / "out"), seq_len=4, workers=0)
    assert f"the cgroup CPU quota ({one_cpu}) allows 1 CPUs of the {cores} cores" in caplog.text
    assert "workers=0: 1 tokenizer processes" in caplog.text


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is pid, each with its start time (so a reused pid is not taken for it)."""
    children = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children[int(entry)] = fields[19]
    return children


def _alive(pid: int, start_time: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == start_time and fields[0] not in "ZX"  # a zombie is dead, only not yet reaped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_with_a_killed_main_process(work):
    """A qwen2-prepare killed with SIGKILL (the out-of-memory killer, kill -9) left its forked workers waiting for
    work forever, each holding its memory. The run is slowed (each batch 0.2 s) so it is still going at the kill."""
    src = work / "src"
    src.mkdir()
    (src / "a.jsonl").write_bytes(_jsonl_bytes([f"document {j} " * 20 for j in range(500)]))
    script = (
        "import sys, time\n"
        "from qwen2_dist.data import prepare as p\n"
        "tok = p.load_tokenizer('qwen2')\n"
        "encode_flat = tok.encode_flat\n"
        "tok.encode_flat = lambda texts: time.sleep(0.2) or encode_flat(texts)\n"
        "p.load_tokenizer = lambda spec: tok\n"
        "p.BATCH_CHARS = 1000\n"
        "p.prepare([sys.argv[1]], sys.argv[2], seq_len=16, workers=2)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", script, str(src / "a.jsonl"), str(work / "out")], cwd=root)
    children: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 30
        while len(children) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            children = _children(proc.pid)
        assert len(children) == 2, "the workers did not start"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while any(_alive(pid, start) for pid, start in children.items()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid, start in children.items() if _alive(pid, start)], "workers outlived the main"
    finally:
        proc.kill()
        proc.wait()
        for pid, start in children.items():
            if _alive(pid, start):
                os.kill(pid, signal.SIGKILL)


def test_a_document_goes_to_the_same_split_composed_or_decomposed():
    """The tokenizer encodes NFC, so a document saved with é as one code point and a copy with e and an accent give
    the same tokens: held out in one form and trained on in the other would leak it into training."""
    import unicodedata

    texts = [f"Café numéro {i}: déjà vu" for i in range(200)]
    decomposed = [unicodedata.normalize("NFD", t) for t in texts]
    assert all(a != b for a, b in zip(texts, decomposed))
    held_out = [prepare_module.in_val_split(t, 0.5) for t in texts]
    assert held_out == [prepare_module.in_val_split(t, 0.5) for t in decomposed] and 50 < sum(held_out) < 150
