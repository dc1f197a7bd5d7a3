"""Outbox relay on real Apache Kafka and real PostgreSQL.

- 10,000 events written by concurrent transactions (including commits out of id order) arrive
  exactly once each, byte for byte, in per-key order, none missing.
- kill -9 of a relay process between "Kafka acknowledged" and "marked sent", then a restart:
  every event arrives at least once with its event id unchanged; after dedup by event id the
  set is what was written and per-key order of first appearance is kept.
- one publisher per schema (hot standby takes over), NOTIFY wake-up, polling fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer

from shared.store.outbox import Outbox, OutboxMessage, OutboxRelay
from shared.store.pool import create_pool

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.postgres]

REPO = Path(__file__).resolve().parents[2]
NewTopic = Callable[..., Awaitable[str]]


# --- what the writers wrote and what the consumer saw ------------------------------------------


@dataclass(frozen=True)
class Written:
    key: str
    seq: int
    message: OutboxMessage

    @property
    def event_id(self) -> str:
        return self.message.headers["event-id"]


@dataclass(frozen=True)
class Received:
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    partition: int

    @property
    def event_id(self) -> str:
        return str(json.loads(self.value)["event_id"])


class Ledger:
    """Everything written, in per-key write order."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.by_key: dict[str, list[Written]] = defaultdict(list)

    def new(self, key: str) -> Written:
        event_id = str(uuid.uuid4())
        seq = len(self.by_key[key])
        value = json.dumps({"event_id": event_id, "key": key, "seq": seq}).encode()
        headers = {"event-id": event_id, "type": "test.Written", "content-type": "application/json"}
        written = Written(key, seq, OutboxMessage(self.topic, key.encode(), value, headers))
        self.by_key[key].append(written)
        return written

    def all(self) -> dict[str, Written]:
        return {w.event_id: w for rows in self.by_key.values() for w in rows}


def assert_delivered(ledger: Ledger, received: list[Received], *, exactly_once: bool) -> None:
    """Every written event arrived unchanged; per-key order of first appearance is write order."""
    written = ledger.all()
    first_seen: dict[str, Received] = {}
    for record in received:
        first_seen.setdefault(record.event_id, record)
        original = written[record.event_id].message
        assert record.value == original.value
        assert record.key == original.key
        assert dict((k, v.decode()) for k, v in record.headers) == original.headers
    assert set(first_seen) == set(written), "missing or unknown events"
    if exactly_once:
        assert len(received) == len(written), f"{len(received) - len(written)} duplicates"

    order: dict[str, list[int]] = defaultdict(list)
    partitions: dict[str, set[int]] = defaultdict(set)
    for event_id, record in first_seen.items():  # dicts keep first-insertion order
        order[written[event_id].key].append(written[event_id].seq)
        partitions[written[event_id].key].add(record.partition)
    for key, seqs in order.items():
        assert seqs == list(range(len(ledger.by_key[key]))), f"key {key} out of order: {seqs}"
        assert len(partitions[key]) == 1, f"key {key} spread over partitions {partitions[key]}"


