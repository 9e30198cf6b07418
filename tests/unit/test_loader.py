"""The loader: a seeded global sample order that no layout changes, exact mixtures, exact resumption, hygiene."""

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter

import numpy as np
import pytest
import torch

from qwen2_dist.config import BatchSchedule
from qwen2_dist.data import hygiene, loader as loader_module
from qwen2_dist.data.loader import (
    MIX_BLOCK, PREFETCH_FACTOR, SampleOrder, TokenBatches, _cache_path, _SourceOrder, _warn_other_hosts, check_vocab,
    first_token_targets, mixture_quotas, narrow_shuffle, order_changes, positions_from_starts, shards_read_together,
    samples_read_together, shards_spanned,
)
from qwen2_dist.model.loss import IGNORE_INDEX
from qwen2_dist.data.prepare import SUMMARY_NAME
from qwen2_dist.errors import ResumeMismatch, UserError
from tests import helpers
from tests.datasets import make_dataset, sample_ids
from tests.helpers import REPO, shm_leftovers, shm_segments

SEQ = 8


@pytest.fixture
def data(tmp_path):
    """Two sources: A (ids 0..29, several shards, 6 held-out samples) and B (ids 1000..1006)."""
    return (make_dataset(tmp_path / "a", 30, SEQ, first_id=0, shard_bytes=256, val_samples=6),
            make_dataset(tmp_path / "b", 7, SEQ, first_id=1000))


def read_steps(batches: TokenBatches, steps: int) -> list[list[int]]:
    """Sample ids of each optimizer step as this rank reads them."""
    return [sum((sample_ids(batches.next_batch()) for _ in range(batches.grad_accum_steps)), [])
            for _ in range(steps)]


def loader(sources, **kwargs) -> TokenBatches:
    args = dict(seq_len=SEQ, micro_batch_size=2, global_batch_size=8, seed=3)
    return TokenBatches([(s, 1.0) if isinstance(s, str) else s for s in sources], **{**args, **kwargs})


def test_shards_a_window_can_span_bounds_every_order_of_the_shards():
    # A small last shard does not make every shard count as small (the cache limit's sizing).
    assert shards_spanned([4096] * 500 + [17], 2 * 262144) == 130
    assert shards_spanned([0, 6, 6, 6, 4], 8) == 3  # the empty first shard streaming may write holds no sample
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 9, size=int(rng.integers(1, 12))).tolist()
        window = int(rng.integers(1, 30))
        bound = shards_spanned(sizes, window)
        most = 0
        for _ in range(20):  # brute force: every window position in a few random shard orders
            order = [sizes[i] for i in rng.permutation(len(sizes))]
            shard_of = np.repeat(np.arange(len(order)), order)
            for start in range(max(1, len(shard_of) - window + 1)):
                most = max(most, len(set(shard_of[start:start + window].tolist())))
        assert most <= bound, (sizes, window, most, bound)


