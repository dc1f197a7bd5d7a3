"""Ledger service settings (``HARBOUR_LEDGER_*``)."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.events.topics import LEDGER_COMMANDS, LEDGER_WRITER_GROUP

# The ledger's outbox rows are expiry answers, which ledger.results keeps for good: each row is
# deleted as soon as Kafka has it (cheaper for PostgreSQL than marking it sent).
ANSWERS_RETENTION = timedelta(0)


class LedgerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HARBOUR_LEDGER_", extra="ignore", frozen=True)

    commands_topic: str = LEDGER_COMMANDS
    group_id: str = LEDGER_WRITER_GROUP
    # The outbox relay carries only expiry answers now (the writer publishes the rest itself);
    # run it in this process by default, or in a child process of its own.
    relay_process: bool = False
    max_batch: int = 2000  # records per transaction: larger batches amortise commit cost
    relay_batch: int = 2000  # results published per relay round
    pool_size: int = 8
    # Static group membership (Kafka KIP-345): a writer restarted with the same id gets its
    # partitions back at once, instead of after the dead member's session timeout (10 s of no
    # settlement on those partitions). Unique per running writer: a pod or host name (two live
    # writers with one id fence each other in Kafka; PostgreSQL's offset locks keep even that
    # exactly-once, but it is a misconfiguration). Unset: dynamic membership.
    instance_id: str | None = None
    # Prometheus /metrics (services/ledger/metrics.py) on this port; 0: none. Two writers on one
    # host need a port each: the second one logs that the port is taken and settles on.
    metrics_port: int = Field(9101, ge=0, le=65535)
