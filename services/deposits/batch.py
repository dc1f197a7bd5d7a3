"""What one batch of deposits messages reads and writes (``DepositsService.handle_batch``).

A Kafka batch is decided message by message, in partition order, but read and written once:

- :class:`BatchView` is everything the batch's decisions need, read in one query (the streams'
  newer events, the participants and wallets they name, the settlement queues they may join, the
  inbox claims of their messages) and kept current *in memory* as the batch's own decisions change
  it: a wallet frozen by message 3 is frozen for message 7, a transfer queued by message 2 counts
  in the queue depth message 5 sees. Each decision thus sees exactly what it would have seen had
  the messages before it been committed one by one;
- :class:`BatchPlan` gathers the rows of every decision for one call of
  ``deposits.record_decisions`` (migration 0002): one round trip and one commit per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from pydantic_core import to_json

from shared.errors import HarbourError
from shared.events import deposits as ev
from shared.store.event_store import NewEvent
from shared.store.outbox import OutboxMessage

from . import domain as dm

__all__ = ["READ_SQL", "RECORD_SQL", "BatchPlan", "BatchView"]


@dataclass(slots=True)
class BatchView:
    """The batch's reads, overlaid with its own decisions (module docstring)."""

    states: dict[str, tuple[int, Any]] = field(default_factory=dict)
    """Per stream: (version, state) as of the decisions so far."""
    participants: dict[str, dm.Participant] = field(default_factory=dict)
    wallets: dict[str, dm.Wallet] = field(default_factory=dict)
    queue_sizes: dict[str, int] = field(default_factory=dict)
    """Per queue key: how many transfers wait in it."""
    queued: dict[str, str] = field(default_factory=dict)
    """The batch's transfers (uetr) that wait in a queue, and which."""
    claimed: set[tuple[str, str]] = field(default_factory=set)
    """(consumer, message id) already processed: stored, or earlier in this batch."""

    def depth(self, instruction: ev.TransferInstruction) -> dict[str, int]:
        """``Context.queue_depth`` for a transfer: its payer's queue, without itself."""
        key = dm.queue_key(instruction.payer_participant, instruction.currency)
        itself = 1 if self.queued.get(instruction.uetr) == key else 0
        waiting = self.queue_sizes.get(key, 0) - itself
        return {key: waiting} if waiting else {}

    def decided(self, stream: str, version: int, state: Any) -> None:
        """A decision of the batch changed ``stream``: later decisions see its new state."""
        self.states[stream] = (version, state)
        match state:
            case dm.Participant():
                self.participants[state.request.participant_id] = state
            case dm.Wallet():
                key = dm.wallet_key(state.request.participant_id, state.request.wallet_id)
                self.wallets[key] = state
            case dm.Transfer():
                self._requeue(state)

    def _requeue(self, transfer: dm.Transfer) -> None:
        entry = dm.queue_entry(transfer)
        before = self.queued.pop(transfer.uetr, None)
        after = entry.queue_key if entry is not None else None
        if before is not None:
            self.queue_sizes[before] = self.queue_sizes.get(before, 1) - 1
        if after is not None:
            self.queued[transfer.uetr] = after
            self.queue_sizes[after] = self.queue_sizes.get(after, 0) + 1


