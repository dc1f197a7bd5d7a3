"""Retry limit + dead letters against the real broker (issue 2, "Dead letters").

Each test: a 1-partition topic, a unique consumer group, its ``<group>.dlq`` topic, records
produced before the subscriber starts (``auto_offset_reset="earliest"`` picks them up in order),
then a FastStream subscriber built with ``make_broker`` + ``subscriber_options``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaTimeoutError
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage

from shared.config import KafkaSettings
from shared.errors import InfrastructureError, ValidationError
from shared.events.topics import TopicSpec, dlq_topic
from shared.messaging import DeadLetterMiddleware, make_broker, subscriber_options
from shared.messaging.admin import ensure_topics

pytestmark = pytest.mark.integration

MAX_ATTEMPTS = 3
WAIT_S = 60.0

Record = tuple[bytes, bytes, list[tuple[str, bytes]]]  # key, value, headers


def _record(value: bytes, *, headers: list[tuple[str, bytes]] | None = None) -> Record:
    return (b"key-" + value, value, headers or [("trace", b"t-" + value)])


class Harness:
    """One topic, one group and its DLQ topic, a broker with a fast-retrying DLQ middleware."""

    def __init__(self, bootstrap: str, topic: str, group: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.group = group
        self.dlq = dlq_topic(group)
        self.dead_letters = DeadLetterMiddleware(
            max_attempts=MAX_ATTEMPTS, backoff_s=0.01, backoff_max_s=0.05
        )
        self.broker: KafkaBroker = make_broker(
            KafkaSettings(kafka_bootstrap=bootstrap, client_id=f"test-{group}"),
            dead_letters=self.dead_letters,
        )

    async def produce(self, records: list[Record]) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True
        )
        await producer.start()
        try:
            for key, value, headers in records:
                await producer.send_and_wait(
                    self.topic, value, key=key, headers=headers, partition=0
                )
        finally:
            await producer.stop()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        await self.broker.start()
        try:
            yield
        finally:
            await self.broker.stop()

    async def committed(self) -> int | None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(self.group)
        finally:
            await admin.close()
        meta = offsets.get(TopicPartition(self.topic, 0))
        return None if meta is None or meta.offset < 0 else meta.offset

    async def wait_committed(self, offset: int) -> None:
        async def done() -> bool:
            return await self.committed() == offset

        await _wait_until(done, f"group {self.group} to commit offset {offset}")

    async def dead_letters_on_topic(self) -> list[ConsumerRecord[bytes, bytes]]:
        """Everything on the DLQ topic right now (read from the beginning to the end offset)."""
        # No group, "earliest" for the initial position. (Not assign() + seek_to_beginning():
        # the consumer's own asynchronous reset to "latest" can land after the seek, and then
        # getmany() returns nothing.)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            group_id=None,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            tp = TopicPartition(self.dlq, 0)
            consumer.assign([tp])
            end = (await consumer.end_offsets([tp]))[tp]
            records: list[ConsumerRecord[bytes, bytes]] = []
            async with asyncio.timeout(WAIT_S):
                while len(records) < end:
                    batch = await consumer.getmany(tp, timeout_ms=1000)
                    records += batch.get(tp, [])
            return records
        finally:
            await consumer.stop()


async def _wait_until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {WAIT_S}s waiting for {what}")
        await asyncio.sleep(0.1)


@pytest.fixture
async def harness(kafka_bootstrap: str, new_topic: Callable[..., Awaitable[str]]) -> Harness:
    topic = await new_topic("dlq-src", partitions=1)
    group = f"test.dlq.{uuid.uuid4().hex[:12]}"
    await ensure_topics(kafka_bootstrap, [TopicSpec(dlq_topic(group), 1)])
    return Harness(kafka_bootstrap, topic, group)


def _value(msg: KafkaMessage) -> bytes:
    raw = msg.raw_message
    assert isinstance(raw, ConsumerRecord) and isinstance(raw.value, bytes)
    return raw.value


def _headers(record: ConsumerRecord[Any, Any]) -> dict[str, bytes]:
    return dict(record.headers)


async def test_poison_record_is_dead_lettered_after_n_attempts_and_partition_moves_on(
    harness: Harness,
) -> None:
    calls: Counter[bytes] = Counter()
    processed: list[bytes] = []
    poison_headers = [("trace", b"t-poison"), ("x-correlation", b"c-1"), ("trace", b"dup")]
    records = [
        _record(b"r1"),
        _record(b"poison", headers=poison_headers),
        _record(b"r2"),
        _record(b"r3"),
    ]

    @harness.broker.subscriber(harness.topic, **subscriber_options(harness.group))
    async def handle(msg: KafkaMessage) -> None:
        value = _value(msg)
        calls[value] += 1
        if value == b"poison":
            raise RuntimeError(f"cannot handle {value!r}")
        processed.append(value)

    await harness.produce(records)
    async with harness.running():
        await harness.wait_committed(4)

    assert processed == [b"r1", b"r2", b"r3"]
    assert calls == {b"r1": 1, b"poison": MAX_ATTEMPTS, b"r2": 1, b"r3": 1}
    assert harness.dead_letters.retried == MAX_ATTEMPTS - 1
    assert harness.dead_letters.dead_lettered == 1

    (dead,) = await harness.dead_letters_on_topic()
    assert dead.key == b"key-poison"
    assert dead.value == b"poison"
    # original headers first, byte for byte, in order, duplicates kept
    assert [tuple(x) for x in dead.headers[: len(poison_headers)]] == poison_headers
    h = _headers(dead)
    assert h["x-harbour-error-code"] == b"unhandled_error"
    assert h["x-harbour-error-type"] == b"builtins.RuntimeError"
    assert h["x-harbour-error"] == b"cannot handle b'poison'"
    assert h["x-harbour-attempts"] == str(MAX_ATTEMPTS).encode()
    assert h["x-harbour-original-topic"] == harness.topic.encode()
    assert h["x-harbour-original-partition"] == b"0"
    assert h["x-harbour-original-offset"] == b"1"
    assert h["x-harbour-group"] == harness.group.encode()
    assert datetime.fromisoformat(h["x-harbour-dead-lettered-at"].decode()).tzinfo is not None


async def test_validation_error_is_dead_lettered_at_the_first_attempt(harness: Harness) -> None:
    calls: Counter[bytes] = Counter()
    processed: list[bytes] = []

    @harness.broker.subscriber(harness.topic, **subscriber_options(harness.group))
    async def handle(msg: KafkaMessage) -> None:
        value = _value(msg)
        calls[value] += 1
        if value == b"bad":
            raise ValidationError("amount has 3 decimals", code="invalid_amount", field="amount")
        processed.append(value)

    await harness.produce([_record(b"bad"), _record(b"good")])
    async with harness.running():
        await harness.wait_committed(2)

    assert calls == {b"bad": 1, b"good": 1}
    assert processed == [b"good"]
    assert harness.dead_letters.retried == 0
    (dead,) = await harness.dead_letters_on_topic()
    assert (dead.key, dead.value) == (b"key-bad", b"bad")
    h = _headers(dead)
    assert h["trace"] == b"t-bad"
    assert h["x-harbour-error-code"] == b"invalid_amount"
    assert h["x-harbour-error-type"] == b"shared.errors.ValidationError"
    assert h["x-harbour-error"] == b"amount has 3 decimals"
    assert h["x-harbour-error-details"] == b'{"field": "amount"}'
    assert h["x-harbour-attempts"] == b"1"
    assert h["x-harbour-original-offset"] == b"0"


async def test_transient_failure_is_retried_and_processed_once(harness: Harness) -> None:
    calls: Counter[bytes] = Counter()
    processed: list[bytes] = []

    @harness.broker.subscriber(harness.topic, **subscriber_options(harness.group))
    async def handle(msg: KafkaMessage) -> None:
        value = _value(msg)
        calls[value] += 1
        if value == b"flaky" and calls[value] == 1:
            raise InfrastructureError("connection reset by peer", retryable=True)
        processed.append(value)

    await harness.produce([_record(b"flaky"), _record(b"after")])
    async with harness.running():
        await harness.wait_committed(2)

    assert processed == [b"flaky", b"after"]
    assert calls == {b"flaky": 2, b"after": 1}
    assert harness.dead_letters.retried == 1
    assert harness.dead_letters.dead_lettered == 0
    assert await harness.dead_letters_on_topic() == []


async def test_record_that_cannot_be_parsed_is_dead_lettered_byte_for_byte(
    harness: Harness,
) -> None:
    """FastStream decodes every header as UTF-8 before any handler runs (AioKafkaParser).

    That failure never reaches ``consume_scope``; the middleware still parks the record, with its
    undecodable header intact, and the partition moves on.
    """
    processed: list[bytes] = []

    @harness.broker.subscriber(harness.topic, **subscriber_options(harness.group))
    async def handle(msg: KafkaMessage) -> None:
        processed.append(_value(msg))

    hostile = [("trace", b"\xff\xfe not utf-8")]
    await harness.produce(
        [
            _record(b"hostile", headers=hostile),
            _record(b"fine"),
            # last on the partition: nothing after it would commit past it for us
            _record(b"hostile-2", headers=hostile),
        ]
    )
    async with harness.running():
        await harness.wait_committed(3)

    assert processed == [b"fine"]
    parked = await harness.dead_letters_on_topic()
    assert [d.value for d in parked] == [b"hostile", b"hostile-2"]
    for dead in parked:
        assert tuple(dead.headers[0]) == ("trace", b"\xff\xfe not utf-8")
        h = _headers(dead)
        assert h["x-harbour-error-code"] == b"invalid_input"
        assert h["x-harbour-error-type"] == b"builtins.UnicodeDecodeError"
        assert h["x-harbour-attempts"] == b"1"
    assert harness.dead_letters.dead_lettered == 2


async def test_failed_dead_letter_publish_redelivers_the_record(harness: Harness) -> None:
    """If the DLQ does not confirm, nothing is committed: the record comes back, then parks."""
    calls: Counter[bytes] = Counter()
    processed: list[bytes] = []
    real_send = harness.dead_letters.send_dead_letter
    failures_left = 1

    async def flaky_send(*args: Any, **kwargs: Any) -> None:
        nonlocal failures_left
        if failures_left:
            failures_left -= 1
            raise KafkaTimeoutError("dead-letter topic unavailable")
        await real_send(*args, **kwargs)

    harness.dead_letters.send_dead_letter = flaky_send  # type: ignore[method-assign]

    @harness.broker.subscriber(harness.topic, **subscriber_options(harness.group))
    async def handle(msg: KafkaMessage) -> None:
        value = _value(msg)
        calls[value] += 1
        if value == b"bad":
            raise ValidationError("unknown type")
        processed.append(value)

    await harness.produce([_record(b"bad"), _record(b"next")])
    async with harness.running():
        await harness.wait_committed(2)

    assert calls == {b"bad": 2, b"next": 1}
    assert processed == [b"next"]
    assert harness.dead_letters.publish_failures == 1
    (dead,) = await harness.dead_letters_on_topic()
    assert dead.value == b"bad"
    assert _headers(dead)["x-harbour-attempts"] == b"2"
