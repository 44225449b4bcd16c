"""Running a coroutine on the process's event loop: uvloop when installed, else asyncio.

Every serving process (``--workers 1`` or each worker) starts here, so the allocator is tuned
here too (:func:`tune_malloc`).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
from collections.abc import Coroutine
from typing import Any, Final

_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
MMAP_THRESHOLD: Final = 16 * 1024 * 1024
"""Buffers up to this size come from the heap, not from a fresh mmap each time."""
TRIM_THRESHOLD: Final = 64 * 1024 * 1024
"""Freed heap up to this size is kept for the next buffers rather than given back at once."""


def tune_malloc() -> bool:
    """Keep glibc from mapping and unmapping a fresh region for every MiB-sized buffer.

    A large GET or PUT makes several 1 MiB buffers per MiB it moves (read chunk, sealed or
    opened segments, the joined output). glibc's default adapts its mmap threshold, but once
    two such buffers are alive at a time the heap top is trimmed and grown again, and every
    new buffer costs the kernel a page fault per 4 KiB: measured ~1.4 s of CPU per GiB here
    against ~0.06 s with these thresholds (benchmarks/README.md, "Allocator").  Memory stays
    bounded: at most ``TRIM_THRESHOLD`` of freed heap is retained per process.  No-op (False)
    off glibc or when ``CMEK_PROXY_MALLOC=default`` or the MALLOC_* variables are set.
    """
    if os.environ.get("CMEK_PROXY_MALLOC") == "default":
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False  # the operator chose
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt)
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    mmap_ok: int = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    trim_ok: int = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return mmap_ok == 1 and trim_ok == 1


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Run under uvloop when it is installed (extra "fast"), unless CMEK_PROXY_LOOP=asyncio.

    See benchmarks/README.md for what uvloop buys on the small-object path.
    """
    tune_malloc()
    if os.environ.get("CMEK_PROXY_LOOP") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass  # uvloop is optional (extra "fast"): fall through to asyncio
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(coro)
            return
    asyncio.run(coro)
