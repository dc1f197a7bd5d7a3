"""The ledger writer's metrics and its paused-until-seeked assignment, without Kafka: the
gauges an operator alerts on, and what happens when the seek to PostgreSQL's offsets fails."""

from __future__ import annotations

from typing import Any

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
