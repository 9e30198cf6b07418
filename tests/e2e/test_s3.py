"""Remote data against a real S3-compatible server (moto's server mode on 127.0.0.1), not a mocked client."""

import glob
import json
import os
import shutil
from pathlib import Path

import pytest

from qwen2_dist.cli.train import check_only, compose_job
from qwen2_dist.data.loader import TokenBatches, _cache_path, run_cache_key
from qwen2_dist.errors import UserError
from tests.datasets import make_dataset, sample_ids
from tests.helpers import run_cli, train_overrides

moto_server = pytest.importorskip(
    "moto.moto_server.threaded_moto_server",
    reason="moto's S3 server is not installed (pip install 'moto[s3]' flask flask-cors)",
)
BUCKET = "corpora"


@pytest.fixture
def s3(monkeypatch):
    """An S3 endpoint on 127.0.0.1 (a free port) and the environment streaming's S3 client reads."""
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"S3_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"])
    client.create_bucket(Bucket=BUCKET)
    yield client, env
    server.stop()


def upload(client, local_dir: str, prefix: str) -> str:
    for root, _, files in os.walk(local_dir):
        for name in files:
            path = os.path.join(root, name)
            client.upload_file(path, BUCKET, f"{prefix}/{os.path.relpath(path, local_dir)}")
    return f"s3://{BUCKET}/{prefix}"


def read_ids(sources, **kwargs) -> list[int]:
    """Ids of the first 48 samples; checks that closing leaves no shared memory or lock file behind."""
    batches = TokenBatches(sources, seq_len=8, micro_batch_size=4, global_batch_size=8, seed=1, **kwargs)
    prefix, lock_dir = f"{batches.dataset._shm_prefix_int:06d}_", batches._lock_dir
    try:
        return [i for _ in range(12) for i in sample_ids(batches.next_batch())]
    finally:
        batches.close()
        assert not glob.glob(f"/dev/shm/{prefix}*") and not glob.glob(os.path.join(lock_dir, f"{prefix}*"))


def test_s3_source_reads_the_same_samples_as_the_local_copy(tmp_path, s3):
    client, _ = s3
    local = make_dataset(tmp_path / "ds", 40, 8, shard_bytes=300, val_samples=8)
    summary_path = os.path.join(local, "prepare_summary.json")
    with open(summary_path) as f:  # what qwen2-prepare records: the tokenizer and the largest id written (56)
        summary = {**json.load(f), "tokenizer": "qwen2", "vocab_size": 151_936, "max_token_id": 56}
    with open(summary_path, "w") as f:
        json.dump(summary, f)
    url = upload(client, local, "ds")
    cache = tmp_path / "cache"
    # validate() reads local summaries only; a remote source's is downloaded by the launchers' check, and by the
    # loader on every worker.
    beyond = f"data source {url} holds token ids up to 56, beyond model.vocab_size=56"
    with pytest.raises(UserError, match=beyond):
        check_only(compose_job(["model=tiny", "model.vocab_size=56", "train.seq_len=8", f"data.path={url}",
                                f"data.cache_dir={cache}", f"run_dir={tmp_path / 'run'}"]), "1")
    with pytest.raises(UserError, match=beyond):
        TokenBatches([(url, 1.0)], seq_len=8, micro_batch_size=2, global_batch_size=4, cache_dir=str(cache),
                     run_key="run1", vocab_size=56)
    assert read_ids([(url, 1.0)], cache_dir=str(cache), run_key="run1") == read_ids([(local, 1.0)])
    assert read_ids([(url, 1.0)], cache_dir=str(cache), run_key="run1", split="val", ) == read_ids(
        [(local, 1.0)], split="val")
    # The shards came over the wire into a cache of this run only.
    cached = os.listdir(os.path.join(_cache_path(str(cache), "run1", url), "train"))
    assert "index.json" in cached and any(name.startswith("shard.") for name in cached)


