"""The ledger writer's metrics and its paused-until-seeked assignment, without Kafka: the
gauges an operator alerts on, and what happens when the seek to PostgreSQL's offsets fails."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from aiokafka import TopicPartition

from services.ledger.consumer import WriterLoop, _SeekToStored
from services.ledger.metrics import WriterMetrics
from services.ledger.writer import BatchReport, LedgerWriter


def _gauge(metrics: WriterMetrics, name: str, partition: int) -> float | None:
    return metrics.registry.get_sample_value(name, {"partition": str(partition)})


def test_lag_and_unanswered_per_partition_and_forgotten_on_revoke() -> None:
    m = WriterMetrics()
    m.partitions({0: 100, 1: 50}, {0: 130, 1: None}, {0: 90})
    assert _gauge(m, "harbour_ledger_consumer_lag", 0) == 30
    assert _gauge(m, "harbour_ledger_unanswered", 0) == 10
    assert _gauge(m, "harbour_ledger_consumer_lag", 1) is None  # high watermark not known yet
    m.forget([0])
    assert _gauge(m, "harbour_ledger_consumer_lag", 0) is None
    assert _gauge(m, "harbour_ledger_unanswered", 0) is None
    assert _gauge(m, "harbour_ledger_unanswered", 1) == 0


def test_a_batch_counts_every_outcome() -> None:
    m = WriterMetrics()
    m.batch(BatchReport(accepted=5, rejected=2, dead_lettered=1, replayed=3, skipped=4), 15, 0.02)
    counts = {o: m.registry.get_sample_value("harbour_ledger_commands_total", {"outcome": o})
              for o in ("accepted", "rejected", "dead_lettered", "replayed", "skipped")}
    assert counts == {"accepted": 5, "rejected": 2, "dead_lettered": 1, "replayed": 3,
                      "skipped": 4}
    assert m.registry.get_sample_value("harbour_ledger_batch_records_sum") == 15


class _Consumer:
    """What the rebalance listener and the retry use of an AIOKafkaConsumer."""

    def __init__(self, assigned: set[TopicPartition]) -> None:
        self.assigned = assigned
        self.paused: set[TopicPartition] = set()

    def pause(self, *tps: TopicPartition) -> None:
        self.paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused.difference_update(tps)

    def assignment(self) -> set[TopicPartition]:
        return self.assigned


@pytest.mark.asyncio
async def test_partitions_stay_paused_until_the_seek_to_stored_offsets_succeeds() -> None:
    tps = {TopicPartition("ledger.commands", 0), TopicPartition("ledger.commands", 1)}
    loop = WriterLoop(None, LedgerWriter(None), "127.0.0.1:1",  # type: ignore[arg-type]
                      topic="ledger.commands", group_id="g")
    consumer = _Consumer(tps)
    loop.consumer = consumer  # type: ignore[assignment]
    seeks: list[list[TopicPartition]] = []
    database_up = False

    async def seek_to_stored(partitions: list[TopicPartition]) -> Any:
        if not database_up:
            raise OSError("connection refused")
        seeks.append(partitions)

    loop.seek_to_stored = seek_to_stored  # type: ignore[method-assign]
    await _SeekToStored(loop).on_partitions_assigned(tps)
    # Resumed now, they would be read from Kafka's committed offset: answers could be lost.
    assert consumer.paused == tps and loop.unseeked == tps
    await loop._seek_unseeked()
    assert consumer.paused == tps and loop.unseeked == tps  # still down: still paused
    database_up = True
    await loop._seek_unseeked()
    assert consumer.paused == set() and loop.unseeked == set()
    assert sorted(seeks[0]) == sorted(tps)


KEPT, TAKEN = TopicPartition("ledger.commands", 0), TopicPartition("ledger.commands", 1)


def _revoked_during_the_seek(database_up: bool) -> tuple[WriterLoop, _StrictConsumer]:
    """A loop owning KEPT and TAKEN whose seek loses TAKEN to a rebalance while it asks
    PostgreSQL (which answers if ``database_up``)."""
    loop = WriterLoop(None, LedgerWriter(None), "127.0.0.1:1",  # type: ignore[arg-type]
                      topic="ledger.commands", group_id="g")
    consumer = _StrictConsumer({KEPT, TAKEN})
    loop.consumer = consumer  # type: ignore[assignment]

    async def seek_to_stored(partitions: list[TopicPartition]) -> Any:
        consumer.assigned.discard(TAKEN)
        if not database_up:
            raise OSError("connection refused")

    loop.seek_to_stored = seek_to_stored  # type: ignore[method-assign]
    return loop, consumer


@pytest.mark.asyncio
async def test_a_partition_taken_away_while_the_seek_failed_is_not_parked() -> None:
    # Pausing or resuming a partition no longer assigned raises in aiokafka, which would end the
    # writer loop.
    loop, consumer = _revoked_during_the_seek(database_up=False)
    assert await loop.seek_or_park([KEPT, TAKEN]) is False
    assert consumer.paused == {KEPT} and loop.unseeked == {KEPT}


@pytest.mark.asyncio
async def test_a_partition_taken_away_during_a_successful_retry_is_not_resumed() -> None:
    loop, consumer = _revoked_during_the_seek(database_up=True)
    consumer.pause(KEPT, TAKEN)
    loop.unseeked = {KEPT, TAKEN}
    await loop._seek_unseeked()
    assert consumer.paused == {TAKEN} and loop.unseeked == set()


class _StrictConsumer(_Consumer):
    """Refuses to pause or resume what it does not own, as aiokafka does (IllegalStateError)."""

    def pause(self, *tps: TopicPartition) -> None:
        self._owned(tps)
        super().pause(*tps)

    def resume(self, *tps: TopicPartition) -> None:
        self._owned(tps)
        super().resume(*tps)

    def _owned(self, tps: tuple[TopicPartition, ...]) -> None:
        if not set(tps) <= self.assigned:
            raise RuntimeError(f"not assigned: {set(tps) - self.assigned}")


@pytest.mark.asyncio
async def test_a_retry_clears_only_what_it_seeked_not_what_a_rebalance_parked_meanwhile() -> None:
    # The retry of P0 waits on PostgreSQL; meanwhile a rebalance assigns P0 and P1 again and
    # fails to seek P1. When the retry's query then succeeds, P1 must stay parked (paused and
    # due for a retry), not be forgotten paused forever.
    p0, p1 = KEPT, TAKEN
    loop = WriterLoop(None, LedgerWriter(None), "127.0.0.1:1",  # type: ignore[arg-type]
                      topic="ledger.commands", group_id="g")
    consumer = _StrictConsumer({p0})
    loop.consumer = consumer  # type: ignore[assignment]
    consumer.pause(p0)
    loop.unseeked = {p0}
    calls = 0

    async def seek_to_stored(partitions: list[TopicPartition]) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:  # the retry of P0, interrupted by a rebalance
            loop.forget([0])
            consumer.assigned.update({p0, p1})
            await _SeekToStored(loop).on_partitions_assigned([p0, p1])  # calls == 2: fails
        elif calls == 2:
            raise OSError("connection refused")

    loop.seek_to_stored = seek_to_stored  # type: ignore[method-assign]
    await loop._seek_unseeked()
    assert p1 in consumer.paused and p1 in loop.unseeked


@pytest.mark.asyncio
async def test_a_successful_seek_on_assignment_ends_an_older_retry_of_the_same_partition() -> None:
    # Parked by a failed seek just before a rebalance, then seeked by the new assignment: the
    # old retry must not seek it again a second later, while its records are being applied.
    loop, consumer = _revoked_during_the_seek(database_up=True)
    loop.unseeked = {KEPT}
    await _SeekToStored(loop).on_partitions_assigned([KEPT])
    assert loop.unseeked == set() and KEPT not in consumer.paused


@pytest.mark.asyncio
@pytest.mark.parametrize("down", [
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.CrashShutdownError("terminating connection because of crash of another process"),
    asyncpg.TooManyConnectionsError("sorry, too many clients already"),
], ids=lambda e: type(e).__name__)
async def test_a_database_shut_down_or_full_fails_the_batch_but_not_the_loop(
        down: Exception, monkeypatch) -> None:
    # A restart or crash of PostgreSQL, or no connection slot left, is an outage like a reset
    # connection: nothing was committed, so the batch is read again; it must not end the loop.
    class Down(LedgerWriter):
        async def apply_batch(self, *args: Any, **kwargs: Any) -> Any:
            raise down

    loop = WriterLoop(None, Down(None), "127.0.0.1:1",  # type: ignore[arg-type]
                      topic="ledger.commands", group_id="g")
    monkeypatch.setattr(asyncio, "sleep", _no_wait)
    assert await loop._apply({}, [], []) is False
    assert loop.metrics.registry.get_sample_value(
        "harbour_ledger_batch_retries_total", {"reason": "database_unavailable"}) == 1


async def _no_wait(_seconds: float) -> None:
    return None
