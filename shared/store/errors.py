"""asyncpg exceptions mapped onto Harbour's error hierarchy, and a retry helper for transient ones.

Modelled on eventsourcing's driver-error mapping: callers above the store never catch asyncpg
types. A stream-version conflict is a ``ConcurrencyError`` (reload and decide again); a lost
connection, a failover, a serialization failure or a deadlock is a retryable
``InfrastructureError``; everything else is a non-retryable ``InfrastructureError`` (a bug or a
schema problem that trying again cannot fix).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import asyncpg

from shared.errors import ConcurrencyError, DuplicateError, HarbourError, InfrastructureError

log = logging.getLogger(__name__)
T = TypeVar("T")

EVENTS_PK = "events_pkey"
EVENTS_EVENT_ID = "events_event_id_key"

# Errors where the same unit of work can succeed if run again from the start.
_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,  # includes ConnectionError: refused, reset, broken pipe
    TimeoutError,  # command_timeout, connect timeout
    asyncpg.InterfaceError,  # client-side: connection closed, pool closing
    asyncpg.PostgresConnectionError,  # class 08, incl. ConnectionDoesNotExistError (lost mid-query)
    asyncpg.CannotConnectNowError,  # 57P03: server starting or in recovery
    asyncpg.AdminShutdownError,  # 57P01: failover / restart
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,  # 53300
    asyncpg.SerializationError,  # 40001
    asyncpg.DeadlockDetectedError,  # 40P01
    asyncpg.LockNotAvailableError,  # 55P03: lock_timeout
    asyncpg.QueryCanceledError,  # 57014: statement_timeout
)


# Raised by the unit of work's own code, not by the driver: passed through untranslated.
# (HarbourError is not here: an InfrastructureError translated inside the unit of work may be
# retryable, and map_error passes Harbour's errors through unchanged anyway.)
_NOT_THE_DATABASE: tuple[type[Exception], ...] = (
    ArithmeticError, AssertionError, AttributeError, LookupError, NameError, RuntimeError,
    TypeError, ValueError)


def map_error(exc: BaseException) -> HarbourError:
    """The Harbour error for an exception raised by asyncpg (or the socket under it)."""
    if isinstance(exc, HarbourError):
        return exc
    if isinstance(exc, asyncpg.UniqueViolationError):
        constraint = getattr(exc, "constraint_name", None)
        if constraint == EVENTS_PK:
            return ConcurrencyError(
                "another writer appended to this stream first", detail=str(exc.detail or "")
            )
        if constraint == EVENTS_EVENT_ID:
            return DuplicateError("an event with this event id is already stored",
                                  detail=str(exc.detail or ""))
    retryable = isinstance(exc, _TRANSIENT)
    details = {"sqlstate": getattr(exc, "sqlstate", None), "error": type(exc).__name__}
    return InfrastructureError(f"database error: {exc}", retryable=retryable, **details)


@contextmanager
def translated() -> Iterator[None]:
    """Re-raise database exceptions from the block as Harbour errors (the cause is chained).

    Usable around awaits: ``with translated(): await conn.execute(...)``.
    """
    try:
        yield
    except HarbourError:
        raise
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        raise map_error(exc) from exc


def is_retryable(exc: BaseException) -> bool:
    """True when running the same unit of work again can succeed."""
    mapped = map_error(exc)
    return isinstance(mapped, InfrastructureError) and mapped.retryable


async def retrying(
    unit_of_work: Callable[[], Awaitable[T]],
    *,
    attempts: int = 5,
    first_delay_ms: int = 50,
    max_delay_ms: int = 2_000,
) -> T:
    """Run ``unit_of_work`` and run it again on transient database errors, with backoff.

    ``unit_of_work`` must be a whole transaction (acquire, begin, work, commit), and idempotent:
    when a connection drops during COMMIT the outcome is unknown, and the retry may find its
    own earlier commit. Harbour's units are (inbox claim, expected stream version, outbox rows
    written in the same transaction), so a retry either redoes the work or is a no-op.

    Raises:
        HarbourError: the mapped error once attempts are exhausted or the error is not transient
            (``ConcurrencyError`` is never retried here: the caller must reload and decide again).
    """
    delay_ms = first_delay_ms
    for attempt in range(1, attempts + 1):
        try:
            return await unit_of_work()
        except _NOT_THE_DATABASE:
            raise  # a bug in the unit of work is not a database error: the caller sees it as is
        except Exception as exc:
            mapped = map_error(exc)
            transient = isinstance(mapped, InfrastructureError) and mapped.retryable
            if not transient or attempt == attempts:
                if mapped is exc:
                    raise
                raise mapped from exc
            log.warning("transient database error (attempt %d/%d): %s", attempt, attempts, exc)
            await asyncio.sleep(random.uniform(0.5, 1.0) * delay_ms / 1000)  # jitter
            delay_ms = min(delay_ms * 2, max_delay_ms)
    raise AssertionError("unreachable")  # pragma: no cover


def require_transaction(conn: asyncpg.Connection, operation: str) -> None:
    """Refuse to run ``operation`` outside a transaction: its atomicity with the caller's
    state change is the whole point (inbox, outbox, event append).

    Raises:
        RuntimeError: ``conn`` is not inside a transaction (a programming error).
    """
    if not conn.is_in_transaction():
        raise RuntimeError(f"{operation} must run inside the caller's transaction")