@dataclass(slots=True)
class BatchPlan:
    """The rows of a batch's decisions, as the arrays of ``deposits.record_decisions``."""

    consumers: list[str] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)
    expected: dict[str, int] = field(default_factory=dict)
    """Per stream appended to: the version the batch's first decision on it started from."""
    events: list[tuple[str, int, NewEvent]] = field(default_factory=list)
    outbox: list[OutboxMessage] = field(default_factory=list)
    routes: list[tuple[str, str, str, str]] = field(default_factory=list)
    views: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    """Per stream: its read-model table and row (the last state of the batch wins)."""
    refusals: list[dict[str, Any]] = field(default_factory=list)
    wakeups: list[tuple[str, datetime | None]] = field(default_factory=list)
    """Transfers an internal command left unchanged, and their next wake-up (not part of the
    decisions' transaction: a lost one only wakes the transfer again)."""

    def __bool__(self) -> bool:
        return bool(self.consumers or self.events)

    def claim(self, consumer: str, message_id: str) -> None:
        self.consumers.append(consumer)
        self.message_ids.append(message_id)

    def refuse(self, row: dict[str, Any]) -> None:
        self.refusals.append(row)

    def append(self, stream: str, version: int, stored: list[NewEvent],
               messages: list[OutboxMessage], asked: list[ev.LedgerCommandRequested]) -> None:
        """Events ``version + 1 ...`` of ``stream``, their outbox rows and ledger routes."""
        self.expected.setdefault(stream, version)
        self.events += [(stream, version + n, e) for n, e in enumerate(stored, start=1)]
        self.outbox += messages
        self.routes += [(e.ledger_key, stream, e.purpose, e.command_id) for e in asked]

    def view(self, stream: str, table: str | None, row: dict[str, Any] | None) -> None:
        if table is not None and row is not None:
            self.views[stream] = (table, row)

    def arguments(self) -> tuple[Any, ...]:
        """The parameters of :data:`RECORD_SQL`, in order."""
        rows: dict[str, list[dict[str, Any]]] = {
            "transfers": [], "conversions": [], "participants": [], "wallets": []}
        for table, row in self.views.values():
            rows[table].append(row)
        streams = list(self.expected)
        return (
            self.consumers, self.message_ids, streams, [self.expected[s] for s in streams],
            [s for s, _, _ in self.events], [v for _, v, _ in self.events],
            [e.event_id for _, _, e in self.events], [e.type for _, _, e in self.events],
            [e.schema_version for _, _, e in self.events],
            [_json(e.payload) for _, _, e in self.events],
            [_json(e.metadata) for _, _, e in self.events],
            [m.topic for m in self.outbox], [m.key for m in self.outbox],
            [m.value for m in self.outbox], [_json(m.headers) for m in self.outbox],
            [r[0] for r in self.routes], [r[1] for r in self.routes],
            [r[2] for r in self.routes], [r[3] for r in self.routes],
            _json(rows["transfers"]), _json(rows["conversions"]),
            _json(rows["participants"]), _json(rows["wallets"]), _json(self.refusals))


def _json(value: Any) -> str:
    """JSON text for a jsonb parameter: pydantic-core's encoder, three times the stdlib's speed
    on these rows (a batch encodes several per message)."""
    return to_json(value).decode()


def refusal_row(message_id: str, stream: str, command_type: str, participant: str,
                refusal: HarbourError) -> dict[str, Any]:
    """A ``deposits.refusals`` row: the audit trail of a command refused by a rule (X-7)."""
    return {"message_id": message_id, "stream_id": stream, "command_type": command_type,
            "participant": participant, "code": refusal.code, "detail": refusal.message[:1000]}


# Kinds: e = an event of a stream (extra: the stream), p = a participant, w = a wallet,
# q = how many transfers wait in a queue, m = a transfer of the batch that waits (in queue `raw`),
# i = an inbox claim (raw: the consumer).
READ_SQL: Final = """
    SELECT 'e'::text AS kind, e.stream_version AS number, e.type AS key, e.schema_version,
           e.payload::text AS raw, e.stream_id AS extra
    FROM deposits.events e
    JOIN unnest($1::text[], $2::int[]) AS s(stream_id, after)
      ON e.stream_id = s.stream_id AND e.stream_version > s.after
    UNION ALL
    SELECT 'p', stream_version, participant_id, 0, state::text, NULL
    FROM deposits.participants WHERE participant_id = ANY($3::text[])
    UNION ALL
    SELECT 'w', w.stream_version, w.participant_id || ':' || w.wallet_id, 0, w.state::text, NULL
    FROM deposits.wallets w
    JOIN unnest($4::text[], $5::text[]) AS k(participant_id, wallet_id)
      ON w.participant_id = k.participant_id AND w.wallet_id = k.wallet_id
    UNION ALL
    SELECT 'q', count(*)::int, queue_key, 0, NULL, NULL
    FROM deposits.transfers WHERE queue_key = ANY($6::text[]) GROUP BY queue_key
    UNION ALL
    SELECT 'm', 0, uetr, 0, queue_key, NULL
    FROM deposits.transfers WHERE uetr = ANY($7::text[]) AND queue_key IS NOT NULL
    UNION ALL
    SELECT 'i', 0, i.message_id, 0, i.consumer, NULL
    FROM deposits.inbox i
    JOIN unnest($8::text[], $9::text[]) AS k(consumer, message_id)
      ON i.consumer = k.consumer AND i.message_id = k.message_id
"""

RECORD_SQL: Final = """
    SELECT deposits.record_decisions($1, $2, $3, $4, $5, $6, $7::uuid[], $8, $9, $10, $11,
        $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24)
"""
