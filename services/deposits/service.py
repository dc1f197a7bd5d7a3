"""The deposits application service: decisions recorded in PostgreSQL, one batch at a time.

Everything goes through :meth:`DepositsService.handle_batch`: a Kafka batch (``router.py``,
``consumer.py``), one message of a batch that failed (a batch of one) and the scheduler's internal
:class:`~services.deposits.domain.Tick` / ``RetrySettlement`` (a batch of one without envelope).
A batch is one unit of work:

1. find each message's stream: :func:`~services.deposits.domain.stream_of` for commands, the
   ``ledger_key -> stream`` route remembered with each request for ledger answers (unknown keys
   are not ours: a no-op), the given stream for internal commands;
2. read what the batch needs in one query (two when a stream is neither cached nor named by its
   message): the streams' newer events (an in-process cache keeps decided states), the
   participants and wallets the decisions name, the payers' queue depths, and the inbox claims
   ``(consumer, envelope event id)`` of its messages (a redelivered record is a no-op);
3. decide each message in order on that view, which the batch's own decisions keep current
   (``batch.BatchView``): each message sees what it would have seen had the ones before it been
   committed one by one;
4. record every decision in one transaction, ``deposits.record_decisions`` (migration 0002):
   inbox claims, the events appended after the version each stream was decided from (a stream
   that moved on, or a message claimed meanwhile, is a ``ConcurrencyError``: the batch is read
   and decided again), the outbox rows (public events to the events topic keyed by the stream's
   id; ledger commands to ``ledger.commands`` with the deterministic envelope id of
   ``accounts.ledger_event_id`` and ``reply_to`` the deposits reply topic), the ledger routes and
   the last read-model row of each stream. It does what ``Inbox.claim``, ``EventStore.append``
   and ``Outbox.add_many`` do, on the same tables with the same guards, in one round trip: on a
   two-core machine the round trips, not the decisions, were the cost of a message.

A refusal by a business rule on an existing aggregate (``DepositsError``, or ``id_conflict``)
records nothing on the stream; it is stored in ``deposits.refusals`` with its code (audit trail,
X-7) in the same transaction as the inbox claim, so it is answered once. Malformed input never gets
this far: the consumer (``consumer.py``) dead-letters what ``shared.events.envelope.decode``
refuses, with the reason. Internal commands carry no envelope and need no inbox: a tick that
finds nothing to do records nothing but its next wake-up.

After commit the outcome says which settlement queues (TD-5) may move: the bank's settlement
account was funded or credited, or a transfer left its queue. :meth:`dispatch` wakes the head of
such a queue with ``RetrySettlement``; the scheduler also retries non-empty queues periodically,
so a wake-up lost to a crash only delays.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

import asyncpg

from shared.clock import Clock, SystemClock
from shared.errors import (
    ConcurrencyError,
    DomainError,
    HarbourError,
    IdempotencyConflictError,
    InfrastructureError,
    ValidationError,
)
from shared.events import deposits as ev
from shared.events.envelope import Envelope, encode, new_envelope
from shared.events.ledger import PostingAccepted, PostingRejected
from shared.events.registry import Payload, resolve, type_of
from shared.ids import new_id
from shared.store.errors import retrying, translated
from shared.store.event_store import NewEvent
from shared.store.outbox import OutboxMessage

from . import accounts as acc
from . import domain as dm
from .batch import READ_SQL as _READ_BATCH_SQL
from .batch import RECORD_SQL as _RECORD_BATCH_SQL
from .batch import BatchPlan, BatchView, refusal_row
from .calendar import DepositsConfig

__all__ = [
    "CONSUMER_COMMANDS",
    "CONSUMER_LEDGER_RESULTS",
    "PRODUCER",
    "DepositsService",
    "Message",
    "Outcome",
    "Topics",
]

log = logging.getLogger("harbour.deposits")

SCHEMA: Final = "deposits"
PRODUCER: Final = "harbour.deposits"
# Inbox consumer names: logical roles, not topic or group names, so that a renamed topic or a new
# consumer group still finds the records it already processed.
CONSUMER_COMMANDS: Final = "deposits.commands"
CONSUMER_LEDGER_RESULTS: Final = "deposits.ledger-results"
# pg_advisory_xact_lock(int4, int4): this class id plus hashtext(stream id) ("HDEP").
STREAM_LOCK_CLASS: Final = 0x48444550
MAX_CONFLICT_RETRIES: Final = 8
# A tick that found nothing to do while its wake-up is due is not re-run before this.
_IDLE_TICK_BACKOFF: Final = timedelta(seconds=1)
_PUBLISHED: Final = frozenset(ev.PUBLISHED_EVENTS)

Decide = Callable[[Any, Any, dm.Context], list[Payload]]
Evolve = Callable[[Any, Payload], Any]
_AGGREGATES: Final[dict[str, tuple[Decide, Evolve]]] = {
    "transfer": (dm.decide_transfer, dm.evolve_transfer),
    "conversion": (dm.decide_conversion, dm.evolve_conversion),
    "participant": (dm.decide_participant, dm.evolve_participant),
    "wallet": (dm.decide_wallet, dm.evolve_wallet),
}
Internal = dm.Tick | dm.RetrySettlement


@dataclass(frozen=True, slots=True)
class Topics:
    """Where the service's records go (settings make them per-deployment, tests unique)."""

    events: str
    ledger_commands: str
    ledger_results: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one message did, for the consumer's metrics, the dispatcher and tests."""

    stream: str | None
    events: tuple[Payload, ...] = ()
    duplicate: bool = False
    refusal: HarbourError | None = None
    wake_queues: frozenset[str] = frozenset()
    state: Any = None


