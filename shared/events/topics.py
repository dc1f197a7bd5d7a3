"""Every Kafka topic Harbour uses, declared once: names, partitions, retention.

``harbour topics`` creates them; services import the names from here. The record key is always the
aggregate/stream id (per-stream order); see each producer.
"""

from __future__ import annotations

from dataclasses import dataclass

DAY_MS = 24 * 60 * 60 * 1000


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    retention_ms: int = 7 * DAY_MS
    compacted: bool = False

    def config(self) -> dict[str, str]:
        return {
            "retention.ms": str(self.retention_ms),
            "cleanup.policy": "compact" if self.compacted else "delete",
            # Records already carry their business time; broker time says when Kafka saw them.
            "message.timestamp.type": "CreateTime",
        }


def dlq_topic(group_id: str) -> str:
    """The dead-letter topic of one consumer group (one per group, DESIGN.md)."""
    return f"{group_id}.dlq"


LEDGER_COMMANDS = "ledger.commands"
LEDGER_RESULTS = "ledger.results"
DEPOSITS_COMMANDS = "deposits.commands"
DEPOSITS_EVENTS = "deposits.events"
RESERVES_COMMANDS = "reserves.commands"
RESERVES_EVENTS = "reserves.events"
CLEARING_COMMANDS = "clearing.commands"
CLEARING_EVENTS = "clearing.events"
BRIDGE_COMMANDS = "bridge.commands"
BRIDGE_EVENTS = "bridge.events"
# Ledger results addressed to one service (the ledger answers on the reply topic a command names).
DEPOSITS_LEDGER_RESULTS = "deposits.ledger-results"

# Consumer groups, one per service role; each has its dead-letter topic below.
LEDGER_WRITER_GROUP = "harbour.ledger.writer"
DEPOSITS_GROUP = "harbour.deposits"
RESERVES_GROUP = "harbour.reserves"
CLEARING_GROUP = "harbour.clearing"
BRIDGE_GROUP = "harbour.bridge"
CONSUMER_GROUPS = (
    LEDGER_WRITER_GROUP, DEPOSITS_GROUP, RESERVES_GROUP, CLEARING_GROUP, BRIDGE_GROUP,
)

# Ledger topics get the most partitions: the writer is partition-parallel and scales by them.
_LEDGER_PARTITIONS = 8
_SERVICE_PARTITIONS = 4

TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(LEDGER_COMMANDS, _LEDGER_PARTITIONS, retention_ms=30 * DAY_MS),
    TopicSpec(LEDGER_RESULTS, _LEDGER_PARTITIONS, retention_ms=30 * DAY_MS),
    TopicSpec(DEPOSITS_COMMANDS, _SERVICE_PARTITIONS),
    TopicSpec(DEPOSITS_EVENTS, _SERVICE_PARTITIONS, retention_ms=30 * DAY_MS),
    TopicSpec(DEPOSITS_LEDGER_RESULTS, _SERVICE_PARTITIONS, retention_ms=30 * DAY_MS),
    TopicSpec(RESERVES_COMMANDS, _SERVICE_PARTITIONS),
    TopicSpec(RESERVES_EVENTS, _SERVICE_PARTITIONS, retention_ms=30 * DAY_MS),
    TopicSpec(CLEARING_COMMANDS, _SERVICE_PARTITIONS),
    TopicSpec(CLEARING_EVENTS, _SERVICE_PARTITIONS, retention_ms=30 * DAY_MS),
    TopicSpec(BRIDGE_COMMANDS, _SERVICE_PARTITIONS),
    TopicSpec(BRIDGE_EVENTS, _SERVICE_PARTITIONS, retention_ms=30 * DAY_MS),
    # Dead letters are kept long: ops inspect and replay them.
    *(TopicSpec(dlq_topic(g), 1, retention_ms=90 * DAY_MS) for g in CONSUMER_GROUPS),
)