async def consume(
    bootstrap: str, topic: str, *, until: Callable[[list[Received]], bool],
    timeout_s: float, settle_s: float = 2.0,
) -> list[Received]:
    """Read ``topic`` from the start until ``until(records)``; then ``settle_s`` more for extras."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=f"test-{uuid.uuid4().hex}",
        auto_offset_reset="earliest", enable_auto_commit=False,
    )
    await consumer.start()
    records: list[Received] = []
    try:
        deadline = time.monotonic() + timeout_s
        while not until(records):
            assert time.monotonic() < deadline, f"only {len(records)} records in {timeout_s} s"
            await _read(consumer, records)
        settle_until = time.monotonic() + settle_s
        while time.monotonic() < settle_until:
            await _read(consumer, records, timeout_ms=250)
    finally:
        await consumer.stop()
    return records


async def _read(consumer: AIOKafkaConsumer, into: list[Received], timeout_ms: int = 1000) -> None:
    batches = await consumer.getmany(timeout_ms=timeout_ms, max_records=5000)
    for tp, batch in batches.items():
        into.extend(
            Received(r.key, r.value, tuple(r.headers), tp.partition) for r in batch
        )


# --- database helpers --------------------------------------------------------------------------


async def make_store(pool: asyncpg.Pool, schema: str) -> Outbox:
    await pool.execute("SELECT harbour.create_service_store($1)", schema)
    return Outbox(schema)


async def wait_all_sent(pool: asyncpg.Pool, outbox: Outbox, *, expected: int,
                        timeout_s: float, check_every_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    table = f"{outbox.schema}.outbox"
    while True:
        async with pool.acquire() as conn:
            unsent = await outbox.unsent_count(conn)
            total = await conn.fetchval(f"SELECT count(*) FROM {table}")
        if unsent == 0 and total == expected:
            return
        assert time.monotonic() < deadline, f"{unsent} of {total} rows unsent after {timeout_s} s"
        await asyncio.sleep(check_every_s)


async def write_keys(pool: asyncpg.Pool, outbox: Outbox, ledger: Ledger, keys: list[str],
                     count: int, seed: int) -> None:
    """One writer: owns ``keys``; ``count`` events in small transactions of 1..10 rows."""
    rng = random.Random(seed)
    left = count
    while left:
        size = min(left, rng.randint(1, 10))
        async with pool.acquire() as conn, conn.transaction():
            rows = [ledger.new(rng.choice(keys)).message for _ in range(size)]
            if size == 1:
                await outbox.add(conn, rows[0].topic, rows[0].key, rows[0].value, rows[0].headers)
            else:
                await outbox.add_many(conn, rows)
        left -= size


async def commit_out_of_id_order(pool: asyncpg.Pool, outbox: Outbox, ledger: Ledger,
                                 pair: int) -> tuple[int, int]:
    """Tx A takes an id and stays open; tx B takes a higher id and commits; the relay publishes
    B (so it has moved past A's id); only then does A commit. An id cursor would skip A."""
    a, b = ledger.new(f"ooo-{pair}-a").message, ledger.new(f"ooo-{pair}-b").message
    async with pool.acquire() as conn_a:
        tx_a = conn_a.transaction()
        await tx_a.start()
        try:
            id_a = await outbox.add(conn_a, a.topic, a.key, a.value, a.headers)
            async with pool.acquire() as conn_b, conn_b.transaction():
                id_b = await outbox.add(conn_b, b.topic, b.key, b.value, b.headers)
            await _wait_sent(pool, outbox.schema, id_b)
        except BaseException:
            await tx_a.rollback()
            raise
        await tx_a.commit()
    return id_a, id_b


async def _wait_sent(pool: asyncpg.Pool, schema: str, row_id: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    sql = f"SELECT sent_at IS NOT NULL FROM {schema}.outbox WHERE id = $1"
    while not await pool.fetchval(sql, row_id):
        assert time.monotonic() < deadline, f"row {row_id} not sent within {timeout_s} s"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(relay: OutboxRelay) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(relay.run())
    try:
        yield task
    finally:
        relay.stop()
        await asyncio.wait_for(task, 30)


async def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# --- tests -------------------------------------------------------------------------------------


WRITERS = 20
KEYS_PER_WRITER = 5
EVENTS_PER_WRITER = 499
OUT_OF_ORDER_PAIRS = 10  # 20 * 499 + 10 * 2 = 10,000


async def test_10k_concurrent_events_arrive_exactly_once_in_key_order(
    db_url: str, kafka_bootstrap: str, new_topic: NewTopic
) -> None:
    topic = await new_topic("outbox", partitions=4)
    ledger = Ledger(topic)
    pool = await create_pool(db_url, min_size=2, max_size=WRITERS + 4)
    try:
        outbox = await make_store(pool, "relay_10k")
        relay = OutboxRelay(db_url, "relay_10k", kafka_bootstrap, batch_size=500)
        started = time.perf_counter()
        async with running(relay):
            writers = [
                write_keys(pool, outbox, ledger,
                           [f"w{w:02d}-k{k}" for k in range(KEYS_PER_WRITER)],
                           EVENTS_PER_WRITER, seed=w)
                for w in range(WRITERS)
            ]

            async def out_of_order() -> list[tuple[int, int]]:
                return [await commit_out_of_id_order(pool, outbox, ledger, p)
                        for p in range(OUT_OF_ORDER_PAIRS)]

            pairs = asyncio.ensure_future(out_of_order())
            await asyncio.wait_for(asyncio.gather(*writers, pairs), 120)
            id_pairs = pairs.result()
            written_s = time.perf_counter() - started
            await wait_all_sent(pool, outbox, expected=10_000, timeout_s=60)
            relayed_s = time.perf_counter() - started
            assert relay.stats.published == 10_000
            assert relay.stats.errors == 0
            batches = relay.stats.batches
    finally:
        await pool.close()

    received = await consume(kafka_bootstrap, topic, timeout_s=60,
                             until=lambda got: len(got) >= 10_000)
    consumed_s = time.perf_counter() - started
    assert all(id_a < id_b for id_a, id_b in id_pairs)
    assert_delivered(ledger, received, exactly_once=True)
    print(f"\n10k relay: written in {written_s:.2f} s, all published+marked at {relayed_s:.2f} s "
          f"({batches} batches), consumed back by {consumed_s:.2f} s")


async def test_kill_9_mid_run_then_restart_loses_nothing(
    db_url: str, kafka_bootstrap: str, new_topic: NewTopic
) -> None:
    topic = await new_topic("outbox-kill", partitions=4)
    ledger = Ledger(topic)
    schema, batch = "relay_kill", 200
    pool = await create_pool(db_url, min_size=2, max_size=12)
    try:
        outbox = await make_store(pool, schema)
        keys = [[f"w{w}-k{k}" for k in range(4)] for w in range(8)]
        await asyncio.gather(*(write_keys(pool, outbox, ledger, keys[w], 500, seed=w)
                               for w in range(8)))

        first = await RelayProcess.start(db_url, schema, kafka_bootstrap, batch, stall_at=4)
        try:
            await first.wait_for_line("STALLED", timeout_s=60)
        finally:
            await first.kill()  # SIGKILL: Kafka has batch 4, Postgres does not know
        assert first.proc.returncode == -signal.SIGKILL
        marked = await pool.fetchval(
            f"SELECT count(*) FROM {schema}.outbox WHERE sent_at IS NOT NULL"
        )
        assert marked == 3 * batch

        # Writes go on while no relay runs; the restarted relay must pick them up too.
        await asyncio.gather(*(write_keys(pool, outbox, ledger, keys[w], 125, seed=100 + w)
                               for w in range(8)))
        second = await RelayProcess.start(db_url, schema, kafka_bootstrap, batch)
        try:
            await second.wait_for_line("LEADER", timeout_s=30)
            await wait_all_sent(pool, outbox, expected=5_000, timeout_s=60)
        finally:
            await second.terminate()
    finally:
        await pool.close()

    received = await consume(kafka_bootstrap, topic, timeout_s=60,
                             until=lambda got: len(got) >= 5_000 + batch)
    assert_delivered(ledger, received, exactly_once=False)
    assert len(received) == 5_000 + batch  # exactly the unmarked batch was published twice


async def test_second_relay_waits_as_hot_standby_and_takes_over(
    db_url: str, kafka_bootstrap: str, new_topic: NewTopic
) -> None:
    topic = await new_topic("outbox-standby", partitions=2)
    ledger = Ledger(topic)
    pool = await create_pool(db_url, min_size=1, max_size=6)
    try:
        outbox = await make_store(pool, "relay_ha")
        one = OutboxRelay(pool, "relay_ha", kafka_bootstrap, batch_size=100, poll_interval_s=0.2)
        two = OutboxRelay(db_url, "relay_ha", kafka_bootstrap, batch_size=100,
                          poll_interval_s=0.2)
        async with running(one), running(two):
            await wait_for(lambda: one.stats.is_leader or two.stats.is_leader, 30, "a leader")
            await asyncio.sleep(0.5)
            assert one.stats.is_leader != two.stats.is_leader, "exactly one relay publishes"
            leader, standby = (one, two) if one.stats.is_leader else (two, one)
            await write_keys(pool, outbox, ledger, ["a", "b", "c"], 300, seed=1)
            await wait_all_sent(pool, outbox, expected=300, timeout_s=30)
            assert (leader.stats.published, standby.stats.published) == (300, 0)

            leader.stop()
            await wait_for(lambda: standby.stats.is_leader, 30, "the standby to take over")
            await write_keys(pool, outbox, ledger, ["a", "b", "c"], 300, seed=2)
            await wait_all_sent(pool, outbox, expected=600, timeout_s=30)
            assert standby.stats.published == 300
    finally:
        await pool.close()
    received = await consume(kafka_bootstrap, topic, timeout_s=30,
                             until=lambda got: len(got) >= 600)
    assert_delivered(ledger, received, exactly_once=True)


async def test_notify_wakes_the_relay_without_polling(
    db_url: str, kafka_bootstrap: str, new_topic: NewTopic
) -> None:
    topic = await new_topic("outbox-notify")
    ledger = Ledger(topic)
    pool = await create_pool(db_url, min_size=1, max_size=2)
    try:
        outbox = await make_store(pool, "relay_notify")
        relay = OutboxRelay(db_url, "relay_notify", kafka_bootstrap, poll_interval_s=120)
        async with running(relay):
            await wait_for(lambda: relay.stats.is_leader, 30, "the relay to lead")
            await asyncio.sleep(0.3)  # the relay has done its first (empty) round and waits
            latencies = []
            for n in range(3):
                started = time.perf_counter()
                await write_keys(pool, outbox, ledger, ["k"], 1, seed=n)
                await wait_all_sent(pool, outbox, expected=n + 1, timeout_s=5,
                                    check_every_s=0.002)
                latencies.append(time.perf_counter() - started)
    finally:
        await pool.close()
    assert max(latencies) < 5  # far below the 120 s poll interval: NOTIFY woke it
    received = await consume(kafka_bootstrap, topic, timeout_s=30, until=lambda g: len(g) >= 3)
    assert_delivered(ledger, received, exactly_once=True)
    print(f"\nNOTIFY wake-up, insert->marked sent: {[f'{s * 1000:.0f} ms' for s in latencies]}")


async def test_polling_covers_a_missed_notify(
    db_url: str, kafka_bootstrap: str, new_topic: NewTopic
) -> None:
    topic = await new_topic("outbox-poll")
    ledger = Ledger(topic)
    pool = await create_pool(db_url, min_size=1, max_size=2)
    try:
        outbox = await make_store(pool, "relay_poll")
        await pool.execute("ALTER TABLE relay_poll.outbox DISABLE TRIGGER outbox_notify")
        relay = OutboxRelay(db_url, "relay_poll", kafka_bootstrap, poll_interval_s=0.5)
        async with running(relay):
            await wait_for(lambda: relay.stats.is_leader, 30, "the relay to lead")
            await asyncio.sleep(0.3)
            await write_keys(pool, outbox, ledger, ["k1", "k2"], 20, seed=3)
            await wait_all_sent(pool, outbox, expected=20, timeout_s=10)
    finally:
        await pool.close()
    received = await consume(kafka_bootstrap, topic, timeout_s=30, until=lambda g: len(g) >= 20)
    assert_delivered(ledger, received, exactly_once=True)


async def test_relay_recovers_when_postgres_drops_its_session(
    db_url: str, kafka_bootstrap: str, new_topic: NewTopic
) -> None:
    """A failover or an admin kill ends the relay's session (and its lock): it reconnects,
    takes the lock again and carries on; at worst the batch in flight is published twice."""
    topic = await new_topic("outbox-reconnect", partitions=2)
    ledger = Ledger(topic)
    pool = await create_pool(db_url, min_size=1, max_size=6)
    try:
        outbox = await make_store(pool, "relay_drop")
        relay = OutboxRelay(db_url, "relay_drop", kafka_bootstrap, batch_size=50,
                            poll_interval_s=0.2, retry_delay_s=0.2)
        async with running(relay):
            writing = asyncio.create_task(write_keys(pool, outbox, ledger, ["x", "y"], 2000, 7))
            await wait_for(lambda: relay.stats.published >= 200, 30, "the relay to publish")
            killed = await pool.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'harbour-outbox-relay:relay_drop'"
            )
            assert killed == 1
            await asyncio.wait_for(writing, 60)
            await wait_all_sent(pool, outbox, expected=2000, timeout_s=60)
            assert relay.stats.errors >= 1 and relay.stats.is_leader
    finally:
        await pool.close()
    received = await consume(kafka_bootstrap, topic, timeout_s=30,
                             until=lambda got: len({r.event_id for r in got}) >= 2000)
    assert_delivered(ledger, received, exactly_once=False)
    assert len(received) - 2000 <= 50  # no more than one batch again


@pytest.mark.parametrize(("retention", "purged"), [
    (timedelta(milliseconds=1), 600),  # sent, then deleted by the purge rounds
    (timedelta(0), 0),  # deleted as soon as Kafka has it: nothing left to purge
], ids=["purged-after-retention", "deleted-when-sent"])
async def test_the_publishing_relay_deletes_sent_rows(
    db_url: str, kafka_bootstrap: str, new_topic: NewTopic, retention: timedelta, purged: int
) -> None:
    """The outbox is a transport buffer: sent rows go after ``retention``, unsent ones never."""
    topic = await new_topic("outbox-purge", partitions=2)
    ledger = Ledger(topic)
    pool = await create_pool(db_url, min_size=1, max_size=4)
    try:
        outbox = await make_store(pool, "relay_purge")
        relay = OutboxRelay(db_url, "relay_purge", kafka_bootstrap, batch_size=100,
                            poll_interval_s=0.1, retention=retention, purge_every_s=0.1)
        async with running(relay):
            await write_keys(pool, outbox, ledger, ["p", "q"], 600, seed=11)
            await wait_for(lambda: relay.stats.published >= 600 and relay.stats.purged >= purged,
                           30, "the relay to publish and purge")
            assert relay.stats.purged == purged
            assert await pool.fetchval("SELECT count(*) FROM relay_purge.outbox") == 0
    finally:
        await pool.close()
    received = await consume(kafka_bootstrap, topic, timeout_s=30, until=lambda g: len(g) >= 600)
    assert_delivered(ledger, received, exactly_once=True)


async def test_outbox_writes_in_input_order_inside_the_callers_transaction(db_url: str) -> None:
    pool = await create_pool(db_url, min_size=1, max_size=2)
    try:
        outbox = await make_store(pool, "outbox_rows")
        messages = [OutboxMessage("t", f"k{i % 3}".encode(), f"v{i}".encode(), {"n": str(i)})
                    for i in range(50)]
        async with pool.acquire() as conn:
            with pytest.raises(RuntimeError, match="transaction"):
                await outbox.add(conn, "t", None, b"v")
            async with conn.transaction():
                ids = await outbox.add_many(conn, messages)
                keyless = await outbox.add(conn, "t", None, b"no key")
            with pytest.raises(ZeroDivisionError):
                async with conn.transaction():
                    await outbox.add(conn, "t", None, b"rolled back with its transaction")
                    raise ZeroDivisionError
            rows = await conn.fetch("SELECT id, key, value, headers FROM outbox_rows.outbox "
                                    "ORDER BY id")
            assert ids == sorted(ids) and keyless > ids[-1]
            assert [r["value"] for r in rows[:50]] == [m.value for m in messages]
            assert rows[0]["headers"] == {"n": "0"}  # create_pool installs the jsonb codec
            assert len(rows) == 51 and rows[50]["key"] is None
            assert await outbox.unsent_count(conn) == len(rows)

            await conn.execute("UPDATE outbox_rows.outbox SET sent_at = now() - interval '2 days'"
                               " WHERE id = ANY($1)", ids[:10])
            assert await outbox.purge_sent(conn, timedelta(days=1)) == 10
            assert await outbox.purge_sent(conn, timedelta(days=1)) == 0
            assert await outbox.purge_sent(conn, timedelta(0)) == 0  # unsent rows stay, always
            assert await conn.fetchval("SELECT count(*) FROM outbox_rows.outbox") == len(rows) - 10
            await conn.execute("UPDATE outbox_rows.outbox SET sent_at = now() - interval '1 hour'"
                               " WHERE id = ANY($1)", ids[10:20])
            assert [await outbox.purge_sent(conn, timedelta(minutes=1), limit=4)
                    for _ in range(4)] == [4, 4, 2, 0]  # oldest first, in bounded chunks
            remaining = await conn.fetch("SELECT id FROM outbox_rows.outbox ORDER BY id")
            assert [r["id"] for r in remaining] == [*ids[20:], keyless]
    finally:
        await pool.close()


# --- the relay as a separate process -----------------------------------------------------------


class RelayProcess:
    """``python -m tests.support.relay_proc`` with its stdout read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    @classmethod
    async def start(cls, db_url: str, schema: str, bootstrap: str, batch: int,
                    stall_at: int | None = None) -> RelayProcess:
        args = ["-m", "tests.support.relay_proc", "--database-url", db_url, "--schema", schema,
                "--bootstrap", bootstrap, "--batch-size", str(batch)]
        if stall_at is not None:
            args += ["--stall-at-batch", str(stall_at)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *args, cwd=REPO, env=os.environ.copy(),
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def wait_for_line(self, prefix: str, timeout_s: float) -> str:
        async def read() -> str:
            assert self.proc.stdout is not None
            while line := (await self.proc.stdout.readline()).decode():
                self.lines.append(line.strip())
                if line.startswith(prefix):
                    return line.strip()
            raise AssertionError(f"relay exited ({self.proc.returncode}) before {prefix!r}: "
                                 f"{self.lines}")

        return await asyncio.wait_for(read(), timeout_s)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), 30)

    async def terminate(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            await self.kill()
            raise
