"""Process memory housekeeping, shared by the supervisor and the workers: the cycle collector
kept out of the first table's way, free pages given back once it is served, and the
allocator told to keep the memory a worker's reads and writes reuse."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import os

# Back on after this long whatever happens, or (say) failed API connections would pile up
# their cycles while the first table never completes.
FIRST_TABLE_GRACE_S = 60.0


def hold_collection(loop: asyncio.AbstractEventLoop) -> None:
    """No cycle collection until the first table is served (first_table_served): reading,
    compiling and applying 50,000 Ingresses makes millions of objects, and each full pass of
    the collector walks all of them (with it on, the first build took twice as long and a
    worker's first apply 3-6x)."""
    gc.disable()
    loop.call_later(FIRST_TABLE_GRACE_S, gc.enable)


def first_table_served() -> None:
    """What exists now is kept out of the collector's passes for good (the objects and the
    table live until they change, and are freed by their reference counts then); collection
    resumes; free heap pages go back to the system."""
    gc.freeze()
    gc.enable()
    release_free_memory()


# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# A body passes through a worker as bytes of up to one read each (uvloop reads up to 256 KiB),
# well over glibc's first mmap threshold (128 KiB). Left to glibc, each such piece was mapped
# and unmapped, or the heap top grown and trimmed, request after request: 1 MiB responses
# cost 390 minor page faults each and edgeproxy 1.6x nginx's CPU (nginx reuses fixed
# buffers). Pieces under 1 MiB come from the heap, and up to 16 MiB of free heap top stays
# mapped for the next ones (glibc's own MALLOC_* or GLIBC_TUNABLES settings, when set, win).
WORKER_MMAP_THRESHOLD = 1 << 20
WORKER_TRIM_THRESHOLD = 16 << 20


def keep_buffer_memory() -> None:
    """For a worker: body-sized allocations reuse heap memory instead of new pages."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "malloc" in tunables or any(name.startswith("MALLOC_") for name in os.environ):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, WORKER_TRIM_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: its own policy
        pass


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim). Reading and
    compiling the first table frees about as much as it keeps; without this, the resident
    size stays at the peak."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        pass
