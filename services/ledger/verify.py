"""``harbour verify``: recompute every hash chain and every balance from the journal.

A fund administrator runs this against a copy of the database to check, independently of the
writer, that no journal row was altered, removed or reordered (the chains) and that the balance
projection equals what the entries say (the balances). The first mismatch is named.

A chain proves its own consistency, not its history: someone with superuser rights could rewrite a
posting and recompute every hash after it. Anchors close that gap. An anchor is a chain position
kept outside the database: ``harbour ledger anchor`` prints the chain heads for ops to file away
(write-once storage, an auditor's mailbox), and every ``PostingAccepted`` a client received is
one too (partition, sequence, hash). ``harbour verify --anchors FILE`` then requires each anchored
position to still carry its anchored hash, so history before an anchor cannot change unnoticed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from . import domain as d
from .repository import CHAIN_PHASE, entry_from_row


@dataclass(frozen=True, slots=True)
class Anchor:
    """A chain position recorded outside the database."""

    partition: int
    sequence: int
    hash: bytes

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Anchor:
        """From ``harbour ledger anchor`` output or a ``PostingAccepted`` payload.

        Raises:
            ValueError: a field is missing or of the wrong kind.
        """
        try:
            partition, sequence, digest = raw["partition"], raw["sequence"], raw["hash"]
        except KeyError as missing:
            raise ValueError(f"anchor without {missing}: {raw}") from None
        if type(partition) is not int or type(sequence) is not int or not isinstance(digest, str):
            raise ValueError(f"anchor needs integer partition and sequence and a hex hash: {raw}")
        return cls(partition, sequence, bytes.fromhex(digest))

    def to_json(self) -> dict[str, Any]:
        return {"partition": self.partition, "sequence": self.sequence, "hash": self.hash.hex()}


def read_anchors(lines: Iterable[str]) -> list[Anchor]:
    """Anchors from JSON lines (blank lines skipped).

    Raises:
        ValueError: a line is not an anchor; its number is in the message.
    """
    anchors = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                anchors.append(Anchor.from_json(json.loads(line)))
            except (ValueError, TypeError) as bad:
                raise ValueError(f"line {number}: {bad}") from None
    return anchors


async def chain_heads(conn: asyncpg.Connection) -> list[Anchor]:
    """The current head of every chain: what ``harbour ledger anchor`` prints."""
    rows = await conn.fetch("SELECT partition, sequence, hash FROM ledger.chain_heads "
                            "ORDER BY partition")
    return [Anchor(r["partition"], r["sequence"], bytes(r["hash"])) for r in rows]


@dataclass
class VerifyReport:
    postings: int = 0
    partitions: int = 0
    accounts: int = 0
    anchors: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    @property
    def first_mismatch(self) -> str | None:
        return self.mismatches[0] if self.mismatches else None


async def verify(pool: asyncpg.Pool, *, anchors: Sequence[Anchor] = (),
                 limit_mismatches: int = 20) -> VerifyReport:
    """Check references, chains (and ``anchors``), balances, then that every asset nets to
    zero."""
    report = VerifyReport()
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                        readonly=True):
        await _check_references(conn, report)
        await _check_chains(conn, report, anchors)
        await _check_balances(conn, report)
        await _check_assets_net_zero(conn, report)
    del report.mismatches[limit_mismatches:]
    return report


async def _postings(conn: asyncpg.Connection) -> AsyncIterator[tuple[asyncpg.Record, list[Any]]]:
    """Postings in chain order with their entries (both cursors stream; nothing is held whole)."""
    entries = conn.cursor(
        """SELECT e.posting_id, e.idx, e.account_id, e.asset, e.direction, e.phase, e.amount
           FROM ledger.entries e JOIN ledger.postings p ON p.id = e.posting_id
           ORDER BY p.partition, p.sequence, e.idx""", prefetch=5000)
    pending_entry = None
    entry_iter = entries.__aiter__()
    async for posting in conn.cursor(
            "SELECT * FROM ledger.postings ORDER BY partition, sequence", prefetch=2000):
        rows = []
        if pending_entry is not None and pending_entry["posting_id"] == posting["id"]:
            rows.append(pending_entry)
            pending_entry = None
        if pending_entry is None:
            async for e in entry_iter:
                if e["posting_id"] != posting["id"]:
                    pending_entry = e
                    break
                rows.append(e)
        yield posting, rows


_BROKEN_REFERENCES = """
SELECT e.posting_id, e.idx, e.account_id, e.asset,
       p.id IS NULL AS no_posting, a.id IS NULL AS no_account, a.asset AS account_asset
