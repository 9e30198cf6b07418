"""The embedded default corpus: the Python standard library's own sources, so a first run needs no download."""

import hashlib
import logging
import os
import shutil
import sys
import sysconfig
import uuid

from qwen2_dist.data.prepare import SUMMARY_NAME, prepare

logger = logging.getLogger(__name__)

# Bump when the recipe below changes, so caches built by an older recipe are not reused. 3: the summary records the
# tokenizer's vocab_size and the largest token id (prepare()), which loader.check_vocab compares with the model.
RECIPE_VERSION = 3
# site-packages differs between environments: including it would make the corpus depend on what is installed.
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
# Tests hold deliberately odd files (bad encodings, data tables); they come after the library code, so a small
# max_tokens gets library code only, and the default 4M tokens still fits (the library alone is about 3M).
TEST_DIRS = {"test", "tests", "idle_test"}
TOKENIZER = "qwen2"
# Held-out files for the eval loss; the stdlib has ~2,000 library modules, so about 40 of them.
VAL_FRACTION = 0.02


def stdlib_sources() -> list[str]:
    """The standard library's .py files, sorted, library code before tests, without site-packages."""
    root = sysconfig.get_paths()["stdlib"]
    library, tests = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]
        in_tests = not TEST_DIRS.isdisjoint(os.path.relpath(dirpath, root).split(os.sep))
        (tests if in_tests else library).extend(os.path.join(dirpath, n) for n in filenames if n.endswith(".py"))
    return sorted(library) + sorted(tests)


def embedded_corpus(cache_dir: str, seq_len: int, max_tokens: int) -> str:
    """Path of the stdlib corpus prepared for seq_len under cache_dir, built on first use."""
    key_text = f"{RECIPE_VERSION}|{sys.version}|{seq_len}|{max_tokens}|{TOKENIZER}"
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    path = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), f"stdlib-{key}")
    if os.path.exists(os.path.join(path, SUMMARY_NAME)):
        return path
    # Every builder writes its own directory and renames it into place; when two processes race, the rename of
    # the second fails on the non-empty directory and it throws its copy away.
    tmp = f"{path}.build-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    summary = prepare(
        stdlib_sources(), tmp, seq_len=seq_len, tokenizer=TOKENIZER, max_tokens=max_tokens, val_fraction=VAL_FRACTION,
        held_out_fix="raise data.embedded_max_tokens (the embedded corpus holds out a fixed share of its documents)",
    )
    try:
        os.rename(tmp, path)
    except OSError:
        if not os.path.exists(os.path.join(path, SUMMARY_NAME)):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return path
    logger.info(
        "built the embedded corpus at %s: %d tokens in %d samples of %d (%d held out) from %d Python standard "
        "library files",
        path,
        summary["tokens"],
        summary["samples"],
        summary["sample_tokens"],
        summary["splits"].get("val", {}).get("samples", 0),
        summary["documents"],
    )
    return path
