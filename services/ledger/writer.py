"""The ledger writer: applies a batch of ``ledger.commands`` records in one PostgreSQL transaction.

Per batch: decode (outside the transaction), lock the stored offsets of the batch's partitions and
drop records applied before (exactly-once in, even for a writer that lost its partitions), load and
lock what the commands touch in sorted order, apply them in partition order with the pure domain,
then write the journal with COPY, the balances with one UPDATE and the next offsets, and commit.
Nothing is visible until all of it is. The batch's answers come back in the report, for the loop
to publish once the transaction has committed (``answers.py``); records applied before whose
answers may not have reached Kafka are answered again from ``ledger.results``, changing nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import asyncpg

from shared.clock import Clock, SystemClock
from shared.events.topics import LEDGER_COMMANDS, LEDGER_RESULTS, LEDGER_WRITER_GROUP, dlq_topic
from shared.ids import DeterministicIds
from shared.store.outbox import Outbox, OutboxMessage

from . import domain as d
from . import repository as repo
from .codec import ChainPlace, DeadLetter, Incoming, read_record, result_message

log = logging.getLogger(__name__)
_COMMITS = frozenset({"commit_pending", "commit_group"})


@dataclass(frozen=True, slots=True)
class Record:
    """What the writer needs of a Kafka record."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()


class OffsetGapError(RuntimeError):
    """The batch starts after the stored offset: the consumer must seek back to it."""

    def __init__(self, partition: int, stored: int, first: int) -> None:
        super().__init__(
            f"partition {partition}: stored next offset {stored}, batch starts {first}"
        )
        self.partition, self.stored = partition, stored


@dataclass
class BatchReport:
    applied: int = 0
    accepted: int = 0
    rejected: int = 0
    dead_lettered: int = 0
    skipped: int = 0
    replayed: int = 0  # applied before, answered again (their answers may not have reached Kafka)
    postings: int = 0
    # Publish these once the batch has committed; then every record of partition p below
    # answered_to[p] has its answer in Kafka.
    answers: list[OutboxMessage] = field(default_factory=list)
    answered_to: dict[int, int] = field(default_factory=dict)


class ReplayDecidedError(RuntimeError):
    """A record applied before got a new decision when answered again: its stored result is
    missing. Nothing is written; the ledger must not answer what it did not journal."""


@dataclass
class _Batch:
    """Everything one transaction writes, gathered while results are walked in order."""

    partition_of: dict[str, int] = field(default_factory=dict)  # pending id -> chain partition
    heads: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    postings: list[tuple[Any, ...]] = field(default_factory=list)
    entries: list[tuple[Any, ...]] = field(default_factory=list)
    results: list[tuple[Any, ...]] = field(default_factory=list)
    outbox: list[OutboxMessage] = field(default_factory=list)
    new_assets: list[d.AssetState] = field(default_factory=list)
    new_accounts: list[d.AccountState] = field(default_factory=list)
    status_accounts: dict[str, d.AccountState] = field(default_factory=dict)
    touched_pendings: set[str] = field(default_factory=set)
    touched_groups: set[str] = field(default_factory=set)  # sealed by commit/void group
    stored_places: dict[str, ChainPlace] = field(default_factory=dict)
    stored_sources: dict[str, tuple[int, int]] = field(default_factory=dict)


