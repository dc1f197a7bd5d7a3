"""SQL of the ledger writer: load what a batch touches (locked, in sorted order), write what it did.

Every function runs inside the caller's transaction. Loads take row locks in sorted key order so
that two writers touching the same accounts queue instead of deadlocking; writes are set-based
(COPY for the journal, one UPDATE ... FROM unnest for balances) so a batch costs a handful of
round trips whatever its size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from . import domain as d

_DIRECTION = {d.DEBIT: "D", d.CREDIT: "C"}
_FROM_DIRECTION: dict[str, d.Direction] = {"D": d.DEBIT, "C": d.CREDIT}
# The phase of the entries a posting's hash chain covers, by kind; the writer journals them and
# `harbour verify` rebuilds the chain from them, so both read this one table.
CHAIN_PHASE = {
    "post": "posted",
    "post_pending": "pending",
    "commit_pending": "posted",
    "commit_group": "posted",
    "void_pending": "release",
    "void_group": "release",
    "expire": "release",
}


def entry_from_row(row: asyncpg.Record) -> d.Entry:
    """An ``entries`` row (account_id, asset, direction, amount) as a domain entry."""
    return d.Entry(row["account_id"], row["asset"], _FROM_DIRECTION[row["direction"]],
                   int(row["amount"]))


Heads = dict[int, tuple[int, bytes]]

_LOCK_PROGRESS = """
SELECT c.partition, c.next_offset, coalesce(c.answered_offset, c.next_offset) AS answered,
       h.sequence, h.hash
