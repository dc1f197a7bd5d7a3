"""Commands in on a real ``ledger.commands`` topic, results out on the reply topic."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from typer.testing import CliRunner

from services.cli.main import app
from services.ledger.consumer import WriterLoop
from services.ledger.verify import verify
from services.ledger.writer import LedgerWriter
from shared.events.envelope import decode
from shared.store.outbox import OutboxRelay
from tests.support import ledger as L
from tests.support.tcp_proxy import CuttableProxy


async def read_results(bootstrap: str, topic: str, count: int, timeout_s: float = 60) -> list[dict]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                group_id=f"reader-{topic}", enable_auto_commit=False)
    await consumer.start()
    # An answer may arrive twice (sent again after a rebalance); a copy has the same event id.
    out: dict[str, dict] = {}
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(out) < count and asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    envelope, _ = decode(r.value)
                    out.setdefault(str(envelope.event_id),
                                   {"type": envelope.type, **envelope.payload})
    finally:
        await consumer.stop()
    return list(out.values())


async def publish(bootstrap: str, topic: str, items: list[tuple[bytes, bytes, int | None]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for value, key, partition in items:
            await producer.send_and_wait(topic, value, key=key, partition=partition)
    finally:
        await producer.stop()


async def test_commands_through_kafka_settle_and_answer(
        kafka_bootstrap: str, new_topic, pool: asyncpg.Pool) -> None:
    commands = await new_topic("ledger.commands", partitions=4)
    results = await new_topic("ledger.results", partitions=4)
    values = [*[L.asset("HKD", 2, reply_to=results)],
              L.account("treasury", "HKD", reply_to=results),
              *[L.account(f"c{i}", "HKD", no_overdraft=True, reply_to=results) for i in range(10)],
              *[L.transfer(f"fund{i}", "treasury", f"c{i}", "HKD", "100.00", reply_to=results)
                for i in range(10)],
              *[L.transfer(f"t{i}", f"c{i}", f"c{(i + 1) % 10}", "HKD", "40.50", reply_to=results)
                for i in range(10)],
              L.transfer("too-much", "c0", "c1", "HKD", "1000.00", reply_to=results)]
    writer = WriterLoop(pool, LedgerWriter(pool, topic=commands), kafka_bootstrap,
                        topic=commands, group_id=f"writer-{commands}")
    relay = OutboxRelay(pool, "ledger", kafka_bootstrap, poll_interval_s=0.2)
    tasks = [asyncio.create_task(writer.run()), asyncio.create_task(relay.run())]
    try:
        # Reference data and funding first (one partition keeps their order), then transfers
        # keyed by the debited account, spread over the partitions.
        setup, transfers = values[:22], values[22:]
        await publish(kafka_bootstrap, commands, [(v, b"setup", 0) for v in setup])
        out = await read_results(kafka_bootstrap, results, len(setup))
        keys = [f"c{i}".encode() for i in range(10)] + [b"c0"]
        keyed = [(v, k, None) for v, k in zip(transfers, keys, strict=True)]
        await publish(kafka_bootstrap, commands, keyed)
        out = await read_results(kafka_bootstrap, results, len(values))
    finally:
        writer.stop()
        relay.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert len(out) == len(values)
    rejected = [r for r in out if r["type"] == "ledger.PostingRejected"]
    assert [(r["command_id"], r["code"]) for r in rejected] == [("too-much", "insufficient_funds")]
    rows = await pool.fetch("SELECT account_id, credits_posted - debits_posted AS bal "
                            "FROM ledger.balances WHERE account_id LIKE 'c%'")
    assert {r["account_id"]: int(r["bal"]) for r in rows} == {f"c{i}": 10000 for i in range(10)}
    assert (await verify(pool)).ok


async def test_an_answer_kafka_refuses_goes_to_the_outbox_and_settlement_goes_on(
        kafka_bootstrap: str, new_topic, pool: asyncpg.Pool, db_url: str) -> None:
    commands = await new_topic("ledger.commands", partitions=1)
    results = await new_topic("ledger.results", partitions=1)
    nowhere = f"{results}-never-created"  # a valid reply topic name; auto-create is off
    values = [L.asset("HKD", 2, reply_to=results),
              L.account("treasury", "HKD", reply_to=results),
              L.account("c1", "HKD", reply_to=results),
              L.transfer("lost-reply", "treasury", "c1", "HKD", "5.00", reply_to=nowhere),
              L.transfer("after", "treasury", "c1", "HKD", "7.00", reply_to=results)]
    writer = WriterLoop(pool, LedgerWriter(pool, topic=commands), kafka_bootstrap,
                        topic=commands, group_id=f"writer-{commands}",
                        answers_refused_after_ms=3_000)
    task = asyncio.create_task(writer.run())
    try:
        await publish(kafka_bootstrap, commands, [(v, b"k", 0) for v in values])
        out = await read_results(kafka_bootstrap, results, 4)
        # The ledger did not wait for the refused answer: the posting after it settled.
        assert [r["command_id"] for r in out][-1] == "after"
        for _ in range(150):  # the refusal takes the producer's 3 s timeout
            if await pool.fetchval("SELECT count(*) FROM ledger.outbox"):
                break
            await asyncio.sleep(0.2)
        # ...and the refused answer waits in the outbox, where the relay retries it and shows
        # the error: not lost, not blocking.
        rows = await pool.fetch("SELECT topic, key FROM ledger.outbox")
        assert [(r["topic"], bytes(r["key"])) for r in rows] == [(nowhere, b"lost-reply")]
        assert writer.answers.spilled == 1
        await asyncio.sleep(0.5)  # idle: the watermark is stored
        row = await pool.fetchrow("SELECT next_offset, answered_offset FROM "
                                  "ledger.consumed_offsets WHERE topic = $1", commands)
        assert (row["next_offset"], row["answered_offset"]) == (5, 5)
    finally:
        writer.stop()
        await asyncio.gather(task, return_exceptions=True)
    balance = await pool.fetchval("SELECT credits_posted FROM ledger.balances "
                                  "WHERE account_id = 'c1'")
    assert int(balance) == 1200
    # What an operator sees: everything applied and answered, one answer waiting for the relay.
    shown = await asyncio.to_thread(CliRunner().invoke, app, ["ledger", "progress", "--json"],
                                    env={"HARBOUR_DATABASE_URL": db_url})
    assert shown.exit_code == 0, shown.output
    lines = [json.loads(line) for line in shown.stdout.splitlines()]
    assert lines == [
        {"topic": commands, "partition": 0, "next_offset": 5, "answered_offset": 5,
         "unanswered": 0, "chain_sequence": 2},
        {"outbox_waiting": 1}]


class _HoldsOneBatch(LedgerWriter):
    """Holds the first batch that carries transfer ``held`` for ``hold_s``, as a busy database
    would, then fails it with ``fails`` (as a lost connection would) if one is given."""

    def __init__(self, *args, hold_s: float, fails: Exception | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._hold_s, self._fails = hold_s, fails
        self.held = False

    async def apply_batch(self, records, decoded=None, answered=None):
        if not self.held and any(b'"held"' in (r.value or b"") for r in records):
            self.held = True
            await asyncio.sleep(self._hold_s)  # records keep arriving, fetched meanwhile
            if self._fails is not None:
                raise self._fails
        return await super().apply_batch(records, decoded, answered)


async def _trickle_behind_a_held_batch(
        pool: asyncpg.Pool, bootstrap: str, new_topic, *, hold_s: float,
        fails: Exception | None = None, partitions: int, count: int, every_s: float,
) -> tuple[list[dict], _HoldsOneBatch]:
    """Set up HKD, treasury and c1, then send transfer ``held`` and, one at a time ``every_s``
    apart and round-robin over ``partitions``, transfers t0.. while the writer holds the batch
    of ``held``. Returns every answer once all have come back, and the writer."""
    commands = await new_topic("ledger.commands", partitions=partitions)
    results = await new_topic("ledger.results", partitions=partitions)
    setup = [L.asset("HKD", 2, reply_to=results), L.account("treasury", "HKD", reply_to=results),
             L.account("c1", "HKD", reply_to=results)]
    writer = _HoldsOneBatch(pool, topic=commands, hold_s=hold_s, fails=fails)
    loop = WriterLoop(pool, writer, bootstrap, topic=commands, group_id=f"writer-{commands}")
    task = asyncio.create_task(loop.run())
    try:
        await publish(bootstrap, commands, [(v, b"k", 0) for v in setup])
        await read_results(bootstrap, results, len(setup))
        names = ["held", *(f"t{i}" for i in range(count))]
        for i, name in enumerate(names):
            if i:
                await asyncio.sleep(every_s)
            transfer = L.transfer(name, "treasury", "c1", "HKD", "1.00", reply_to=results)
            await publish(bootstrap, commands, [(transfer, b"k", max(i - 1, 0) % partitions)])
        return await read_results(bootstrap, results, len(setup) + len(names)), writer
    finally:
        loop.stop()
        await asyncio.gather(task, return_exceptions=True)


async def test_records_arriving_during_a_batch_all_go_into_the_next(
        kafka_bootstrap: str, new_topic, pool: asyncpg.Pool) -> None:
    # aiokafka fetches nothing more while records it fetched sit unread. A writer that read only
    # between batches took one fetch's worth per batch: the rest of what arrived meanwhile waited
    # for a batch more. Every record here arrives while the first transfer's batch is held.
    out, _ = await _trickle_behind_a_held_batch(  # 200 ms apart, all within the held 1.5 s
        pool, kafka_bootstrap, new_topic, hold_s=1.5, partitions=1, count=4, every_s=0.2)
    assert len(out) == 3 + 5
    # One writer transaction stamps one time on all its results.
    rows = await pool.fetch("SELECT command_id, recorded_at FROM ledger.results "
                            "WHERE command_id IN ('held', 't0', 't1', 't2', 't3')")
    applied_at = {r["command_id"]: r["recorded_at"] for r in rows}
    assert len({applied_at[f"t{i}"] for i in range(4)}) == 1, applied_at
    assert applied_at["t0"] > applied_at["held"]


async def test_a_batch_lost_with_the_database_is_read_again_with_what_was_fetched_meanwhile(
        kafka_bootstrap: str, new_topic, pool: asyncpg.Pool) -> None:
    # The failed batch's records, and those fetched and decoded while it ran, were read past by
    # the consumer: all of them must be read again from the stored offsets, applied once each.
    out, writer = await _trickle_behind_a_held_batch(  # both partitions, within the held 0.5 s
        pool, kafka_bootstrap, new_topic, hold_s=0.5,
        fails=ConnectionResetError("connection to PostgreSQL lost"),
        partitions=2, count=10, every_s=0.05)
    assert writer.held
    transfers = [r for r in out if r["type"] == "ledger.PostingAccepted"
                 and r["command_id"] in {"held", *(f"t{i}" for i in range(10))}]
    assert sorted(r["command_id"] for r in transfers) == sorted(
        ["held", *(f"t{i}" for i in range(10))])
    assert int(await pool.fetchval(
        "SELECT credits_posted FROM ledger.balances WHERE account_id = 'c1'")) == 1100
    assert await pool.fetchval("SELECT count(*) FROM ledger.postings") == 11
    assert (await verify(pool)).ok


async def test_the_writer_outlasts_a_database_outage_longer_than_its_retry_wait(
        kafka_bootstrap: str, new_topic, db_url: str, pool: asyncpg.Pool, caplog) -> None:
    # The writer reaches PostgreSQL through a proxy that is cut for 4 s while transfers keep
    # arriving: batches fail, and so does the seek back to the stored offsets. The loop must keep
    # running, and once the database is back, settle every transfer exactly once.
    commands = await new_topic("ledger.commands", partitions=2)
    results = await new_topic("ledger.results", partitions=2)
    parts = urlsplit(db_url)
    userinfo = parts.netloc.rpartition("@")[0]
    async with CuttableProxy("127.0.0.1", parts.port or 5432) as proxy, asyncpg.create_pool(
            urlunsplit(parts._replace(netloc=f"{userinfo}@127.0.0.1:{proxy.port}")),
            min_size=1, max_size=4, timeout=2) as via_proxy:
        loop = WriterLoop(via_proxy, LedgerWriter(via_proxy, topic=commands), kafka_bootstrap,
                          topic=commands, group_id=f"writer-{commands}")
        task = asyncio.create_task(loop.run())
        try:
            setup = [L.asset("HKD", 2, reply_to=results),
                     L.account("treasury", "HKD", reply_to=results),
                     L.account("c1", "HKD", reply_to=results)]
            await publish(kafka_bootstrap, commands, [(v, b"k", 0) for v in setup])
            assert len(await read_results(kafka_bootstrap, results, len(setup))) == len(setup)
            names = [f"t{i}" for i in range(20)]
            transfers = [(L.transfer(n, "treasury", "c1", "HKD", "1.00", reply_to=results),
                          b"k", i % 2) for i, n in enumerate(names)]
            await publish(kafka_bootstrap, commands, transfers[:5])
            proxy.cut()
            await publish(kafka_bootstrap, commands, transfers[5:])
            await asyncio.sleep(4.0)
            assert not task.done(), task  # still running through the outage
            assert any("seek to the stored offsets failed" in r.getMessage()
                       for r in caplog.records)  # the outage reached the seek, not only a batch
            proxy.restore()
            out = await read_results(kafka_bootstrap, results, len(setup) + len(names))
            accepted = sorted(r["command_id"] for r in out if r["type"] == "ledger.PostingAccepted"
                              and r["command_id"] in names)
            assert accepted == sorted(names)
            assert loop.metrics.registry.get_sample_value(
                "harbour_ledger_batch_retries_total", {"reason": "database_unavailable"})
            assert int(await pool.fetchval(
                "SELECT credits_posted FROM ledger.balances WHERE account_id = 'c1'")) == 2000
            assert await pool.fetchval("SELECT count(*) FROM ledger.postings") == 20
            assert (await verify(pool)).ok
        finally:
            loop.stop()
            await asyncio.gather(task, return_exceptions=True)