class LedgerWriter:
    """Applies batches; one instance per consumer, safe alongside writers in other processes."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        clock: Clock | None = None,
        topic: str = LEDGER_COMMANDS,
        group_id: str = LEDGER_WRITER_GROUP,
    ) -> None:
        self._pool = pool
        self.clock: Clock = clock or SystemClock()
        self._topic = topic
        self._answer_ids = DeterministicIds("ledger.answer", topic)
        self._dlq = dlq_topic(group_id)
        self._outbox = Outbox("ledger")
        self._assets: dict[str, d.AssetState] = {}

    @staticmethod
    def prepare(records: Sequence[Record]) -> list[tuple[Record, Incoming | DeadLetter]]:
        """Decode a batch (pure CPU, no I/O: the loop runs it while the previous batch's
        transaction is with PostgreSQL)."""
        return [(r, read_record(r.value, r.key)) for r in records]

    async def apply_batch(
        self, records: Sequence[Record],
        decoded: list[tuple[Record, Incoming | DeadLetter]] | None = None,
        answered: dict[int, int] | None = None,
    ) -> BatchReport:
        """Apply ``records`` (in partition order) exactly once; return what happened and the
        answers to publish now that it has committed.

        ``answered``: how far this writer's earlier answers are acknowledged by Kafka, per
        partition; stored with the progress of this batch's partitions.
        """
        if decoded is None:
            decoded = self.prepare(records)
        report = BatchReport()
        async with self._pool.acquire() as conn, conn.transaction():
            live, progress = await self._fence(conn, decoded, report)
            if not live:
                return report
            fresh = [(r, x) for r, x in live if r.offset >= progress.next[r.partition]]
            batch = _Batch(heads=progress.heads)
            incoming = [(r, x) for r, x in live if isinstance(x, Incoming)]
            state = await self._load(conn, [x.command for _, x in incoming], batch)
            locked = set(state.accounts)  # the balance rows loaded FOR UPDATE, before any open
            now = self.clock.now()
            applied = [(r, x, state.apply(x.command, now)) for r, x in incoming]
            _check_replays(applied, progress.next)
            # PostgreSQL updates the balances (rows locked above) while this process journals
            # the batch and writes its answers: the two no longer wait for each other. Accounts
            # this batch opens have no balance row yet; theirs follow the account rows.
            deltas = d.net_deltas(res for _, _, res in applied)
            opened = {a: deltas.pop(a) for a in list(deltas) if a not in locked}
            balances = asyncio.create_task(repo.apply_balance_deltas(conn, deltas))
            await asyncio.sleep(0)  # the UPDATE goes on the wire
            try:
                results = iter(applied)
                for r, x in live:  # record order, so replies and dead letters keep it too
                    # A replayed record is answered again and counted as replayed only.
                    fresh_record = r.offset >= progress.next[r.partition]
                    if isinstance(x, DeadLetter):
                        batch.outbox.append(self._dead_letter(r, x))
                        if fresh_record:
                            report.dead_lettered += 1
                    else:
                        _, _, result = next(results)
                        self._walk(state, batch, r.partition, x, result, now,
                                   (r.partition, r.offset))
                        if fresh_record and result.accepted:
                            report.accepted += 1
                        elif fresh_record:
                            report.rejected += 1
            finally:
                await asyncio.wait([balances])  # never leave a statement running on conn
            balances.result()
            await self._write(conn, state, batch, opened)
            mine = progress.next.keys()
            await repo.save_progress(conn, self._topic, _next_offsets(fresh), batch.heads,
                                     {p: a for p, a in (answered or {}).items() if p in mine})
        self._assets.update((a.code, a) for a in batch.new_assets)  # committed: now cacheable
        report.applied = len(fresh)
        report.replayed = len(live) - len(fresh)
        report.answers = batch.outbox
        report.answered_to = _next_offsets(live)
        return report

    async def expire_due(self, partitions: Sequence[int], limit: int = 1000) -> int:
        """Release pendings of ``partitions`` whose timeout has passed; return how many.

        The expiry goes into the pending's own partition chain, under the same offsets-row lock
        the batches take, so a chain never has two writers at once.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            now = self.clock.now()
            due = await repo.due_pendings(conn, partitions, now, limit)
            if not due:
                return 0
            batch = _Batch()
            # Offsets rows first, as batches take them, so the two never deadlock.
            batch.heads = (await repo.lock_offsets(conn, self._topic, {p: 0 for _, p in due})).heads
            loaded = await repo.load_pendings(conn, [pid for pid, _ in due])
            state = d.LedgerState()
            for pending, partition in loaded:
                state.load_pending(pending)
                batch.partition_of[pending.posting_id] = partition
            accounts = {e.account_id for p, _ in loaded for e in p.entries}
            for account in await repo.load_accounts(conn, accounts):
                state.load_account(account)
            results = state.expire(now)
            for result in results:
                partition = batch.partition_of[result.refs[0]]
                self._walk(state, batch, partition, _EXPIRY_REPLY, result, now)
            await self._write(conn, state, batch, d.net_deltas(results))
            # No record to answer these again from: they go through the outbox and its relay.
            await self._outbox.add_many(conn, batch.outbox)
            await repo.save_progress(conn, self._topic, {}, batch.heads)
        return len(results)

    async def _fence(
        self, conn: asyncpg.Connection, decoded: list[tuple[Record, Any]], report: BatchReport
    ) -> tuple[list[tuple[Record, Any]], repo.Progress]:
        """Lock the batch's progress; keep the records not yet answered (those not yet applied
        must start exactly at the stored next offset)."""
        first: dict[int, int] = {}
        for r, _ in decoded:
            first[r.partition] = min(first.get(r.partition, r.offset), r.offset)
        progress = await repo.lock_offsets(conn, self._topic, first)
        live = [(r, x) for r, x in decoded if r.offset >= progress.answered[r.partition]]
        report.skipped = len(decoded) - len(live)
        starts: dict[int, int] = {}
        for r, _ in live:
            if r.offset >= progress.next[r.partition]:
                starts.setdefault(r.partition, r.offset)
        for partition, start in starts.items():
            if start != progress.next[partition]:
                raise OffsetGapError(partition, progress.next[partition], start)
        return live, progress

    async def _load(
        self, conn: asyncpg.Connection, commands: list[d.Command], batch: _Batch
    ) -> d.LedgerState:
        state = d.LedgerState()
        if not _asset_codes(commands) <= self._assets.keys():
            # Assets never change once defined, so the cache is only ever incomplete, never
            # wrong: reload when a command names a code this writer has not seen yet.
            self._assets = {a.code: a for a in await repo.load_assets(conn)}
        for asset in self._assets.values():
            state.load_asset(asset)
        ids = [c.command_id for c in commands if type(c.command_id) is str]
        for stored in await repo.load_results(conn, ids):
            state.remember(stored.result.command_id, stored.result.request_hash, stored.result)
            if stored.source is not None:
                batch.stored_sources[stored.result.command_id] = stored.source
            if stored.partition is not None and stored.sequence is not None and stored.hash:
                batch.stored_places[stored.result.command_id] = ChainPlace(
                    stored.partition, stored.sequence, stored.hash
                )
        await self._load_pendings(conn, state, commands, batch)
        touched: set[str] = set()
        for c in commands:
            touched |= d.accounts_touched(c, state)
        for account in await repo.load_accounts(conn, touched):
            state.load_account(account)
        return state

    async def _load_pendings(
        self,
        conn: asyncpg.Connection,
        state: d.LedgerState,
        commands: list[d.Command],
        batch: _Batch,
    ) -> None:
        group_ids: set[str] = set()
        pending_ids: set[str] = set()
        for c in commands:
            group_ids |= d.groups_referenced(c)
            pending_ids |= d.pendings_referenced(c)
        groups, members = await repo.load_groups(conn, group_ids)
        for pending, partition in await repo.load_pendings(conn, pending_ids | members):
            state.load_pending(pending)
            batch.partition_of[pending.posting_id] = partition
        for group in groups:
            state.load_group(group)

    def _walk(
        self,
        state: d.LedgerState,
        batch: _Batch,
        partition: int,
        incoming: Incoming,
        result: d.Result,
        now: datetime,
        source: tuple[int, int] | None = None,
    ) -> None:
        """Turn one command's result (and the expiries it caused) into rows and one reply.

        ``source``: the command record's (partition, offset); None for expiries."""
        place = batch.stored_places.get(result.command_id) if result.duplicate else None
        # A duplicate replays the original Result, expired sub-results included: those were
        # journalled with the original, so a replay writes nothing.
        for effect in () if result.duplicate else result.effects():
            if not effect.recorded:
                continue
            effect_place = (
                self._journal(state, batch, partition, effect) if effect.is_posting else None
            )
            if effect is result:
                place = effect_place
            if effect_place is not None:  # a retry later in this batch replays this place
                batch.stored_places[effect.command_id] = effect_place
            self._track(state, batch, incoming.command, effect, partition)
            batch.results.append(
                _result_row(effect, effect_place, now, source if effect is result else None))
        answer = result
        if result.duplicate and source is not None and batch.stored_sources.get(
                result.command_id) == source:
            # This very record decided it, and is answered again (after a crash or re-seek):
            # the answer says what its first one said.
            answer = replace(result, duplicate=False)
        answer_id = self._answer_id(*source) if source is not None else None
        batch.outbox.append(result_message(answer, incoming, place, now, answer_id))

    def _journal(
        self, state: d.LedgerState, batch: _Batch, partition: int, effect: d.Result
    ) -> ChainPlace:
        sequence, prev = batch.heads.get(partition, (0, d.GENESIS_HASH))
        digest = d.chain_hash(prev, d.canonical_posting_bytes(effect))
        batch.heads[partition] = (sequence + 1, digest)
        pid = effect.command_id
        batch.postings.append(
            (
                pid,
                effect.kind,
                partition,
                sequence + 1,
                list(effect.refs),
                effect.settlement_group,
                effect.timeout_at,
                effect.effective_at,
                effect.recorded_at,
                _json(effect.metadata),
                digest,
            )
        )
        phase = repo.CHAIN_PHASE[effect.kind]
        rows = [(pid, e, phase) for e in effect.entries]
        if effect.kind in _COMMITS:
            rows += [
                (pid, e, "release") for ref in effect.refs for e in state.pendings[ref].entries
            ]
        batch.entries.extend(
            (p, i, e.account_id, e.asset, repo.direction_code(e.direction), ph, e.amount_minor)
            for i, (p, e, ph) in enumerate(rows)
        )
        return ChainPlace(partition, sequence + 1, digest)

    def _track(
        self,
        state: d.LedgerState,
        batch: _Batch,
        command: d.Command,
        effect: d.Result,
        partition: int,
    ) -> None:
        """Note the reference data and projections an accepted effect changed."""
        if not effect.accepted:
            return
        kind = effect.kind
        if isinstance(command, d.DefineAsset) and kind == "define_asset":
            batch.new_assets.append(state.assets[command.code])
        elif isinstance(command, d.OpenAccount) and kind == "open_account":
            batch.new_accounts.append(state.accounts[command.account_id])
        elif isinstance(command, d.FreezeAccount | d.UnfreezeAccount | d.CloseAccount):
            account = state.accounts[command.account_id]
            batch.status_accounts[account.id] = account
        elif kind == "post_pending":
            batch.partition_of[effect.command_id] = partition
            batch.touched_pendings.add(effect.command_id)
        batch.touched_pendings.update(effect.refs)
        if kind in ("commit_group", "void_group") and effect.settlement_group is not None:
            # A group whose members all expired has no refs, but the command still seals it.
            batch.touched_groups.add(effect.settlement_group)

    async def _write(
        self,
        conn: asyncpg.Connection,
        state: d.LedgerState,
        batch: _Batch,
        deltas: dict[str, d.BalanceDelta],
    ) -> None:
        """Write what ``batch`` gathered (its answers excepted) and add ``deltas`` to the
        balances."""
        await repo.insert_assets(conn, batch.new_assets)
        new_ids = {a.id for a in batch.new_accounts}
        await repo.insert_accounts(conn, batch.new_accounts)
        await repo.update_account_status(
            conn, [a for i, a in sorted(batch.status_accounts.items()) if i not in new_ids]
        )
        await repo.copy_journal(conn, batch.postings, batch.entries, batch.results)
        await repo.upsert_pendings(
            conn,
            [
                _pending_row(state.pendings[p], batch.partition_of[p])
                for p in sorted(batch.touched_pendings)
            ],
        )
        # Only groups the state holds can have changed: an expiry (expire_due loads no groups)
        # releases a member but leaves its group's status alone.
        group_ids = {
            g
            for p in batch.touched_pendings
            if (g := state.pendings[p].settlement_group) is not None and g in state.groups
        } | batch.touched_groups
        await repo.upsert_groups(conn, [state.groups[g] for g in sorted(group_ids)])
        await repo.apply_balance_deltas(conn, deltas)

    def _answer_id(self, partition: int, offset: int) -> str:
        """The id of the answer to a record: the same whenever that record is answered
        (``deterministic_id("ledger.answer", topic, partition, offset)``)."""
        return self._answer_ids.text(str(partition), str(offset))

    def _dead_letter(self, record: Record, dead: DeadLetter) -> OutboxMessage:
        headers = {_text(k): _text(v.decode("utf-8", "replace")) for k, v in record.headers}
        headers.update(
            {
                "x-harbour-error-code": dead.error.code,
                "x-harbour-error": _text(dead.error.message[:1000]),
                "x-harbour-original-topic": self._topic,
                "x-harbour-original-partition": str(record.partition),
                "x-harbour-original-offset": str(record.offset),
                "x-harbour-attempts": "1",
            }
        )
        return OutboxMessage(self._dlq, record.key, record.value or b"", headers)


