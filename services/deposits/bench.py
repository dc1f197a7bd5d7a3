"""The deposits benchmark behind ``harbour bench deposits``.

What it measures (DESIGN.md "Quality bars": a domain round trip, command in -> settled event out,
p99 < 250 ms at 500/s offered): interbank tokenized-deposit transfers in ``wcbdc`` mode, the fully
automated atomic path (earmark, mint and wCBDC-leg pendings asked for together, then one group
commit), end to end: from the ``InstructTransfer`` published on the commands topic to its
``TransferSettled`` consumed from the events topic. Each transfer is six sequential Kafka hops
(the command, two ledger round trips, the event) through two services, with four ledger
commands.

One run:

1. creates its own database (``bench_deposits_<id>``, migrated) and topics, and starts the ledger
   (``python -m services.ledger.app``) and the deposits service (``python -m
   services.deposits.app``) as subprocesses on them;
2. setup: two banks onboarded in CNH (``wcbdc``, 24/7), ``--wallets`` wallets per bank issued
   tokens, settlement accounts funded so that nothing queues;
3. throughput: ``--transfers`` transfers published as fast as the producer goes; first publish ->
   last ``TransferSettled`` consumed;
4. latency: transfers offered at ``--rate`` per second for ``--duration-s`` seconds by a pacing
   loop; latency per transfer is settled-consumed minus *scheduled* send time (no coordinated
   omission); p50/p90/p99/max;
5. the raw reference: one Kafka hop (publish -> consume, the same broker, the same rate), since a
   transfer is at least six sequential hops;
6. drops the database and topics unless ``--keep``.

``HARBOUR_BENCH_PROFILE_DEPOSITS=<path>`` (or ``..._LEDGER``) runs that service under cProfile and
writes its statistics to ``<path>`` when it stops (figures then include the profiler's overhead).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import typer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from shared.benchkit import (
    LatencySummary,
    ServiceProcess,
    admin_execute,
    delete_topics,
    summarize_ns,
)
from shared.events import deposits as ev
from shared.events.envelope import encode, new_envelope
from shared.events.registry import Payload
from shared.events.topics import TopicSpec, dlq_topic
from shared.messaging.admin import ensure_topics
from shared.store.migrate import migrate

from .calendar import BusinessCalendar, CurrencyRules, DepositsConfig

__all__ = ["DepositsBenchConfig", "DepositsBenchReport", "command", "render", "run_bench"]

BANKS = ("BENCHAHK", "BENCHBHK")
CURRENCY = "CNH"
HOPS = 6
TARGET_P99_MS = 250.0
Say = Callable[[str], None]
BENCH_CONFIG = DepositsConfig(currencies={CURRENCY: CurrencyRules(
    currency=CURRENCY, scale=2, settlement_mode="wcbdc", settlement_asset="WCBDC.CNH",
    calendar=BusinessCalendar(timezone="Asia/Hong_Kong"), window=None)})


@dataclass(frozen=True)
class DepositsBenchConfig:
    bootstrap: str
    database_url: str
    transfers: int = 2_000
    rate: int = 500
    duration_s: float = 10.0
    wallets: int = 20
    max_batch: int = 500
    keep: bool = False
    seed: int = 7
    stall_s: float = 60.0


@dataclass
class DepositsBenchReport:
    config: dict[str, Any]
    setup_s: float | None = None
    throughput_count: int = 0
    throughput_s: float | None = None
    throughput_per_s: float | None = None
    latency: LatencySummary | None = None
    latency_offered_per_s: float | None = None
    latency_achieved_per_s: float | None = None
    latency_lost: int = 0
    hop: LatencySummary | None = None
    deposits_peak_rss_mb: float | None = None
    deposits_cpu_s: float | None = None
    ledger_cpu_s: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


# --- processes ---------------------------------------------------------------------------------


# --- the events reader -------------------------------------------------------------------------


class Settled:
    """Consumes the events topic; records when each UETR's TransferSettled arrived (ns)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.at: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(self.topic, bootstrap_servers=self.bootstrap, group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    fetch_max_wait_ms=5, max_partition_fetch_bytes=4 << 20)
        await consumer.start()
        self._task = asyncio.create_task(self._run(consumer))

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        try:
            while True:
                batch = await consumer.getmany(timeout_ms=50, max_records=5000)
                now = time.monotonic_ns()
                for records in batch.values():
                    for r in records:
                        # Cheap filter first: the bench client shares the machine's two cores.
                        value: bytes = r.value
                        start = value.find(b'"type":"deposits.')
                        name = value[start + 17:value.find(b'"', start + 17)].decode()
                        self.counts[name] = self.counts.get(name, 0) + 1
                        if name == "TransferSettled":
                            u = json.loads(value)["payload"]["uetr"]
                            self.at.setdefault(u, now)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def wait_count(self, name: str, count: int, stall_s: float,
                         services: Sequence[ServiceProcess]) -> None:
        last, last_change = -1, time.monotonic()
        while self.counts.get(name, 0) < count:
            for s in services:
                s.check()
            seen = self.counts.get(name, 0)
            if seen != last:
                last, last_change = seen, time.monotonic()
            elif time.monotonic() - last_change > stall_s:
                raise RuntimeError(f"stalled at {seen}/{count} {name}")
            await asyncio.sleep(0.05)

    async def wait_uetrs(self, uetrs: Sequence[str], stall_s: float,
                         services: Sequence[ServiceProcess]) -> None:
        last, last_change = -1, time.monotonic()
        while True:
            missing = sum(1 for u in uetrs if u not in self.at)
            if not missing:
                return
            for s in services:
                s.check()
            if missing != last:
                last, last_change = missing, time.monotonic()
            elif time.monotonic() - last_change > stall_s:
                raise RuntimeError(f"stalled: {missing} of {len(uetrs)} transfers not settled")
            await asyncio.sleep(0.05)


