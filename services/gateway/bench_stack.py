"""The stack ``harbour bench gateway`` runs on: its own database and topics, the gateway, the
ledger and the deposits service as subprocesses, two onboarded banks with funded wallets, and a
reader of the deposits events topic that records when each transfer settled."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import asyncpg
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from shared.benchkit import ServiceProcess, admin_execute
from shared.events import deposits as ev
from shared.events.envelope import encode, new_envelope
from shared.events.registry import Payload
from shared.events.topics import TopicSpec, dlq_topic
from shared.messaging.admin import ensure_topics
from shared.store.migrate import migrate

from . import repository as repo
from .auth import Role
from .bench import BANKS, CURRENCY, GatewayBenchConfig

_FINAL = (b"TransferSettled", b"TransferFailed", b"TransferRejected", b"TransferExpired",
          b"TransferCancelled")
# CNH in tokenised central-bank money, 24/7: the interbank leg settles on Harbour, no agent.
_DEPOSITS_CONFIG = json.dumps({"currencies": {CURRENCY: {
    "currency": CURRENCY, "scale": 2, "settlement_mode": "wcbdc",
    "settlement_asset": "WCBDC.CNH", "calendar": {"timezone": "Asia/Hong_Kong"},
    "window": None}}})


class Events:
    """Reads the deposits events topic; records per UETR when it settled (monotonic ns) or how
    it ended otherwise, and counts events by type (for the set-up waits)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.settled: dict[str, int] = {}
        self.final: dict[str, str] = {}
        self.counts: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(self.topic, bootstrap_servers=self.bootstrap, group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    fetch_max_wait_ms=5)
        await consumer.start()
        self._task = asyncio.create_task(self._run(consumer))

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        try:
            while True:
                batch = await consumer.getmany(timeout_ms=50, max_records=5000)
                now = time.monotonic_ns()
                for records in batch.values():
                    for r in records:
                        self._see(r.value, now)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()

    def _see(self, value: bytes, now: int) -> None:
        # Cheap filter first: the bench shares the machine's cores with what it measures.
        start = value.find(b'"type":"deposits.') + 17
        name = value[start:value.find(b'"', start)]
        self.counts[name.decode()] = self.counts.get(name.decode(), 0) + 1
        if name in _FINAL:
            uetr = json.loads(value)["payload"]["uetr"]
            self.final.setdefault(uetr, name.decode())
            if name == b"TransferSettled":
                self.settled.setdefault(uetr, now)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def wait_count(self, name: str, count: int, stall_s: float,
                         check: Callable[[], None]) -> None:
        await _until(lambda: self.counts.get(name, 0), count, stall_s, check, name)

    async def wait_final(self, uetrs: Sequence[str], timeout_s: float,
                         check: Callable[[], None]) -> None:
        """Until every transfer in ``uetrs`` ended, or ``timeout_s`` passed (no error: the
        report counts what did not settle)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(u not in self.final for u in uetrs):
            check()
            await asyncio.sleep(0.1)


async def _until(progress: Callable[[], int], target: int, stall_s: float,
                 check: Callable[[], None], what: str) -> None:
    last, changed = -1, time.monotonic()
    while (seen := progress()) < target:
        check()
        if seen != last:
            last, changed = seen, time.monotonic()
        elif time.monotonic() - changed > stall_s:
            raise RuntimeError(f"stalled at {seen}/{target} {what}")
        await asyncio.sleep(0.05)


class BenchStack:
    def __init__(self, cfg: GatewayBenchConfig, workdir: Path) -> None:
        self.cfg, self.workdir = cfg, workdir
        self.tag = uuid.uuid4().hex[:10]
        self.db_name = f"bench_gateway_{self.tag}"
        self.db_url = f"{cfg.database_url.rpartition('/')[0]}/{self.db_name}"
        self.port = _free_port()
        self.tokens: dict[str, str] = {}
        self.ops_token = ""
        t, group, ledger_group = self.tag, f"bench.deposits.{self.tag}", f"bench.ledger.{self.tag}"
        self.topics = {"ledger": TopicSpec(f"ledger.commands.bench{t}", 8),
                       "reply": TopicSpec(f"bench{t}.ledger-results", 4),
                       "commands": TopicSpec(f"deposits.commands.bench{t}", 4),
                       "events": TopicSpec(f"deposits.events.bench{t}", 4)}
        self.specs = [*self.topics.values(), TopicSpec(dlq_topic(group), 1),
                      TopicSpec(dlq_topic(ledger_group), 1)]
        base = {"HARBOUR_KAFKA_BOOTSTRAP": cfg.bootstrap, "HARBOUR_DATABASE_URL": self.db_url}
        self.gateway = ServiceProcess("gateway", {
            **base, "HARBOUR_GATEWAY_PORT": str(self.port),
            "HARBOUR_GATEWAY_COMMANDS_TOPIC": self.topics["commands"].name,
            "HARBOUR_GATEWAY_RATE_PER_S": "1000000", "HARBOUR_GATEWAY_RATE_BURST": "1000000"},
            workdir / "gateway.log")
        ledger = ServiceProcess("ledger", {**base,
                                    "HARBOUR_LEDGER_COMMANDS_TOPIC": self.topics["ledger"].name,
                                    "HARBOUR_LEDGER_GROUP_ID": ledger_group,
                                    "HARBOUR_LEDGER_METRICS_PORT": "0"},
                         workdir / "ledger.log")
        deposits = ServiceProcess("deposits", {
            **base, "HARBOUR_DEPOSITS_COMMANDS_TOPIC": self.topics["commands"].name,
            "HARBOUR_DEPOSITS_METRICS_PORT": "0",
            "HARBOUR_DEPOSITS_EVENTS_TOPIC": self.topics["events"].name,
            "HARBOUR_DEPOSITS_LEDGER_COMMANDS_TOPIC": self.topics["ledger"].name,
            "HARBOUR_DEPOSITS_LEDGER_RESULTS_TOPIC": self.topics["reply"].name,
            "HARBOUR_DEPOSITS_GROUP_ID": group, "HARBOUR_DEPOSITS_RELAY_POLL_S": "0.2",
            "HARBOUR_DEPOSITS_CONFIG_JSON": _DEPOSITS_CONFIG}, workdir / "deposits.log")
        self.services = [self.gateway, *((ledger, deposits) if cfg.settle else ())]
        self.events = Events(cfg.bootstrap, self.topics["events"].name)
        self._producer: AIOKafkaProducer | None = None

    async def start(self, say: Callable[[str], None]) -> None:
        await admin_execute(self.cfg.database_url, f'CREATE DATABASE "{self.db_name}"')
        await migrate(self.db_url)
        await ensure_topics(self.cfg.bootstrap, self.specs)
        await self._keys()
        for service in self.services:
            await service.start()
        if self.cfg.settle:
            await self.events.start()
            say("set-up: two banks onboarded in CNH, wallets issued tokens, accounts funded")
            await self._onboard()
        else:
            await admin_execute(self.db_url, "INSERT INTO ledger.assets (code, scale) "
                                      f"VALUES ('{CURRENCY}', 2)", database=None)
        await self._wait_listening()

    async def _keys(self) -> None:
        conn = await asyncpg.connect(self.db_url)
        try:
            for bank in BANKS:
                await repo.add_participant(conn, bank, bank, Role.BANK)
                self.tokens[bank] = (await repo.issue_key(conn, bank, "bench")).token
            await repo.add_participant(conn, "bench-ops", "bench", Role.OPS)
            self.ops_token = (await repo.issue_key(conn, "bench-ops", "bench")).token
        finally:
            await conn.close()

    async def _onboard(self) -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=self.cfg.bootstrap, acks="all",
                                          enable_idempotence=True, linger_ms=2)
        await self._producer.start()
        cfg, check = self.cfg, self.check
        await self._send([(b, ev.OnboardParticipant(participant_id=b, name=b, currencies=(
            ev.CurrencyArrangement(currency=CURRENCY, settlement_account_ref=f"SA-{b}"),)))
            for b in BANKS])
        await self.events.wait_count("ParticipantOnboarded", len(BANKS), cfg.stall_s, check)
        wallets = [(b, f"w{i:03d}") for b in BANKS for i in range(cfg.wallets)]
        await self._send([(f"{b}:{w}", ev.OpenWallet(
            participant_id=b, wallet_id=w, currencies=(CURRENCY,), customer_ref="C",
            kyc_ref="K")) for b, w in wallets])
        await self.events.wait_count("WalletOpened", len(wallets), cfg.stall_s, check)
        issues = [(u, ev.IssueDepositToken(uetr=u, end_to_end_id="BENCH", participant_id=b,
                                           wallet_id=w, currency=CURRENCY, amount="1000000.00"))
                  for b, w in wallets for u in [str(uuid.uuid4())]]
        funding = [(b, ev.FundSettlementAccount(funding_id=f"F-{b}", participant_id=b,
                                                currency=CURRENCY, amount="1000000000.00"))
                   for b in BANKS]
        await self._send([*issues, *funding])
        await self.events.wait_count("DepositTokensMinted", len(issues), cfg.stall_s, check)
        await self.events.wait_count("SettlementAccountFunded", len(BANKS), cfg.stall_s, check)

    async def _send(self, items: Sequence[tuple[str, Payload]]) -> None:
        assert self._producer is not None
        topic = self.topics["commands"].name
        futures = []
        for key, payload in items:
            actor = getattr(payload, "participant_id", "ops")
            value = encode(new_envelope(payload, producer="bench", participant=actor))
            futures.append(await self._producer.send(topic, value, key=key.encode()))
        await asyncio.gather(*futures)

    async def _wait_listening(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.check()
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            await asyncio.sleep(0.2)
        raise RuntimeError("the gateway did not start listening")

    def check(self) -> None:
        for service in self.services:
            service.check()

    def cpu(self) -> dict[str, float]:
        out = {s.name: s.cpu_s() for s in self.services}
        t = psutil.Process().cpu_times()
        out["bench client"] = float(t.user + t.system)  # float ok: CPU seconds
        return out

    def tails(self) -> list[str]:
        return [f"{s.name} log tail:\n{s.tail(15)}" for s in self.services]

    async def stop(self) -> None:
        await self.events.stop()
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
        for service in self.services:
            with contextlib.suppress(Exception):
                await service.stop()
        if self.cfg.keep:
            return
        with contextlib.suppress(Exception):
            await admin_execute(self.cfg.database_url,
                                f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        with contextlib.suppress(Exception):
            admin = AIOKafkaAdminClient(bootstrap_servers=self.cfg.bootstrap)
            await admin.start()
            try:
                await admin.delete_topics([s.name for s in self.specs])
            finally:
                await admin.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
