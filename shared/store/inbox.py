"""Exactly-once effects for consumers: one inbox row per (consumer, message) processed.

The claim is written in the same transaction as the consumer's effect (eventsourcing's
``ProcessRecorder`` tracking row): a redelivered record finds its row and the caller skips the
effect; if the transaction rolls back, the claim goes with it and a redelivery applies the
effect. Two deliveries racing on different connections serialise on the primary key: the second
waits for the first to commit (then gets ``False``) or roll back (then gets ``True``).
"""

from __future__ import annotations

import asyncpg

from shared.store.errors import require_transaction, translated
from shared.store.pool import qualified


class Inbox:
    """The ``inbox`` table of one service schema."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        table = qualified(schema, "inbox")
        self._claim_sql = f"""
            INSERT INTO {table} (consumer, message_id) VALUES ($1, $2)
            ON CONFLICT (consumer, message_id) DO NOTHING
            RETURNING true"""
        self._seen_sql = (
            f"SELECT EXISTS (SELECT 1 FROM {table} WHERE consumer = $1 AND message_id = $2)"
        )

    async def claim(self, conn: asyncpg.Connection, consumer: str, message_id: str) -> bool:
        """Record that ``consumer`` processes ``message_id`` in the caller's transaction.

        Returns:
            True the first time: apply the effect in the same transaction. False when this
            consumer already processed the message: skip the effect (it is a duplicate).

        Raises:
            RuntimeError: ``conn`` is not in a transaction.
        """
        require_transaction(conn, "Inbox.claim")
        with translated():
            return bool(await conn.fetchval(self._claim_sql, consumer, message_id))

    async def seen(self, conn: asyncpg.Connection, consumer: str, message_id: str) -> bool:
        """Whether ``consumer`` has a committed claim for ``message_id`` (diagnostics, tests)."""
        with translated():
            return bool(await conn.fetchval(self._seen_sql, consumer, message_id))