_EXPIRY_REPLY = Incoming(
    command=d.MalformedCommand("expire", b""), envelope=None, reply_to=LEDGER_RESULTS, key=None
)


def _text(value: str) -> str:
    """Outbox headers are jsonb, which refuses NUL: a hostile header must not fail the batch."""
    return value.replace("\x00", "\ufffd")


def _asset_codes(commands: list[d.Command]) -> set[str]:
    """Every asset code the commands name (entries, accounts, definitions)."""
    codes: set[str] = set()
    for c in commands:
        entries = c.entries if isinstance(c, d.Post | d.PostPending | d.CommitPending) else None
        if entries:
            codes.update(e.asset for e in entries if type(e.asset) is str)
        elif isinstance(c, d.OpenAccount | d.DefineAsset):
            code = c.asset if isinstance(c, d.OpenAccount) else c.code
            if type(code) is str:
                codes.add(code)
    return codes


def _check_replays(applied: list[tuple[Record, Incoming, d.Result]], next_offsets: dict[int, int]
                   ) -> None:
    """A record below the stored next offset was applied before: answering it again must replay
    the stored outcome (or a rejection that stores nothing), never decide anew."""
    for r, _, result in applied:
        if r.offset < next_offsets[r.partition] and result.recorded:
            raise ReplayDecidedError(
                f"partition {r.partition} offset {r.offset}: command {result.command_id!r} was "
                "applied before but has no stored result")