# --- workload ----------------------------------------------------------------------------------


def _record(payload: Payload, participant: str) -> bytes:
    return encode(new_envelope(payload, producer="bench", participant=participant))


def plan_transfers(count: int, wallets: int, rng: random.Random) -> list[tuple[str, bytes]]:
    """``count`` pre-encoded interbank CNH transfers between the two banks: (uetr, value)."""
    out = []
    for _ in range(count):
        payer, payee = rng.sample(BANKS, 2)
        u = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        amount = f"{rng.randint(1, 9)}.{rng.randint(0, 99):02d}"
        out.append((u, _record(ev.InstructTransfer(
            uetr=u, end_to_end_id=f"B-{u[:8]}", payer_participant=payer,
            payer_wallet=f"w{rng.randrange(wallets):03d}", payee_participant=payee,
            payee_wallet=f"w{rng.randrange(wallets):03d}", currency=CURRENCY, amount=amount),
            payer)))
    return out


# --- the run -----------------------------------------------------------------------------------


async def _publish(producer: AIOKafkaProducer, topic: str, items: Sequence[tuple[str, bytes]],
                   chunk: int = 500) -> None:
    for i in range(0, len(items), chunk):
        futures = [await producer.send(topic, v, key=k.encode()) for k, v in items[i:i + chunk]]
        await asyncio.gather(*futures)


