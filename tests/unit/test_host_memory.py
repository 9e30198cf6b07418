"""qwen2_dist/train/host_memory.py: glibc's malloc keeping freed memory, seen in glibc's own counters."""

import json
import os
import subprocess
import sys

import pytest

from qwen2_dist.train import host_memory
from tests.helpers import REPO

pytestmark = pytest.mark.skipif(host_memory._libc() is None or not hasattr(host_memory._libc(), "mallinfo2"),
                                reason="needs glibc 2.33 or newer (mallopt, mallinfo2)")

PROBE = """
import ctypes, json, sys
from qwen2_dist.train.host_memory import keep_freed_memory

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
said = keep_freed_memory(json.loads(sys.argv[1])) if sys.argv[1] != "none" else None
size = 48 << 20  # over glibc's largest mmap threshold (32 MiB)
before = libc.mallinfo2()
block = libc.malloc(size)
ctypes.memset(block, 1, size)
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(json.dumps({"said": said, "mapped": during.hblks - before.hblks, "kept_free": after.fordblks >= size}))
"""


def probe(environ: str) -> dict:
    """A fresh interpreter started without malloc settings; keep_freed_memory(environ) unless "none", then one 48 MiB
    block made and freed: whether glibc mapped it for itself, and whether the heap kept it when freed."""
    env = {k: v for k, v in os.environ.items() if k not in host_memory.ENV and k != "GLIBC_TUNABLES"}
    result = subprocess.run([sys.executable, "-c", PROBE, environ], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_large_block_comes_from_the_heap_and_stays_there_when_freed():
    assert probe("none") == {"said": None, "mapped": 1, "kept_free": False}  # glibc's defaults: mapped, unmapped
    kept = probe("{}")
    assert kept["said"].startswith("glibc malloc keeps freed memory") and kept["mapped"] == 0 and kept["kept_free"]


def test_malloc_settings_of_the_environment_are_left_as_they_are():
    # MALLOC_MMAP_THRESHOLD_ was overridden, though its tunable's spelling was not.
    for environ in ({"MALLOC_MMAP_MAX_": "65536"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"},
                    {"MALLOC_MMAP_THRESHOLD_": "1048576"}):
        assert probe(json.dumps(environ)) == {
            "said": "glibc malloc as the environment sets it (MALLOC_* or GLIBC_TUNABLES)", "mapped": 1,
            "kept_free": False}
