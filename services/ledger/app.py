"""Composition root of the ledger service: pool, writer loop, results relay. ``python -m
services.ledger.app`` runs it until SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":
    # A stop requested while the process is still importing (a supervisor or test stopping it
    # right after start) must end it cleanly, not kill it by the signal's default action.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

import asyncio
import contextlib
import logging
import subprocess

import asyncpg

from shared.config import KafkaSettings, PostgresSettings
from shared.metrics import serve_metrics
from shared.runtime import run_service
from shared.store.outbox import OutboxRelay

from .consumer import WriterLoop
from .metrics import WriterMetrics
from .relay import spawn_child
from .settings import ANSWERS_RETENTION, LedgerSettings
from .writer import LedgerWriter

log = logging.getLogger("harbour.ledger")


async def run_ledger(
    kafka: KafkaSettings, postgres: PostgresSettings, settings: LedgerSettings, stop: asyncio.Event
) -> None:
    """Run the writer group members and the ledger's results relay until ``stop``."""
    # No JSON codecs on this pool: the writer sends jsonb as text (COPY cannot cast).
    # backend_flush_after: COPY writes the journal's new pages out through a small ring of
    # buffers, into the kernel's page cache, where they sat until its writeback flushed them all
    # at once, every 5 s; COMMITs (a WAL fsync on the same disk) waiting behind those bursts took
    # 27 to 49 ms. With it the kernel is told to write each 256 kB at once, in the background:
    # 0.014 such COMMITs per second of bench load instead of 0.033 (six runs against ten).
    pool = await asyncpg.create_pool(
        postgres.database_url,
        min_size=2,
        max_size=settings.pool_size,
        server_settings={"application_name": "harbour-ledger", "backend_flush_after": "256kB"},
        reset=_end_transaction_only,
    )
    assert pool is not None
    ledger = LedgerWriter(pool, topic=settings.commands_topic, group_id=settings.group_id)
    # One group member per process; scale out with more processes. (Two members in one process
    # rebalanced each other under load.)
    metrics = WriterMetrics()
    serve_metrics(metrics.registry, settings.metrics_port)
    writers = [
        WriterLoop(pool, ledger, kafka.kafka_bootstrap, topic=settings.commands_topic,
                   group_id=settings.group_id, max_records=settings.max_batch,
                   instance_id=settings.instance_id, metrics=metrics)
    ]
    tasks = [asyncio.create_task(w.run(), name=f"ledger-writer-{i}") for i, w in enumerate(writers)]
    relay: OutboxRelay | None = None
    children: list[subprocess.Popen[bytes]] = []
    if settings.relay_process:
        tasks.append(asyncio.create_task(_keep_relay_running(children, stop), name="relay-child"))
    else:
        # Its own connection, not the pool's: it holds an advisory lock and LISTENs, session
        # state that this pool does not reset (see _end_transaction_only).
        relay = OutboxRelay(postgres.database_url, "ledger", kafka.kafka_bootstrap,
                            batch_size=settings.relay_batch, poll_interval_s=0.5,
                            retention=ANSWERS_RETENTION)
        metrics.watch_relay(relay.stats)
        tasks.append(asyncio.create_task(relay.run(), name="ledger-relay"))
    try:
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([*tasks, stopped], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopped and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for w in writers:
            w.stop()
        if relay is not None:
            relay.stop()
        for child in children:
            child.terminate()
            await asyncio.to_thread(child.wait, 15)
        for task in tasks:
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(task, timeout=15)
        await pool.close()


async def _end_transaction_only(conn: asyncpg.Connection) -> None:
    """Pool reset for the writer's connections. asyncpg's default runs ``RESET ALL``, ``UNLISTEN
    *`` and unlocks advisory locks on every release: one more round trip per batch, and the
    writer sets none of those. What it must never hand on is an open transaction."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def _keep_relay_running(children: list[subprocess.Popen[bytes]], stop: asyncio.Event) -> None:
    """Run the relay child; start it again if it dies (results must keep flowing)."""
    while not stop.is_set():
        if not children or children[-1].poll() is not None:
            if children:
                log.warning("relay child exited with %s; restarting", children[-1].returncode)
            children[:] = [spawn_child()]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)


# The writer's batches create no reference cycles (tests/unit/test_ledger_gc.py holds it to
# that), so the cyclic collector only ever finds what asyncio and the clients leave behind: about
# 500 objects in a whole `harbour bench ledger` run. At the shared 100,000 threshold it still ran
# during every burst, each time walking the 2,000-record batch in flight and the one staged behind
# it, all alive: young collections of 40 to 124 ms in the bench's throughput phases, a stall for
# every posting in flight. A million makes it a safety net that a leak would trip, and a whole
# bench run passes with no collection at all (peak RSS unchanged at 113 to 119 MiB).
WRITER_YOUNG_GC_THRESHOLD = 1_000_000


def main() -> None:
    run_service("ledger writer", lambda stop: run_ledger(
        KafkaSettings(), PostgresSettings(), LedgerSettings(), stop),
        young_gc_threshold=WRITER_YOUNG_GC_THRESHOLD)


if __name__ == "__main__":
    main()
