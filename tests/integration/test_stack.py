"""The test backends are real: a Kafka broker that stores and serves records, and PostgreSQL."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from shared.config import StackSettings
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


def test_local_kafka_formats_storage_whatever_its_cluster_id(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One random cluster id in 64 begins with "-"; passed as "-t <id>", Kafka's storage tool
    # took it for an option and the broker never started (a flaky CI run).
    from shared.localstack import kafka as lk

    lib = lk.fetch_kafka_jars(StackSettings().cache_dir, StackSettings().kafka_version)
    dashed = uuid.UUID(bytes=b"\xf8" + bytes(15))
    assert base64.urlsafe_b64encode(dashed.bytes).decode().startswith("-")
    monkeypatch.setattr(lk.uuid, "uuid4", lambda: dashed)
    broker = lk.LocalKafka(tmp_path / "kafka", 1, 2, lib)
    broker.home.mkdir(parents=True)
    broker._format_storage(broker._write_config())
    meta = (tmp_path / "kafka" / "data" / "meta.properties").read_text()
    assert "cluster.id=-" in meta
