"""The test backends are real: a Kafka broker that stores and serves records, and PostgreSQL."""

from __future__ import annotations

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from shared.store.migrate import discover, migrate

pytestmark = [__import__("pytest").mark.integration]


async def test_kafka_round_trip(kafka_bootstrap: str, new_topic) -> None:
    topic = await new_topic("stack", partitions=3)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all",
                                enable_idempotence=True)
    await producer.start()
    try:
        for i in range(30):
            await producer.send_and_wait(topic, f"v{i}".encode(), key=f"k{i % 5}".encode())
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, group_id=topic,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        seen: list[bytes] = []
        while len(seen) < 30:
            batch = await consumer.getmany(timeout_ms=10_000)
            assert batch, "the broker served nothing within 10 s"
            seen += [r.value for records in batch.values() for r in records]
    finally:
        await consumer.stop()
    assert sorted(seen) == sorted(f"v{i}".encode() for i in range(30))


async def test_postgres_is_real_and_migrated(pool: asyncpg.Pool) -> None:
    version = await pool.fetchval("SHOW server_version_num")
    assert int(version) >= 150000
    applied = await pool.fetchval("SELECT count(*) FROM schema_migrations")
    assert applied == len(discover())


async def test_migrate_twice_is_a_no_op(db_url: str) -> None:
    assert await migrate(db_url) == []
