"""Process memory housekeeping, shared by the supervisor and the workers."""

from __future__ import annotations

import ctypes
import ctypes.util


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim). Reading and
    compiling the first table frees about as much as it keeps; without this, the resident
    size stays at the peak."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        pass
