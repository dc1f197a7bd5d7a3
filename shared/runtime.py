"""Process-level settings every Harbour service applies at start."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def tune_gc(young: int = 100_000) -> None:
    """Collect young objects less often and keep start-up objects out of every collection.

    A writer allocates tens of thousands of short-lived objects per batch; with CPython's default
    thresholds the cyclic collector runs hundreds of times per batch and re-walks every long-lived
    object each time (measured: about a third of the ledger writer's CPU). Harbour's hot paths
    create no reference cycles worth chasing, so rarer collections cost memory only briefly.

    ``young``: how many more container objects than were freed since the last collection start
    the next one (CPython counts allocations minus deallocations, so objects freed by their
    reference count never add up).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(young, 50, 1_000)


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


def run_service(name: str, body: Callable[[asyncio.Event], Awaitable[None]], *,
                young_gc_threshold: int = 100_000) -> None:
    """The ``main()`` of every service process: INFO logging, start-up objects kept out of the
    collector (:func:`tune_gc` with ``young_gc_threshold``), SIGTERM/SIGINT set the event
    ``body`` runs until, all on :func:`run`."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log = logging.getLogger(f"harbour.{name.split()[0]}")

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tune_gc(young_gc_threshold)
        log.info("%s starting", name)
        await body(stop)
        log.info("%s stopped", name)

    run(serve())


def die_with_parent() -> None:
    """``preexec_fn`` for a child process: the kernel sends it SIGTERM when its parent dies
    (Linux ``PR_SET_PDEATHSIG``), so a SIGKILLed parent leaves no orphan behind (a relay holding
    its advisory lock, a service running on a bench's throwaway database)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
