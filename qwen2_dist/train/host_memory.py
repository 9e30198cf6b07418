"""glibc's malloc for training on the CPU: freed memory kept for the next step instead of unmapped.

glibc serves a block over its mmap threshold (at most 32 MiB) with a fresh mapping and unmaps it when freed, so
every such temporary is page-faulted in again, page by page, each time it is made. A CPU step of the tiny model
makes several: the loss's fp32 logits of a 64-token micro-batch over the 151,936-token vocabulary are 39 MB. On
the 2-core development machine (2026-12-07) the loss's softmax step took 142 ms with glibc's defaults and 51 ms
with freed memory kept (torch.clone of those logits: 40 ms, most of it page faults), and a 6-step CPU run of the
tiny model 5.2 s against 3.9 s (under cProfile). The README's main job spent 6 min 35 s in the kernel in 9 min 49 s
(tests ran beside it for part of it), and 4 s in 4 min 29 s with this and the loss's one-exp step. Only a process
that trains on the CPU changes it (a GPU's tensors are not glibc's), and only where the environment does not already
set it (MALLOC_MMAP_MAX_, MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_, MALLOC_TOP_PAD_ or a glibc.malloc tunable,
which glibc read when the process started).
"""

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: free memory at the top of the heap is returned past 2 GiB
ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
"""The same settings for a process started with them (glibc reads these variables when it starts)."""
# glibc's variables for what is set here (mmap and trimming; the older spelling of its tunables): one that is set
# means the user set these by hand. (Not MALLOC_ARENA_MAX, often set for another reason.)
GLIBC_MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def _libc():
    """glibc's functions, or None on another C library."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_freed_memory(environ=os.environ) -> str:
    """Have glibc serve every block from its heap (no mmap) and keep what is freed (trim only past 2 GiB), unless
    `environ` (this process' environment at start) sets malloc itself; what was done, for the log."""
    if any(key in environ for key in GLIBC_MALLOC_VARIABLES) or "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "glibc malloc as the environment sets it (MALLOC_* or GLIBC_TUNABLES)"
    libc = _libc()
    if libc is None:
        return "malloc left as it is (not glibc)"
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "malloc left as it is (glibc refused mallopt)"
    return ("glibc malloc keeps freed memory for the next step (no mmap, trim past 2 GiB): large temporaries are "
            "not page-faulted in again on every step")
