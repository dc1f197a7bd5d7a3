"""Inbox on real PostgreSQL: a record delivered twice, or again after a restart, applies once."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from shared.store.inbox import Inbox
from shared.store.pool import create_pool

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

SCHEMA = "inbox_test"
CONSUMER = "harbour.test-consumer"


class Boom(Exception):
    pass


@pytest.fixture
async def inbox(pool: asyncpg.Pool) -> Inbox:
    await pool.execute("SELECT harbour.create_service_store($1)", SCHEMA)
    await pool.execute(
        "CREATE TABLE inbox_test.effects (name text PRIMARY KEY, applied int NOT NULL)"
    )
    await pool.execute("INSERT INTO inbox_test.effects VALUES ('credits', 0)")
    return Inbox(SCHEMA)


async def handle(conn: asyncpg.Connection, inbox: Inbox, message_id: str,
                 *, consumer: str = CONSUMER, fail: bool = False) -> bool:
    """What a service does per record: claim + effect in one transaction."""
    async with conn.transaction():
        if not await inbox.claim(conn, consumer, message_id):
            return False
        await conn.execute("UPDATE inbox_test.effects SET applied = applied + 1")
        if fail:
            raise Boom("the handler failed after its effect")
    return True


async def applied(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT applied FROM inbox_test.effects"))


async def test_duplicate_and_after_restart_apply_once(
    db_url: str, pool: asyncpg.Pool, inbox: Inbox
) -> None:
    async with pool.acquire() as conn:
        assert await handle(conn, inbox, "evt-1") is True
        assert await handle(conn, inbox, "evt-1") is False  # redelivered on the same connection

    # A consumer restart: a new process would open a new pool and see the committed claim.
    restarted = await create_pool(db_url, min_size=1, max_size=2)
    try:
        async with restarted.acquire() as conn:
            assert await handle(conn, Inbox(SCHEMA), "evt-1") is False
            assert await handle(conn, Inbox(SCHEMA), "evt-2") is True
            assert await Inbox(SCHEMA).seen(conn, CONSUMER, "evt-1")
    finally:
        await restarted.close()
    assert await applied(pool) == 2


async def test_claims_are_per_consumer(pool: asyncpg.Pool, inbox: Inbox) -> None:
    async with pool.acquire() as conn:
        assert await handle(conn, inbox, "evt-1", consumer="group-a") is True
        assert await handle(conn, inbox, "evt-1", consumer="group-b") is True
        assert await handle(conn, inbox, "evt-1", consumer="group-a") is False
    assert await applied(pool) == 2


async def test_failed_handler_releases_its_claim(pool: asyncpg.Pool, inbox: Inbox) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(Boom):
            await handle(conn, inbox, "evt-1", fail=True)
        assert await applied(pool) == 0
        assert not await inbox.seen(conn, CONSUMER, "evt-1")
        assert await handle(conn, inbox, "evt-1") is True  # the redelivery applies it
        assert await handle(conn, inbox, "evt-1") is False
    assert await applied(pool) == 1


async def test_racing_duplicates_apply_once(pool: asyncpg.Pool, inbox: Inbox) -> None:
    """Two consumers (e.g. across a rebalance) get the same record at once: one effect."""

    async def deliver(start: asyncio.Barrier) -> bool:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT 1")
            await start.wait()
            if not await inbox.claim(conn, CONSUMER, "evt-race"):
                return False
            await conn.execute("UPDATE inbox_test.effects SET applied = applied + 1")
            await asyncio.sleep(0.2)  # hold the claim uncommitted while the other one waits
            return True

    winners_per_round = []
    for _ in range(5):
        start = asyncio.Barrier(4)
        results = await asyncio.wait_for(asyncio.gather(*(deliver(start) for _ in range(4))), 30)
        winners_per_round.append(sum(results))
    assert winners_per_round == [1, 0, 0, 0, 0]
    assert await applied(pool) == 1


async def test_claim_outside_a_transaction_is_refused(pool: asyncpg.Pool, inbox: Inbox) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(RuntimeError, match="transaction"):
            await inbox.claim(conn, CONSUMER, "evt-1")
