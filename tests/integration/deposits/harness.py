"""A small Harbour for the deposits tests: real Kafka, real PostgreSQL, the ledger running.

Per test: its own database (migrated), its own topics (ledger commands, the deposits reply topic,
deposits commands and events, the dead-letter topics of both groups) and consumer groups. The
ledger runs in-process (``WriterLoop`` + its ``OutboxRelay``, as in the ledger's end-to-end test);
the deposits service runs in-process (``run_deposits`` with an injectable clock) or as a
``python -m services.deposits.app`` subprocess that a test can SIGKILL.

:class:`World` is what a bank, the settlement agent and ops see: it sends commands, reads every
event on the events topic, answers pacs.009 requests as the agent, and reads the ledger's balances
to check TD-1 (token supply = liability) and that every asset nets to zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.deposits import accounts as acc
from services.deposits import calendar as cal
from services.deposits.app import run_deposits
from services.deposits.metrics import DepositsMetrics
from services.deposits.service import DepositsService
from services.deposits.settings import DepositsSettings
from services.ledger.consumer import WriterLoop
from services.ledger.writer import LedgerWriter
from shared.clock import Clock, ManualClock
from shared.config import KafkaSettings, PostgresSettings
from shared.events import deposits as ev
from shared.events.envelope import Envelope, decode, encode, new_envelope
from shared.events.registry import Payload
from shared.events.topics import TopicSpec, dlq_topic
from shared.messaging.admin import ensure_topics
from shared.store.outbox import OutboxRelay
from tests.support.ledger_run import unsent as ledger_unsent

_REPO = Path(__file__).resolve().parents[3]
HSBC, HASE = "HSBCHKHH", "HASEHKHH"
BANKS = (HSBC, HASE)
HK = cal.BusinessCalendar(timezone="Asia/Hong_Kong")
WINDOWED_HKD = cal.CurrencyRules(
    currency="HKD", scale=2, settlement_mode="rtgs", settlement_asset="RTGS.HKD", calendar=HK,
    window=cal.SettlementWindow(opens_at=dtime(9), closes_at=dtime(17, 30)))
ALWAYS_HKD = WINDOWED_HKD.model_copy(update={"window": None})
CNH = cal.CurrencyRules(currency="CNH", scale=2, settlement_mode="wcbdc",
                        settlement_asset="WCBDC.CNH", calendar=HK, window=None)
WINDOWED = cal.DepositsConfig(currencies={"HKD": WINDOWED_HKD, "CNH": CNH})
ALWAYS_OPEN = cal.DepositsConfig(currencies={"HKD": ALWAYS_HKD, "CNH": CNH})


def hkt(y: int, mo: int, d: int, h: int, mi: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, tzinfo=UTC) - timedelta(hours=8)


# Monday 30 Nov 2026, 11:00 Hong Kong time: inside the HKD window (09:00-17:30).
MONDAY_11 = hkt(2026, 11, 30, 11)


def uetr() -> str:
    return str(uuid.uuid4())


def minor(amount: str) -> int:
    whole, _, frac = amount.partition(".")
    return int(whole) * 100 + int((frac + "00")[:2])


@dataclass(frozen=True, slots=True)
class Received:
    """One record read from the events topic."""

    partition: int
    offset: int
    envelope: Envelope
    payload: Payload


class EventLog:
    """Reads the events topic from the beginning into memory, in the background."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.records: list[Received] = []
        self.changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.listeners: list[Callable[[Received], Awaitable[None]]] = []

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(self.topic, bootstrap_servers=self.bootstrap,
                                    group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest", fetch_max_wait_ms=50)
        await consumer.start()
        self._task = asyncio.create_task(self._run(consumer), name="event-log")

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        try:
            while True:
                batch = await consumer.getmany(timeout_ms=100)
                fresh: list[Received] = []
                for tp, records in batch.items():
                    for r in records:
                        envelope, payload = decode(r.value)
                        fresh.append(Received(tp.partition, r.offset, envelope, payload))
                if fresh:
                    self.records.extend(fresh)
                    for listener in self.listeners:
                        for item in fresh:
                            await listener(item)
                    async with self.changed:
                        self.changed.notify_all()
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def of(self, cls: type[Payload] | tuple[type[Payload], ...], **match: Any) -> list[Any]:
        """Distinct events (by event id; relay re-sends are copies) of a type, in arrival order."""
        seen: set[uuid.UUID] = set()
        out = []
        for r in self.records:
            if isinstance(r.payload, cls) and r.envelope.event_id not in seen and all(
                    getattr(r.payload, k) == v for k, v in match.items()):
                seen.add(r.envelope.event_id)
                out.append(r.payload)
        return out

    async def wait(self, what: str, check: Callable[[], bool], timeout_s: float = 30) -> None:
        async def until() -> None:
            async with self.changed:
                await self.changed.wait_for(check)

        try:
            await asyncio.wait_for(until(), timeout_s)
        except TimeoutError:
            types = sorted({type(r.payload).__name__ for r in self.records})
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; "
                                 f"{len(self.records)} events so far: {types}") from None

    async def one(self, cls: type[Payload], timeout_s: float = 30, **match: Any) -> Any:
        await self.wait(f"{cls.__name__} {match}", lambda: bool(self.of(cls, **match)),
                        timeout_s)
        return self.of(cls, **match)[0]


