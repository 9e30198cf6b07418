"""prepare() turns text into exact seq_len+1 token samples, skips bad records, and never leaves a half dataset."""

import json
import logging
import os
import shutil

import numpy as np
import pytest

from qwen2_dist.cli.prepare import main
from qwen2_dist.data import corpus, prepare as prepare_module
from qwen2_dist.data.corpus import embedded_corpus
from qwen2_dist.data.prepare import SUMMARY_NAME, prepare, read_summary
from qwen2_dist.data.streaming_compat import import_streaming
from qwen2_dist.data.tokenizer import load_tokenizer
from qwen2_dist.errors import UserError

GOOD_DOCS = ["Hello world", "你好，世界", "12345 <|endoftext|> tail"]
TXT_DOC = "Plain text file.\nSecond line, with more words in it.\n"


def read_tokens(path) -> list[np.ndarray]:
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
        samples.extend(reader.get_item(i)["tokens"] for i in range(len(reader)))
    return samples


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
        json.dumps({"text": 5}).encode(),  # line 7: missing_field (not a string)
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
    assert summary["skipped"] == {"malformed_json": 1, "missing_field": 2, "not_utf8": 1, "empty_document": 1}
    assert summary["skipped_examples"] == [
        f"{a}:2 malformed_json",
        f"{a}:4 missing_field",
        f"{a}:5 not_utf8",
        f"{a}:6 empty_document",
        f"{a}:7 missing_field",
    ]
    expected = expected_samples(GOOD_DOCS + [TXT_DOC], sample_tokens=5)
    num_stream = sum(len(load_tokenizer().encode(d)) + 1 for d in GOOD_DOCS + [TXT_DOC])
    assert summary["documents"] == 4
    assert summary["samples"] == len(expected) > 3
    assert (summary["seq_len"], summary["sample_tokens"]) == (4, 5)
    assert summary["tokens"] == 5 * len(expected)
    assert summary["dropped_tail_tokens"] == num_stream - 5 * len(expected)
    assert summary["tokenizer"] == "qwen2"
    assert summary["inputs"] == [a, str(inputs / "b.txt")]
    assert read_summary(str(out)) == summary

    samples = read_tokens(out)
    assert all(s.dtype == np.int32 for s in samples)
    assert [s.tolist() for s in samples] == expected
    assert sorted(os.listdir(work)) == ["out", "src"]  # no temporary directory left behind


def test_samples_keep_order_across_shards(work, inputs, monkeypatch):
    monkeypatch.setattr(prepare_module, "SHARD_SIZE_LIMIT", 64)  # a few samples per shard
    out = work / "out"
    summary = prepare([str(inputs / "a.jsonl"), str(inputs / "b.txt")], str(out), seq_len=4)
    with open(out / "index.json") as f:
        assert len(json.load(f)["shards"]) > 2
    assert [s.tolist() for s in read_tokens(out)] == expected_samples(GOOD_DOCS + [TXT_DOC], 5)
    assert summary["samples"] == len(expected_samples(GOOD_DOCS + [TXT_DOC], 5))


def test_max_tokens_stops_the_stream(work, inputs):
    out = work / "out"
    summary = prepare([str(inputs / "a.jsonl"), str(inputs / "b.txt")], str(out), seq_len=4, max_tokens=12)
    assert [s.tolist() for s in read_tokens(out)] == expected_samples(GOOD_DOCS + [TXT_DOC], 5, max_tokens=12)
    assert (summary["samples"], summary["tokens"], summary["dropped_tail_tokens"]) == (2, 10, 2)
    assert summary["documents"] == 3  # the third document is cut; b.txt is never reached


def test_refuses_existing_output_without_overwrite(work, inputs):
    out = work / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match=r"output=.*out exists and is not empty; pass overwrite=true"):
        prepare([str(inputs / "a.jsonl")], str(out), seq_len=4)
    assert os.listdir(out) == ["keep.txt"]

    prepare([str(inputs / "a.jsonl")], str(out), seq_len=4, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert read_summary(str(out))["documents"] == 3
    assert sorted(os.listdir(work)) == ["out", "src"]


def test_interrupted_prepare_leaves_nothing(work, inputs, monkeypatch):
    tok = load_tokenizer("qwen2")
    calls = []

    def encode_batch_then_die(texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return tok.encode_batch(texts)

    monkeypatch.setattr(tok, "encode_batch", encode_batch_then_die)
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
    with pytest.raises(UserError, match=r"fewer than one sample of seq_len\+1=1001"):
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
    assert len(caplog.records) == 1 and path in caplog.text
    summary = read_summary(path)
    assert summary["tokens"] == summary["samples"] * 33 > 19_000
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
    assert read_summary(path)["samples"] == 2_000 // 33
    assert os.listdir(work) == [os.path.basename(path)]