FROM ledger.consumed_offsets c LEFT JOIN ledger.chain_heads h ON h.partition = c.partition
WHERE c.topic = $1 AND c.partition = ANY($2::int[])
ORDER BY c.partition FOR UPDATE OF c
"""


@dataclass(frozen=True, slots=True)
class Progress:
    """Where the ledger is on some partitions: the next record to apply, the first record whose
    answer Kafka may not have acknowledged (``answered <= next``), and the chain heads."""

    next: dict[int, int]
    answered: dict[int, int]
    heads: Heads


async def lock_offsets(conn: asyncpg.Connection, topic: str, first: dict[int, int]) -> Progress:
    """Lock the stored progress of ``first``'s partitions and return it.

    The lock fences a writer that lost its partitions in a rebalance: it waits here for the new
    owner's transaction and then sees that the records were applied already. It also makes the
    holder the only writer of those partitions' hash chains. A partition seen for the first time
    gets a row starting at its first offset (one extra round trip, once).
    """
    partitions = sorted(first)
    rows = await conn.fetch(_LOCK_PROGRESS, topic, partitions)
    if len(rows) < len(partitions):
        await conn.execute(
            """INSERT INTO ledger.consumed_offsets (topic, partition, next_offset, answered_offset)
               SELECT $1, p, o, o FROM unnest($2::int[], $3::bigint[]) AS t(p, o)
               ON CONFLICT DO NOTHING""",
            topic, partitions, [first[p] for p in partitions],
        )
        rows = await conn.fetch(_LOCK_PROGRESS, topic, partitions)
    return Progress(
        {r["partition"]: r["next_offset"] for r in rows},
        {r["partition"]: r["answered"] for r in rows},
        {r["partition"]: (r["sequence"], bytes(r["hash"])) for r in rows
         if r["sequence"] is not None},
    )


async def save_progress(conn: asyncpg.Connection, topic: str, next_offsets: dict[int, int],
                        heads: Heads, answered: dict[int, int] | None = None) -> None:
    """Store the next offsets, the answered watermarks and the chain heads in one round trip.

    A watermark only moves forward and never past the next offset. The caller holds the rows'
    locks (the fence), so no other writer's progress is touched here.
    """
    answered = answered or {}
    partitions = sorted(next_offsets.keys() | answered.keys())
    chains = sorted(heads)
    await conn.execute(
        """WITH progress AS (
               UPDATE ledger.consumed_offsets c
               SET next_offset = coalesce(t.o, c.next_offset),
                   answered_offset = least(greatest(coalesce(c.answered_offset, c.next_offset),
                                                    t.a),
                                           coalesce(t.o, c.next_offset))
               FROM unnest($2::int[], $3::bigint[], $7::bigint[]) AS t(p, o, a)
               WHERE c.topic = $1 AND c.partition = t.p
           )
           INSERT INTO ledger.chain_heads (partition, sequence, hash)
           SELECT * FROM unnest($4::int[], $5::bigint[], $6::bytea[])
           ON CONFLICT (partition)
           DO UPDATE SET sequence = EXCLUDED.sequence, hash = EXCLUDED.hash""",
        topic, partitions, [next_offsets.get(p) for p in partitions],
        chains, [heads[p][0] for p in chains], [heads[p][1] for p in chains],
        [answered.get(p) for p in partitions],
    )


async def save_answered(conn: asyncpg.Connection, topic: str, answered: dict[int, int]) -> None:
    """Move the answered watermarks forward outside a batch (an idle writer, or one stopping).
    Rows are locked in partition order, as the fence takes them, so this cannot deadlock with a
    batch of another writer."""
    if not answered:
        return
    partitions = sorted(answered)
    await conn.execute(
        """UPDATE ledger.consumed_offsets c
           SET answered_offset = least(greatest(coalesce(c.answered_offset, c.next_offset), t.a),
                                       c.next_offset)
           FROM unnest($2::int[], $3::bigint[]) AS t(p, a),
                (SELECT partition FROM ledger.consumed_offsets
                 WHERE topic = $1 AND partition = ANY($2::int[])
                 ORDER BY partition FOR UPDATE) AS locked
           WHERE c.topic = $1 AND c.partition = t.p AND locked.partition = t.p""",
        topic, partitions, [answered[p] for p in partitions],
    )


async def stored_offsets(conn: asyncpg.Connection, topic: str) -> dict[int, tuple[int, int]]:
    """Per partition (start, next): where a writer that takes over a partition starts reading,
    the first record whose answer may not have reached Kafka (the records from there to the next
    offset are answered again), and the next record to apply."""
    rows = await conn.fetch(
        """SELECT partition, coalesce(answered_offset, next_offset) AS start, next_offset
           FROM ledger.consumed_offsets WHERE topic = $1""", topic
    )
    return {r["partition"]: (r["start"], r["next_offset"]) for r in rows}


@dataclass(frozen=True, slots=True)
class PartitionProgress:
    """Where the writers are on one partition of a commands topic (``harbour ledger progress``)."""

    topic: str
    partition: int
    next_offset: int
    answered_offset: int
    chain_sequence: int | None

    @property
    def unanswered(self) -> int:
        """Records applied whose answers Kafka has not acknowledged yet (as last stored)."""
        return self.next_offset - self.answered_offset


async def progress_report(conn: asyncpg.Connection) -> tuple[list[PartitionProgress], int]:
    """Every partition's progress, and the outbox rows waiting for the relay (expiry answers,
    answers Kafka refused)."""
    rows = await conn.fetch(
        """SELECT c.topic, c.partition, c.next_offset,
                  coalesce(c.answered_offset, c.next_offset) AS answered, h.sequence
           FROM ledger.consumed_offsets c LEFT JOIN ledger.chain_heads h
             ON h.partition = c.partition
           ORDER BY c.topic, c.partition""")
    waiting = await conn.fetchval("SELECT count(*) FROM ledger.outbox WHERE sent_at IS NULL")
    return [PartitionProgress(r["topic"], r["partition"], r["next_offset"], r["answered"],
                              r["sequence"]) for r in rows], int(waiting)


@dataclass(frozen=True, slots=True)
class StoredResult:
    result: d.Result
    partition: int | None
    sequence: int | None
    hash: bytes | None
    source: tuple[int, int] | None = None  # the command record that decided it


async def load_results(conn: asyncpg.Connection, ids: Sequence[str]) -> list[StoredResult]:
    rows = await conn.fetch(
        """SELECT command_id, request_hash, command_type, accepted, code, detail, partition,
                  sequence, hash, recorded_at, source_partition, source_offset
           FROM ledger.results WHERE command_id = ANY($1::text[])""",
        list(ids),
    )
    return [
        StoredResult(
            d.Result(
                command_id=r["command_id"],
                kind=r["command_type"],
                accepted=r["accepted"],
                code=d.RejectionCode(r["code"]) if r["code"] else None,
                detail=r["detail"] or "",
                request_hash=bytes(r["request_hash"]),
                recorded_at=r["recorded_at"],
            ),
            r["partition"],
            r["sequence"],
            bytes(r["hash"]) if r["hash"] is not None else None,
            (r["source_partition"], r["source_offset"])
            if r["source_offset"] is not None else None,
        )
        for r in rows
    ]


async def load_assets(conn: asyncpg.Connection) -> list[d.AssetState]:
    rows = await conn.fetch("SELECT code, scale FROM ledger.assets")
    return [d.AssetState(r["code"], r["scale"]) for r in rows]


async def load_groups(
    conn: asyncpg.Connection, ids: Iterable[str]
) -> tuple[list[d.GroupState], set[str]]:
    """Lock the groups and return them with the ids of all their member pendings."""
    wanted = sorted(set(ids))
    if not wanted:
        return [], set()
    rows = await conn.fetch(
        "SELECT id, status FROM ledger.settlement_groups WHERE id = ANY($1::text[])"
        " ORDER BY id FOR UPDATE",
        wanted,
    )
    members = await conn.fetch(
        """SELECT settlement_group, posting_id FROM ledger.pendings
           WHERE settlement_group = ANY($1::text[]) ORDER BY settlement_group, posting_id""",
        wanted,
    )
    by_group: dict[str, list[str]] = {}
    for m in members:
        by_group.setdefault(m["settlement_group"], []).append(m["posting_id"])
    groups = [d.GroupState(r["id"], by_group.get(r["id"], []), r["status"]) for r in rows]
    return groups, {m["posting_id"] for m in members}


async def load_pendings(
    conn: asyncpg.Connection, ids: Iterable[str]
) -> list[tuple[d.PendingState, int]]:
    """Lock the pendings (sorted) and return each with its held entries and chain partition."""
    wanted = sorted(set(ids))
    if not wanted:
        return []
    rows = await conn.fetch(
        """SELECT posting_id, partition, status, settlement_group, timeout_at, effective_at,
                  resolved_by
           FROM ledger.pendings WHERE posting_id = ANY($1::text[])
           ORDER BY posting_id FOR UPDATE""",
        wanted,
    )
    entries = await conn.fetch(
        """SELECT posting_id, account_id, asset, direction, amount FROM ledger.entries
           WHERE posting_id = ANY($1::text[]) AND phase = 'pending' ORDER BY posting_id, idx""",
        wanted,
    )
    held: dict[str, list[d.Entry]] = {}
    for e in entries:
        held.setdefault(e["posting_id"], []).append(entry_from_row(e))
    return [
        (
            d.PendingState(
                r["posting_id"],
                tuple(held.get(r["posting_id"], ())),
                r["timeout_at"],
                r["settlement_group"],
                r["status"],
                r["effective_at"],
                r["resolved_by"],
            ),
            r["partition"],
        )
        for r in rows
    ]


async def due_pendings(
    conn: asyncpg.Connection, partitions: Sequence[int], now: Any, limit: int
) -> list[tuple[str, int]]:
    rows = await conn.fetch(
        """SELECT posting_id, partition FROM ledger.pendings
           WHERE partition = ANY($1::int[]) AND status = 'pending' AND timeout_at <= $2
           ORDER BY timeout_at, posting_id LIMIT $3""",
        list(partitions),
        now,
        limit,
    )
    return [(r["posting_id"], r["partition"]) for r in rows]


async def load_accounts(conn: asyncpg.Connection, ids: Iterable[str]) -> list[d.AccountState]:
    """Lock the balance rows of ``ids`` in sorted order and return the accounts that exist."""
    wanted = sorted(set(ids))
    if not wanted:
        return []
    rows = await conn.fetch(
        """SELECT a.id, a.participant, a.asset, a.debits_must_not_exceed_credits,
                  a.credits_must_not_exceed_debits, a.limit_minor::text, a.status,
                  b.debits_posted::text, b.credits_posted::text, b.debits_pending::text,
                  b.credits_pending::text
           FROM ledger.accounts a JOIN ledger.balances b ON b.account_id = a.id
           WHERE a.id = ANY($1::text[]) ORDER BY a.id FOR UPDATE OF b""",
        wanted,
    )
    return [
        d.AccountState(
            r["id"],
            r["participant"],
            r["asset"],
            r["debits_must_not_exceed_credits"],
            r["credits_must_not_exceed_debits"],
            int(r["limit_minor"]) if r["limit_minor"] is not None else None,
            r["status"],
            int(r["debits_posted"]),
            int(r["credits_posted"]),
            int(r["debits_pending"]),
            int(r["credits_pending"]),
        )
        for r in rows
    ]


async def insert_assets(conn: asyncpg.Connection, assets: Sequence[d.AssetState]) -> None:
    if assets:
        await conn.executemany(
            "INSERT INTO ledger.assets (code, scale) VALUES ($1, $2)",
            [(a.code, a.scale) for a in assets],
        )


async def insert_accounts(conn: asyncpg.Connection, accounts: Sequence[d.AccountState]) -> None:
    if not accounts:
        return
    await conn.executemany(
        """INSERT INTO ledger.accounts (id, participant, asset, debits_must_not_exceed_credits,
               credits_must_not_exceed_debits, limit_minor, status)
           VALUES ($1, $2, $3, $4, $5, $6, $7)""",
        [
            (
                a.id,
                a.participant,
                a.asset,
                a.debits_must_not_exceed_credits,
                a.credits_must_not_exceed_debits,
                a.limit_minor,
                a.status,
            )
            for a in accounts
        ],
    )
    await conn.execute(
        "INSERT INTO ledger.balances (account_id) SELECT unnest($1::text[])",
        [a.id for a in accounts],
    )


async def update_account_status(
    conn: asyncpg.Connection, accounts: Sequence[d.AccountState]
) -> None:
    if accounts:
        await conn.execute(
            """UPDATE ledger.accounts a SET status = t.s
               FROM unnest($1::text[], $2::text[]) AS t(id, s) WHERE a.id = t.id""",
            [a.id for a in accounts],
            [a.status for a in accounts],
        )


_INT8_MAX = 2**63 - 1


async def apply_balance_deltas(conn: asyncpg.Connection, deltas: dict[str, d.BalanceDelta]) -> None:
    """Add each account's four deltas in one statement.

    Deltas travel as int8 (asyncpg encodes those several times faster than numeric) unless one
    does not fit, then as numeric; PostgreSQL adds them to the numeric(38,0) columns exactly.
    (Not as text: there is no ``numeric + text`` operator.)
    """
    if not deltas:
        return
    ids = sorted(deltas)
    cols = [
        [getattr(deltas[i], f) for i in ids]
        for f in ("debits_posted", "credits_posted", "debits_pending", "credits_pending")
    ]
    fits = all(-_INT8_MAX <= v <= _INT8_MAX for col in cols for v in col)
    kind = "int8" if fits else "numeric"
    args = cols
    status = await conn.execute(
        f"""UPDATE ledger.balances b SET
               debits_posted = b.debits_posted + t.dp, credits_posted = b.credits_posted + t.cp,
               debits_pending = b.debits_pending + t.dq, credits_pending = b.credits_pending + t.cq
           FROM unnest($1::text[], $2::{kind}[], $3::{kind}[], $4::{kind}[], $5::{kind}[])
                AS t(id, dp, cp, dq, cq)
           WHERE b.account_id = t.id""",
        ids,
        *args,
    )
    if int(status.split()[-1]) != len(ids):
        # A delta without its balance row would vanish silently: refuse the whole batch.
        raise RuntimeError(f"balances: {len(ids)} accounts to update, {status!r} updated")


async def copy_journal(
    conn: asyncpg.Connection,
    postings: list[tuple[Any, ...]],
    entries: list[tuple[Any, ...]],
    results: list[tuple[Any, ...]],
) -> None:
    """Append the batch's postings, entries and results with COPY (the fastest path in)."""
    if postings:
        await conn.copy_records_to_table(
            "postings",
            schema_name="ledger",
            records=postings,
            columns=(
                "id",
                "kind",
                "partition",
                "sequence",
                "refs",
                "settlement_group",
                "timeout_at",
                "effective_at",
                "recorded_at",
                "metadata",
                "hash",
            ),
        )
    if entries:
        await conn.copy_records_to_table(
            "entries",
            schema_name="ledger",
            records=entries,
            columns=("posting_id", "idx", "account_id", "asset", "direction", "phase", "amount"),
        )
    if results:
        await conn.copy_records_to_table(
            "results",
            schema_name="ledger",
            records=results,
            columns=(
                "command_id",
                "request_hash",
                "command_type",
                "accepted",
                "code",
                "detail",
                "posting_id",
                "partition",
                "sequence",
                "hash",
                "recorded_at",
                "source_partition",
                "source_offset",
            ),
        )


async def upsert_pendings(conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Insert new pendings, update resolved ones. rows follow the table's column order."""
    if rows:
        await conn.executemany(
            """INSERT INTO ledger.pendings (posting_id, partition, status, settlement_group,
                   timeout_at, effective_at, resolved_by)
               VALUES ($1, $2, $3, $4, $5, $6, $7)
               ON CONFLICT (posting_id) DO UPDATE
               SET status = EXCLUDED.status, resolved_by = EXCLUDED.resolved_by""",
            rows,
        )


async def upsert_groups(conn: asyncpg.Connection, groups: Sequence[d.GroupState]) -> None:
    if groups:
        await conn.executemany(
            """INSERT INTO ledger.settlement_groups (id, status) VALUES ($1, $2)
               ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status""",
            [(g.group_id, g.status) for g in groups],
        )


def direction_code(direction: str) -> str:
    return _DIRECTION[direction]
