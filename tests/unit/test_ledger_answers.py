"""The answered watermark: it moves only over batches whose answers Kafka acknowledged, in the
order the batches committed, and stops for good at the first one that failed."""

from __future__ import annotations

import asyncio
from typing import Any

from services.ledger.answers import AnswerPublisher, Spill
from shared.store.outbox import OutboxMessage


class _Producer:
    """Stands in for AIOKafkaProducer.send: each send's acknowledgement is settled by the test."""

    def __init__(self) -> None:
        self.acks: dict[bytes, asyncio.Future[Any]] = {}

    async def send(self, topic: str, value: bytes, *, key: bytes | None = None,
                   headers: Any = None) -> asyncio.Future[Any]:
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.acks[value] = ack
        return ack


def _publisher(spill: Spill | None = None) -> tuple[AnswerPublisher, _Producer]:
    publisher = AnswerPublisher("unused:9092", spill=spill)
    fake = _Producer()
    publisher._producer = fake
    return publisher, fake


def _answer(value: bytes) -> OutboxMessage:
    return OutboxMessage("ledger.results", b"k", value, {"type": "x"})


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_the_watermark_follows_batches_in_commit_order() -> None:
    publisher, kafka = _publisher()
    publisher.publish([_answer(b"a1"), _answer(b"a2")], {0: 2})
    publisher.publish([_answer(b"b1")], {0: 3, 1: 1})
    await _settle()
    kafka.acks[b"b1"].set_result(None)  # the later batch is acknowledged first
    await _settle()
    assert publisher.acknowledged == {}
    kafka.acks[b"a1"].set_result(None)
    kafka.acks[b"a2"].set_result(None)
    await publisher.drain()
    await _settle()
    assert publisher.acknowledged == {0: 3, 1: 1}
    assert publisher.unsaved() == {0: 3, 1: 1}
    publisher.saved({0: 3})
    assert publisher.unsaved() == {1: 1} and publisher.unsaved({0}) == {}


async def test_a_failed_batch_stops_the_watermark_before_it() -> None:
    publisher, kafka = _publisher()
    publisher.publish([_answer(b"a")], {0: 1})
    publisher.publish([_answer(b"b")], {0: 2})
    publisher.publish([_answer(b"c")], {0: 3})
    await _settle()
    kafka.acks[b"a"].set_result(None)
    kafka.acks[b"b"].set_exception(RuntimeError("broker gone"))
    kafka.acks[b"c"].set_result(None)
    await _settle()
    await _settle()
    assert publisher.acknowledged == {0: 1}
    assert isinstance(publisher.failed, RuntimeError)
    # Answering again from the stored watermark moves it on; never backwards.
    publisher.reset_failure()
    publisher.publish([_answer(b"b again")], {0: 2})
    publisher.publish([], {0: 1})
    await _settle()
    kafka.acks[b"b again"].set_result(None)
    await publisher.drain()
    await _settle()
    assert publisher.acknowledged == {0: 2} and publisher.failed is None


async def test_answers_kafka_refuses_go_to_the_outbox_and_the_watermark_moves_on() -> None:
    spilled: list[list[bytes]] = []

    async def spill(answers: list[OutboxMessage]) -> None:
        spilled.append([m.value for m in answers])

    publisher, kafka = _publisher(spill)
    publisher.publish([_answer(b"a1"), _answer(b"a2")], {0: 2})
    publisher.publish([_answer(b"b")], {0: 3})
    await _settle()
    kafka.acks[b"a1"].set_result(None)
    kafka.acks[b"a2"].set_exception(RuntimeError("UnknownTopicOrPartition"))
    kafka.acks[b"b"].set_result(None)
    await publisher.drain()
    await _settle()
    assert spilled == [[b"a2"]]  # only what Kafka refused; a1 is in Kafka already
    assert publisher.spilled == 1 and publisher.failed is None
    assert publisher.acknowledged == {0: 3}


async def test_when_the_outbox_fails_too_the_watermark_stops() -> None:
    async def spill(answers: list[OutboxMessage]) -> None:
        raise OSError("database unreachable")

    publisher, kafka = _publisher(spill)
    publisher.publish([_answer(b"a")], {0: 1})
    await _settle()
    kafka.acks[b"a"].set_exception(RuntimeError("broker gone"))
    await _settle()
    await _settle()
    assert publisher.acknowledged == {} and isinstance(publisher.failed, OSError)
