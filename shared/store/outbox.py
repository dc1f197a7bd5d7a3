"""Exactly-once effects out: the transactional outbox and the relay that publishes it to Kafka.

Writers call ``Outbox.add``/``add_many`` inside the transaction that changes their state, so a
record exists if and only if the change committed. ``OutboxRelay`` publishes unsent rows with an
idempotent producer (``acks="all"``) and then marks them sent. Delivery is at-least-once: a crash
between publishing and marking publishes the batch again, byte for byte (the relay never edits a
value or a header), and consumers dedupe on the event id inside the envelope (``Inbox``).

Ordering. Rows are selected by the unsent flag, never by an id cursor: ids are handed out in
insert order but become visible in commit order, so a cursor would skip a row whose transaction
commits after a higher id's. One relay per schema publishes at a time (a Postgres advisory lock;
others wait as hot standbys) and each batch is fully acknowledged before the next is read, so
records of one key go out in id order. Writers of one key are serialised upstream (the event
store's stream version), which makes id order their commit order.

Failures. Any Kafka or Postgres error ends the relay's session (connection, lock and producer);
it starts over after ``retry_delay_s`` and re-sends from the first unsent row, so nothing is
skipped. A row Kafka refuses for good (topic missing, record too large) therefore blocks its
schema's relay and shows in ``stats.errors``/``last_error``: it is never dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer

from shared.store.errors import require_transaction, translated
from shared.store.pool import DEFAULT_COMMAND_TIMEOUT_S, qualified

log = logging.getLogger(__name__)

# pg_try_advisory_lock(int4, int4): this class id plus hashtext(schema). The two-key lock space
# does not overlap the one-key space used by the migration runner.
RELAY_LOCK_CLASS = 0x48424F58  # "HBOX"
PRODUCER_STOP_TIMEOUT_S = 30
DEFAULT_RETENTION = timedelta(hours=1)  # sent rows kept for inspection, then deleted
PURGE_CHUNK = 10_000


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """One record to publish: the Kafka topic, key (the stream id), value and headers."""

    topic: str
    key: bytes | None
    value: bytes
    headers: dict[str, str] = field(default_factory=dict)


class Outbox:
    """The ``outbox`` table of one service schema (the writer's side)."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        table = qualified(schema, "outbox")
        # ORDER BY ordinality: ids are drawn as rows leave the sort, so they follow input order.
        self._insert_sql = f"""
            INSERT INTO {table} (topic, key, value, headers)
            SELECT m.topic, m.key, m.value, m.headers::jsonb
            FROM unnest($1::text[], $2::bytea[], $3::bytea[], $4::text[])
                 WITH ORDINALITY AS m(topic, key, value, headers, ord)
            ORDER BY m.ord
            RETURNING id"""
        self._unsent_sql = f"SELECT count(*) FROM {table} WHERE sent_at IS NULL"
        # Oldest first (the primary key's order), a bounded chunk per statement: the table is
        # a transport buffer, and a purge must not hold up the relay or the writers for long.
        self._purge_sql = f"""
            DELETE FROM {table} WHERE id IN (
                SELECT id FROM {table}
                WHERE sent_at IS NOT NULL AND sent_at < clock_timestamp() - $1::interval
                ORDER BY id LIMIT $2)"""

    async def add(
        self,
        conn: asyncpg.Connection,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: dict[str, str] | None = None,
    ) -> int:
        """Queue one record in the caller's transaction; return its outbox id."""
        (row_id,) = await self.add_many(conn, [OutboxMessage(topic, key, value, headers or {})])
        return row_id

    async def add_many(
        self, conn: asyncpg.Connection, messages: Sequence[OutboxMessage]
    ) -> list[int]:
        """Queue ``messages`` in one round trip in the caller's transaction; return their ids in
        the given order (which is also the order they are published in, per key).

        Raises:
            RuntimeError: ``conn`` is not in a transaction.
        """
        require_transaction(conn, "Outbox.add_many")
        if not messages:
            return []
        columns = (
            [m.topic for m in messages],
            [m.key for m in messages],
            [m.value for m in messages],
            [json.dumps(m.headers) for m in messages],
        )
        with translated():
            rows = await conn.fetch(self._insert_sql, *columns)
        return sorted(row["id"] for row in rows)

    async def unsent_count(self, conn: asyncpg.Connection) -> int:
        """Rows waiting for the relay (a lag gauge for health checks and metrics)."""
        with translated():
            return int(await conn.fetchval(self._unsent_sql))

    async def purge_sent(self, conn: asyncpg.Connection, older_than: timedelta,
                         limit: int = 10_000) -> int:
        """Delete up to ``limit`` rows sent more than ``older_than`` ago, oldest first; return
        how many. Unsent rows are never touched. (The relay calls this on its own.)"""
        with translated():
            status = await conn.execute(self._purge_sql, older_than, limit)
        return int(status.split()[-1])


@dataclass(slots=True)
class RelayStats:
    """Counters for metrics: records and batches published, sent rows purged, failures,
    leadership."""

    published: int = 0
    batches: int = 0
    purged: int = 0
    errors: int = 0
    is_leader: bool = False
    last_error: str | None = None


class OutboxRelay:
    """Publishes one schema's outbox to Kafka until ``stop()``.

    Args:
        database: a ``postgresql://`` URL (the relay opens its own connection) or a pool (the
            relay holds one connection from it for as long as it runs).
        schema: the service schema whose ``outbox`` table is relayed.
        bootstrap: Kafka bootstrap servers.
        batch_size: rows read, published and marked per round.
        poll_interval_s: the longest wait between rounds when no NOTIFY arrives; also how
            often a standby relay retries the lock.
        retry_delay_s: pause after a Kafka or Postgres failure before starting over.
        producer_options: extra ``AIOKafkaProducer`` settings (the safety ones cannot be
            overridden).
        retention: how long sent rows stay (for inspection) before the publishing relay
            deletes them; zero deletes each row once Kafka acknowledged it; ``None`` keeps them
            forever. The history lives in the journal and the event store; an outbox that is
            never purged grows by every message published and makes each autovacuum longer.
        purge_every_s: how often the publishing relay deletes expired rows (a chunk per round
            until none are left).
    """

    def __init__(
        self,
        database: str | asyncpg.Pool,
        schema: str,
        bootstrap: str,
        *,
        batch_size: int = 500,
        poll_interval_s: float = 1.0,
        retry_delay_s: float = 1.0,
        producer_options: dict[str, Any] | None = None,
        retention: timedelta | None = DEFAULT_RETENTION,
        purge_every_s: float = 60.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        table = qualified(schema, "outbox")
        self.schema = schema
        self.stats = RelayStats()
        self._database = database
        self._bootstrap = bootstrap
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_s
        self._retry_delay_s = retry_delay_s
        self._producer_options = producer_options or {}
        self._retention = retention
        self._purge_every_s = purge_every_s
        self._outbox = Outbox(schema)
        self._channel = f"{schema}_outbox"
        self._select_sql = f"""
            SELECT id, topic, key, value, headers::text AS headers FROM {table}
            WHERE sent_at IS NULL ORDER BY id LIMIT $1"""
        # Retention zero: a row goes as soon as Kafka has acknowledged it. A DELETE costs
        # PostgreSQL less than the UPDATE (no new row version, no index entry), and there is
        # nothing to purge later.
        self._mark_sql = (
            f"DELETE FROM {table} WHERE id = ANY($1)" if retention == timedelta(0) else
            f"UPDATE {table} SET sent_at = clock_timestamp() WHERE id = ANY($1)")
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Ask ``run()`` to return after the batch in flight is published and marked."""
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        """Publish until ``stop()``: wait for the lock, then relay; start over after failures."""
        while not self._stopping.is_set():
            try:
                await self._session()
            except Exception as exc:  # Kafka or Postgres trouble: nothing was marked wrongly
                self.stats.errors += 1
                self.stats.last_error = repr(exc)
                log.warning("outbox relay %s failed; retrying: %r", self.schema, exc)
                await self._sleep(self._retry_delay_s)
            finally:
                self.stats.is_leader = False

    async def _session(self) -> None:
        async with self._connection() as conn, self._producer() as producer:
            if not await self._acquire_lock(conn):
                return
            log.info("outbox relay %s: publishing (lock held)", self.schema)
            self.stats.is_leader = True
            await conn.add_listener(self._channel, self._on_notify)
            try:
                await self._pump(conn, producer)
            finally:
                await self._release(conn)

    async def _pump(self, conn: asyncpg.Connection, producer: AIOKafkaProducer) -> None:
        loop = asyncio.get_running_loop()
        next_purge = loop.time()
        while not self._stopping.is_set():
            self._wake.clear()  # before reading: a NOTIFY during the round wakes the next wait
            relayed = await self._relay_batch(conn, producer)
            if self._retention and loop.time() >= next_purge:
                # One chunk per round, between publishing rounds; a full chunk means more.
                purged = await self._outbox.purge_sent(conn, self._retention, PURGE_CHUNK)
                self.stats.purged += purged
                if purged < PURGE_CHUNK:
                    next_purge = loop.time() + self._purge_every_s
            if relayed < self._batch_size:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll_interval_s)

    async def _relay_batch(self, conn: asyncpg.Connection, producer: AIOKafkaProducer) -> int:
        rows = await conn.fetch(self._select_sql, self._batch_size)
        if not rows:
            return 0
        await self._publish(producer, rows)
        await self._mark_sent(conn, [row["id"] for row in rows])
        self.stats.published += len(rows)
        self.stats.batches += 1
        return len(rows)

    async def _publish(self, producer: AIOKafkaProducer, rows: Sequence[asyncpg.Record]) -> None:
        """Send every row, then wait for every acknowledgement; raise the first failure."""
        deliveries: list[asyncio.Future[Any]] = []
        try:
            for row in rows:
                deliveries.append(await producer.send(
                    row["topic"], row["value"], key=row["key"], headers=_headers(row["headers"])
                ))
        finally:  # even when a send raised, settle the ones already queued
            outcomes = await asyncio.gather(*deliveries, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _mark_sent(self, conn: asyncpg.Connection, ids: list[int]) -> None:
        await conn.execute(self._mark_sql, ids)

    async def _acquire_lock(self, conn: asyncpg.Connection) -> bool:
        """Become the schema's publishing relay; wait as a standby while another one is."""
        while not self._stopping.is_set():
            locked = await conn.fetchval(
                "SELECT pg_try_advisory_lock($1, hashtext($2))", RELAY_LOCK_CLASS, self.schema
            )
            if locked:
                return True
            await self._sleep(self._poll_interval_s)
        return False

    async def _release(self, conn: asyncpg.Connection) -> None:
        if conn.is_closed():
            return  # the server already dropped the session, and the lock with it
        with contextlib.suppress(Exception):
            await conn.remove_listener(self._channel, self._on_notify)
            await conn.execute(
                "SELECT pg_advisory_unlock($1, hashtext($2))", RELAY_LOCK_CLASS, self.schema
            )

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        if isinstance(self._database, str):
            conn = await asyncpg.connect(
                self._database,
                command_timeout=DEFAULT_COMMAND_TIMEOUT_S,
                server_settings={
                    "application_name": f"harbour-outbox-relay:{self.schema}",
                    # This session only marks rows sent and purges old ones. A mark lost in a
                    # crash publishes its rows again, which at-least-once delivery already
                    # allows (consumers dedupe); waiting for its WAL flush only delayed the
                    # next round's records by a disk sync each.
                    "synchronous_commit": "off",
                },
            )
            try:
                yield conn
            finally:
                await conn.close(timeout=5)
        else:
            async with self._database.acquire() as conn:
                yield conn

    @contextlib.asynccontextmanager
    async def _producer(self) -> AsyncIterator[AIOKafkaProducer]:
        options: dict[str, Any] = {
            "client_id": f"harbour-outbox-{self.schema}",
            "linger_ms": 5,
            "max_batch_size": 256 * 1024,
            **self._producer_options,
            # Safety settings last: no option can weaken them.
            "bootstrap_servers": self._bootstrap,
            "acks": "all",
            "enable_idempotence": True,
        }
        producer = AIOKafkaProducer(**options)
        try:
            await producer.start()
            yield producer
        finally:
            try:  # stop() flushes; bound it so a dead broker cannot hang shutdown or failover
                await asyncio.wait_for(producer.stop(), PRODUCER_STOP_TIMEOUT_S)
            except TimeoutError:
                log.warning("outbox relay %s: producer did not stop in %s s",
                            self.schema, PRODUCER_STOP_TIMEOUT_S)


def _headers(raw: str) -> list[tuple[str, bytes]]:
    return [(name, value.encode()) for name, value in json.loads(raw).items()]