class DepositsProcess:
    """``python -m services.deposits.app`` as a child process (stopped or SIGKILLed by tests)."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.proc, self.log_path = proc, log_path

    @classmethod
    async def start(cls, env: dict[str, str], log_path: Path) -> DepositsProcess:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            log.write(f"==== start at {time.time():.3f}\n".encode())
            log.flush()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.deposits.app", cwd=_REPO,
                env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT)
        return cls(proc, log_path)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def kill(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self, timeout_s: float = 20) -> int | None:
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                await self.kill()
        return self.proc.returncode

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class World:
    """Two banks, their wallets, the ledger and the deposits service, on fresh topics and DB."""

    def __init__(self, bootstrap: str, db_url: str, pool: asyncpg.Pool, *,
                 config: cal.DepositsConfig, clock: Clock | None, tmp: Path) -> None:
        self.bootstrap, self.db_url, self.pool = bootstrap, db_url, pool
        self.config = config
        self.clock = clock
        self.tmp = tmp
        tag = uuid.uuid4().hex[:10]
        self.ledger_commands = f"ledger.commands.{tag}"
        self.reply_topic = f"dep-{tag}.ledger-results"
        self.commands = f"deposits.commands.{tag}"
        self.events = f"deposits.events.{tag}"
        self.group = f"test.deposits.{tag}"
        self.ledger_group = f"test.ledger.{tag}"
        self.log = EventLog(bootstrap, self.events)
        self.agent_policy: dict[str, str] = {}
        """uetr -> "acsc" | "rjct" | "hold": how the settlement agent answers a pacs.009."""
        self.agent_default = "acsc"
        self._producer: AIOKafkaProducer | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._ledger_parts: list[Any] = []
        self._deposits_stop: asyncio.Event | None = None
        self._deposits_task: asyncio.Task[None] | None = None
        self.service: DepositsService | None = None
        self.metrics = DepositsMetrics()  # of the in-process service, fresh for each start
        self.process: DepositsProcess | None = None

    # --- life cycle ----------------------------------------------------------------------------

    def settings(self, **overrides: Any) -> DepositsSettings:
        return DepositsSettings(
            commands_topic=self.commands, events_topic=self.events,
            ledger_commands_topic=self.ledger_commands, ledger_results_topic=self.reply_topic,
            group_id=self.group, tick_interval_s=0.1, queue_retry_interval_s=0.5,
            relay_poll_s=0.2, max_attempts=3, metrics_port=0, metrics_refresh_s=0.2,
            config_json=self.config.model_dump_json(), **overrides)

    def env(self) -> dict[str, str]:
        s = self.settings()
        return {
            "HARBOUR_KAFKA_BOOTSTRAP": self.bootstrap, "HARBOUR_DATABASE_URL": self.db_url,
            "HARBOUR_DEPOSITS_COMMANDS_TOPIC": s.commands_topic,
            "HARBOUR_DEPOSITS_EVENTS_TOPIC": s.events_topic,
            "HARBOUR_DEPOSITS_LEDGER_COMMANDS_TOPIC": s.ledger_commands_topic,
            "HARBOUR_DEPOSITS_LEDGER_RESULTS_TOPIC": s.ledger_results_topic,
            "HARBOUR_DEPOSITS_GROUP_ID": s.group_id,
            "HARBOUR_DEPOSITS_TICK_INTERVAL_S": str(s.tick_interval_s),
            "HARBOUR_DEPOSITS_QUEUE_RETRY_INTERVAL_S": str(s.queue_retry_interval_s),
            "HARBOUR_DEPOSITS_RELAY_POLL_S": str(s.relay_poll_s),
            "HARBOUR_DEPOSITS_METRICS_PORT": "0",
            "HARBOUR_DEPOSITS_CONFIG_JSON": s.config_json or "",
        }

    async def start(self, *, deposits: str = "inprocess") -> None:
        await ensure_topics(self.bootstrap, [
            TopicSpec(self.ledger_commands, 4), TopicSpec(self.reply_topic, 2),
            TopicSpec(self.commands, 2), TopicSpec(self.events, 2),
            TopicSpec(dlq_topic(self.group), 1), TopicSpec(dlq_topic(self.ledger_group), 1)])
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all",
                                          enable_idempotence=True, linger_ms=2)
        await self._producer.start()
        await self.log.start()
        self.log.listeners.append(self._agent)
        await self.start_ledger()
        if deposits == "inprocess":
            await self.start_deposits()
        else:
            await self.start_deposits_process()

    async def start_ledger(self) -> None:
        writer = WriterLoop(self.pool, LedgerWriter(self.pool, topic=self.ledger_commands,
                                                    group_id=self.ledger_group),
                            self.bootstrap, topic=self.ledger_commands,
                            group_id=self.ledger_group)
        relay = OutboxRelay(self.pool, "ledger", self.bootstrap, poll_interval_s=0.2)
        self._ledger_parts = [writer, relay]
        self._tasks += [asyncio.create_task(writer.run(), name="ledger-writer"),
                        asyncio.create_task(relay.run(), name="ledger-relay")]

    async def start_deposits(self, **overrides: Any) -> None:
        assert self._deposits_task is None
        stop = asyncio.Event()
        ready = asyncio.Event()

        def started(service: DepositsService) -> None:
            self.service = service
            ready.set()

        self._deposits_stop = stop
        self.metrics = DepositsMetrics()
        self._deposits_task = asyncio.create_task(run_deposits(
            KafkaSettings(kafka_bootstrap=self.bootstrap, client_id="test-deposits"),
            PostgresSettings(database_url=self.db_url), self.settings(**overrides), stop,
            clock=self.clock, started=started, metrics=self.metrics), name="deposits")
        done, _ = await asyncio.wait([self._deposits_task, asyncio.create_task(ready.wait())],
                                     return_when=asyncio.FIRST_COMPLETED)
        if self._deposits_task in done:
            self._deposits_task.result()  # raises what stopped it

    async def stop_deposits(self) -> None:
        if self._deposits_task is not None:
            assert self._deposits_stop is not None
            self._deposits_stop.set()
            await asyncio.wait_for(self._deposits_task, 30)
            self._deposits_task = None

    async def start_deposits_process(self) -> DepositsProcess:
        self.process = await DepositsProcess.start(self.env(), self.tmp / "deposits.log")
        return self.process

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.stop_deposits()
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                await self.process.kill()
        for part in self._ledger_parts:
            part.stop()
        for task in self._tasks:
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(task, 15)
        await self.log.stop()
        if self._producer is not None:
            await self._producer.stop()

    # --- a bank, the agent, ops -----------------------------------------------------------------

    async def send(self, payload: Payload, *, participant: str = HSBC,
                   key: str | None = None) -> Envelope:
        """Publish one command on the deposits commands topic (keyed by its stream)."""
        envelope = new_envelope(payload, producer="tests", participant=participant)
        await self.publish_raw(self.commands, encode(envelope), key or _key_of(payload))
        return envelope

    async def publish_raw(self, topic: str, value: bytes, key: str | bytes | None,
                          headers: list[tuple[str, bytes | None]] | None = None) -> None:
        assert self._producer is not None
        raw_key = key.encode() if isinstance(key, str) else key
        await self._producer.send_and_wait(topic, value, key=raw_key, headers=headers)

    async def _agent(self, item: Received) -> None:
        """The settlement agent (CHATS): answers each pacs.009 by the test's policy."""
        p = item.payload
        if not isinstance(p, ev.InterbankSettlementRequested):
            return
        policy = self.agent_policy.get(p.uetr, self.agent_default)
        if policy == "acsc":
            await self.send(ev.SettleInterbankLeg(uetr=p.uetr, end_to_end_id=p.end_to_end_id,
                                                  agent_reference=f"CHATS-{p.uetr[:8]}"),
                            participant="HKMA")
        elif policy == "rjct":
            await self.send(ev.RejectInterbankLeg(uetr=p.uetr, end_to_end_id=p.end_to_end_id,
                                                  agent_reference=f"CHATS-{p.uetr[:8]}",
                                                  reason_code="AM04", detail="insufficient"),
                            participant="HKMA")

    async def onboard(self, currencies: Iterable[str] = ("HKD", "CNH"),
                      wallets: Iterable[tuple[str, str]] = ((HSBC, "alice"), (HSBC, "carol"),
                                                            (HASE, "bob"))) -> None:
        ccys = tuple(currencies)
        for bank in BANKS:
            await self.send(ev.OnboardParticipant(
                participant_id=bank, name=f"Bank {bank}",
                currencies=tuple(ev.CurrencyArrangement(currency=c,
                                                        settlement_account_ref=f"SA-{bank}-{c}")
                                 for c in ccys)), participant=bank)
        await self.log.wait("both banks onboarded",
                            lambda: len(self.log.of(ev.ParticipantOnboarded)) >= len(BANKS)
                            or bool(self.log.of(ev.ParticipantOnboardingFailed)))
        assert not self.log.of(ev.ParticipantOnboardingFailed), self.log.of(
            ev.ParticipantOnboardingFailed)
        wanted = list(wallets)
        for bank, wallet in wanted:
            await self.send(ev.OpenWallet(participant_id=bank, wallet_id=wallet, currencies=ccys,
                                          customer_ref=f"CUST-{wallet}", kyc_ref=f"KYC-{wallet}"),
                            participant=bank)
        await self.log.wait("wallets opened",
                            lambda: len(self.log.of(ev.WalletOpened)) >= len(wanted))

    async def issue(self, bank: str, wallet: str, currency: str, amount: str) -> str:
        u = uetr()
        await self.send(ev.IssueDepositToken(uetr=u, end_to_end_id=f"ISSUE-{u[:8]}",
                                             participant_id=bank, wallet_id=wallet,
                                             currency=currency, amount=amount), participant=bank)
        await self.log.one(ev.DepositTokensMinted, uetr=u)
        return u

    async def fund(self, bank: str, currency: str, amount: str, *, wait: bool = True) -> str:
        funding = f"F-{uuid.uuid4().hex[:12]}"
        await self.send(ev.FundSettlementAccount(funding_id=funding, participant_id=bank,
                                                 currency=currency, amount=amount),
                        participant="HKMA")
        if wait:
            await self.log.one(ev.SettlementAccountFunded, funding_id=funding)
        return funding

    async def transfer(self, amount: str, currency: str = "HKD", *,
                       payer: tuple[str, str] = (HSBC, "alice"),
                       payee: tuple[str, str] = (HASE, "bob"), u: str | None = None) -> str:
        u = u or uetr()
        await self.send(ev.InstructTransfer(
            uetr=u, end_to_end_id=f"E2E-{u[:8]}", payer_participant=payer[0],
            payer_wallet=payer[1], payee_participant=payee[0], payee_wallet=payee[1],
            currency=currency, amount=amount), participant=payer[0])
        return u

    async def final(self, u: str, timeout_s: float = 30) -> Payload:
        """The transfer's terminal event (settled, failed, cancelled, expired, rejected)."""
        kinds = (ev.TransferSettled, ev.TransferFailed, ev.TransferCancelled,
                 ev.TransferExpired, ev.TransferRejected)
        await self.log.wait(f"transfer {u} final", lambda: bool(self.log.of(kinds, uetr=u)),
                            timeout_s)
        return self.log.of(kinds, uetr=u)[0]

    # --- the books -----------------------------------------------------------------------------

    async def balances(self) -> dict[str, acc.AccountBalance]:
        rows = await self.pool.fetch(
            "SELECT b.account_id, a.asset, b.debits_posted, b.credits_posted, b.debits_pending, "
            "b.credits_pending FROM ledger.balances b JOIN ledger.accounts a "
            "ON a.id = b.account_id")
        return {r["account_id"]: acc.AccountBalance(
            r["account_id"], r["asset"], int(r["debits_posted"]), int(r["credits_posted"]),
            int(r["debits_pending"]), int(r["credits_pending"])) for r in rows}

    async def balance(self, account: str) -> int:
        """Posted credit balance (credits - debits) of one account."""
        b = (await self.balances())[account]
        return b.credits_posted - b.debits_posted

    async def assert_books(self, *, settled: bool = True) -> dict[str, acc.AccountBalance]:
        """TD-1 for every bank and currency, every asset nets to zero (posted and pending);
        with ``settled``, nothing is left pending either."""
        balances = await self.balances()
        for bank in BANKS:
            for ccy in self.config.currencies:
                report = acc.supply_report(bank, ccy, balances.values())
                assert report.ok, report
        net = acc.net_by_asset(balances.values())
        assert all(v == (0, 0) for v in net.values()), net
        if settled:
            held = {k: b for k, b in balances.items() if b.debits_pending or b.credits_pending}
            assert not held, f"pending amounts left: {held}"
        return balances

    async def deposits_events(self) -> int:
        return int(await self.pool.fetchval("SELECT count(*) FROM deposits.events"))

    async def quiet(self, timeout_s: float = 30) -> None:
        """Wait until both outboxes are drained and both consumer groups are caught up."""
        deadline = time.monotonic() + timeout_s
        while True:
            unsent = await self.pool.fetchval(
                "SELECT count(*) FROM deposits.outbox WHERE sent_at IS NULL"
            ) + await ledger_unsent(self.pool)
            lag = await self.lag()
            if unsent == 0 and lag == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not quiet after {timeout_s}s: unsent {unsent}, lag {lag}")
            await asyncio.sleep(0.2)

    async def lag(self) -> int:
        """Records not yet consumed by deposits (committed offsets) or the ledger (stored)."""
        ends = {t: await _end_offsets(self.bootstrap, t)
                for t in (self.commands, self.reply_topic, self.ledger_commands)}
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            committed = await admin.list_consumer_group_offsets(self.group)
        finally:
            await admin.close()
        lag = 0
        for topic in (self.commands, self.reply_topic):
            for p, end in ends[topic].items():
                meta = committed.get(TopicPartition(topic, p))
                lag += end - (meta.offset if meta is not None and meta.offset >= 0 else 0)
        stored = {r["partition"]: r["next_offset"] for r in await self.pool.fetch(
            "SELECT partition, next_offset FROM ledger.consumed_offsets WHERE topic = $1",
            self.ledger_commands)}
        lag += sum(end - stored.get(p, 0) for p, end in ends[self.ledger_commands].items())
        return lag


