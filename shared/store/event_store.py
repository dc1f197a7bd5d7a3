"""Append-only event streams in a service's own schema, with optimistic concurrency.

The table is created by ``harbour.create_service_store`` (0001_platform.sql). Modelled on
eventsourcing's Postgres recorder: the primary key ``(stream_id, stream_version)`` is the
concurrency guard, so two writers that both decided from version N cannot both append N+1.

Everything here runs on the caller's connection inside the caller's transaction, so events,
outbox rows and the inbox claim commit or roll back together (DESIGN.md, "Exactly-once").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from shared.errors import ConcurrencyError
from shared.store.errors import require_transaction, translated
from shared.store.pool import qualified


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append. ``event_id`` is chosen by the producer (time-ordered where possible)
    and travels unchanged into the envelope, so consumers can dedupe on it."""

    event_id: UUID
    type: str
    schema_version: int
    payload: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as recorded: its place in the stream and in the schema-wide order."""

    stream_id: str
    stream_version: int
    global_position: int
    event_id: UUID
    type: str
    schema_version: int
    payload: dict[str, Any]
    metadata: dict[str, Any]
    recorded_at: datetime


class EventStore:
    """The ``events`` table of one service schema."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        table = qualified(schema, "events")
        self._current_sql = (
            f"SELECT coalesce(max(stream_version), 0) FROM {table} WHERE stream_id = $1"
        )
        # One round trip for any number of events; JSON goes as text and is cast in SQL so the
        # store works whatever codecs the caller's connection has.
        self._append_sql = f"""
            INSERT INTO {table}
                (stream_id, stream_version, event_id, type, schema_version, payload, metadata)
            SELECT $1, $2 + e.ord, e.event_id, e.type, e.schema_version,
                   e.payload::jsonb, e.metadata::jsonb
            FROM unnest($3::uuid[], $4::text[], $5::int[], $6::text[], $7::text[])
                 WITH ORDINALITY AS e(event_id, type, schema_version, payload, metadata, ord)
            ORDER BY e.ord"""
        self._load_sql = f"""
            SELECT stream_id, stream_version, global_position, event_id, type, schema_version,
                   payload::text AS payload, metadata::text AS metadata, recorded_at
            FROM {table}
            WHERE stream_id = $1 AND stream_version > $2
            ORDER BY stream_version"""

    async def current_version(self, conn: asyncpg.Connection, stream_id: str) -> int:
        """The stream's latest version; 0 when it has no events."""
        with translated():
            return int(await conn.fetchval(self._current_sql, stream_id))

    async def append(
        self,
        conn: asyncpg.Connection,
        stream_id: str,
        expected_version: int,
        events: Sequence[NewEvent],
    ) -> int:
        """Append ``events`` after ``expected_version``; return the stream's new version.

        Args:
            conn: a connection inside the caller's transaction.
            stream_id: the aggregate id (also the Kafka key of its outbox records).
            expected_version: the version the caller decided from; 0 for a new stream.
            events: in order; an empty sequence appends nothing.

        Raises:
            ConcurrencyError: the stream is not at ``expected_version``. When the conflict is
                found by the primary key (a concurrent writer committed first) the transaction
                is aborted: roll back, reload, decide again.
            DuplicateError: an event id is already stored (the same event appended twice).
            RuntimeError: ``conn`` is not in a transaction.
        """
        require_transaction(conn, "EventStore.append")
        if expected_version < 0:
            raise ValueError(f"expected_version must be >= 0, got {expected_version}")
        actual = await self.current_version(conn, stream_id)
        if actual != expected_version:
            raise _conflict(stream_id, expected_version, actual)
        if not events:
            return expected_version
        try:
            with translated():
                await conn.execute(
                    self._append_sql, stream_id, expected_version, *_columns(events)
                )
        except ConcurrencyError as exc:  # a concurrent writer committed the same version first
            raise _conflict(stream_id, expected_version, None) from exc
        return expected_version + len(events)

    async def load(
        self, conn: asyncpg.Connection, stream_id: str, after_version: int = 0
    ) -> list[StoredEvent]:
        """The stream's events with version > ``after_version``, in version order."""
        with translated():
            rows = await conn.fetch(self._load_sql, stream_id, after_version)
        return [_stored(row) for row in rows]


def _conflict(stream_id: str, expected: int, actual: int | None) -> ConcurrencyError:
    found = "a concurrent append" if actual is None else f"version {actual}"
    return ConcurrencyError(
        f"stream {stream_id!r} was expected at version {expected} but found {found}",
        stream_id=stream_id, expected_version=expected, actual_version=actual,
    )


def _columns(events: Sequence[NewEvent]) -> tuple[list[Any], ...]:
    return (
        [e.event_id for e in events],
        [e.type for e in events],
        [e.schema_version for e in events],
        [json.dumps(e.payload) for e in events],
        [json.dumps(e.metadata) for e in events],
    )


def _stored(row: asyncpg.Record) -> StoredEvent:
    return StoredEvent(
        stream_id=row["stream_id"],
        stream_version=row["stream_version"],
        global_position=row["global_position"],
        event_id=row["event_id"],
        type=row["type"],
        schema_version=row["schema_version"],
        payload=json.loads(row["payload"]),
        metadata=json.loads(row["metadata"]),
        recorded_at=row["recorded_at"],
    )