@dataclass(frozen=True, slots=True)
class Message:
    """What is decided: a consumed record (its inbox consumer, envelope and payload), or an
    internal command of the scheduler (no consumer, no envelope, the stream it is for)."""

    consumer: str | None
    envelope: Envelope | None
    payload: Any
    stream: str | None = None
    """Set for internal commands; a record's stream follows from its payload."""

    @property
    def claim(self) -> tuple[str, str] | None:
        """The inbox key ``(consumer, envelope event id)``; internal commands need none."""
        if self.consumer is None or self.envelope is None:
            return None
        return self.consumer, str(self.envelope.event_id)


@dataclass(slots=True)
class _Cached:
    version: int
    state: Any


@dataclass(slots=True)
class _Directory:
    """Parsed participant and wallet states, keyed by (key, stream version)."""

    max_size: int
    parsed: OrderedDict[tuple[str, int], Any] = field(default_factory=OrderedDict)

    def get(self, key: str, version: int, raw: str, cls: type[Any]) -> Any:
        found = self.parsed.get((key, version))
        if found is None:
            found = cls.model_validate_json(raw)
            self.parsed[(key, version)] = found
            while len(self.parsed) > self.max_size:
                self.parsed.popitem(last=False)
        return found


class DepositsService:
    """Decides deposits messages against the ``deposits`` schema (module docstring)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        config: DepositsConfig,
        *,
        topics: Topics,
        clock: Clock | None = None,
        cache_size: int = 20_000,
        producer: str = PRODUCER,
    ) -> None:
        self._pool = pool
        self.config = config
        self.topics = topics
        self.clock: Clock = clock or SystemClock()
        self.producer = producer
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._routes: OrderedDict[str, str] = OrderedDict()
        self._queues: set[str] = set()
        """Settlement queues known to hold transfers (refreshed by :meth:`queue_keys`)."""
        self._cache_size = cache_size
        self._directory = _Directory(max_size=cache_size)

    # --- entry points --------------------------------------------------------------------------

    @staticmethod
    def command_message(envelope: Envelope, payload: Payload) -> Message:
        """A record from ``deposits.commands``, checked.

        Raises:
            ValidationError: ``unknown_type``: the payload is not a deposits command (an event,
                a ledger result, another domain's command): the consumer dead-letters it.
        """
        if dm.stream_of(payload) is None:
            raise ValidationError(f"{envelope.type} is not a deposits command",
                                  code="unknown_type", type=envelope.type)
        return Message(CONSUMER_COMMANDS, envelope, payload)

    @staticmethod
    def result_message(envelope: Envelope, payload: Payload) -> Message:
        """A ``PostingAccepted``/``PostingRejected`` from the deposits reply topic, checked."""
        if not isinstance(payload, PostingAccepted | PostingRejected):
            raise ValidationError(f"{envelope.type} is not a ledger result",
                                  code="unknown_type", type=envelope.type)
        return Message(CONSUMER_LEDGER_RESULTS, envelope, payload)

    async def handle_command(self, envelope: Envelope, payload: Payload) -> Outcome:
        """One record from ``deposits.commands`` in a transaction of its own."""
        return await self.handle(self.command_message(envelope, payload))

    async def handle_ledger_result(self, envelope: Envelope, payload: Payload) -> Outcome:
        """One ledger answer in a transaction of its own."""
        return await self.handle(self.result_message(envelope, payload))

    async def handle(self, message: Message) -> Outcome:
        """One message in a transaction of its own (the batch's fallback): a batch of one."""
        return (await self.handle_batch([message]))[0]

    async def handle_batch(self, messages: Sequence[Message]) -> list[Outcome]:
        """Decide ``messages`` in order and record every decision in one transaction.

        Each decision sees the state the earlier ones left (``batch.BatchView``), so the
        outcome is that of handling them one by one. A stream another writer moved meanwhile
        (or a message another consumer claimed) makes the batch read and decide again.

        Raises:
            ConcurrencyError: still racing after ``MAX_CONFLICT_RETRIES`` attempts.
            InfrastructureError: the database failed (``retryable`` when trying later helps).
        """
        for attempt in range(1, MAX_CONFLICT_RETRIES + 1):
            try:
                return await retrying(lambda: self._decide_batch(messages))
            except ConcurrencyError as exc:
                if exc.details.get("stream_id"):  # else a claim raced: the cache is still right
                    self._cache.pop(str(exc.details["stream_id"]), None)
                if attempt == MAX_CONFLICT_RETRIES:
                    raise
                await asyncio.sleep(random.uniform(0.001, 0.01) * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def wake(self, stream: str, command: Internal) -> Outcome:
        """Deliver an internal command (the scheduler's Tick, the queue's RetrySettlement)."""
        if not stream.startswith("transfer:"):
            raise ValueError(f"internal commands go to transfers, not {stream!r}")
        return await self.handle(Message(None, None, command, stream))

    async def dispatch(self, queue_keys: Iterable[str], *, rounds: int = 64) -> int:
        """Wake the head of each queue with ``RetrySettlement``; follow the queues it moves.

        A head already retrying (its attempt is with the ledger) is left alone: its answer
        decides what happens next. Queues this process has not seen hold anything since the
        last :meth:`queue_keys` are skipped without a query (the periodic round covers queues
        other instances filled). Returns how many retries were sent.
        """
        pending = {k for k in queue_keys if k in self._queues}
        sent = 0
        while pending and rounds > 0:
            rounds -= 1
            key = pending.pop()
            row = await self._pool.fetchrow(
                "SELECT uetr, retrying FROM deposits.transfers WHERE queue_key = $1 "
                "ORDER BY queued_since, uetr LIMIT 1", key)
            if row is None:
                self._queues.discard(key)
                continue
            if row["retrying"]:
                continue
            try:
                outcome = await self.wake(f"transfer:{row['uetr']}", dm.RetrySettlement())
            except Exception:  # the periodic round retries it; the other queues go on
                log.exception("retry of the head of queue %s failed", key)
                continue
            sent += 1
            pending |= {k for k in outcome.wake_queues if k in self._queues}
        return sent

    async def due_streams(self, now: datetime, limit: int = 500) -> list[str]:
        """Transfers whose ``next_wakeup`` is due at ``now``, earliest first."""
        rows = await self._pool.fetch(
            "SELECT uetr FROM deposits.transfers WHERE next_wakeup_at <= $1 "
            "ORDER BY next_wakeup_at LIMIT $2", now, limit)
        return [f"transfer:{r['uetr']}" for r in rows]

    async def postpone(self, stream: str, until: datetime) -> None:
        """Move a transfer's wake-up to ``until`` (a tick of it failed; try again later)."""
        await self._pool.execute(_POSTPONE_SQL, [stream.split(":", 1)[1]], [until])

    async def queue_stats(self) -> dict[str, tuple[int, float]]:
        """Per settlement queue: how many transfers wait and how long (seconds, by this
        service's clock) the head has waited."""
        rows = await self._pool.fetch(
            """SELECT queue_key, count(*) AS depth, min(queued_since) AS oldest
               FROM deposits.transfers WHERE queue_key IS NOT NULL GROUP BY queue_key""")
        now = self.clock.now()
        return {r["queue_key"]: (r["depth"], max(0.0, (now - r["oldest"]).total_seconds()))
                for r in rows}

    async def queue_keys(self) -> list[str]:
        """Every settlement queue that holds at least one transfer."""
        rows = await self._pool.fetch(
            "SELECT DISTINCT queue_key FROM deposits.transfers WHERE queue_key IS NOT NULL")
        self._queues = {r["queue_key"] for r in rows}
        return sorted(self._queues)

    # --- the stream cache ---------------------------------------------------------------------

    def _fold(self, stream: str, version: int, state: Any, evolve: Evolve,
              rows: Sequence[asyncpg.Record]) -> tuple[int, Any]:
        events = sorted((r for r in rows if r[0] == "e"), key=lambda r: r[1])
        for _, number, name, schema_version, raw in events:
            # Our own JSON: lax mode takes its ISO strings and lists for tuples.
            payload = resolve(name, schema_version).model_validate(json.loads(raw),
                                                                   strict=False)
            state = evolve(state, payload)
            version = number
        if events:
            self._put(stream, _Cached(version, state))
        return version, state

    def _put(self, stream: str, value: _Cached) -> None:
        if self._cache_size <= 0:
            return
        self._cache[stream] = value
        self._cache.move_to_end(stream)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _remember_route(self, ledger_key: str, stream: str) -> None:
        if self._cache_size <= 0:
            return
        self._routes[ledger_key] = stream
        while len(self._routes) > self._cache_size:
            self._routes.popitem(last=False)

    # --- a batch in one transaction ------------------------------------------------------------

    async def _decide_batch(self, messages: Sequence[Message]) -> list[Outcome]:
        plan = BatchPlan()
        cached: dict[str, _Cached] = {}
        async with self._pool.acquire() as conn:
            streams = await self._streams_of(conn, messages)
            view = await self._read_batch(conn, messages, streams)
            outcomes = [self._decide_in_batch(m, stream, view, plan, cached)
                        for m, stream in zip(messages, streams, strict=True)]
            if plan:
                await self._record_batch(conn, plan)
            if plan.wakeups:
                await conn.execute(_POSTPONE_SQL, [u for u, _ in plan.wakeups],
                                   [due for _, due in plan.wakeups])
        for stream, value in cached.items():
            self._put(stream, value)
        for ledger_key, stream, _, _ in plan.routes:
            self._remember_route(ledger_key, stream)
        return outcomes

    async def _streams_of(self, conn: asyncpg.Connection, messages: Sequence[Message]
                          ) -> list[str | None]:
        """Each message's stream: by the command, or by the route of the ledger key answered
        (``None``: an answer to nothing this service asked)."""
        answered = [_answered(m) for m in messages]
        unknown = {key for key in answered if key is not None and key not in self._routes}
        found: dict[str, str] = {}
        if unknown:
            found = dict(await conn.fetch(
                "SELECT ledger_key, stream_id FROM deposits.ledger_routes "
                "WHERE ledger_key = ANY($1::text[])", sorted(unknown)))
        return [m.stream or (dm.stream_of(m.payload) if key is None
                             else self._routes.get(key) or found.get(key))
                for m, key in zip(messages, answered, strict=True)]

    async def _read_batch(self, conn: asyncpg.Connection, messages: Sequence[Message],
                          streams: Sequence[str | None]) -> BatchView:
        """The batch's streams and context in one query; in two when a stream is not cached
        and its message does not name the parties (its events say who they are)."""
        view = BatchView()
        for stream in {s for s in streams if s is not None}:
            hit = self._cache.get(stream)
            view.states[stream] = (hit.version, hit.state) if hit else (0, None)
        parties = [self._parties_in(view, m, s) for m, s in zip(messages, streams, strict=True)]
        cold = sorted({s for m, s, p in zip(messages, streams, parties, strict=True)
                       if s is not None and p is None and view.states[s][1] is None
                       and not isinstance(m.payload, _NAMES_NOBODY)})
        if cold:
            self._fold_batch(view, await conn.fetch(
                _READ_BATCH_SQL, cold, [0] * len(cold), [], [], [], [], [], [], []))
            parties = [self._parties_in(view, m, s)
                       for m, s in zip(messages, streams, strict=True)]
        banks: set[str] = set()
        wallets: set[tuple[str, str]] = set()
        queues: dict[str, str] = {}  # uetr -> its payer's queue
        for found in parties:
            if found is not None:
                banks |= found[0]
                wallets |= found[1]
                if found[2] is not None:
                    queues[found[2][1]] = found[2][0]
        known = sorted(view.states)
        w = sorted(wallets)
        claims = [m.claim for m in messages if m.claim is not None]
        rows = await conn.fetch(
            _READ_BATCH_SQL, known, [view.states[s][0] for s in known], sorted(banks),
            [b for b, _ in w], [i for _, i in w], sorted(set(queues.values())), sorted(queues),
            [c for c, _ in claims], [i for _, i in claims])
        self._fold_batch(view, rows)
        for kind, number, key, _, raw, _ in rows:
            if kind == "p":
                view.participants[key] = self._directory.get(key, number, raw, dm.Participant)
            elif kind == "w":
                view.wallets[key] = self._directory.get(key, number, raw, dm.Wallet)
            elif kind == "q":
                view.queue_sizes[key] = int(number)
            elif kind == "m":
                view.queued[key] = raw
            elif kind == "i":
                view.claimed.add((raw, key))
        return view

    @staticmethod
    def _parties_in(view: BatchView, message: Message, stream: str | None
                    ) -> tuple[set[str], set[tuple[str, str]], tuple[str, str] | None] | None:
        if stream is None:
            return set(), set(), None
        state = view.states[stream][1]
        return _parties(state if state is not None else message.payload)

    def _fold_batch(self, view: BatchView, rows: Sequence[asyncpg.Record]) -> None:
        """Apply the streams' newer events (rows of kind ``e``) to the view's states."""
        by_stream: dict[str, list[tuple[Any, ...]]] = {}
        for row in rows:
            if row[0] == "e":
                by_stream.setdefault(row[5], []).append(tuple(row)[:5])
        for stream, events in by_stream.items():
            _, evolve = _AGGREGATES[stream.split(":", 1)[0]]
            version, state = view.states.get(stream, (0, None))
            view.states[stream] = self._fold(stream, version, state, evolve, events)

    def _decide_in_batch(self, message: Message, stream: str | None, view: BatchView,
                         plan: BatchPlan, cached: dict[str, _Cached]) -> Outcome:
        """One message of the batch: decided on the view, its rows added to the plan."""
        claim, envelope = message.claim, message.envelope
        if stream is None:
            return Outcome(None)  # not an answer to anything we asked
        if claim is not None and claim in view.claimed:
            return Outcome(stream, duplicate=True)
        decide, evolve = _AGGREGATES[stream.split(":", 1)[0]]
        version, state = view.states[stream]
        ctx = self._batch_context(view, state if state is not None else message.payload)
        try:
            events = decide(state, message.payload, ctx)
        except (DomainError, IdempotencyConflictError) as exc:
            if claim is not None and envelope is not None:
                # Recorded with the message (audit trail, X-7), nothing on the stream.
                log.info("%s %s refused on %s: %s (%s)", envelope.type, claim[1], stream,
                         exc.code, exc.message)
                view.claimed.add(claim)
                plan.claim(*claim)
                plan.refuse(refusal_row(claim[1], stream, envelope.type, envelope.participant,
                                        exc))
            return Outcome(stream, refusal=exc, state=state)
        if not events:
            if envelope is None and isinstance(state, dm.Transfer):
                # An internal command changed nothing: move the wake-up so the clock cannot spin.
                plan.wakeups.append((state.uetr, self._idle_wakeup(state, ctx.now)))
            return Outcome(stream, state=state)
        new_state = dm.fold(evolve, events, state)
        ids = [new_id() for _ in events]
        if claim is not None:
            plan.claim(*claim)
            view.claimed.add(claim)
        plan.append(stream, version,
                    [self._stored(e, i, envelope) for e, i in zip(events, ids, strict=True)],
                    self._messages(stream, events, ids, envelope, new_state),
                    [e for e in events if isinstance(e, ev.LedgerCommandRequested)])
        plan.view(stream, *self._view_row(new_state, version + len(events), ctx.now))
        view.decided(stream, version + len(events), new_state)
        cached[stream] = _Cached(version + len(events), new_state)
        return Outcome(stream, tuple(events), wake_queues=_queues_to_wake(state, new_state,
                                                                           events),
                       state=new_state)

    def _idle_wakeup(self, t: dm.Transfer, now: datetime) -> datetime | None:
        due = dm.next_wakeup(t, self.config, now)
        return now + _IDLE_TICK_BACKOFF if due is not None and due <= now else due

    def _batch_context(self, view: BatchView, source: Any) -> dm.Context:
        instruction = source.instruction if isinstance(source, dm.Transfer) else source
        depth = view.depth(instruction) if isinstance(instruction,
                                                      ev.TransferInstruction) else {}
        return dm.Context(now=self.clock.now(), config=self.config,
                          participants=view.participants, wallets=view.wallets,
                          queue_depth=depth)

    async def _record_batch(self, conn: asyncpg.Connection, plan: BatchPlan) -> None:
        try:
            with translated():
                status = await conn.fetchval(_RECORD_BATCH_SQL, *plan.arguments())
        except InfrastructureError as exc:
            if exc.details.get("sqlstate") == "HDDUP":  # a redelivery was handled meanwhile
                raise ConcurrencyError("a message of the batch was processed meanwhile") from exc
            raise
        if status != "ok":
            stream = str(status).removeprefix("conflict:")
            raise ConcurrencyError(f"stream {stream!r} moved on during the batch",
                                   stream_id=stream)

    # --- what is written -----------------------------------------------------------------------

    def _stored(self, event: Payload, event_id: Any, envelope: Envelope | None) -> NewEvent:
        name, version = type_of(event)
        metadata: dict[str, Any] = {"producer": self.producer}
        if envelope is not None:
            metadata |= {"message_id": str(envelope.event_id),
                         "correlation_id": str(envelope.correlation_id),
                         "participant": envelope.participant, "message_type": envelope.type}
        return NewEvent(event_id, name, version, event.model_dump(mode="json"), metadata)

    def _messages(self, stream: str, events: Sequence[Payload], ids: Sequence[Any],
                  envelope: Envelope | None, state: Any) -> list[OutboxMessage]:
        correlation = envelope.correlation_id if envelope is not None else None
        causation = envelope.event_id if envelope is not None else None
        actor = envelope.participant if envelope is not None else _actor(state)
        key = stream.split(":", 1)[1].encode()
        out: list[OutboxMessage] = []
        for event, event_id in zip(events, ids, strict=True):
            if isinstance(event, ev.LedgerCommandRequested):
                command = event.command
                env = new_envelope(
                    command, producer=self.producer, participant=actor,
                    event_id=acc.ledger_event_id(event.command_id),
                    correlation_id=correlation, causation_id=event_id,
                    reply_to=self.topics.ledger_results, clock=self.clock)
                out.append(OutboxMessage(self.topics.ledger_commands,
                                         _ledger_record_key(key, event), encode(env),
                                         {"type": env.type}))
            elif type(event) in _PUBLISHED:
                env = new_envelope(event, producer=self.producer, participant=actor,
                                   event_id=event_id, correlation_id=correlation,
                                   causation_id=causation, clock=self.clock)
                out.append(OutboxMessage(self.topics.events, key, encode(env),
                                         {"type": env.type}))
        return out

    def _view_row(self, state: Any, version: int, now: datetime
                  ) -> tuple[str | None, dict[str, Any] | None]:
        """The read-model table and row of the stream's new state (JSON-ready)."""
        stamp = now.isoformat()
        match state:
            case dm.Transfer():
                i, t = state.instruction, state
                entry = dm.queue_entry(t)
                if entry is not None:
                    self._queues.add(entry.queue_key)
                wake = dm.next_wakeup(t, self.config, now)
                return "transfers", {
                    "uetr": i.uetr, "end_to_end_id": i.end_to_end_id,
                    "instruction_id": i.instruction_id,
                    "payer_participant": i.payer_participant, "payer_wallet": i.payer_wallet,
                    "payee_participant": i.payee_participant, "payee_wallet": i.payee_wallet,
                    "currency": i.currency, "amount": i.amount, "route": t.route,
                    "settlement_mode": t.mode, "status": t.status.value,
                    "reason": t.outcome_code, "attempts": t.attempts,
                    "queue_key": entry.queue_key if entry else None,
                    "queued_since": entry.queued_since.isoformat() if entry else None,
                    "retrying": bool(entry and entry.retrying),
                    "next_wakeup_at": wake.isoformat() if wake else None,
                    "settled_at": t.settled_at.isoformat() if t.settled_at else None,
                    "stream_version": version,
                    "created_at": (t.instructed_at or now).isoformat(), "updated_at": stamp}
            case dm.Conversion():
                c = state.instruction
                return "conversions", {
                    "uetr": c.uetr, "end_to_end_id": c.end_to_end_id, "kind": state.kind,
                    "participant_id": c.participant_id, "wallet_id": c.wallet_id,
                    "currency": c.currency, "amount": c.amount, "status": state.status.value,
                    "reason": state.code, "stream_version": version, "created_at": stamp,
                    "updated_at": stamp}
            case dm.Participant():
                r = state.request
                return "participants", {
                    "participant_id": r.participant_id, "name": r.name,
                    "status": state.status.value,
                    "currencies": [a.currency for a in r.currencies],
                    "failure_code": state.failure_code, "stream_version": version,
                    "state": state.model_dump(mode="json"), "updated_at": stamp}
            case dm.Wallet():
                w = state.request
                return "wallets", {
                    "participant_id": w.participant_id, "wallet_id": w.wallet_id,
                    "status": state.status.value, "frozen": state.frozen,
                    "currencies": list(w.currencies), "failure_code": state.failure_code,
                    "stream_version": version, "state": state.model_dump(mode="json"),
                    "updated_at": stamp}
        return None, None


_NAMES_NOBODY = (ev.OnboardParticipant, ev.FundSettlementAccount)
"""Commands whose context needs no participant or wallet (the decision needs the config only)."""


def _parties(source: Any) -> tuple[set[str], set[tuple[str, str]], tuple[str, str] | None] | None:
    """Participants, wallets and the queue a decision about ``source`` needs in its context:
    from a state's instruction or from a command that names them; ``None`` when unknown."""
    if isinstance(source, dm.Transfer | dm.Conversion):
        source = source.instruction
    match source:
        case ev.TransferInstruction():
            return ({source.payer_participant, source.payee_participant},
                    {(source.payer_participant, source.payer_wallet),
                     (source.payee_participant, source.payee_wallet)},
                    (dm.queue_key(source.payer_participant, source.currency), source.uetr))
        case ev.ConversionInstruction():
            return {source.participant_id}, {(source.participant_id, source.wallet_id)}, None
        case ev.OpenWallet():
            return {source.participant_id}, set(), None
        case dm.Participant() | dm.Wallet() | ev.OnboardParticipant() | \
                ev.FundSettlementAccount() | ev.FreezeWallet() | ev.UnfreezeWallet():
            return set(), set(), None
    return None


def _answered(message: Message) -> str | None:
    """The ledger key a ledger answer answers; ``None`` for a command."""
    if isinstance(message.payload, PostingAccepted | PostingRejected):
        return message.payload.command_id
    return None


def _ledger_record_key(stream_key: bytes, event: ev.LedgerCommandRequested) -> bytes:
    """The ``ledger.commands`` record key: ``accounts.record_key``, except for set-up commands.

    Onboarding and wallet opening emit asset definitions and account openings in one decision,
    in dependency order (assets before the accounts that hold them). Keyed by asset code and
    account id they would land on different partitions, which the ledger applies in parallel,
    and an account could be opened before its asset exists (``unknown_asset``). Keyed by the
    stream they stay on one partition, in order. Postings keep the ledger's convention (first
    debited account, or the settlement group).
    """
    if event.purpose in ("define_asset", "open_account"):
        return stream_key
    return acc.record_key(event.command).encode()


def _actor(state: Any) -> str:
    """Who acts when the clock or the queue moves a stream: the payer bank of a transfer."""
    if isinstance(state, dm.Transfer):
        return state.instruction.payer_participant
    return PRODUCER


def _queues_to_wake(before: Any, after: Any, events: Sequence[Payload]) -> frozenset[str]:
    """Settlement queues that may move after these events (module docstring)."""
    keys: set[str] = set()
    if isinstance(after, dm.Transfer):
        was = dm.queue_entry(before) if isinstance(before, dm.Transfer) else None
        if was is not None and dm.queue_entry(after) is None:
            keys.add(was.queue_key)  # the head left: the next one may go
    for event in events:
        if isinstance(event, ev.SettlementAccountFunded):
            keys.add(dm.queue_key(event.participant_id, event.currency))
        elif isinstance(event, ev.TransferSettled) and event.route == "interbank" and isinstance(
                after, dm.Transfer):
            i = after.instruction  # the payee bank's settlement account was credited
            keys.add(dm.queue_key(i.payee_participant, i.currency))
    return frozenset(keys)


_POSTPONE_SQL: Final = """
    UPDATE deposits.transfers t SET next_wakeup_at = w.due
    FROM unnest($1::text[], $2::timestamptz[]) AS w(uetr, due) WHERE t.uetr = w.uetr
"""
