"""Ops can list a group's dead letters and replay one to its original topic, byte for byte."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from services.cli.dlq import read_dead_letters, replay
from shared.events.topics import TopicSpec, dlq_topic
from shared.messaging.admin import ensure_topics
from shared.messaging.dlq import H_ERROR_CODE, H_ORIGINAL_OFFSET, H_ORIGINAL_TOPIC


async def test_list_then_replay_a_dead_letter(kafka_bootstrap: str, new_topic) -> None:
    source = await new_topic("orders", partitions=1)
    group = f"group-{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka_bootstrap, [TopicSpec(dlq_topic(group), 1)])
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all",
                                enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(dlq_topic(group), b"{broken", key=b"acct-1", headers=[
            ("trace", b"t-1"), (H_ERROR_CODE, b"malformed_json"),
            (H_ORIGINAL_TOPIC, source.encode()), (H_ORIGINAL_OFFSET, b"41"),
        ])
    finally:
        await producer.stop()

    letters = await read_dead_letters(kafka_bootstrap, group)
    assert [(x.key, x.value, x.header(H_ERROR_CODE)) for x in letters] == [
        (b"acct-1", b"{broken", "malformed_json")]

    assert await replay(kafka_bootstrap, letters) == 1
    consumer = AIOKafkaConsumer(source, bootstrap_servers=kafka_bootstrap,
                                auto_offset_reset="earliest", group_id=f"check-{group}")
    await consumer.start()
    try:
        batch = await asyncio.wait_for(consumer.getmany(timeout_ms=10_000), 15)
        records = [r for rs in batch.values() for r in rs]
    finally:
        await consumer.stop()
    assert [(r.key, r.value, list(r.headers)) for r in records] == [
        (b"acct-1", b"{broken", [("trace", b"t-1")])]
