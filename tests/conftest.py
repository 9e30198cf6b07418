"""Shared fixtures: a per-test TMPDIR (streaming's lock files go there) and a small embedded corpus."""

import pytest


@pytest.fixture(autouse=True)
def _private_tmpdir(tmp_path_factory, monkeypatch):
    """Each test gets its own TMPDIR, so streaming's lock files and compile caches never collide."""
    monkeypatch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmpdir")))


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory) -> str:
    """A cache dir holding a small embedded corpus (seq_len 32), built once per test session."""
    from qwen2_dist.data.corpus import embedded_corpus

    cache = str(tmp_path_factory.mktemp("corpus"))
    embedded_corpus(cache, seq_len=32, max_tokens=60_000)
    return cache