def _cached_shard_bytes(cache) -> int:
    """Bytes of shard files in the cache now; DataLoader workers may delete one while it is listed (an eviction, or
    the compressed form after decompressing): it no longer counts."""
    total = 0
    for d, _, names in os.walk(cache):
        for name in names:
            if name.startswith("shard."):
                try:
                    total += os.path.getsize(os.path.join(d, name))
                except FileNotFoundError:
                    pass
    return total


def test_a_cache_limit_keeps_the_cache_bounded_and_the_samples_unchanged(tmp_path, s3):
    """Two epochs of a 43-shard S3 dataset through a cache limited to what the read order needs at once (two global
    batches of 8 samples span at most 5 shards of 4 or 6 samples; with 2 DataLoader workers reading 4 micro-batches
    ahead, 4 global batches), read by one process and by 2 DataLoader workers: the same samples as the local copy, the
    cache over the limit by no more than the downloads in flight, shards evicted and fetched again."""
    client, _ = s3
    local = make_dataset(tmp_path / "ds", 256, 8, shard_bytes=600)  # 6 samples per shard
    url = upload(client, local, "ds")
    kwargs = dict(seq_len=8, micro_batch_size=4, global_batch_size=8, seed=3, shuffle_block_size=4)
    cache = tmp_path / "cache"
    remote_args = dict(cache_dir=str(cache), run_key="run1", **kwargs)

    with pytest.raises(UserError, match=r"data.cache_limit=1 kB is below the [0-9.]+ kB the read order needs .* "
                                        r"two global batches of 8 samples .* raise data.cache_limit \(or prepare"):
        TokenBatches([(url, 1.0)], cache_limit=1000, **remote_args)
    with pytest.raises(UserError, match=r"two shuffle blocks of 64 samples .* raise data.cache_limit or lower "
                                        r"data.shuffle_block_size \(to no less than 60, 10 shards' samples: a "
                                        r"smaller block mixes few shards\)$"):
        TokenBatches([(url, 1.0)], cache_limit=1000, **{**remote_args, "shuffle_block_size": 64})
    with pytest.raises(UserError, match=r"two shuffle blocks of 48 samples .* raise data.cache_limit \(or prepare"):
        TokenBatches([(url, 1.0)], cache_limit=1000, **{**remote_args, "shuffle_block_size": 48})  # below the 60
    with pytest.raises(UserError, match=r"data.cache_limit is set, but data source .* is a local directory"):
        TokenBatches([(local, 1.0)], cache_limit=10**9, **kwargs)

    for workers in (0, 2):  # one reading process; then 2 DataLoader workers downloading and evicting side by side
        shutil.rmtree(cache, ignore_errors=True)
        expected = TokenBatches([(local, 1.0)], **kwargs)
        probe = TokenBatches([(url, 1.0)], cache_limit=10**9, num_workers=workers, **remote_args)
        need = probe.cache_need
        num_shards = len(probe.dataset.shards)
        probe.close()
        shutil.rmtree(cache)
        limited = TokenBatches([(url, 1.0)], cache_limit=need, num_workers=workers, **remote_args)
        shard_dir = Path(_cache_path(str(cache), "run1", url)) / "train"
        index = sum(stream.get_index_size() for stream in limited.dataset.streams)
        biggest = max(s.get_max_size() for s in limited.dataset.shards)
        assert sum(s.get_max_size() for s in limited.dataset.shards) > 1.5 * (need - index)  # the data cannot fit
        try:
            largest = 0
            for _ in range(2 * 256 // 4):  # two epochs of micro-batches
                assert sample_ids(limited.next_batch()) == sample_ids(expected.next_batch())
                largest = max(largest, _cached_shard_bytes(shard_dir))
            # Over the limit by at most the downloads in flight in the other reading processes.
            assert 0 < largest <= need - index + max(0, workers - 1) * biggest, (workers, largest, need - index)
            cached = [name for name in os.listdir(shard_dir) if name.startswith("shard.")]
            assert len(cached) < num_shards  # shards were evicted (and the second epoch fetched them again)
        finally:
            limited.close()
            expected.close()


def test_training_mixes_an_s3_source_with_a_local_one(tmp_path, s3, corpus_cache):
    """qwen2-train end to end: two sources (one on S3), document masking, an eval loss, a resume."""
    client, env = s3
    local = make_dataset(tmp_path / "local", 40, 32, shard_bytes=2000, val_samples=8)
    url = upload(client, make_dataset(tmp_path / "remote", 24, 32, first_id=500, val_samples=8), "remote")
    run_dir = tmp_path / "run"
    args = train_overrides(run_dir, corpus_cache, **{
        "data.sources": f"[{{path: {url}, weight: 0.25}}, {{path: {local}, weight: 0.75}}]",
        "data.document_masking": "true", "eval.interval": 3, "eval.samples": 8, "train.stop_at": 3,
    })
    first = run_cli("qwen2_dist.cli.train", args, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli("qwen2_dist.cli.train", args[:-1], env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    evals = {r["step"]: r for r in records if "eval_loss" in r}
    assert sorted(evals) == [3, 6] and all(r["eval_loss"] > 0 for r in evals.values())
    for r in evals.values():  # each source on its own, weighted as in training
        assert r["eval_loss"] == pytest.approx(0.25 * r["eval_loss/remote"] + 0.75 * r["eval_loss/local"])
    assert "(weighted as in training) | remote " in first.stdout + first.stderr
    assert "flash-attn not installed, no CUDA or fp32" in first.stdout and "explicit block-diagonal causal mask" in (
        first.stdout)


def test_a_dataset_prepared_again_at_the_same_url_is_not_mixed_with_the_cached_one(tmp_path, s3, monkeypatch, caplog):
    """The cache of a remote source keeps the summary, index and shards it was filled from; a dataset prepared again
    at the same URL is refused by the launchers' check and the loader (naming what changed and the fixes), until the
    cache is deleted; a summary that cannot be fetched again leaves the cached copy in use, with a warning."""
    from qwen2_dist.data import loader

    client, _ = s3
    v1 = make_dataset(tmp_path / "v1", 40, 8, shard_bytes=300)
    v2 = make_dataset(tmp_path / "v2", 48, 8, first_id=1000, shard_bytes=300)
    url = upload(client, v1, "ds")
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    remote_args = dict(cache_dir=str(cache), run_key=run_cache_key(str(run_dir)))
    assert read_ids([(url, 1.0)], **remote_args) == read_ids([(v1, 1.0)])

    client.delete_objects(Bucket=BUCKET, Delete={"Objects": [
        {"Key": o["Key"]} for o in client.list_objects_v2(Bucket=BUCKET, Prefix="ds/")["Contents"]]})
    upload(client, v2, "ds")
    # The process has compared this cache already: the memory of that goes, as it does with a new process.
    monkeypatch.setattr(loader, "_compared_caches", set())
    local = _cache_path(str(cache), remote_args["run_key"], url)
    again = (rf"data source {url} was prepared again since this run cached it in {local}: .*train samples 40 -> 48"
             ".* delete ")
    with pytest.raises(UserError, match=again):
        read_ids([(url, 1.0)], **remote_args)
    monkeypatch.setattr(loader, "_compared_caches", set())
    with pytest.raises(UserError, match=again):
        check_only(compose_job(["model=tiny", "train.seq_len=8", f"data.path={url}", f"data.cache_dir={cache}",
                                f"run_dir={run_dir}"]), "1")

    shutil.rmtree(local)
    monkeypatch.setattr(loader, "_compared_caches", set())
    assert read_ids([(url, 1.0)], **remote_args) == read_ids([(v2, 1.0)])

    client.delete_object(Bucket=BUCKET, Key="ds/prepare_summary.json")
    monkeypatch.setattr(loader, "_compared_caches", set())
    assert read_ids([(url, 1.0)], **remote_args) == read_ids([(v2, 1.0)])
    assert "cannot download prepare_summary.json to compare it with the copy cached in" in caplog.text