def most_shards_of_two_steps(counts: list[int], batch: int, shuffle: bool, block: int, epochs: int = 3,
                             steps: int = 2) -> int:
    """Brute force: the most shards any two (or `steps`) consecutive steps read, over a few epochs of the real order."""
    order = _SourceOrder(counts, 0, 0, shuffle, block)
    shard_of = np.repeat(np.arange(len(counts)), counts)
    return max(len(set(shard_of[order.sample_ids(np.arange(t * batch, (t + steps) * batch))].tolist()))
               for t in range(epochs * sum(counts) // batch + 1))


def test_the_cache_budget_covers_the_shards_two_consecutive_steps_read():
    # With shuffle blocks no larger than the global batch the budget counted the shards of 2 global batches, but a
    # step reads from every block it overlaps: 16 shards where 12 were budgeted (the review's numbers).
    counts = [100] * 200
    for batch, block, budget in ((512, 400, 20), (512, 300, 18), (512, 512, 22), (256, 4096, 89)):
        assert shards_read_together(counts, batch, True, block) == budget
        assert most_shards_of_two_steps(counts, batch, True, block) <= budget, (batch, block)
    assert shards_read_together(counts, 512, False, 400) == shards_spanned(counts, 1024) == 12  # no blocks
    # Shards of uneven sizes, epochs' ends (each epoch shuffles the shards anew), blocks above and below the batch.
    rng = np.random.default_rng(0)
    for _ in range(150):
        counts = rng.integers(0, 20, size=int(rng.integers(1, 12))).tolist()
        counts[0] = counts[0] or 3
        batch, block, shuffle = int(rng.integers(1, 16)), int(rng.integers(1, 40)), bool(rng.integers(0, 4))
        bound = shards_read_together(counts, batch, shuffle, block)
        assert most_shards_of_two_steps(counts, batch, shuffle, block) <= bound, (counts, batch, block, shuffle)
        assert bound <= sum(1 for c in counts if c)
        # More steps at once (DataLoader workers reading ahead: samples_read_together).
        steps = int(rng.integers(3, 7))
        bound = shards_read_together(counts, batch, shuffle, block, steps)
        assert most_shards_of_two_steps(counts, batch, shuffle, block, steps=steps) <= bound, (counts, batch, steps)


def test_the_samples_read_at_once_count_what_the_dataloader_workers_read_ahead():
    """Each DataLoader worker holds PREFETCH_FACTOR (2) micro-batches in flight: 2 workers read up to 4 micro-batches
    ahead, 4 steps of one micro-batch each, or 1 step of 4; no workers, the main process reads: the two steps. Under
    train.batch_rampup, the widest stretch anywhere in the run (walking every step finds no wider one)."""
    assert PREFETCH_FACTOR == 2

    def constant(workers: int, micro_batches: int) -> tuple[int, int]:  # 8 samples per micro-batch of all ranks
        return samples_read_together(BatchSchedule(8 * micro_batches), 8, workers)[:2]

    assert constant(0, 1) == (16, 2) and constant(0, 16) == (256, 2)
    assert constant(2, 1) == (6 * 8, 6)
    assert constant(2, 4) == (3 * 32, 3)
    assert constant(8, 3) == (8 * 24, 8)  # 16 micro-batches: 5 steps and part of a sixth
    # A ramp from 32 to 1024 samples (32 a micro-batch): 3 steps of 1024 at most, not the 10 steps its 32s take.
    assert samples_read_together(BatchSchedule(1024, ((32, 100),)), 32, 4) == (3 * 1024, 3, 101)

    def walk(schedule: BatchSchedule, per: int, workers: int, first: int) -> int:
        samples, step, read_ahead = schedule.at(first) + schedule.at(first + 1), first + 2, 0
        while read_ahead < PREFETCH_FACTOR * workers:
            samples, read_ahead = samples + schedule.at(step), read_ahead + schedule.at(step) // per
            step += 1
        return samples

    rng = np.random.default_rng(0)
    for _ in range(100):
        per, workers = int(rng.integers(1, 4)), int(rng.integers(0, 4))
        sizes = sorted(per * int(n) for n in rng.integers(1, 9, size=int(rng.integers(1, 4)) + 1))
        lasts = sorted(int(n) for n in rng.choice(np.arange(1, 30), size=len(sizes) - 1, replace=False))
        schedule = BatchSchedule(sizes[-1], tuple(zip(sizes[:-1], lasts)))
        widest = max(walk(schedule, per, workers, first) for first in range(1, 40))
        assert samples_read_together(schedule, per, workers)[0] == widest, schedule


def test_each_epoch_is_a_seeded_permutation():
    shards = [7, 7, 7, 3]
    order = SampleOrder([shards], [MIX_BLOCK], seed=5, shuffle=True, block_size=10)
    _, ids = order.lookup(np.arange(72))
    epochs = ids.reshape(3, 24)
    assert all(sorted(e) == list(range(24)) for e in epochs.tolist())
    assert len({tuple(e) for e in epochs.tolist()}) == 3
    assert (SampleOrder([shards], [MIX_BLOCK], 5, True, 10).lookup(np.arange(72))[1] == ids).all()
    assert not (SampleOrder([shards], [MIX_BLOCK], 6, True, 10).lookup(np.arange(72))[1] == ids).all()
    assert SampleOrder([shards], [MIX_BLOCK], 5, False, 10).lookup(np.arange(30))[1].tolist() == list(range(24)) + list(
        range(6))


def test_a_shuffle_block_mixes_the_samples_of_its_shards():
    """Within a block, samples of its shards are interleaved, not read shard after shard (whole shards in a shuffled
    order looked shuffled to every test whose shards hold one sample)."""
    order = SampleOrder([[10] * 20], [MIX_BLOCK], seed=5, shuffle=True, block_size=100)
    _, ids = order.lookup(np.arange(200))
    shards = ids // 10
    for block in (shards[:100], shards[100:]):
        assert len(set(block.tolist())) == 10  # a block holds 10 whole shards
        assert int(np.count_nonzero(block[1:] != block[:-1])) > 60  # read shard after shard: 9 changes


def test_mixture_proportions_within_2_percent_over_10k_samples(tmp_path, data):
    c = make_dataset(tmp_path / "c", 13, SEQ, first_id=2000)
    weights = {0: 0.5, 1000: 0.3, 2000: 0.2}
    batches = loader([(data[0], 0.5), (data[1], 0.3), (c, 0.2)], micro_batch_size=50, global_batch_size=100)
    try:
        ids = [i for step in read_steps(batches, 100) for i in step]
    finally:
        batches.close()
    assert len(ids) == 10_000
    by_source = Counter(1000 * (i // 1000) for i in ids)
    for first, weight in weights.items():
        assert abs(by_source[first] / len(ids) - weight) < 0.02, (first, by_source)
    # Each source is read in whole epochs: the 7 samples of B (and the 13 of C) come up equally often.
    per_sample = Counter(i for i in ids if 1000 <= i < 1007)
    assert max(per_sample.values()) - min(per_sample.values()) <= 1


def test_a_weight_too_small_for_any_share_is_refused_and_the_shares_are_logged(tmp_path, data, caplog):
    # Sources are mixed in blocks of 4096 samples: a weight below about 1/8192 of the total got no sample of a block
    # and its source was silently never read.
    with pytest.raises(UserError, match=rf"data.sources\[1\].weight=0.0001 \({re.escape(data[1])}\) is too small: "
                                        r".* never be read; set it to at least 0.000247 "):
        loader([(data[0], 1.0), (data[1], 1e-4)])
    with pytest.raises(UserError, match=r"data.sources\[2\].weight=0.0001 "):  # one of two equal weights got a share
        loader([(data[0], 0.9998), (data[1], 1e-4), (data[1], 1e-4)])
    assert mixture_quotas([("a", 1.0), ("b", 0.000247)]).tolist() == [4095, 1]  # the weight suggested is enough
    # Finite weights whose sum is not (an assertion deep in the loader, after the launch check said "config ok").
    with pytest.raises(UserError, match=r"weights 1\.7e\+308, 1\.7e\+308 add up past the largest float; only "
                                        "their ratios matter"):
        mixture_quotas([("a", 1.7e308), ("b", 1.7e308)])
    c = make_dataset(tmp_path / "c", 7, SEQ, first_id=2000, val_samples=2)
    with caplog.at_level(logging.INFO, logger="qwen2_dist.data.loader"):
        loader([(data[0], 0.7), (c, 0.3)]).close()
        loader([(data[0], 0.7), (c, 0.3)], split="val", global_batch_size=2, micro_batch_size=1).close()
    mixing = [r.getMessage() for r in caplog.records if "mixing" in r.getMessage()]
    assert mixing == [f"data: mixing 2 sources, samples per block of 4096: {data[0]} 2867 (share 0.7 for weight "
                      f"share 0.7), {c} 1229 (share 0.3 for weight share 0.3)"]  # once: for the train split


def test_a_shuffle_block_of_few_shards_is_named_with_the_block_that_mixes_enough(data, caplog):
    # A block smaller than a shard's samples shuffled within one or two shards, silently.
    assert narrow_shuffle([100] * 50, 999) == 1000 and narrow_shuffle([100] * 50, 1000) is None
    assert narrow_shuffle([100] * 3, 299) == 300  # fewer than 10 shards: the block should hold them all
    assert narrow_shuffle([0, 7, 7], 13) == 14 and narrow_shuffle([0], 1) is None  # empty shards hold no sample
    with caplog.at_level(logging.WARNING, logger="qwen2_dist.data.loader"):
        loader([data[0]], shuffle_block_size=9).close()  # A: 30 shards of one sample (and an empty one)
        loader([data[0]], shuffle_block_size=9, shuffle=False).close()  # no shuffle: nothing to warn about
        loader([data[0]], shuffle_block_size=9, dp_rank=1, dp_size=2).close()  # once per run, on the first dp rank
        loader([data[0]], shuffle_block_size=10).close()
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [f"data: data.shuffle_block_size=9 holds fewer samples than 10 of the 30 shards of {data[0]} "
                      "(1 samples each on average): each stretch of the run reads few shards, so its batches mix "
                      "little of the data; use data.shuffle_block_size >= 10"], warned


def test_remote_sources_whose_urls_differ_in_punctuation_get_their_own_caches(tmp_path):
    # Both URLs made safe for a file name read s3_b_web_v1: the second source found the first one's cache.
    paths = [_cache_path(str(tmp_path), "run", url) for url in ("s3://b/web/v1", "s3://b/web_v1", "s3://b/web/v1")]
    assert paths[0] != paths[1] and paths[0] == paths[2]
    assert all(os.path.basename(p).startswith("s3_b_web_v1-") for p in paths)  # still readable
    # One directory per node, also in a cache_dir every node sees (a shared home): streaming's files are per node.
    assert os.path.basename(os.path.dirname(paths[0])) == socket.gethostname().replace("/", "_")


def test_a_read_only_source_cached_from_another_version_of_it_is_refused(tmp_path, monkeypatch):
    """A read-only directory is read through a copy in the run's cache, keyed by its path: prepared again there, it
    was read from the old shards cached, under the new summary (the fingerprint the same when the counts are)."""
    monkeypatch.setattr(loader_module, "reads_in_place", lambda path, split: False)  # as on a read-only mount
    source, cache = str(tmp_path / "ro"), str(tmp_path / "cache")
    make_dataset(source, 30, SEQ, first_id=0, shard_bytes=256)
    kwargs = dict(shuffle=False, cache_dir=cache, global_batch_size=4, micro_batch_size=4)
    for _ in range(2):  # the copy of the same version is read again
        batches = loader([source], **kwargs)
        local = batches.dataset.streams[0].local
        assert sample_ids(batches.next_batch()) == [0, 1, 2, 3] and local.startswith(cache)
        batches.close()
    shutil.rmtree(source)
    make_dataset(source, 30, SEQ, first_id=5000, shard_bytes=256)  # the same counts of other text
    with pytest.raises(UserError, match=rf"data source {re.escape(source)} was prepared again since this run cached "
                                        rf"it in {re.escape(local)}: its prepare_summary.json differs \(train digest "
                                        r"[0-9a-f]{16} -> [0-9a-f]{16}\).* delete "):
        loader([source], **kwargs)
    shutil.rmtree(source)  # the same, prepared before the digest: the same summary, which the index tells apart
    make_dataset(source, 30, SEQ, first_id=0, shard_bytes=256, digest=False)
    shutil.copyfile(os.path.join(source, SUMMARY_NAME), os.path.join(local, SUMMARY_NAME))
    shutil.rmtree(source)
    make_dataset(source, 30, SEQ, first_id=5000, shard_bytes=256, digest=False)
    with pytest.raises(UserError, match=rf"data source {re.escape(source)} was prepared again since this run cached "
                                        rf"it in {re.escape(local)}: its train/index.json differs \(as many shards "
                                        r"and samples, of other sizes\).* delete "):
        loader([source], **kwargs)
    shutil.rmtree(source)
    make_dataset(source, 40, SEQ, first_id=5000, shard_bytes=256)
    with pytest.raises(UserError, match=r"its prepare_summary.json differs \(train samples 30 -> 40\)"):
        loader([source], **kwargs)
    os.remove(os.path.join(local, SUMMARY_NAME))  # a copy cached before the summary was: its index still tells
    with pytest.raises(UserError, match=r"its train/index.json differs \(\d+ shards of 30 samples -> \d+ shards of "
                                        r"40 samples\)"):
        loader([source], **kwargs)
    shutil.rmtree(local)  # the fix named
    batches = loader([source], **kwargs)
    assert sample_ids(batches.next_batch()) == [5000, 5001, 5002, 5003]
    batches.close()


def test_a_run_cache_holding_more_hosts_than_the_job_has_nodes_is_named(tmp_path, monkeypatch, caplog):
    """Each node caches a run's remote data under its host name: a job requeued onto other nodes fetches it again,
    and the old nodes' copies stay. Named at the start, unless they can all be this job's other nodes."""
    monkeypatch.setattr(loader_module, "reads_in_place", lambda path, split: False)  # cached, as remote data is
    source, cache = make_dataset(tmp_path / "ro", 6, SEQ, val_samples=2), str(tmp_path / "cache")
    run_cache = os.path.dirname(os.path.dirname(_cache_path(cache, "run", source)))
    for host in ("node-a", "node-b"):
        os.makedirs(os.path.join(run_cache, host, "x"))
    with caplog.at_level(logging.WARNING, logger="qwen2_dist.data.loader"):
        loader([source], cache_dir=cache, run_key="run").close()
        loader([source], cache_dir=cache, run_key="run", split="val", global_batch_size=2,
               micro_batch_size=1).close()  # once: by the training split's loader
        monkeypatch.setenv("WORLD_SIZE", "6")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        _warn_other_hosts(run_cache, socket.gethostname())  # 3 nodes: the two may be this job's
        monkeypatch.setenv("WORLD_SIZE", "4")
        _warn_other_hosts(run_cache, socket.gethostname())
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and warned[0] == warned[1].replace("this job's 1 other", "this job's 0 other"), warned
    assert warned[0] == (f"data: {run_cache} holds this run's cached data for 2 other host(s) (node-a, node-b), more "
                         "than this job's 0 other node(s): each node keeps a copy of its own, and a job requeued onto "
                         "other nodes leaves the copies of the nodes it ran on before; remove each such copy (rm -r "
                         f"{run_cache}/HOST) once no job on its host reads it")


def _with_vocab(path: str, **fields) -> str:
    """A dataset directory whose summary also records the tokenizer fields given, as qwen2-prepare's does."""
    with open(os.path.join(path, SUMMARY_NAME)) as f:
        summary = json.load(f)
    with open(os.path.join(path, SUMMARY_NAME), "w") as f:
        json.dump({**summary, **fields}, f)
    return path


def test_check_vocab_refuses_mixed_tokenizers_and_ids_beyond_the_model(tmp_path):
    qwen = _with_vocab(make_dataset(tmp_path / "qwen", 4, SEQ), tokenizer="qwen2", vocab_size=151_646,
                       max_token_id=151_643)
    copy = _with_vocab(make_dataset(tmp_path / "copy", 4, SEQ), tokenizer="/models/qwen2-tok", vocab_size=151_646,
                       max_token_id=151_643)
    llama = _with_vocab(make_dataset(tmp_path / "llama", 4, SEQ), tokenizer="/models/llama3", vocab_size=128_256,
                        max_token_id=128_001)
    old = make_dataset(tmp_path / "old", 4, SEQ)  # prepared before summaries recorded the vocabulary
    check_vocab([qwen, copy, old, "s3://bucket/other"], vocab_size=151_936)  # one tokenizer by two names
    check_vocab([qwen], vocab_size=151_644)  # the largest id written is what counts
    with pytest.raises(UserError, match=rf"data sources {re.escape(qwen)} \(tokenizer qwen2, 151646 tokens\) and "
                                        rf"{re.escape(llama)} \(tokenizer /models/llama3, 128256 tokens\) were "
                                        r"prepared by different tokenizers.*re-prepare them with the model's "
                                        r"tokenizer"):
        check_vocab([qwen, old, llama], vocab_size=151_936)
    with pytest.raises(UserError, match=rf"data source {re.escape(qwen)} holds token ids up to 151643, beyond "
                                        r"model.vocab_size=1000; set model.vocab_size >= 151644 or re-prepare"):
        check_vocab([old, qwen], vocab_size=1000)
    no_max = _with_vocab(make_dataset(tmp_path / "no_max", 4, SEQ), tokenizer="qwen2", vocab_size=151_646)
    check_vocab([no_max], vocab_size=151_646)
    with pytest.raises(UserError, match=r"holds ids of tokenizer qwen2 \(151646 tokens\), beyond "
                                        r"model.vocab_size=151645; set model.vocab_size >= 151646"):
        check_vocab([no_max], vocab_size=151_645)


def test_step_samples_do_not_depend_on_ranks_or_accumulation(data):
    sources = [(data[0], 0.7), (data[1], 0.3)]
    reference = loader(sources, micro_batch_size=8)
    expected = read_steps(reference, 10)  # 80 samples: A (30) and B (7) both wrap into new epochs
    reference.close()
    for dp_size, micro in ((1, 2), (2, 2), (2, 4), (4, 1)):
        ranks = [loader(sources, micro_batch_size=micro, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
        per_rank = [read_steps(b, 10) for b in ranks]
        for b in ranks:
            b.close()
        assert [sum((per_rank[r][step] for r in range(dp_size)), []) for step in range(10)] == expected, (
            dp_size, micro)


def test_worker_processes_read_the_same_sequence(data):
    batches = [loader([data[0]], num_workers=workers) for workers in (0, 2)]
    try:
        assert read_steps(batches[0], 6) == read_steps(batches[1], 6)
    finally:
        for b in batches:
            b.close()


SPAWNED = textwrap.dedent("""
    import json, multiprocessing, sys
    from qwen2_dist.data.loader import TokenBatches
    from tests.datasets import sample_ids

    multiprocessing.set_start_method(sys.argv[2])
    ids = []
    for workers in (0, 1):
        batches = TokenBatches([(sys.argv[1], 1.0)], seq_len=8, micro_batch_size=2, global_batch_size=4, seed=3,
                               num_workers=workers)
        try:
            ids.append([batches.next_batch().inputs[:, 0].tolist() for _ in range(4)])
        finally:
            batches.close()
    print(json.dumps(ids))
""")


def test_workers_started_by_spawn_read_the_same_sequence_and_leave_the_segments_to_their_owner(data):
    """Workers started by spawn (forkserver, Python 3.14's default on Linux, alike) unpickle the dataset: they died
    importing streaming's torchvision-bound modules. The shared-memory segments they attach again must not be left
    to Python's resource tracker, which would unlink them by name at exit (its warning names them as leaked)."""
    result = subprocess.run([sys.executable, "-c", SPAWNED, data[0], "spawn"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr[-3000:]
    in_process, by_worker = json.loads(result.stdout.splitlines()[-1])
    assert by_worker == in_process and len(sum(in_process, [])) == 8
    assert "resource_tracker" not in result.stderr, result.stderr[-3000:]


def test_resume_1_to_1_continues_the_same_sequence(data):
    straight = loader([data[0]])
    expected = read_steps(straight, 12)
    straight.close()
    first = loader([data[0]])
    head = read_steps(first, 5)
    state = first.state_dict()
    first.close()
    assert state["samples_seen"] == 40
    second = loader([data[0]])
    second.load_state_dict(state)
    tail = read_steps(second, 7)
    second.close()
    assert head + tail == expected


def test_resume_refuses_other_data_or_an_old_position(data):
    batches = loader([data[0]])
    state = batches.state_dict()
    batches.close()
    other = loader([data[0]], seed=4)
    try:
        with pytest.raises(UserError, match=r"trained on other data or another data order \(changed since: seed 3 "
                                            r"-> 4\)"):
            other.load_state_dict(state)
        # Every changed part of the order is named; a checkpoint of an older release (no summary) gets the list
        # of what may have changed.
        old_state = {key: value for key, value in state.items() if key != "order"}
        with pytest.raises(UserError, match=r"another data order \(sources, their shards, weights, seed or shuffle\)"):
            other.load_state_dict(old_state)
        with pytest.raises(UserError, match="written by an older loader"):
            other.load_state_dict({"epoch": 0, "samples_in_epoch": 8})
        # What data.new_stage's WARNING names; an older loader's position, which may be of this very data, is no
        # new stage (None: refused all the same).
        assert other.data_change(state) == "changed since: seed 3 -> 4"
        assert other.data_change(old_state) == "other sources, shards, weights or order"
        assert other.data_change({"epoch": 0, "samples_in_epoch": 8}) is None
    finally:
        other.close()
    # Other data of the same shards and samples (its tokens' digest differs), or another train.seq_len over the
    # same counts: the fingerprint was the same, and the position was taken over.
    same_counts = make_dataset(os.path.dirname(data[0]) + "/same_counts", 30, SEQ, first_id=7000, shard_bytes=256,
                               val_samples=6)
    other = loader([same_counts])
    try:
        assert other.fingerprint == state["fingerprint"]
        with pytest.raises(UserError, match=r"changed since: source 0 \(.*same_counts\): digest [0-9a-f]{16} -> "
                                            r"[0-9a-f]{16}\)"):
            other.load_state_dict(state)
        assert other.data_change(state).startswith("changed since: source 0")  # what data.new_stage names
        older = {**state, "order": {**state["order"], "sources": [  # data prepared before the digest
            {k: v for k, v in source.items() if k != "digest"} for source in state["order"]["sources"]]}}
        assert other.state_problem(older) is None
    finally:
        other.close()
    again = loader([data[0]])
    try:
        assert again.state_problem(state) is None
        longer = {**state, "order": {**state["order"], "seq_len": 2 * SEQ}}
        assert "changed since: train.seq_len 16 -> 8" in again.state_problem(longer)
    finally:
        again.close()
    mixed = loader([data[0], (data[1], 2.0)], shuffle=False)
    try:
        with pytest.raises(UserError) as caught:
            mixed.load_state_dict(state)
        assert ("seed" not in str(caught.value)
                and "changed since: shuffle True -> False; 1 source(s) -> 2)" in str(caught.value)), str(caught.value)
    finally:
        mixed.close()


def test_a_mixture_resumes_on_weights_of_the_same_shares_only(data):
    """The order depends on each source's share of a mixing block (its quota), not on how the weights are written:
    weights scaled by one factor resume (checkpoints of either fingerprint), another share is refused, naming the
    weight; a single source's weight is no part of its order."""
    first = loader([(data[0], 0.7), (data[1], 0.3)])
    head = read_steps(first, 4)
    state = first.state_dict()
    tail = read_steps(first, 4)
    first.close()
    assert [source["quota"] for source in state["order"]["sources"]] == [2867, 1229] and head != tail
    # What checkpoints written before the quotas were hashed hold: the raw weights in the fingerprint, no quota.
    old_key = {"format": 2, "shards": [shard_samples(path) for path in data], "weights": [0.7, 0.3], "seed": 3,
               "shuffle": True, "shuffle_block_size": 1 << 18, "split": "train"}  # in this order
    old_state = {**state, "fingerprint": hashlib.sha256(json.dumps(old_key).encode()).hexdigest()[:16],
                 "order": {**state["order"], "sources": [{k: v for k, v in source.items() if k != "quota"}
                                                         for source in state["order"]["sources"]]}}
    for saved, weights in ((state, (70.0, 30.0)), (old_state, (0.7, 0.3))):
        again = loader(list(zip(data, weights)))
        try:
            again.load_state_dict(saved)
            assert read_steps(again, 4) == tail
        finally:
            again.close()
    other = loader([(data[0], 0.6), (data[1], 0.4)])
    try:
        with pytest.raises(UserError, match=rf"changed since: source 0 \({re.escape(data[0])}\): weight 0.7 -> 0.6; "
                                            rf"source 1 \({re.escape(data[1])}\): weight 0.3 -> 0.4\)"):
            other.load_state_dict(state)
    finally:
        other.close()
    one = loader([data[0]])
    state = one.state_dict()
    one.close()
    single = loader([(data[0], 3.0)], global_batch_size=16)  # the batch is not part of the order either
    try:
        single.load_state_dict({**state, "samples_seen": 8})
        assert single.position == 8
    finally:
        single.close()


def test_a_position_saved_by_an_older_loader_is_refused_before_the_checkpoint_loads(data):
    """Without samples_seen the refusal came from load_state_dict, after the weights had loaded: auto-resume took
    every such checkpoint for a damaged one and fell back through all of them."""
    batches = loader([data[0]])
    try:
        problem = batches.state_problem({"epoch": 0, "samples_in_epoch": 8})
        assert problem.startswith("the checkpoint's data position was written by an older loader"), problem
        with pytest.raises(ResumeMismatch, match="written by an older loader"):
            batches.load_state_dict({"epoch": 0, "samples_in_epoch": 8})
        assert batches.state_problem(batches.state_dict()) is None
    finally:
        batches.close()


def legacy_fingerprint(state: dict, paths: list[str], block: int, shuffle: bool) -> str:
    """The fingerprint a checkpoint of an earlier release holds: the block size as configured, the quotas."""
    key = {"format": 2, "shards": [shard_samples(path) for path in paths],
           "quotas": [source["quota"] for source in state["order"]["sources"]], "seed": 3, "shuffle": shuffle,
           "shuffle_block_size": block, "split": "train"}
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def test_a_shuffle_block_size_that_acts_the_same_resumes(data):
    """The block size is no part of the order without shuffling, nor between sizes at or above the largest source's
    samples (A: 30): such a change resumes, from checkpoints of either fingerprint, and the launchers' look at the
    order (order_changes) does not name it; one that changes the order still is refused, naming it."""
    for shuffle, before, after in ((False, 10, 20), (True, 30, 1 << 18), (True, 64, 1000)):
        first = loader([data[0], data[1]], shuffle=shuffle, shuffle_block_size=before)
        read_steps(first, 2)
        state = first.state_dict()
        tail = read_steps(first, 3)
        first.close()
        legacy = {**state, "fingerprint": legacy_fingerprint(state, data, before, shuffle)}
        assert legacy["fingerprint"] != state["fingerprint"] or (shuffle, before) == (True, 30)
        again = loader([data[0], data[1]], shuffle=shuffle, shuffle_block_size=after)
        try:
            assert order_changes(state["order"], again.order_summary) == ""
            for saved in (state, legacy):
                again.load_state_dict(saved)
                assert read_steps(again, 3) == tail, (shuffle, before, after)
        finally:
            again.close()
    first = loader([data[0]], shuffle_block_size=9)
    state = first.state_dict()
    first.close()
    other = loader([data[0]], shuffle_block_size=10)
    try:
        with pytest.raises(ResumeMismatch, match=r"changed since: shuffle_block_size 9 -> 10\)"):
            other.load_state_dict(state)
        with pytest.raises(ResumeMismatch, match=r"changed since: shuffle_block_size 9 -> 10\)"):
            other.load_state_dict({**state, "fingerprint": legacy_fingerprint(state, data[:1], 9, True)})
    finally:
        other.close()
    # As the launchers' check builds it: sources from the datasets' summaries (no shard counts).
    now = {"seed": 3, "shuffle": True, "shuffle_block_size": 1 << 18, "split": "train", "seq_len": SEQ,
           "sources": [{"path": "/data/a", "weight": 1.0, "quota": 4096, "samples": 30}]}
    assert order_changes({**now, "shuffle_block_size": 30}, now) == ""
    assert order_changes({**now, "shuffle_block_size": 29}, now) == "shuffle_block_size 29 -> 262144"
    assert order_changes({**now, "shuffle": False, "shuffle_block_size": 5}, {**now, "shuffle": False}) == ""
    assert order_changes({**now, "shuffle_block_size": 5}, {**now, "shuffle": False}) == "shuffle True -> False"


def test_another_global_batch_resumes_at_the_sample_position_saved(data):
    """The order does not depend on the global batch: a resume with another one reads on from the position."""
    straight = loader([data[0]], global_batch_size=4, micro_batch_size=4)
    expected = sum(read_steps(straight, 6), [])
    straight.close()
    first = loader([data[0]], global_batch_size=8, micro_batch_size=4)
    head = sum(read_steps(first, 1), [])
    state = first.state_dict()
    first.close()
    bigger = loader([data[0]], global_batch_size=16, micro_batch_size=4)
    try:
        bigger.load_state_dict(state)
        assert head + sum(read_steps(bigger, 1), []) == expected
    finally:
        bigger.close()


def test_a_batch_rampup_reads_the_constant_batch_order_in_steps_of_its_sizes(data):
    """train.batch_rampup (steps of 4, 4, 8, then 16 samples) reads the sequence a constant batch reads, cut into its
    steps' sizes: on two ranks, through a DataLoader worker, and resumed inside the ramp."""
    sizes = [4, 4, 8, 16, 16]
    schedule = BatchSchedule(16, ((4, 2), (8, 3)))
    straight = loader([data[0]], global_batch_size=4)
    flat = sum(read_steps(straight, sum(sizes) // 4), [])  # 48 samples: over an epoch's end
    straight.close()
    expected = [flat[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(len(sizes))]
    for dp_size, workers in ((2, 0), (1, 1)):
        ranks = [loader([data[0]], global_batch_size=16, batch_schedule=schedule, dp_rank=r, dp_size=dp_size,
                        num_workers=workers) for r in range(dp_size)]
        per_rank = [read_steps(b, len(sizes)) for b in ranks]
        for b in ranks:
            b.close()
        assert [sum((per_rank[r][step] for r in range(dp_size)), []) for step in range(len(sizes))] == expected
    first = loader([data[0]], global_batch_size=16, batch_schedule=schedule)
    head = read_steps(first, 2)
    state = first.state_dict()
    first.close()
    assert state["samples_seen"] == 8
    second = loader([data[0]], global_batch_size=16, batch_schedule=schedule, num_workers=1)
    try:
        second.load_state_dict(state, steps_done=2)
        assert (second.global_batch_size, second.grad_accum_steps) == (8, 4)
        assert head + read_steps(second, 3) == expected
    finally:
        second.close()


def test_a_worker_forked_while_garbage_collection_is_paused_collects_again(tmp_path, monkeypatch):
    """train.gc_interval switches automatic collection off in the trainer; a DataLoader worker forked then would
    inherit that for the whole run."""
    import gc

    collate = loader_module._collate

    def checked(*args, **kwargs):
        assert gc.isenabled(), "a DataLoader worker without garbage collection"
        return collate(*args, **kwargs)

    monkeypatch.setattr(loader_module, "_collate", checked)
    batches = loader([make_dataset(tmp_path / "d", 8, SEQ)], num_workers=1)
    gc.disable()
    try:
        batches.next_batch()
    finally:
        gc.enable()
        batches.close()


def test_a_cache_limit_too_small_names_the_fixes_that_keep_the_order_for_a_resume(tmp_path, monkeypatch):
    """Lowering data.shuffle_block_size changes the data order, which a resumed run's checkpoint refuses: the other
    fixes come first, for a resume."""
    monkeypatch.setattr(loader_module, "reads_in_place", lambda path, split: False)  # cached, as remote data is
    source = make_dataset(tmp_path / "ro", 30, SEQ, shard_bytes=256)  # 30 shards of one sample, and an empty one
    kwargs = dict(cache_dir=str(tmp_path / "cache"), cache_limit=1000)
    # 2 workers read 4 micro-batches (of 2 samples; 4 per step of 8) ahead: one step more than the two.
    with pytest.raises(UserError, match=r"the shards that two shuffle blocks of 16 samples and 22 more \(3 global "
                                        r"batches, 1 of them read ahead by the 2 DataLoader workers, 2 micro-batches "
                                        r"each\) can span, as a "
                                        r"step reads from every shuffle block it overlaps, also across an epoch's end, "
                                        r"and one being fetched by each of the node's 2 reading processes.*; to resume "
                                        r"a run, raise data.cache_limit, or lower data.num_workers \(to 1: [0-9.]+ "
                                        r"\w+ less\): another data.shuffle_block_size changes the data order, and the "
                                        r"checkpoint's position would be refused \(or, with data.new_stage, the "
                                        r"data read again from its first sample\); for a new run, raise "
                                        r"data.cache_limit or lower data.shuffle_block_size \(to no less than 10, "):
        loader([source], shuffle_block_size=16, num_workers=2, **kwargs)
    with pytest.raises(UserError, match=r"the shards that two global batches of 8 samples and 6 more can span.* "
                                        r"raise data.cache_limit \(or prepare the data in smaller shards\)$"):
        loader([source], shuffle_block_size=4, **kwargs)
    with pytest.raises(UserError, match=r"the shards that two global batches of 8 samples can span, and one"):
        loader([source], shuffle=False, **kwargs)


def test_the_cache_must_hold_what_the_dataloader_workers_read_ahead(tmp_path, monkeypatch):
    """Workers read PREFETCH_FACTOR micro-batches ahead each (the DataLoader is built with it): 2 workers, 4 micro-
    batches of 2 samples per step, so 3 steps at once where the training process reads 2; 60 shards of one sample,
    in order: 26 shards and one more in flight instead of 18, which the need and the message count."""
    monkeypatch.setattr(loader_module, "reads_in_place", lambda path, split: False)  # cached, as remote data is
    source = make_dataset(tmp_path / "ro", 60, SEQ, shard_bytes=256)
    kwargs = dict(cache_dir=str(tmp_path / "cache"), shuffle=False)
    needs = {}
    for workers in (0, 2):
        batches = loader([source], num_workers=workers, cache_limit=10**9, **kwargs)
        try:
            largest = max(shard.get_max_size() for shard in batches.dataset.shards)
            needs[workers] = batches.cache_need
            batches.next_batch()
            if workers:
                assert batches._loader.prefetch_factor == PREFETCH_FACTOR
        finally:
            batches.close()
    assert needs[2] - needs[0] == (26 + 1 - 18) * largest
    # Under train.batch_rampup (6 samples to step 3, then 8), steps 1-4 are read at once, 6 + 6 + 6 + 8 samples (the
    # 3 micro-batches of step 3 are fewer than the 4 read ahead): 2 shards more than 3 steps of 8.
    ramped = loader([source], num_workers=2, cache_limit=10**9, batch_schedule=BatchSchedule(8, ((6, 3),)), **kwargs)
    ramped.close()
    assert ramped.cache_need - needs[2] == 2 * largest
    with pytest.raises(UserError, match=r"the shards that 3 global batches of 8 samples \(1 of them read ahead by the "
                                        r"2 DataLoader workers, 2 micro-batches each\) can span, and one being fetched "
                                        r"by each of the node's 2 reading processes.*raise data.cache_limit \(or "
                                        r"prepare the data in smaller shards\), or lower data.num_workers \(to 1: "
                                        r"[0-9.]+ \w+ less; to 0: [0-9.]+ \w+ less, reading in the training "
                                        r"process\)$"):
        loader([source], num_workers=2, cache_limit=needs[2] - 1, **kwargs)


def shard_samples(path: str) -> list[int]:
    """Samples per shard of a dataset's train split, from its MDS index."""
    with open(os.path.join(path, "train", "index.json")) as f:
        return [shard["samples"] for shard in json.load(f)["shards"]]


def test_validation_split_and_document_positions(data):
    batches = loader([data[0]], split="val", global_batch_size=6, micro_batch_size=3, document_masking=True)
    try:
        first = [sample_ids(batches.next_batch()) for _ in range(2)]
        batches.seek(0)
        batch = batches.next_batch()
    finally:
        batches.close()
    assert sorted(sum(first, [])) == list(range(30, 36))  # the held-out samples, each once
    assert sample_ids(batch) == first[0]  # seek(0) reads the same samples again
    half = (SEQ + 1) // 2
    assert all(row.tolist() == list(range(half)) + list(range(SEQ - half)) for row in batch.positions)
    # Targets are the inputs shifted by one token, in every row (each sample counts up from its id).
    assert torch.equal(batch.targets[:, :-1], batch.inputs[:, 1:])
    assert torch.equal(batch.targets[:, -1], batch.inputs[:, -1] + 1)


def test_eod_mask_loss_ignores_the_targets_that_start_a_document(data):
    """data.eod_mask_loss: each sample's second document starts at token (SEQ + 1) // 2, which is the target of
    input position (SEQ + 1) // 2 - 1; that target is IGNORE_INDEX, every other one the same as without."""
    batches = {masked: loader([data[0]], global_batch_size=6, micro_batch_size=3, eod_mask_loss=masked)
               for masked in (False, True)}
    try:
        plain, masked = (batches[flag].next_batch() for flag in (False, True))
    finally:
        for b in batches.values():
            b.close()
    ignored = torch.zeros_like(plain.targets, dtype=torch.bool)
    ignored[:, (SEQ + 1) // 2 - 1] = True
    assert torch.equal(masked.inputs, plain.inputs) and torch.equal(masked.targets[~ignored], plain.targets[~ignored])
    assert (masked.targets[ignored] == IGNORE_INDEX).all()


def test_first_token_targets():
    """A start at s >= 1 marks target s - 1 (the last token of a sample is target SEQ - 1); a start at 0 has no
    target in the sample."""
    marks = first_token_targets([np.array([0, 3]), np.array([0, 1, SEQ]), np.array([0])], SEQ)
    assert marks.nonzero().tolist() == [[0, 2], [1, 0], [1, SEQ - 1]]


def test_positions_restart_at_every_document_start_in_the_inputs():
    """The inputs are the first SEQ tokens of a sample: a document starting at the last input restarts there; one
    starting at SEQ (the last target only) or past it moves no position; several documents each count from 0."""
    positions = positions_from_starts([np.array([0, SEQ - 1]), np.array([0, SEQ]), np.array([0]),
                                       np.array([0, 2, 3, 6])], SEQ)
    assert positions.tolist() == [
        [0, 1, 2, 3, 4, 5, 6, 0],
        list(range(SEQ)),
        list(range(SEQ)),
        [0, 1, 0, 0, 1, 2, 0, 1],
    ]


def test_bad_sources_are_refused_clearly(tmp_path, data):
    with pytest.raises(UserError, match=r"samples hold 9 tokens but train.seq_len=16 needs 17"):
        loader([data[0]], seq_len=16)
    with pytest.raises(UserError, match="no samples in its val split"):
        loader([data[1]], split="val")
    with pytest.raises(UserError, match="set data.cache_dir"):
        loader(["s3://bucket/data"])
    with pytest.raises(UserError, match="prepare_summary.json not found"):
        loader([str(tmp_path)])
    with pytest.raises(UserError, match="weight -1"):
        loader([(data[0], -1.0)])


@pytest.mark.parametrize("damage", ["cut short", "a changed byte"])
def test_a_damaged_shard_stops_with_its_name_and_the_fix(data, damage):
    """A copy of a dataset cut short (or a damaged disk) stops at the first sample of the shard with a UserError
    naming it, not with the codec's message alone: a crash there would be restarted into the same shard again."""
    shard = sorted(glob.glob(os.path.join(data[0], "train", "shard.*.mds.zstd")))[-1]
    content = open(shard, "rb").read()
    if damage == "cut short":
        content = content[: len(content) // 2]
    else:
        content = content[:20] + bytes([content[20] ^ 0xFF]) + content[21:]
    open(shard, "wb").write(content)
    batches = loader([data[0]], shuffle=False, global_batch_size=2)
    try:
        with pytest.raises(UserError, match=rf"data shard {re.escape(shard)}: .*copy it again from its source"):
            for _ in range(30):
                batches.next_batch()
    finally:
        batches.close()


def test_a_decompressed_shard_cut_short_is_made_again_and_one_stored_so_is_named(data, caplog):
    """A copy of a dataset already read holds the raw shards the loader decompressed beside the compressed ones: one
    cut short was trusted, and the run crashed at the same step at every restart (a numpy reshape error)."""
    batches = loader([data[0]], shuffle=False, global_batch_size=2)
    expected = [sample_ids(batches.next_batch()) for _ in range(15)]
    batches.close()
    raw = sorted(glob.glob(os.path.join(data[0], "train", "shard.*.mds")))[-1]
    content = open(raw, "rb").read()
    open(raw, "wb").write(content[: len(content) // 2])
    batches = loader([data[0]], shuffle=False, global_batch_size=2)
    try:
        with caplog.at_level(logging.WARNING):
            assert [sample_ids(batches.next_batch()) for _ in range(15)] == expected
    finally:
        batches.close()
    assert f"data shard {raw}: {len(content) // 2:,} bytes, where the dataset's index.json says {len(content):,}; " \
           "decompressing it again" in caplog.text and open(raw, "rb").read() == content


@pytest.mark.parametrize("damage", ["no index", "a broken index", "no split directory"])
def test_a_split_without_its_index_is_named_with_the_fix(data, damage):
    """streaming's FileNotFoundError or JSONDecodeError (exit 1: torchrun restarted into it again), or, with the
    split directory gone, 'is read-only; set data.cache_dir', which it was not."""
    index = os.path.join(data[0], "train", "index.json")
    if damage == "no index":
        os.remove(index)
    elif damage == "a broken index":
        open(index, "w").write('{"shards": [')
    else:
        shutil.rmtree(os.path.dirname(index))
    what = {"no index": "is missing,", "a broken index": "is not the JSON index streaming writes",
            "no split directory": r"is missing \(no train/ directory\)"}[damage]
    with pytest.raises(UserError, match=rf"data source {re.escape(data[0])}: {re.escape(index)} {what}.* names a "
                                        r"train split; the copy of the dataset is damaged or incomplete"):
        loader([data[0]])


def test_a_damaged_shard_of_a_source_read_through_the_cache_is_named(tmp_path, monkeypatch):
    """A read-only (or remote) source's shards are fetched and decompressed by streaming into the cache: a damaged
    one ended with the codec's error alone ("zstd.Error: Decompression error"), naming no shard and no fix."""
    monkeypatch.setattr(loader_module, "reads_in_place", lambda path, split: False)  # as on a read-only mount
    source = make_dataset(tmp_path / "ro", 30, SEQ, shard_bytes=256)
    shard = sorted(glob.glob(os.path.join(source, "train", "shard.*.mds.zstd")))[-1]
    content = open(shard, "rb").read()
    open(shard, "wb").write(content[:20] + bytes([content[20] ^ 0xFF]) + content[21:])
    batches = loader([source], shuffle=False, global_batch_size=2, cache_dir=str(tmp_path / "cache"))
    try:
        with pytest.raises(UserError, match=rf"data shard {re.escape(source)}/train/{os.path.basename(shard)} "
                                            r"\(cached in .*cache.*\) cannot be read .*: the source's shard is "
                                            r"damaged or missing, or its cached copy is; delete "):
            for _ in range(15):
                batches.next_batch()
    finally:
        batches.close()


HOLDER = textwrap.dedent("""
    import sys
    from qwen2_dist.data.loader import TokenBatches
    batches = TokenBatches([(sys.argv[1], 1.0)], seq_len=8, micro_batch_size=2, global_batch_size=2)
    batches.next_batch()
    print(batches.dataset._shm_prefix_int, flush=True)
    sys.stdin.readline()
    batches.close()
""")


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="POSIX shared memory in /dev/shm (Linux)")
def test_shared_memory_is_released_and_only_dead_runs_are_cleaned(data):
    env = {**os.environ, "PYTHONPATH": REPO}
    holders = [subprocess.Popen([sys.executable, "-c", HOLDER, data[0]], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
               for _ in range(2)]
    try:
        killed, alive = (int(h.stdout.readline()) for h in holders)
        # The machine's prefix lock held meanwhile: a loader starting in another test process (the other pytest
        # worker) cleans a dead run's segments under it, and once removed those of the killed run here (CI,
        # 2026-12-07).
        with hygiene.prefix_lock(True):
            holders[0].kill()
            holders[0].wait()
            time.sleep(0.5)
            # Python's resource tracker (still alive) does not unlink them by name: the loader took them over, so a
            # tracker outliving its process can never remove the segments of a later run that reuses the prefix.
            assert shm_segments(killed) and shm_segments(alive)

        batches = loader([data[0]])  # cleans what the killed run left, leaves the live run alone
        mine = batches.dataset._shm_prefix_int
        assert holders[0].pid not in [pid for _, _, pid, _ in hygiene._records(killed)]
        assert mine == killed or not shm_leftovers(killed)  # the freed prefix may be reused at once
        assert shm_segments(alive) and [pid for _, _, pid, _ in hygiene._records(alive)] == [holders[1].pid]
        lock_dir = batches._lock_dir
        batches.close()
        assert os.getpid() not in [pid for _, _, pid, _ in hygiene._records(mine)]
        assert not shm_leftovers(mine) and not glob.glob(os.path.join(lock_dir, f"{mine:06d}_*"))

        holders[1].stdin.write("\n")
        holders[1].stdin.close()
        assert holders[1].wait(timeout=60) == 0
        assert holders[1].pid not in [pid for _, _, pid, _ in hygiene._records(alive)]
        assert not shm_leftovers(alive)
    finally:
        for h in holders:
            if h.poll() is None:
                os.killpg(h.pid, signal.SIGKILL)


STARTER = textwrap.dedent("""
    import os, sys, time
    from qwen2_dist.data.loader import TokenBatches
    from qwen2_dist.data.streaming_compat import import_streaming
    import_streaming()
    import streaming.base.shared.prefix as prefix

    find = prefix._check_and_find_retrying

    def find_then_wait(*args, **kwargs):
        # Widen the race: streaming has looked for a free prefix, and creates it only once "go" exists.
        found = find(*args, **kwargs)
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.001)
        return found

    prefix._check_and_find_retrying = find_then_wait
    print("ready", flush=True)
    batches = TokenBatches([(sys.argv[1], 1.0)], seq_len=8, micro_batch_size=2, global_batch_size=2)
    print(batches.dataset._shm_prefix_int, flush=True)
    sys.stdin.readline()
    batches.close()
""")


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="POSIX shared memory in /dev/shm (Linux)")
def test_a_closing_loader_removes_its_prefix_under_the_prefix_lock(tmp_path, monkeypatch, caplog):
    """Another run's ranks may be choosing their prefix from what /dev/shm holds: the last owner removes its
    segments only with the lock in hand; inside this process's own locked section, without waiting for itself."""
    import fcntl

    held = []

    def unlink(prefix_int, lock_dirs):
        fd = os.open(hygiene.SHM_DIR, os.O_RDONLY)
        try:  # another open file description: refused while the releasing one holds the lock
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        return []

    monkeypatch.setattr(hygiene, "_unlink_prefix", unlink)
    hygiene.release(999_998, None, str(tmp_path))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING), hygiene.prefix_lock(True):
        hygiene.release(999_998, None, str(tmp_path))  # a finalizer run by the garbage collector in there
    assert held == [True, True]
    assert time.monotonic() - started < 5 and "without the lock" not in caplog.text


def forked_python(**extra_env: str) -> tuple[str, dict]:
    """The interpreter and environment of a process forked by the test zygote (tests/zygote.py), torch imported
    already (3-4 s of CPU less per process on the 2-core machine): its client passes on its standard streams and
    signals, and exits as the run does."""
    return helpers.forked_python()["PYTHON"], {**os.environ, "PYTHONPATH": REPO, **extra_env, **helpers.worker_env()}


CROSSED = textwrap.dedent("""
    import os, sys, time
    from datetime import timedelta
    import torch.distributed as dist
    from qwen2_dist.data import hygiene

    store, rank, lock, delay = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    time.sleep(delay)
    with hygiene.prefix_lock(True, lock):
        dist.barrier()  # as streaming's and the loader's barriers, with the lock in hand
        time.sleep(0.2)
    print("done", flush=True)
    dist.destroy_process_group()
""")


def test_two_multi_node_runs_sharing_two_machines_do_not_deadlock_on_the_prefix_locks(tmp_path):
    """Runs a and b each have a leader on machine 1 and one on machine 2 (each machine's lock a directory here). a's
    leader on 1 and b's on 2 come first; a leader that waited for its lock while the other held its own, waiting at
    its run's barrier, would deadlock both runs until the process group's timeout."""
    machines = [tmp_path / "machine1", tmp_path / "machine2"]
    for machine in machines:
        machine.mkdir()
    python, env = forked_python(OMP_NUM_THREADS="1")
    layout = [("a", 0, machines[0], 0.0), ("a", 1, machines[1], 1.5), ("b", 0, machines[1], 0.0),
              ("b", 1, machines[0], 1.5)]
    procs = [subprocess.Popen([python, "-c", CROSSED, str(tmp_path / f"store_{run}"), str(rank), str(lock),
                               str(delay)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              start_new_session=True)
             for run, rank, lock, delay in layout]
    try:
        outs = [proc.communicate(timeout=90) for proc in procs]
    except subprocess.TimeoutExpired:
        pytest.fail("the two runs deadlocked on the machines' prefix locks")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert [out.strip() for out, _ in outs] == ["done"] * 4, [err[-2000:] for _, err in outs]


def test_a_rank_without_a_lock_waits_while_its_leader_cannot_get_one(tmp_path):
    """Another run holds the machine's prefix lock: the leader (local rank 0) retries, and rank 1, which takes no
    lock, retries beside it until the lock is free (it tried to let go of a lock it never took, and failed)."""
    import fcntl

    lock = tmp_path / "machine"
    lock.mkdir()
    python, env = forked_python(OMP_NUM_THREADS="1")
    held = os.open(lock, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # the other run's
    code = CROSSED.replace("hygiene.prefix_lock(True, lock)", "hygiene.prefix_lock(rank == 0, lock)")
    procs = [subprocess.Popen([python, "-c", code, str(tmp_path / "store"), str(rank), str(lock), "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              start_new_session=True) for rank in (0, 1)]
    try:
        time.sleep(3)
        assert [proc.poll() for proc in procs] == [None, None]  # both waiting, none failed
        os.close(held)
        outs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert [out.strip() for out, _ in outs] == ["done"] * 2, [err[-2000:] for _, err in outs]


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="POSIX shared memory in /dev/shm (Linux)")
def test_runs_starting_together_get_their_own_prefixes(data, tmp_path):
    # streaming picks the first free prefix in /dev/shm; without hygiene.prefix_lock, runs that look at the same
    # moment pick the same one and all but one fail with "File exists: '/000000_locals'" (seen in CI). The runs
    # here stop between looking and creating until "go", which makes that moment two seconds long.
    go = tmp_path / "go"
    python, env = forked_python()
    runs = [subprocess.Popen([python, "-c", STARTER, data[0], str(go)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
            for _ in range(4)]
    try:
        assert all(run.stdout.readline().strip() == "ready" for run in runs)
        time.sleep(2)  # every run that may look for a prefix now has (without the lock, all four have)
        go.touch()
        prefixes = []
        for run in runs:
            line = run.stdout.readline().strip()
            assert line.isdigit(), run.stderr.read()[-2000:] if run.poll() is not None else line
            prefixes.append(int(line))
        assert len(set(prefixes)) == 4
        for run in runs:
            run.stdin.write("\n")
            run.stdin.close()
        assert [run.wait(timeout=60) for run in runs] == [0] * 4
    finally:
        for run in runs:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)


def test_streaming_imports_without_torchvision_or_transformers(tmp_path):
    """A torchvision that fails on import (built for another torch) is never imported, nor is transformers (2 s in
    every training rank); what the loader and prepare use is there."""
    broken = tmp_path / "site" / "torchvision"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    code = ("import sys\n"
            "from qwen2_dist.data.streaming_compat import import_streaming\n"
            "s = import_streaming()\n"
            "from streaming.base.shared.memory import SharedMemory\n"
            "from streaming.base.storage.download import CloudDownloader\n"
            "print(s.StreamingDataset.__name__, s.Stream.__name__, s.MDSWriter.__name__,\n"
            "      [m for m in ('torchvision', 'transformers') if m in sys.modules])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), REPO])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[0] == "StreamingDataset Stream MDSWriter []", result.stdout


def test_cleaning_leaves_the_prefixes_of_another_pid_namespace_alone(tmp_path, monkeypatch):
    """Containers sharing /dev/shm (docker --ipc=host) have PID namespaces of their own: an owner recorded in another
    one is not in this /proc, so it cannot be told dead, and its segments stay; a dead owner of this one's go."""
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(hygiene, "SHM_DIR", str(shm))
    record = hygiene.register(123, str(tmp_path))
    mine = os.path.basename(record)[len(hygiene.RECORD_PREFIX):].split("-")[2]
    assert mine.endswith("." + hygiene._pid_namespace()) and hygiene._pid_namespace()
    os.remove(record)
    dead = 999_999_999  # no such pid, in this namespace or, as the record says, in another
    (shm / f"{hygiene.RECORD_PREFIX}000123-{dead}-1.{hygiene._pid_namespace()}").write_text(str(tmp_path))
    (shm / f"{hygiene.RECORD_PREFIX}000124-{dead}-1.1").write_text(str(tmp_path))
    for prefix in ("000123", "000124"):
        (shm / f"{prefix}_locals").write_text("")
    hygiene.clean_stale(str(tmp_path))
    assert sorted(os.listdir(shm)) == ["000124_locals", f"{hygiene.RECORD_PREFIX}000124-{dead}-1.1"]


def test_cleaning_skips_what_another_user_left(tmp_path, monkeypatch):
    """/dev/shm and /tmp are shared and sticky: a dead run of another user leaves segments and lock files this user
    may not remove. The cleaning at every loader start goes past them instead of failing the run."""
    shm, locks = tmp_path / "shm", tmp_path / "locks"
    shm.mkdir()
    locks.mkdir()
    monkeypatch.setattr(hygiene, "SHM_DIR", str(shm))
    dead = 999_999_999  # no such pid
    (shm / f"{hygiene.RECORD_PREFIX}000123-{dead}-1").write_text(str(locks))
    (shm / "000123_locals").write_text("")
    (locks / "000123_cache_filelock").write_text("")
    (locks / "000124_barrier_filelock").write_text("")  # an orphan lock file
    remove = os.remove

    def not_ours(path, *args, **kwargs):
        if os.path.basename(path).startswith("000"):
            raise PermissionError(1, "Operation not permitted", path)
        return remove(path, *args, **kwargs)

    monkeypatch.setattr(os, "remove", not_ours)
    removed = hygiene.clean_stale(str(locks))
    assert removed == [str(shm / f"{hygiene.RECORD_PREFIX}000123-{dead}-1")]
