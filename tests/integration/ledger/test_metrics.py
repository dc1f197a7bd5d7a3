"""The ledger service's /metrics, scraped over HTTP from ``python -m services.ledger.app`` on real
Kafka and PostgreSQL: the counts an operator sees match what the ledger decided."""

from __future__ import annotations

import asyncio
import random
import socket
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.events.topics import TopicSpec, dlq_topic
from shared.messaging.admin import ensure_topics
from tests.support import ledger_run as R

NewTopic = Callable[..., Awaitable[str]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _by_label(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str
              ) -> dict[str, float]:
    return {dict(labels).get("partition") or dict(labels).get("outcome") or "": value
            for (n, labels), value in samples.items() if n == name}


@pytest.mark.timeout(120)
async def test_metrics_count_what_the_ledger_decided(
        kafka_bootstrap: str, new_topic: NewTopic, db_url: str, pool: asyncpg.Pool,
        tmp_path: Path) -> None:
    commands = await new_topic("ledger.commands", partitions=4)
    results = await new_topic("ledger.results", partitions=4)
    s = R.make_scenario(random.Random(11), accounts=20, transfers=400, reply_to=results,
                        invalid_every=23)
    garbage: list[R.Item] = [(b'{"not": "an envelope"}', b"k1"), (b"\xff\xfe", b"k2")]
    group = f"writer-{commands}"
    await ensure_topics(kafka_bootstrap, [TopicSpec(dlq_topic(group), 1)])
    port = _free_port()
    async with R.Processes(db_url=db_url, bootstrap=kafka_bootstrap, topic=commands,
                           log_dir=tmp_path) as procs:
        writer = await procs.start(group, "writer", metrics_port=port)
        # Kafka orders records within a partition only: the transfers (on every partition) go
        # out once the accounts and funding (on partition 0) are applied, as a client must.
        await R.publish(kafka_bootstrap, commands, s.setup_items(), partition=0)
        await R.wait_applied_and_relayed(pool, commands, len(s.setup), timeout_s=60,
                                         procs=procs)
        await R.publish(kafka_bootstrap, commands, s.transfer_items() + garbage)
        total = len(s.setup) + len(s.transfers) + len(garbage)
        await R.wait_applied_and_relayed(pool, commands, total, timeout_s=60, procs=procs)

        async def answered_everything() -> bool:
            try:
                scraped = await asyncio.to_thread(_scrape, port)
            except OSError:  # not serving yet
                return False
            unanswered = _by_label(scraped, "harbour_ledger_unanswered")
            return bool(unanswered) and not any(unanswered.values())

        await R.wait_for("the unanswered gauges to reach 0", answered_everything, timeout_s=10,
                         detail=procs.logs)
        samples = await asyncio.to_thread(_scrape, port)
        assert await writer.stop() == 0, procs.logs()

    rejected = len(s.expected_rejections())
    assert rejected > 0  # the scenario exercises rejections
    assert _by_label(samples, "harbour_ledger_commands_total") == {
        "accepted": total - len(garbage) - rejected, "rejected": rejected,
        "dead_lettered": len(garbage), "replayed": 0, "skipped": 0}
    lag = _by_label(samples, "harbour_ledger_consumer_lag")
    assert set(lag) == {"0", "1", "2", "3"} and not any(lag.values()), lag
    batches = samples[("harbour_ledger_batch_records_count", ())]
    assert batches >= 1
    assert samples[("harbour_ledger_batch_records_sum", ())] == total
    assert samples[("harbour_ledger_batch_seconds_count", ())] == batches
    assert samples[("harbour_ledger_last_batch_timestamp_seconds", ())] > 0
    assert samples[("harbour_ledger_answers_spilled_total", ())] == 0
    # The process itself comes from the process-wide registry, served alongside.
    assert samples[("process_resident_memory_bytes", ())] > 0
    # The in-process relay (expiry answers, refused answers): leading, idle, no errors.
    assert samples[("harbour_ledger_relay_leader", ())] == 1
    assert samples[("harbour_ledger_relay_published_total", ())] == 0
    assert samples[("harbour_ledger_relay_errors_total", ())] == 0