def _next_offsets(fresh: list[tuple[Record, Any]]) -> dict[int, int]:
    nxt: dict[int, int] = {}
    for r, _ in fresh:
        nxt[r.partition] = max(nxt.get(r.partition, 0), r.offset + 1)
    return nxt


def _result_row(effect: d.Result, place: ChainPlace | None, now: datetime,
                source: tuple[int, int] | None) -> tuple[Any, ...]:
    return (
        effect.command_id,
        effect.request_hash,
        effect.kind,
        effect.accepted,
        str(effect.code) if effect.code else None,
        effect.detail or None,
        effect.command_id if place else None,
        place.partition if place else None,
        place.sequence if place else None,
        place.hash if place else None,
        effect.recorded_at or now,
        *(source or (None, None)),
    )


def _pending_row(p: d.PendingState, partition: int) -> tuple[Any, ...]:
    return (
        p.posting_id,
        partition,
        p.status,
        p.settlement_group,
        p.timeout_at,
        p.effective_at,
        p.resolved_by,
    )


def _json(value: Any) -> str:
    return json.dumps(dict(value) if value else {}, sort_keys=True, separators=(",", ":"))


__all__ = ["LEDGER_RESULTS", "BatchReport", "LedgerWriter", "OffsetGapError", "Record",
           "ReplayDecidedError"]
