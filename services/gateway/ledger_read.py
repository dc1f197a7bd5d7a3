"""Reads of the ledger's read side (schema ``ledger``, SELECT only): asset scales, balances and
statements. Amounts stay integer minor units here; schemas.py formats them.

Sign convention (as ``harbour ledger balances``): an account flagged
``credits_must_not_exceed_debits`` is debit-normal (its balance is debits - credits), every
other account credit-normal (credits - debits).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import asyncpg

from .errors import ApiError

_ACCOUNT_COLUMNS: Final = """
SELECT a.id, a.participant, a.asset, s.scale, a.status,
       a.credits_must_not_exceed_debits AS debit_normal,
       coalesce(b.debits_posted, 0) AS debits_posted,
       coalesce(b.credits_posted, 0) AS credits_posted,
       coalesce(b.debits_pending, 0) AS debits_pending,
       coalesce(b.credits_pending, 0) AS credits_pending
FROM ledger.accounts a JOIN ledger.assets s ON s.code = a.asset
LEFT JOIN ledger.balances b ON b.account_id = a.id"""
_ONE_ACCOUNT: Final = _ACCOUNT_COLUMNS + " WHERE a.id = $1"
_ACCOUNTS: Final = _ACCOUNT_COLUMNS + """
WHERE ($1::text[] IS NULL OR a.participant = ANY($1)) AND ($2::text IS NULL OR a.asset = $2)
  AND a.id > $3
ORDER BY a.id LIMIT $4"""

# Keyset order of a statement: value date, then the ledger's own order, then the entry index.
_STATEMENT: Final = """
SELECT p.id AS posting_id, p.kind, p.partition, p.sequence, p.effective_at, p.recorded_at,
       p.metadata, e.idx, e.direction, e.amount
FROM ledger.entries e JOIN ledger.postings p ON p.id = e.posting_id
WHERE e.account_id = $1 AND e.phase = 'posted'
  AND p.effective_at >= $2 AND p.effective_at < $3
  AND (p.effective_at, p.partition, p.sequence, e.idx) > ($4, $5, $6, $7)
ORDER BY p.effective_at, p.partition, p.sequence, e.idx
LIMIT $8"""
_DEBITS_MINUS_CREDITS_UP_TO: Final = """
SELECT coalesce(sum(CASE WHEN e.direction = 'D' THEN e.amount ELSE -e.amount END), 0)
FROM ledger.entries e JOIN ledger.postings p ON p.id = e.posting_id
WHERE e.account_id = $1 AND e.phase = 'posted'
  AND (p.effective_at, p.partition, p.sequence, e.idx) <= ($2, $3, $4, $5)"""


@dataclass(frozen=True, slots=True)
class Position:
    """A place in an account's statement order (exclusive lower bound of the next page)."""

    effective_at: datetime
    partition: int = -1
    sequence: int = -1
    idx: int = -1

    def encode(self) -> str:
        raw = json.dumps([self.effective_at.isoformat(), self.partition, self.sequence, self.idx])
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, cursor: str) -> Position:
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            at, partition, sequence, idx = json.loads(raw)
            when = datetime.fromisoformat(at)
            if when.tzinfo is None or not all(type(v) is int for v in (partition, sequence, idx)):
                raise ValueError(cursor)
        except (ValueError, TypeError, UnicodeDecodeError):
            raise ApiError(400, "invalid_cursor", "the cursor was not issued by this API",
                           field="cursor") from None
        return cls(when, partition, sequence, idx)


def signed(debit_normal: bool, debits_minus_credits: int) -> int:
    return debits_minus_credits if debit_normal else -debits_minus_credits


class LedgerReader:
    """Read-only queries against the ledger schema, plus a cache of asset scales (an asset's
    scale never changes once defined, so a positive answer is cached for the process)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._scales: dict[str, int] = {}

    async def asset_scale(self, code: str) -> int | None:
        scale = self._scales.get(code)
        if scale is None:
            scale = await self._pool.fetchval(
                "SELECT scale FROM ledger.assets WHERE code = $1", code)
            if scale is not None:
                self._scales[code] = int(scale)
        return scale

    async def account(self, account_id: str) -> asyncpg.Record | None:
        return await self._pool.fetchrow(_ONE_ACCOUNT, account_id)

    async def accounts(self, participants: Iterable[str] | None, asset: str | None,
                       after: str, limit: int) -> list[asyncpg.Record]:
        owners = None if participants is None else sorted(participants)
        return await self._pool.fetch(_ACCOUNTS, owners, asset, after, limit)

    async def statement(self, account_id: str, start: datetime, end: datetime,
                        after: Position, limit: int) -> tuple[int, list[asyncpg.Record]]:
        """``limit`` posted entries after ``after`` within [start, end), and the account's
        debits - credits up to and including ``after`` (the opening of this page)."""
        async with self._pool.acquire() as conn, conn.transaction(
                isolation="repeatable_read", readonly=True):
            opening = await conn.fetchval(
                _DEBITS_MINUS_CREDITS_UP_TO, account_id, after.effective_at, after.partition,
                after.sequence, after.idx)
            rows = await conn.fetch(_STATEMENT, account_id, start, end, after.effective_at,
                                    after.partition, after.sequence, after.idx, limit)
        return int(opening), rows


def metadata_of(row: asyncpg.Record) -> dict[str, Any]:
    value = row["metadata"]
    return value if isinstance(value, dict) else {}
