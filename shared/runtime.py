"""Process-level settings every Harbour service applies at start."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def tune_gc() -> None:
    """Collect young objects less often and keep start-up objects out of every collection.

    A writer allocates tens of thousands of short-lived objects per batch; with CPython's default
    thresholds the cyclic collector runs hundreds of times per batch and re-walks every long-lived
    object each time (measured: about a third of the ledger writer's CPU). Harbour's hot paths
    create no reference cycles worth chasing, so rarer collections cost memory only briefly.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 1_000)


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop where it exists (Linux, macOS), the stock loop elsewhere.

    uvloop (libuv, from the authors of asyncpg) does the event loop's own work and socket I/O
    in C; a writer that spends its time on Kafka fetches and PostgreSQL round trips gets that
    much of a core back for the ledger's own work.
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return asyncio.run(main)
    return uvloop.run(main)
