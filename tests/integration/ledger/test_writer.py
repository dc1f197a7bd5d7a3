"""The writer against real PostgreSQL: batches applied exactly once, journal and balances agree."""

from __future__ import annotations

import asyncpg
import pytest

from services.ledger.verify import verify
from services.ledger.writer import BatchReport, LedgerWriter, OffsetGapError, Record
from shared.events.envelope import decode
from tests.support import ledger as L


def records(values: list[bytes], partition: int = 0, start: int = 0) -> list[Record]:
    return [Record(partition, start + i, b"k", v) for i, v in enumerate(values)]


SETUP = [
    L.asset("HKD", 2),
    L.account("bank:a:cash", "HKD"),
    L.account("cust:1", "HKD", no_overdraft=True),
    L.account("cust:2", "HKD", no_overdraft=True),
]


async def balances(pool: asyncpg.Pool) -> dict[str, tuple[int, int, int, int]]:
    rows = await pool.fetch("SELECT * FROM ledger.balances")
    return {r["account_id"]: (int(r["debits_posted"]), int(r["credits_posted"]),
                              int(r["debits_pending"]), int(r["credits_pending"])) for r in rows}


def replies(*reports: BatchReport) -> list[tuple[str, dict]]:
    """The answers the batches handed back to publish (in order)."""
    out = []
    for report in reports:
        for m in report.answers:
            envelope, _ = decode(m.value)
            out.append((envelope.type, envelope.payload))
    return out


def _without_stamps(value: bytes) -> dict:
    """An answer minus the time it was written (the one thing a re-sent answer may change)."""
    envelope, _ = decode(value)
    return {**envelope.model_dump(mode="json"), "occurred_at": None, "recorded_at": None}


async def test_postings_settle_and_balances_follow(pool: asyncpg.Pool) -> None:
    writer = LedgerWriter(pool)
    batch = [*SETUP,
             L.transfer("p1", "bank:a:cash", "cust:1", "HKD", "1000.00"),
             L.transfer("p2", "cust:1", "cust:2", "HKD", "250.75"),
             L.transfer("p3", "cust:2", "cust:1", "HKD", "999.00")]  # overdraft: refused
    report = await writer.apply_batch(records(batch))
    assert (report.accepted, report.rejected, report.dead_lettered) == (6, 1, 0)
    assert await balances(pool) == {
        "bank:a:cash": (100000, 0, 0, 0),
        "cust:1": (25075, 100000, 0, 0),
        "cust:2": (0, 25075, 0, 0),
    }
    out = replies(report)
    assert [t for t, _ in out][-1] == "ledger.PostingRejected"
    assert out[-1][1]["code"] == "insufficient_funds"
    assert (await verify(pool)).ok


async def test_redelivered_records_are_skipped_and_retries_replay(pool: asyncpg.Pool) -> None:
    writer = LedgerWriter(pool)
    first = records([*SETUP, L.transfer("p1", "bank:a:cash", "cust:1", "HKD", "10.00")])
    original = await writer.apply_batch(first)
    # The same offsets again (a restart re-reading from the answered watermark): the answers may
    # not have reached Kafka, so they are given again, word for word, and nothing moves.
    again = await writer.apply_batch(first)
    assert (again.replayed, again.applied, again.skipped) == (len(first), 0, 0)
    assert (again.accepted, again.rejected, again.dead_lettered) == (0, 0, 0)  # replayed only
    assert [(m.topic, m.key, _without_stamps(m.value)) for m in again.answers] == [
        (m.topic, m.key, _without_stamps(m.value)) for m in original.answers]
    assert again.answered_to == {0: len(first)}
    # Once Kafka acknowledged them (the loop passes that on), a redelivery is skipped.
    await writer.apply_batch(records([L.asset("USD", 2)], start=len(first)),
                             answered={0: len(first)})
    assert (await pool.fetchval("SELECT answered_offset FROM ledger.consumed_offsets")
            ) == len(first)
    skipped = await writer.apply_batch(first)
    assert (skipped.skipped, skipped.applied, skipped.replayed) == (len(first), 0, 0)
    assert (await balances(pool))["cust:1"] == (0, 1000, 0, 0)
    # A client retry: same posting id and body, new record -> original answer, nothing moves.
    retry = records([L.transfer("p1", "bank:a:cash", "cust:1", "HKD", "10.00")], start=6)
    retried = await writer.apply_batch(retry)
    assert retried.accepted == 1
    conflict = records([L.transfer("p1", "bank:a:cash", "cust:1", "HKD", "11.00")], start=7)
    report = await writer.apply_batch(conflict)
    assert report.rejected == 1
    assert (await balances(pool))["cust:1"] == (0, 1000, 0, 0)
    out = replies(retried, report)
    assert out[-2][1]["duplicate"] is True and out[-2][1]["sequence"] == 1
    assert out[-1][1]["code"] == "id_conflict"


async def test_a_gap_in_offsets_is_refused(pool: asyncpg.Pool) -> None:
    writer = LedgerWriter(pool)
    await writer.apply_batch(records(SETUP))
    with pytest.raises(OffsetGapError):
        await writer.apply_batch(records([L.asset("USD", 2)], start=10))


async def test_pending_commit_void_and_expiry(pool: asyncpg.Pool) -> None:
    writer = LedgerWriter(pool)
    await writer.apply_batch(records([
        *SETUP, L.transfer("fund", "bank:a:cash", "cust:1", "HKD", "100.00"),
        L.pending("h1", "cust:1", "cust:2", "HKD", "30.00"),
        L.pending("h2", "cust:1", "cust:2", "HKD", "20.00", timeout_s=1),
    ]))
    assert (await balances(pool))["cust:1"] == (0, 10000, 5000, 0)
    await writer.apply_batch(records([
        L.record(__import__("shared.events.ledger", fromlist=["x"]).CommitPending(
            posting_id="c1", pending_id="h1")),
    ], start=7))
    assert (await balances(pool))["cust:2"] == (0, 3000, 0, 2000)
    import datetime as dt

    from shared.clock import ManualClock
    clock = ManualClock(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5))
    expiring = LedgerWriter(pool, clock=clock)
    assert await expiring.expire_due([0]) == 1
    assert (await balances(pool))["cust:1"] == (3000, 10000, 0, 0)
    assert (await balances(pool))["cust:2"] == (0, 3000, 0, 0)
    assert (await verify(pool)).ok


async def test_undecodable_records_are_dead_lettered_with_the_original(pool: asyncpg.Pool) -> None:
    writer = LedgerWriter(pool)
    report = await writer.apply_batch(records([b"{not json", *SETUP]))
    assert report.dead_lettered == 1 and report.accepted == 4
    dead = report.answers[0]
    assert dead.topic == "harbour.ledger.writer.dlq" and dead.value == b"{not json"
