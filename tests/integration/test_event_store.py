"""Event store on real PostgreSQL: optimistic concurrency, ordered loads, append-only table."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from shared.errors import ConcurrencyError, DuplicateError, InfrastructureError
from shared.store.errors import retrying, translated
from shared.store.event_store import EventStore, NewEvent

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

SCHEMA = "es_test"


def event(n: int, **payload: object) -> NewEvent:
    return NewEvent(uuid.uuid4(), f"test.Happened{n}", 1, {"n": n, **payload}, {"corr": "c-1"})


@pytest.fixture
async def store(pool: asyncpg.Pool) -> EventStore:
    await pool.execute("SELECT harbour.create_service_store($1)", SCHEMA)
    return EventStore(SCHEMA)


async def _append(pool: asyncpg.Pool, store: EventStore, stream: str, expected: int,
                  events: list[NewEvent]) -> int:
    async with pool.acquire() as conn, conn.transaction():
        return await store.append(conn, stream, expected, events)


async def test_concurrent_appends_at_same_version_exactly_one_wins(
    pool: asyncpg.Pool, store: EventStore
) -> None:
    """Both transactions are open before either commits; many streams so the race really runs."""
    streams = [f"race-{i}" for i in range(25)]

    async def contender(stream: str, both_open: asyncio.Barrier, tag: str) -> str:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT 1")  # the transaction has really begun on the server
            await both_open.wait()
            await store.append(conn, stream, 0, [event(1, writer=tag)])
        return tag

    for stream in streams:
        barrier = asyncio.Barrier(2)
        outcomes = await asyncio.gather(
            contender(stream, barrier, "a"), contender(stream, barrier, "b"),
            return_exceptions=True,
        )
        winners = [o for o in outcomes if isinstance(o, str)]
        losers = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(winners) == 1 and len(losers) == 1, outcomes
        assert isinstance(losers[0], ConcurrencyError), repr(losers[0])
        async with pool.acquire() as conn:
            stored = await store.load(conn, stream)
        assert [(e.stream_version, e.payload["writer"]) for e in stored] == [(1, winners[0])]


async def test_conflict_found_by_primary_key_while_loser_waits(
    pool: asyncpg.Pool, store: EventStore
) -> None:
    """The loser has passed the version check and blocks on the index until the winner commits."""
    async with pool.acquire() as winner, pool.acquire() as loser:
        loser_pid = loser.get_server_pid()
        win_tx = winner.transaction()
        await win_tx.start()
        await store.append(winner, "pk-race", 0, [event(1)])

        async def lose() -> None:
            async with loser.transaction():
                await store.append(loser, "pk-race", 0, [event(1)])

        losing = asyncio.create_task(lose())
        await _wait_until_blocked(pool, loser_pid)
        await win_tx.commit()
        with pytest.raises(ConcurrencyError) as caught:
            await asyncio.wait_for(losing, 10)
    assert caught.value.details["stream_id"] == "pk-race"
    assert caught.value.details["expected_version"] == 0
    assert isinstance(caught.value.__cause__, ConcurrencyError)


async def _wait_until_blocked(pool: asyncpg.Pool, pid: int) -> None:
    for _ in range(200):
        waiting = await pool.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
        )
        if waiting:
            return
        await asyncio.sleep(0.025)
    raise AssertionError("the second writer never blocked on the first one's insert")


async def test_stale_expected_version_is_refused_before_writing(
    pool: asyncpg.Pool, store: EventStore
) -> None:
    assert await _append(pool, store, "s-1", 0, [event(1), event(2)]) == 2
    with pytest.raises(ConcurrencyError) as caught:
        await _append(pool, store, "s-1", 1, [event(3)])
    assert caught.value.details == {
        "stream_id": "s-1", "expected_version": 1, "actual_version": 2,
    }
    with pytest.raises(ConcurrencyError):
        await _append(pool, store, "s-1", 3, [event(3)])  # ahead of the stream is refused too


async def test_load_returns_events_in_version_order(pool: asyncpg.Pool, store: EventStore) -> None:
    written = [event(n) for n in range(1, 8)]
    version = 0
    for chunk in (written[:1], written[1:4], [], written[4:]):
        version = await _append(pool, store, "acct-42", version, chunk)
    await _append(pool, store, "other", 0, [event(99)])
    assert version == 7

    async with pool.acquire() as conn:
        stored = await store.load(conn, "acct-42")
        tail = await store.load(conn, "acct-42", after_version=5)
        assert await store.load(conn, "never-written") == []
        assert await store.current_version(conn, "acct-42") == 7

    assert [e.stream_version for e in stored] == list(range(1, 8))
    assert [e.event_id for e in stored] == [e.event_id for e in written]
    assert [(e.type, e.schema_version, e.payload, e.metadata) for e in stored] == [
        (e.type, e.schema_version, e.payload, e.metadata) for e in written
    ]
    assert [e.global_position for e in stored] == sorted(e.global_position for e in stored)
    assert [e.stream_version for e in tail] == [6, 7]


async def test_same_event_id_twice_is_a_duplicate(pool: asyncpg.Pool, store: EventStore) -> None:
    first = event(1)
    await _append(pool, store, "dup-a", 0, [first])
    with pytest.raises(DuplicateError):
        await _append(pool, store, "dup-b", 0, [first])


async def test_append_outside_a_transaction_is_refused(
    pool: asyncpg.Pool, store: EventStore
) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(RuntimeError, match="transaction"):
            await store.append(conn, "s", 0, [event(1)])


@pytest.mark.parametrize("statement", [
    "UPDATE es_test.events SET type = 'rewritten'",
    "DELETE FROM es_test.events",
    "DELETE FROM es_test.events WHERE false",
    "TRUNCATE es_test.events",
])
async def test_events_are_append_only(
    pool: asyncpg.Pool, store: EventStore, statement: str
) -> None:
    await _append(pool, store, "kept", 0, [event(1)])
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await pool.execute(statement)
    assert await pool.fetchval("SELECT count(*) FROM es_test.events") == 1


async def test_create_service_store_is_idempotent(pool: asyncpg.Pool, store: EventStore) -> None:
    await _append(pool, store, "kept", 0, [event(1)])
    await pool.execute("SELECT harbour.create_service_store($1)", SCHEMA)
    assert await pool.fetchval("SELECT count(*) FROM es_test.events") == 1
    tables = await pool.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", SCHEMA
    )
    assert {r["table_name"] for r in tables} == {"events", "inbox", "outbox"}
    with pytest.raises(asyncpg.InvalidSchemaNameError):
        await pool.execute("SELECT harbour.create_service_store('Robert\"; DROP')")


async def test_retrying_reruns_the_unit_of_work_after_a_dropped_connection(
    pool: asyncpg.Pool, store: EventStore
) -> None:
    attempts = 0

    async def unit_of_work() -> int:
        nonlocal attempts
        attempts += 1
        async with pool.acquire() as conn, conn.transaction():
            version = await store.current_version(conn, "retried")
            new_version = await store.append(conn, "retried", version, [event(attempts)])
            if attempts == 1:  # the server goes away before COMMIT (failover, admin kill)
                await pool.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
                await conn.execute("SELECT 1")
        return new_version

    assert await retrying(unit_of_work, first_delay_ms=1) == 1
    assert attempts == 2
    async with pool.acquire() as conn:
        assert [e.payload["n"] for e in await store.load(conn, "retried")] == [2]


async def test_retrying_leaves_conflicts_and_bugs_to_the_caller(pool: asyncpg.Pool) -> None:
    calls = 0

    async def conflicting() -> None:
        nonlocal calls
        calls += 1
        raise ConcurrencyError("lost the race")

    async def broken_sql() -> None:
        await pool.execute("SELECT no_such_column FROM pg_class")

    with pytest.raises(ConcurrencyError):
        await retrying(conflicting)
    assert calls == 1
    with pytest.raises(InfrastructureError) as caught:
        await retrying(broken_sql)
    assert caught.value.retryable is False
    assert caught.value.details["sqlstate"] == "42703"

    async def buggy() -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("a bug, not a database error")

    with pytest.raises(RuntimeError):  # not dressed up as an infrastructure error
        await retrying(buggy)
    assert calls == 2


async def test_retrying_reruns_errors_already_translated_as_transient() -> None:
    calls = 0

    async def deadlocked_once() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            with translated():
                raise asyncpg.DeadlockDetectedError("deadlock detected")
        return calls

    assert await retrying(deadlocked_once, first_delay_ms=1) == 2