async def _paced(producer: AIOKafkaProducer, topic: str, items: Sequence[tuple[str, bytes]],
                 rate: float) -> list[int]:
    """Send ``items`` at ``rate``/s; return each one's scheduled send time (monotonic ns)."""
    start = time.monotonic_ns() + 50_000_000
    schedule = [start + round(i * 1e9 / rate) for i in range(len(items))]
    futures = []
    for (k, v), due in zip(items, schedule, strict=True):
        delay = (due - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        futures.append(await producer.send(topic, v, key=k.encode()))
    await asyncio.gather(*futures)
    return schedule


async def _kafka_hop(bootstrap: str, topic: str, rate: float, duration_s: float
                     ) -> LatencySummary | None:
    """The raw reference: one publish -> consume hop on the same broker at the same rate."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                enable_auto_commit=False, auto_offset_reset="latest",
                                fetch_max_wait_ms=5)
    await consumer.start()
    await consumer.seek_to_end()
    got: dict[bytes, int] = {}
    count = max(1, int(rate * duration_s))

    async def read() -> None:
        while len(got) < count:
            for records in (await consumer.getmany(timeout_ms=50)).values():
                now = time.monotonic_ns()
                for r in records:
                    got.setdefault(r.key, now)

    reader = asyncio.create_task(read())
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                                linger_ms=0)
    await producer.start()
    try:
        await asyncio.sleep(0.5)
        items = [(f"k{i}", b"x" * 600) for i in range(count)]
        schedule = await _paced(producer, topic, items, rate)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader, 30)
    finally:
        reader.cancel()
        await producer.stop()
        await consumer.stop()
    return summarize_ns([got[k.encode()] - due for (k, _), due in
                      zip(items, schedule, strict=True) if k.encode() in got])


async def run_bench(cfg: DepositsBenchConfig, say: Say) -> DepositsBenchReport:
    report = DepositsBenchReport(config=asdict(cfg))
    tag = uuid.uuid4().hex[:10]
    db_name = f"bench_deposits_{tag}"
    base, _, _ = cfg.database_url.rpartition("/")
    db_url = f"{base}/{db_name}"
    group, ledger_group = f"bench.deposits.{tag}", f"bench.ledger.{tag}"
    topics = {
        "ledger": TopicSpec(f"ledger.commands.bench{tag}", 8),
        "reply": TopicSpec(f"bench{tag}.ledger-results", 4),
        "commands": TopicSpec(f"deposits.commands.bench{tag}", 4),
        "events": TopicSpec(f"deposits.events.bench{tag}", 4),
        "hop": TopicSpec(f"bench.hop.{tag}", 4),
    }
    specs = [*topics.values(), TopicSpec(dlq_topic(group), 1), TopicSpec(dlq_topic(ledger_group),
                                                                          1)]
    workdir = Path(tempfile.mkdtemp(prefix="harbour-bench-deposits-"))
    base_env = {"HARBOUR_KAFKA_BOOTSTRAP": cfg.bootstrap, "HARBOUR_DATABASE_URL": db_url,
                "PYTHONUNBUFFERED": "1"}
    ledger = ServiceProcess("ledger", {**base_env,
                                 "HARBOUR_LEDGER_COMMANDS_TOPIC": topics["ledger"].name,
                                 "HARBOUR_LEDGER_GROUP_ID": ledger_group,
                                 "HARBOUR_LEDGER_METRICS_PORT": "0"},
                      workdir / "ledger.log")
    deposits = ServiceProcess("deposits", {
        **base_env,
        "HARBOUR_DEPOSITS_COMMANDS_TOPIC": topics["commands"].name,
        "HARBOUR_DEPOSITS_EVENTS_TOPIC": topics["events"].name,
        "HARBOUR_DEPOSITS_LEDGER_COMMANDS_TOPIC": topics["ledger"].name,
        "HARBOUR_DEPOSITS_LEDGER_RESULTS_TOPIC": topics["reply"].name,
        "HARBOUR_DEPOSITS_GROUP_ID": group,
        "HARBOUR_DEPOSITS_MAX_BATCH": str(cfg.max_batch),
        "HARBOUR_DEPOSITS_RELAY_POLL_S": "0.2",
        "HARBOUR_DEPOSITS_METRICS_PORT": "0",
        "HARBOUR_DEPOSITS_CONFIG_JSON": BENCH_CONFIG.model_dump_json(),
    }, workdir / "deposits.log")
    services = (ledger, deposits)
    settled = Settled(cfg.bootstrap, topics["events"].name)
    producer = AIOKafkaProducer(bootstrap_servers=cfg.bootstrap, acks="all",
                                enable_idempotence=True, linger_ms=1,
                                max_batch_size=256 * 1024)
    say(f"database {db_name}, topics *{tag}, logs in {workdir}")
    try:
        await admin_execute(cfg.database_url, f'CREATE DATABASE "{db_name}"')
        await migrate(db_url)
        await ensure_topics(cfg.bootstrap, specs)
        await producer.start()
        await settled.start()
        for s in services:
            await s.start()
        began = time.monotonic()
        say("setup: onboarding two banks, opening wallets, issuing tokens, funding")
        await _setup(cfg, producer, topics["commands"].name, settled, services)
        report.setup_s = time.monotonic() - began
        rng = random.Random(cfg.seed)

        say(f"throughput: {cfg.transfers} transfers published as fast as possible")
        work = plan_transfers(cfg.transfers, cfg.wallets, rng)
        cpu0 = (deposits.cpu_s(), ledger.cpu_s())
        t0 = time.monotonic_ns()
        await _publish(producer, topics["commands"].name, work)
        await settled.wait_uetrs([u for u, _ in work], cfg.stall_s, services)
        elapsed = max(settled.at[u] for u, _ in work) - t0
        report.throughput_count = len(work)
        report.throughput_s = elapsed / 1e9
        report.throughput_per_s = len(work) * 1e9 / elapsed
        report.deposits_cpu_s = deposits.cpu_s() - cpu0[0]
        report.ledger_cpu_s = ledger.cpu_s() - cpu0[1]
        say(f"  {report.throughput_per_s:,.0f} transfers/s ({report.throughput_s:.1f} s)")

        count = max(1, int(cfg.rate * cfg.duration_s))
        say(f"latency: {count} transfers offered at {cfg.rate}/s")
        work = plan_transfers(count, cfg.wallets, rng)
        schedule = await _paced(producer, topics["commands"].name, work, cfg.rate)
        report.latency_offered_per_s = count * 1e9 / max(1, schedule[-1] - schedule[0])
        with contextlib.suppress(RuntimeError):
            await settled.wait_uetrs([u for u, _ in work], cfg.stall_s, services)
        done = [(settled.at[u], due) for (u, _), due in zip(work, schedule, strict=True)
                if u in settled.at]
        report.latency_lost = count - len(done)
        report.latency = summarize_ns([at - due for at, due in done])
        if done:
            span = max(at for at, _ in done) - schedule[0]
            report.latency_achieved_per_s = len(done) * 1e9 / max(1, span)
        if report.latency is not None:
            say(f"  p50 {report.latency.p50_ms:.0f} ms, p99 {report.latency.p99_ms:.0f} ms")

        say(f"raw reference: one Kafka hop at {cfg.rate}/s")
        report.hop = await _kafka_hop(cfg.bootstrap, topics["hop"].name, cfg.rate,
                                      min(cfg.duration_s, 5.0))
        report.deposits_peak_rss_mb = deposits.peak_rss / 2**20
    except (Exception, asyncio.CancelledError) as exc:
        report.error = f"{type(exc).__name__}: {exc}"
        for s in services:
            report.notes.append(f"{s.name} log tail:\n{s.tail()}")
    finally:
        await settled.stop()
        with contextlib.suppress(Exception):
            await producer.stop()
        for s in services:
            with contextlib.suppress(Exception):
                await s.stop()
        if not cfg.keep:
            with contextlib.suppress(Exception):
                await admin_execute(cfg.database_url,
                                    f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
            with contextlib.suppress(Exception):
                await delete_topics(cfg.bootstrap, [s.name for s in specs])
    return report


async def _setup(cfg: DepositsBenchConfig, producer: AIOKafkaProducer, topic: str,
                 settled: Settled, services: Sequence[ServiceProcess]) -> None:
    async def send(items: list[tuple[str, bytes]]) -> None:
        await _publish(producer, topic, items)

    await send([(bank, _record(ev.OnboardParticipant(
        participant_id=bank, name=bank, currencies=(ev.CurrencyArrangement(
            currency=CURRENCY, settlement_account_ref=f"SA-{bank}"),)), bank)) for bank in BANKS])
    await settled.wait_count("ParticipantOnboarded", len(BANKS), cfg.stall_s, services)
    await send([(f"{bank}:w{i:03d}", _record(ev.OpenWallet(
        participant_id=bank, wallet_id=f"w{i:03d}", currencies=(CURRENCY,), customer_ref="C",
        kyc_ref="K"), bank)) for bank in BANKS for i in range(cfg.wallets)])
    await settled.wait_count("WalletOpened", len(BANKS) * cfg.wallets, cfg.stall_s, services)
    issues = []
    for bank in BANKS:
        for i in range(cfg.wallets):
            u = str(uuid.uuid4())
            issues.append((u, _record(ev.IssueDepositToken(
                uetr=u, end_to_end_id=f"I-{u[:8]}", participant_id=bank, wallet_id=f"w{i:03d}",
                currency=CURRENCY, amount="10000000.00"), bank)))
    await send(issues)
    await send([(bank, _record(ev.FundSettlementAccount(
        funding_id=f"F-{bank}", participant_id=bank, currency=CURRENCY,
        amount="1000000000.00"), "HKMA")) for bank in BANKS])
    await settled.wait_count("DepositTokensMinted", len(issues), cfg.stall_s, services)
    await settled.wait_count("SettlementAccountFunded", len(BANKS), cfg.stall_s, services)


def render(report: DepositsBenchReport, console: Any) -> None:
    """Print the figures beside the raw reference and the target."""
    from rich.table import Table

    table = Table(title="harbour bench deposits: interbank transfers (wcbdc), command -> "
                        "TransferSettled")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("note")
    if report.throughput_per_s is not None:
        table.add_row("throughput", f"{report.throughput_per_s:,.0f} /s",
                      f"{report.throughput_count} transfers in {report.throughput_s:.1f} s")
    if report.deposits_cpu_s is not None and report.throughput_count:
        per = 1e3 / report.throughput_count
        table.add_row("CPU per transfer", f"{report.deposits_cpu_s * per:.2f} ms",
                      f"deposits service; ledger {(report.ledger_cpu_s or 0) * per:.2f} ms")
    if report.latency is not None:
        lat = report.latency
        verdict = "meets" if lat.p99_ms < TARGET_P99_MS else "misses"
        table.add_row(f"latency at {report.latency_offered_per_s or 0:,.0f}/s offered",
                      f"p50 {lat.p50_ms:,.0f} ms", f"p90 {lat.p90_ms:,.0f}, max {lat.max_ms:,.0f}")
        table.add_row("  p99", f"{lat.p99_ms:,.0f} ms",
                      f"{verdict} the {TARGET_P99_MS:.0f} ms target; achieved "
                      f"{report.latency_achieved_per_s or 0:,.0f}/s, "
                      f"{report.latency_lost} not settled")
    if report.hop is not None:
        hop = report.hop
        table.add_row("raw reference: 1 Kafka hop", f"p50 {hop.p50_ms:.1f} ms",
                      f"p99 {hop.p99_ms:.1f} ms; a transfer is >= {HOPS} sequential hops "
                      f"(floor ~{HOPS * hop.p50_ms:.0f} ms p50)")
    if report.deposits_peak_rss_mb is not None:
        table.add_row("deposits peak RSS", f"{report.deposits_peak_rss_mb:,.0f} MiB", "")
    if report.setup_s is not None:
        table.add_row("setup", f"{report.setup_s:.1f} s", "onboarding, wallets, issue, funding")
    console.print(table)
    if report.error:
        console.print(f"[red]error:[/] {report.error}")
    for note in report.notes:
        console.print(note)


def command(
    transfers: int = typer.Option(2_000, "--transfers", min=1,
                                  help="interbank transfers for the throughput case"),
    rate: int = typer.Option(500, "--rate", min=1, help="offered transfers/s for latency"),
    duration_s: float = typer.Option(10.0, "--duration-s", min=0.1,
                                     help="how long the latency load is offered"),
    wallets: int = typer.Option(20, "--wallets", min=1, help="wallets per bank"),
    max_batch: int = typer.Option(500, "--max-batch", min=1,
                                  help="records per deposits batch at most"),
    keep: bool = typer.Option(False, "--keep", help="keep the database and topics afterwards"),
    json_path: Path | None = typer.Option(None, "--json", help="write the report as JSON here"),
) -> None:
    """Interbank tokenized-deposit transfers end to end (command -> TransferSettled): transfers/s
    and p50/p99 at a fixed offered rate, beside one raw Kafka hop.

    Uses HARBOUR_KAFKA_BOOTSTRAP and HARBOUR_DATABASE_URL; creates and drops its own database and
    topics; runs the ledger and the deposits service as subprocesses.
    """
    from rich.console import Console

    from shared.config import KafkaSettings, PostgresSettings

    console = Console(width=None if sys.stdout.isatty() else 150)
    cfg = DepositsBenchConfig(
        bootstrap=KafkaSettings().kafka_bootstrap, database_url=PostgresSettings().database_url,
        transfers=transfers, rate=rate, duration_s=duration_s, wallets=wallets,
        max_batch=max_batch,
        keep=keep)
    report = asyncio.run(run_bench(cfg, lambda line: console.print(f"[bold cyan]bench[/] {line}")))
    render(report, console)
    if json_path is not None:
        json_path.write_text(report.to_json())
    if report.error:
        raise typer.Exit(1)