FROM ledger.entries e
LEFT JOIN ledger.postings p ON p.id = e.posting_id
LEFT JOIN ledger.accounts a ON a.id = e.account_id
WHERE p.id IS NULL OR a.id IS NULL OR a.asset <> e.asset
ORDER BY e.posting_id, e.idx
LIMIT $1
"""


async def _check_references(conn: asyncpg.Connection, report: VerifyReport, limit: int = 20
                            ) -> None:
    """Every entry belongs to a posting and to an account of its asset.

    The journal has no foreign keys on its hot path (migration 0002): the writer guarantees these
    references, and this check proves them without trusting the writer.
    """
    for r in await conn.fetch(_BROKEN_REFERENCES, limit):
        where = f"entry {r['posting_id']}#{r['idx']}"
        if r["no_posting"]:
            report.mismatches.append(f"{where}: posting {r['posting_id']} does not exist")
        elif r["no_account"]:
            report.mismatches.append(f"{where}: account {r['account_id']} does not exist")
        else:
            report.mismatches.append(
                f"{where}: asset {r['asset']} but account {r['account_id']} holds "
                f"{r['account_asset']}")


async def _check_chains(conn: asyncpg.Connection, report: VerifyReport,
                        anchors: Sequence[Anchor]) -> None:
    heads = {r["partition"]: (r["sequence"], bytes(r["hash"]))
             for r in await conn.fetch("SELECT * FROM ledger.chain_heads")}
    anchored = {(a.partition, a.sequence): a.hash for a in anchors}
    found: dict[tuple[int, int], bytes] = {}
    last: dict[int, tuple[int, bytes]] = {}
    async for posting, entries in _postings(conn):
        report.postings += 1
        partition = posting["partition"]
        sequence, prev = last.get(partition, (0, d.GENESIS_HASH))
        where = f"posting {posting['id']} (partition {partition}, sequence {posting['sequence']})"
        if posting["sequence"] != sequence + 1:
            report.mismatches.append(f"{where}: sequence gap after {sequence}")
        digest = d.chain_hash(prev, d.canonical_posting_bytes(_as_result(posting, entries)))
        if digest != bytes(posting["hash"]):
            report.mismatches.append(f"{where}: hash does not match its content and chain")
        last[partition] = (posting["sequence"], bytes(posting["hash"]))
        if (partition, posting["sequence"]) in anchored:
            found[partition, posting["sequence"]] = digest  # recomputed, not as stored
    report.partitions = len(last)
    report.anchors = len(anchored)
    for (partition, sequence), digest in sorted(anchored.items()):
        where = f"anchor partition {partition} sequence {sequence}"
        if (partition, sequence) not in found:
            report.mismatches.append(f"{where}: no such posting (the chain was cut short)")
        elif found[partition, sequence] != digest:
            report.mismatches.append(
                f"{where}: the journal hashes to {found[partition, sequence].hex()[:16]}..., "
                f"the anchor says {digest.hex()[:16]}... (history up to it was rewritten)")
    for partition, head in sorted(heads.items()):
        if last.get(partition) != head:
            report.mismatches.append(f"chain head of partition {partition} does not match")


def _as_result(posting: asyncpg.Record, entries: list[asyncpg.Record]) -> d.Result:
    phase = CHAIN_PHASE.get(posting["kind"], "posted")
    return d.Result(
        command_id=posting["id"], kind=posting["kind"], accepted=True,
        entries=tuple(entry_from_row(e) for e in entries if e["phase"] == phase),
        effective_at=posting["effective_at"], metadata=_json(posting["metadata"]),
        refs=tuple(posting["refs"]), settlement_group=posting["settlement_group"],
        timeout_at=posting["timeout_at"],
    )


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


_RECOMPUTED_BALANCES = """
WITH sums AS (
    SELECT account_id,
           sum(amount) FILTER (WHERE direction = 'D' AND phase = 'posted') AS dp,
           sum(amount) FILTER (WHERE direction = 'C' AND phase = 'posted') AS cp,
           coalesce(sum(amount) FILTER (WHERE direction = 'D' AND phase = 'pending'), 0)
             - coalesce(sum(amount) FILTER (WHERE direction = 'D' AND phase = 'release'), 0) AS dq,
           coalesce(sum(amount) FILTER (WHERE direction = 'C' AND phase = 'pending'), 0)
             - coalesce(sum(amount) FILTER (WHERE direction = 'C' AND phase = 'release'), 0) AS cq
    FROM ledger.entries GROUP BY account_id
)
SELECT b.account_id,
       b.debits_posted, b.credits_posted, b.debits_pending, b.credits_pending,
       coalesce(s.dp, 0) AS dp, coalesce(s.cp, 0) AS cp,
       coalesce(s.dq, 0) AS dq, coalesce(s.cq, 0) AS cq
FROM ledger.balances b LEFT JOIN sums s ON s.account_id = b.account_id
ORDER BY b.account_id
"""


async def _check_balances(conn: asyncpg.Connection, report: VerifyReport) -> None:
    for r in await conn.fetch(_RECOMPUTED_BALANCES):
        report.accounts += 1
        stored = (r["debits_posted"], r["credits_posted"], r["debits_pending"],
                  r["credits_pending"])
        recomputed = (r["dp"], r["cp"], r["dq"], r["cq"])
        if stored != recomputed:
            report.mismatches.append(
                f"account {r['account_id']}: balances {tuple(map(int, stored))} but entries say "
                f"{tuple(map(int, recomputed))}")


async def _check_assets_net_zero(conn: asyncpg.Connection, report: VerifyReport) -> None:
    rows = await conn.fetch(
        """SELECT a.asset, sum(b.debits_posted - b.credits_posted) AS net_posted,
                  sum(b.debits_pending - b.credits_pending) AS net_pending
           FROM ledger.balances b JOIN ledger.accounts a ON a.id = b.account_id
           GROUP BY a.asset ORDER BY a.asset""")
    for r in rows:
        if r["net_posted"] != 0 or r["net_pending"] != 0:
            report.mismatches.append(
                f"asset {r['asset']} does not net to zero: posted {r['net_posted']}, "
                f"pending {r['net_pending']}")
