"""Running a coroutine on the process's event loop: uvloop when installed, else asyncio."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Run under uvloop when it is installed (extra "fast"), unless CMEK_PROXY_LOOP=asyncio.

    See benchmarks/README.md for what uvloop buys on the small-object path.
    """
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