def _key_of(payload: Payload) -> str:
    from services.deposits.domain import stream_of

    stream = stream_of(payload)
    return stream.split(":", 1)[1] if stream else "none"


async def _end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in sorted(parts)])
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        await consumer.stop()


async def read_all(bootstrap: str, topic: str) -> list[tuple[int, bytes | None, bytes | None,
                                                            list[tuple[str, bytes]]]]:
    """Every record of ``topic`` now: (partition, key, value, headers), per partition in order."""
    ends = await _end_offsets(bootstrap, topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    out: list[tuple[int, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
    try:
        parts = [TopicPartition(topic, p) for p in sorted(ends)]
        consumer.assign(parts)
        position = dict.fromkeys(ends, 0)
        deadline = time.monotonic() + 30
        while any(position[p] < ends[p] for p in ends):
            assert time.monotonic() < deadline, f"read_all {topic}: at {position}, end {ends}"
            for tp, records in (await consumer.getmany(timeout_ms=300)).items():
                for r in records:
                    if r.offset < ends[tp.partition]:
                        position[tp.partition] = r.offset + 1
                        out.append((tp.partition, r.key, r.value, list(r.headers or ())))
    finally:
        await consumer.stop()
    return out


def new_world(bootstrap: str, db_url: str, pool: asyncpg.Pool, tmp: Path, *,
              config: cal.DepositsConfig = WINDOWED, clock: Clock | None = None) -> World:
    return World(bootstrap, db_url, pool, config=config,
                 clock=clock if clock is not None else ManualClock(MONDAY_11), tmp=tmp)
