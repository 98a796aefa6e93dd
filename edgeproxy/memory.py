"""Process memory housekeeping, shared by the supervisor and the workers: the cycle collector
kept out of the first table's way, and free pages given back once it is served."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc

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


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim). Reading and
    compiling the first table frees about as much as it keeps; without this, the resident
    size stays at the peak."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        pass
