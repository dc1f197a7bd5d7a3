"""The ledger's results relay as a process of its own: ``python -m services.ledger.relay``.

The relay publishes the ledger's outbox: the answers to expiries, which have no command record the
writer could answer them again from (the writer publishes every other answer itself, see
``answers.py``). By default it runs inside the writer's process (``HARBOUR_LEDGER_RELAY_PROCESS``
moves it to a child). One relay per schema holds the advisory lock (shared.store.outbox), so a
second one is a hot standby, and running it in or out of the writer's process is equally safe.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

from shared.config import KafkaSettings, PostgresSettings
from shared.runtime import die_with_parent, run_service
from shared.store.outbox import OutboxRelay

from .settings import ANSWERS_RETENTION, LedgerSettings


def spawn_child() -> subprocess.Popen[bytes]:
    """Start the relay as a child that dies with this process (Linux)."""
    return subprocess.Popen(
        [sys.executable, "-m", "services.ledger.relay"], preexec_fn=die_with_parent,
    )


async def run_relay(kafka: KafkaSettings, postgres: PostgresSettings, settings: LedgerSettings,
                    stop: asyncio.Event) -> None:
    relay = OutboxRelay(postgres.database_url, "ledger", kafka.kafka_bootstrap,
                        batch_size=settings.relay_batch, poll_interval_s=0.5,
                        retention=ANSWERS_RETENTION)
    task = asyncio.create_task(relay.run(), name="ledger-relay")
    await stop.wait()
    relay.stop()
    await asyncio.wait_for(task, timeout=15)


def main() -> None:
    run_service("ledger relay", lambda stop: run_relay(
        KafkaSettings(), PostgresSettings(), LedgerSettings(), stop))


if __name__ == "__main__":
    main()
