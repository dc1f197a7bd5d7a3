"""The ledger benchmark behind ``harbour bench ledger``.

Speed is measured by a benchmark printed beside the raw ceiling of the same machine in the same
run (DESIGN.md, "Quality bars"). One run:

1. creates its own database (``bench_<id>`` on the server of ``HARBOUR_DATABASE_URL``, migrated)
   and its own topics (commands with 8 partitions, results, the writer group's dead letters);
2. starts the ledger service as a subprocess (``python -m services.ledger.app``) on them;
3. setup: defines HKD/2, opens the accounts (``debits_must_not_exceed_credits``, so every
   transfer runs the funds check) and funds them from a flagless treasury account;
4. throughput: publishes N pre-encoded two-entry postings as fast as the producer goes and times
   first publish -> last result consumed from the results topic (consumer started before);
5. latency: publishes at a fixed offered rate with a pacing loop; latency per posting is
   result consumed - *scheduled* send time (no coordinated omission);
6. repeats 4 and 5 over 10 hot accounts (``--hot``);
7. stops the writer (peak RSS from ``VmHWM``), then writes the same rows straight into a second
   fresh database with the writer's own set-based SQL, one transaction per batch of the writer's
   batch size, no Kafka, no Python domain (the raw PostgreSQL ceiling); also replays the writer's
   full statement sequence (locks and reads included) and, optionally, pgbench TPC-B-like;
8. drops the databases and topics unless ``--keep``.

Every wait is bounded (no-progress stall and a hard cap), the writer subprocess dies with the
bench (``PR_SET_PDEATHSIG``) and is stopped on errors and Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import platform
import pstats
import random
import re
import signal
import sys
import tempfile
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from shared.benchkit import (
    LatencySummary,
    admin_execute,
    delete_topics,
    die_with_parent,
    histogram_ns,
    pacing_schedule,
    per_second,
    pooled_summary,
    ratio,
    summarize_ns,
    with_database,
)
from shared.events import ledger as wire
from shared.events.envelope import encode, new_envelope
from shared.events.registry import Payload
from shared.events.topics import TopicSpec, dlq_topic
from shared.money import format_amount
from shared.runtime import tune_gc

from . import domain as d
from . import repository as repo
from .settings import LedgerSettings

_REPO_ROOT = Path(__file__).resolve().parents[2]
ASSET, SCALE = "HKD", 2
COMMAND_PARTITIONS = 8
RESULT_PARTITIONS = 8
HOT_ACCOUNTS = 10
TREASURY = "bench-treasury"
FUNDING_MINOR = 10_000_000_00  # 10 million HKD per account: no bench transfer can overdraw
MAX_TRANSFER_MINOR = 100_00  # transfers of 0.01 .. 100.00 HKD
FUNDING_FANOUT = 63  # credits per funding posting (a posting holds at most 64 entries)
PARTICIPANT = "BENCH"
PACING_TICK_S = 0.005  # the latency phase sends what is due every 5 ms (see run_latency)
PROFILE_ENV, PROFILER_ENV = "HARBOUR_BENCH_PROFILE", "HARBOUR_BENCH_PROFILER"
# Bars from issue 3 / DESIGN.md "Quality bars" (2-core machine).
RESOLVE_POSTINGS_PER_S, TARGET_POSTINGS_PER_S = 5_000, 20_000
RESOLVE_P99_MS, TARGET_P99_MS = 100.0, 50.0

Say = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Configuration and report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    bootstrap: str
    database_url: str
    postings: int = 50_000
    accounts: int = 10_000
    rate: int = 2_000
    duration_s: float = 10.0
    hot: bool = True
    keep: bool = False
    pgbench: bool = True
    pgbench_seconds: int = 10
    profile: Path | None = None
    profiler: str = "cprofile"  # or "pyinstrument" (pip install it into the venv first)
    seed: int = 7
    stall_s: float = 60.0  # give up when no result arrives for this long


@dataclass
class ThroughputFigures:
    label: str
    accounts: int
    postings: int
    received: int = 0
    accepted: int = 0
    rejected: int = 0
    rejection_codes: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    postings_per_s: float = 0.0
    publish_s: float = 0.0
    publish_per_s: float = 0.0
    writer_cpu_pct: float = 0.0  # 100 = one core busy
    writer_cpu_us_per_posting: float = 0.0  # writer process CPU (writer + relay) per posting
    bench_cpu_pct: float = 0.0
    system_cpu_pct: float = 0.0  # all cores, 100 = machine saturated
    transactions: int = 0  # writer transactions that wrote these postings (distinct xmin)
    postings_per_transaction: float = 0.0
    complete: bool = False


@dataclass
class LatencyFigures:
    label: str
    accounts: int
    offered_per_s: int
    duration_s: float
    sent: int = 0
    received: int = 0
    accepted: int = 0
    rejected: int = 0
    latency: LatencySummary | None = None
    # Where the time goes, per posting, from the bench's clock, the database's timestamps
    # (results.recorded_at: the writer's clock once the batch's rows are loaded and locked) and
    # the result record's CreateTime (the writer's send). Same host, so one wall clock.
    stages: dict[str, LatencySummary] = field(default_factory=dict)
    # Every posting's latency, counted per 100 µs (shared.benchkit.histogram_ns): what
    # `harbour bench pool` merges across runs.
    histogram_us: dict[int, int] = field(default_factory=dict)
    max_send_lag_ms: float = 0.0  # how far the pacing loop fell behind its schedule
    achieved_per_s: float = 0.0
    writer_cpu_pct: float = 0.0
    bench_cpu_pct: float = 0.0  # the bench client itself shares the machine it measures
    system_cpu_pct: float = 0.0  # all cores, 100 = machine saturated
    complete: bool = False


@dataclass
class CeilingFigures:
    label: str
    includes: str
    postings: int
    batch_size: int
    transactions: int = 0
    rows: int = 0
    elapsed_s: float = 0.0
    rows_per_s: float = 0.0
    postings_per_s: float = 0.0


@dataclass
class PgbenchFigures:
    scale: int
    clients: int
    threads: int
    seconds: int
    tps: float | None = None
    latency_avg_ms: float | None = None
    error: str | None = None


@dataclass
class ProfileLine:
    function: str
    ncalls: int
    tottime_s: float
    cumtime_s: float
    pct_total: float
    pct_busy: float  # share of the time not spent waiting in the event loop's selector


@dataclass
class BenchReport:
    run_id: str
    started_at: str
    config: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=dict)
    funding: str = ""
    writer_batch: int = 0
    setup_s: float = 0.0
    setup_commands: int = 0
    throughput: list[ThroughputFigures] = field(default_factory=list)
    latency: list[LatencyFigures] = field(default_factory=list)
    writer_peak_rss_mb: float | None = None  # highest sampled RSS
    writer_vmhwm_mb: float | None = None  # the kernel's high-water mark
    ceilings: list[CeilingFigures] = field(default_factory=list)
    pgbench: PgbenchFigures | None = None
    ledger_vs_ceiling: float | None = None
    ledger_vs_writer_sql: float | None = None
    profile_path: str | None = None
    profile_top: list[ProfileLine] = field(default_factory=list)
    kept: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    interrupted: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transfer:
    posting_id: str
    debit: str
    credit: str
    amount_minor: int


def plan_transfers(prefix: str, count: int, accounts: Sequence[str], rng: random.Random
                   ) -> list[Transfer]:
    """``count`` transfers between two distinct random ``accounts``."""
    n = len(accounts)
    if n < 2:
        raise ValueError("transfers need at least two accounts")
    out: list[Transfer] = []
    for i in range(count):
        a = rng.randrange(n)
        b = rng.randrange(n - 1)
        b += b >= a
        out.append(Transfer(f"{prefix}-{i:07d}", accounts[a], accounts[b],
                            rng.randint(1, MAX_TRANSFER_MINOR)))
    return out


def _entry(account: str, direction: str, minor: int) -> wire.EntryIn:
    return wire.EntryIn(account_id=account, asset=ASSET, direction=direction,  # type: ignore[arg-type]
                        amount=format_amount(minor, SCALE))


def _encode(payload: Payload, reply_to: str) -> tuple[bytes, bytes]:
    """(command id the result will be keyed by, record value)."""
    envelope = new_envelope(payload, producer="harbour.bench", participant=PARTICIPANT,
                            reply_to=reply_to)
    command_id = getattr(payload, "posting_id", None) or str(envelope.event_id)
    return command_id.encode(), encode(envelope)


def encode_transfers(transfers: Sequence[Transfer], reply_to: str
                     ) -> list[tuple[bytes, bytes, bytes]]:
    """(result key, record key, value) per transfer; the record key is the debited account."""
    out = []
    for t in transfers:
        payload = wire.Post(posting_id=t.posting_id, entries=[
            _entry(t.debit, "debit", t.amount_minor), _entry(t.credit, "credit", t.amount_minor)])
        result_key, value = _encode(payload, reply_to)
        out.append((result_key, t.debit.encode(), value))
    return out


def setup_commands(accounts: Sequence[str], reply_to: str) -> list[tuple[bytes, bytes]]:
    """Asset, treasury, accounts (no overdraft) and their funding, in apply order."""
    cmds = [_encode(wire.DefineAsset(code=ASSET, scale=SCALE), reply_to),
            _encode(wire.OpenAccount(account_id=TREASURY, participant=PARTICIPANT, asset=ASSET),
                    reply_to)]
    cmds += [_encode(wire.OpenAccount(account_id=a, participant=PARTICIPANT, asset=ASSET,
                                      debits_must_not_exceed_credits=True), reply_to)
             for a in accounts]
    for i in range(0, len(accounts), FUNDING_FANOUT):
        chunk = accounts[i:i + FUNDING_FANOUT]
        entries = [_entry(TREASURY, "debit", FUNDING_MINOR * len(chunk))]
        entries += [_entry(a, "credit", FUNDING_MINOR) for a in chunk]
        cmds.append(_encode(wire.Post(posting_id=f"fund-{i:07d}", entries=entries), reply_to))
    return cmds


# --------------------------------------------------------------------------------------------
# Infrastructure: databases, topics, the writer subprocess, the results collector
# --------------------------------------------------------------------------------------------


class BenchError(RuntimeError):
    pass


async def _create_database(server_url: str, name: str) -> str:
    await admin_execute(server_url, f'CREATE DATABASE "{name}"')
    return with_database(server_url, name)


async def _drop_database(server_url: str, name: str) -> None:
    await admin_execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class WriterProcess:
    """``python -m services.ledger.app`` on the bench database and topics; sampled for RSS/CPU."""

    def __init__(self, env: dict[str, str], log_path: Path, profile: Path | None,
                 profiler: str) -> None:
        self._env = env
        self.log_path = log_path
        self._profile = profile
        self._profiler = profiler
        self.proc: asyncio.subprocess.Process | None = None
        self._ps: psutil.Process | None = None
        self.peak_rss = 0
        self._sampler: asyncio.Task[None] | None = None

    def _argv(self) -> tuple[list[str], dict[str, str]]:
        if self._profile is None:
            return [sys.executable, "-m", "services.ledger.app"], self._env
        # The same app, under a profiler that SIGUSR1 starts and SIGUSR2 stops and writes.
        env = {**self._env, PROFILE_ENV: str(self._profile), PROFILER_ENV: self._profiler}
        return [sys.executable, "-m", "services.ledger.bench"], env

    async def start(self) -> None:
        argv, env = self._argv()
        log = self.log_path.open("ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, cwd=str(_REPO_ROOT), env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True, preexec_fn=die_with_parent)
        finally:
            log.close()
        self._ps = psutil.Process(self.proc.pid)
        self._sampler = asyncio.create_task(self._sample(), name="bench-rss")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def _sample(self) -> None:
        while self.alive and self._ps is not None:
            with contextlib.suppress(psutil.Error):
                self.peak_rss = max(self.peak_rss, self._ps.memory_info().rss)
            await asyncio.sleep(0.1)

    def profile_start(self) -> None:
        if self._profile is not None and self.proc is not None and self.alive:
            self.proc.send_signal(signal.SIGUSR1)

    async def profile_stop(self, timeout_s: float = 60.0) -> bool:
        """Ask the profiler to stop and write its file; True once the file is complete."""
        if self._profile is None or self.proc is None or not self.alive:
            return False
        done = self._profile.with_suffix(self._profile.suffix + ".done")
        done.unlink(missing_ok=True)
        self.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.alive:
            if done.exists():
                done.unlink(missing_ok=True)
                return True
            await asyncio.sleep(0.1)
        return False

    def cpu_seconds(self) -> float:
        if self._ps is None:
            return 0.0
        try:
            t = self._ps.cpu_times()
        except psutil.Error:
            return 0.0
        return t.user + t.system

    def vmhwm_bytes(self) -> int | None:
        if self.proc is None:
            return None
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return None

    def log_tail(self, lines: int = 25) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (the app drains and exits; a profiler writes its file), SIGKILL after a while."""
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sampler
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await asyncio.wait_for(self.proc.wait(), 10)
        return self.proc.returncode


class Phase:
    """The results one phase waits for, keyed by command id, with their receive times."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        self.index = {k: i for i, k in enumerate(keys)}
        self.expected = len(keys)
        self.recv_ns = [0] * len(keys)
        self.created_ms = [0] * len(keys)
        self.received = 0
        self.accepted = 0
        self.rejected = 0
        self.codes: Counter[str] = Counter()
        self.first_ns = 0
        self.last_ns = 0

    @property
    def complete(self) -> bool:
        return self.received >= self.expected

    def see(self, key: bytes | None, now_ns: int, created_ms: int, kind: str, value: bytes) -> None:
        i = self.index.get(key) if key is not None else None
        if i is None or self.recv_ns[i]:
            return  # another phase's result, or a relay re-send after a crash
        self.recv_ns[i] = now_ns
        self.created_ms[i] = created_ms
        self.received += 1
        self.first_ns = self.first_ns or now_ns
        self.last_ns = now_ns
        if kind == "PostingRejected":
            self.rejected += 1
            with contextlib.suppress(Exception):
                self.codes[json.loads(value)["payload"]["code"]] += 1
        else:
            self.accepted += 1


class ResultCollector:
    """Reads the results topic from its start for the whole run and routes records to phases."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self._topic = topic
        self._partitions = partitions
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest", fetch_max_wait_ms=5, max_partition_fetch_bytes=8 << 20,
            fetch_max_bytes=64 << 20, client_id="harbour-bench-results")
        self._phases: list[Phase] = []
        self.task: asyncio.Task[None] | None = None
        self.total = 0

    async def start(self) -> None:
        await self._consumer.start()
        tps = [TopicPartition(self._topic, p) for p in range(self._partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self.task = asyncio.create_task(self._run(), name="bench-results")

    def expect(self, keys: Sequence[bytes]) -> Phase:
        phase = Phase(keys)
        self._phases.append(phase)
        return phase

    def done(self, phase: Phase) -> None:
        with contextlib.suppress(ValueError):
            self._phases.remove(phase)

    async def _run(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=100)
            now = time.monotonic_ns()
            for records in batch.values():
                self.total += len(records)
                for r in records:
                    kind = ""
                    for name, value in r.headers or ():
                        if name == "type":
                            kind = value.decode()
                    for phase in self._phases:
                        phase.see(r.key, now, r.timestamp, kind, r.value or b"")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._consumer.stop(), 10)


async def wait_phase(phase: Phase, what: str, writer: WriterProcess, collector: ResultCollector,
                     *, stall_s: float, cap_s: float) -> None:
    """Until every expected result is in; raise on a dead writer, a stall or the cap."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    progress, progress_at = phase.received, start
    while not phase.complete:
        await asyncio.sleep(0.05)
        now = loop.time()
        if phase.received != progress:
            progress, progress_at = phase.received, now
        if not writer.alive:
            raise BenchError(f"{what}: the ledger writer exited with code "
                             f"{writer.proc.returncode if writer.proc else '?'} after "
                             f"{phase.received}/{phase.expected} results\n{writer.log_tail()}")
        if collector.task is not None and collector.task.done():
            exc = collector.task.exception()
            raise BenchError(f"{what}: the results consumer failed: {exc!r}")
        if now - progress_at > stall_s:
            raise BenchError(f"{what}: no result for {stall_s:.0f} s, "
                             f"{phase.received}/{phase.expected} received\n{writer.log_tail()}")
        if now - start > cap_s:
            raise BenchError(f"{what}: gave up after {cap_s:.0f} s, "
                             f"{phase.received}/{phase.expected} received")


def _producer(bootstrap: str) -> AIOKafkaProducer:
    # No linger: the latency phase batches by its pacing tick, and the throughput phase appends
    # faster than requests return, so its batches fill while one is in flight.
    return AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                            linger_ms=0, max_batch_size=256 * 1024, max_request_size=8 << 20,
                            client_id="harbour-bench-publisher")


# --------------------------------------------------------------------------------------------
# Machine facts
# --------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def kafka_version_from_cmdline(cmdline: Sequence[str]) -> str | None:
    """Apache Kafka's version from a broker's java command line (classpath jars or lib dir)."""
    text = " ".join(cmdline)
    m = re.search(r"kafka(?:_[0-9.]+)?-(\d+\.\d+\.\d+)", text)
    if m:
        return m.group(1)
    for part in re.split(r"[\s:]", text):
        lib = Path(part.rstrip("*")) if part.endswith("*") else None
        if lib is not None and lib.is_dir():
            for jar in lib.glob("kafka*.jar"):
                m = re.search(r"kafka(?:_[0-9.]+)?-(\d+\.\d+\.\d+)\.jar$", jar.name)
                if m:
                    return m.group(1)
    return None


def _kafka_version(bootstrap: str) -> str:
    port = int(bootstrap.split(",")[0].rsplit(":", 1)[1])
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port \
                    and conn.pid:
                found = kafka_version_from_cmdline(psutil.Process(conn.pid).cmdline())
                if found:
                    return f"Apache Kafka {found}"
    except (psutil.Error, OSError):
        pass
    return "unknown (broker not a local process)"


async def machine_facts(bootstrap: str, database_url: str) -> dict[str, Any]:
    import aiokafka

    facts: dict[str, Any] = {
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cpu": _cpu_model(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "aiokafka": aiokafka.__version__,
        "asyncpg": asyncpg.__version__,
        "kafka": _kafka_version(bootstrap),
    }
    conn = await asyncpg.connect(with_database(database_url, "postgres"), timeout=30)
    try:
        facts["postgres"] = await conn.fetchval("SHOW server_version")
        settings = await conn.fetch(
            "SELECT name, setting, unit FROM pg_settings WHERE name = ANY($1::text[])",
            ["synchronous_commit", "fsync", "shared_buffers", "wal_level", "max_wal_size",
             "full_page_writes"])
        facts["postgres_settings"] = {
            r["name"]: f"{r['setting']}{r['unit'] or ''}" for r in settings}
        facts["postgres_connections"] = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
    finally:
        await conn.close(timeout=5)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    try:
        await asyncio.wait_for(admin.start(), 20)
        cluster = await asyncio.wait_for(admin.describe_cluster(), 20)
        facts["kafka_brokers"] = len(cluster.get("brokers", []))
    except Exception as exc:  # informational only
        facts["kafka_brokers"] = f"unknown ({exc!r})"
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    return facts


# --------------------------------------------------------------------------------------------
# Ledger phases
# --------------------------------------------------------------------------------------------


class _CpuWindow:
    def __init__(self, writer: WriterProcess) -> None:
        self._writer = writer
        self._me = psutil.Process()
        self._t0 = time.monotonic()
        self._w0 = writer.cpu_seconds()
        c = self._me.cpu_times()
        self._b0 = c.user + c.system
        self._s0 = psutil.cpu_times()
        self.writer_cpu_s = 0.0

    def close(self) -> tuple[float, float, float]:
        wall = max(time.monotonic() - self._t0, 1e-9)
        self.writer_cpu_s = self._writer.cpu_seconds() - self._w0
        c = self._me.cpu_times()
        s1 = psutil.cpu_times()
        busy = sum(getattr(s1, f) - getattr(self._s0, f) for f in s1._fields
                   if f not in ("idle", "iowait", "guest", "guest_nice"))
        total = sum(getattr(s1, f) - getattr(self._s0, f) for f in s1._fields
                    if f not in ("guest", "guest_nice"))
        return (100 * self.writer_cpu_s / wall,
                100 * (c.user + c.system - self._b0) / wall,
                100 * busy / total if total > 0 else 0.0)


async def _transactions(pool: asyncpg.Pool, prefix: str) -> int:
    return int(await pool.fetchval(
        "SELECT count(DISTINCT xmin::text) FROM ledger.postings WHERE id LIKE $1", prefix + "-%"))


async def run_throughput(label: str, prefix: str, accounts: Sequence[str],
                         transfers: list[Transfer], ctx: _Run) -> ThroughputFigures:
    figures = ThroughputFigures(label, len(accounts), len(transfers))
    ctx.say(f"{label}: encoding {len(transfers):,} postings")
    records = encode_transfers(transfers, ctx.results_topic)
    phase = ctx.collector.expect([k for k, _, _ in records])
    cpu = _CpuWindow(ctx.writer)
    ctx.say(f"{label}: publishing")
    start = time.monotonic_ns()
    try:
        deliveries = []
        for n, (_, key, value) in enumerate(records):
            deliveries.append(await ctx.producer.send(ctx.commands_topic, value, key=key))
            if n % 256 == 255:
                await asyncio.sleep(0)  # let the sender and the results consumer run
        await asyncio.gather(*deliveries)
        published = time.monotonic_ns()
        figures.publish_s = (published - start) / 1e9
        figures.publish_per_s = per_second(len(records), published - start)
        await wait_phase(phase, label, ctx.writer, ctx.collector, stall_s=ctx.cfg.stall_s,
                         cap_s=120 + len(records) / 100)
    finally:
        figures.writer_cpu_pct, figures.bench_cpu_pct, figures.system_cpu_pct = cpu.close()
        figures.writer_cpu_us_per_posting = 1e6 * cpu.writer_cpu_s / max(1, phase.received)
        ctx.collector.done(phase)
        figures.received, figures.accepted, figures.rejected = (
            phase.received, phase.accepted, phase.rejected)
        figures.rejection_codes = dict(phase.codes)
        if phase.last_ns:
            figures.elapsed_s = (phase.last_ns - start) / 1e9
            figures.postings_per_s = per_second(phase.received, phase.last_ns - start)
        figures.complete = phase.complete
        ctx.report.throughput.append(figures)
    figures.transactions = await _transactions(ctx.pool, prefix)
    if figures.transactions:
        figures.postings_per_transaction = figures.accepted / figures.transactions
    ctx.say(f"{label}: {figures.postings_per_s:,.0f} postings/s "
            f"({figures.accepted:,} accepted, {figures.rejected:,} rejected)")
    return figures


_STAGES_SQL = "SELECT command_id, recorded_at FROM ledger.results WHERE command_id LIKE $1"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _epoch_ns(value: datetime) -> int:
    return (value - _EPOCH) // timedelta(microseconds=1) * 1000


async def stage_breakdown(pool: asyncpg.Pool, prefix: str, phase: Phase, schedule: Sequence[int],
                          wall_minus_mono_ns: int) -> dict[str, LatencySummary]:
    """Per-stage latency summaries of one latency phase (see ``LatencyFigures.stages``): the
    result row's ``recorded_at`` is when the writer applied the command, the answer's Kafka
    timestamp when the writer sent it."""
    rows = await pool.fetch(_STAGES_SQL, prefix + "-%")
    stages: dict[str, list[int]] = {
        "1 scheduled -> writer applies (Kafka in, wait for batch, decode, locks/loads)": [],
        "2 writer applies -> answer sent (journal, commit, publish)": [],
        "3 answer sent -> result consumed (Kafka out)": [],
    }
    s1, s2, s3 = stages.values()
    for r in rows:
        i = phase.index.get(r["command_id"].encode())
        if i is None or not phase.recv_ns[i]:
            continue
        scheduled = schedule[i] + wall_minus_mono_ns
        applied = _epoch_ns(r["recorded_at"])
        sent, consumed = phase.created_ms[i] * 1_000_000, phase.recv_ns[i] + wall_minus_mono_ns
        s1.append(applied - scheduled)
        s2.append(max(0, sent - applied))
        s3.append(max(0, consumed - sent))
    return {k: v for k, v in ((k, summarize_ns(v)) for k, v in stages.items()) if v is not None}


async def run_latency(label: str, prefix: str, accounts: Sequence[str],
                      transfers: list[Transfer], ctx: _Run) -> LatencyFigures:
    rate = ctx.cfg.rate
    figures = LatencyFigures(label, len(accounts), rate, ctx.cfg.duration_s)
    ctx.say(f"{label}: encoding {len(transfers):,} postings")
    records = encode_transfers(transfers, ctx.results_topic)
    phase = ctx.collector.expect([k for k, _, _ in records])
    # The bench must not pause itself: a collection stalls the pacing loop and the result
    # collector for tens of ms (measured: up to 77 ms for a full one, 27 ms for a young one over
    # the phase's bookkeeping), which would count as ledger latency. So the encoded workload is
    # kept out of collections and none runs while the load is offered (the phase's garbage is
    # bounded: its results and timings, freed when it ends).
    tune_gc()
    gc.disable()
    cpu = _CpuWindow(ctx.writer)
    ctx.say(f"{label}: offering {rate:,}/s for {ctx.cfg.duration_s:g} s")
    wall_minus_mono_ns = time.time_ns() - time.monotonic_ns()
    schedule = pacing_schedule(time.monotonic_ns() + 20_000_000, rate, len(records))
    deliveries: list[asyncio.Future[Any]] = []
    max_lag = 0
    try:
        i, n = 0, len(records)
        while i < n:
            now = time.monotonic_ns()
            if schedule[i] > now:
                # What falls due meanwhile goes out together every 5 ms, each record still
                # timed from its own schedule (so its wait here counts as latency, as a 5 ms
                # linger would). The producer does not linger: all partitions' records of a
                # tick leave in one request. Lingering per partition instead sent a request for
                # every record or two at 2,000/s, and the bench took 37 to 40% of a core (26 to 30%
                # this way) from the machine it measures. (A sleep under a millisecond would
                # return at once and spin: the event loop's timers have millisecond resolution.)
                await asyncio.sleep(min(max((schedule[i] - now) / 1e9, PACING_TICK_S), 0.05))
                continue
            while i < n and schedule[i] <= now:  # everything due goes out now, late or not
                _, key, value = records[i]
                deliveries.append(await ctx.producer.send(ctx.commands_topic, value, key=key))
                max_lag = max(max_lag, time.monotonic_ns() - schedule[i])
                i += 1
        figures.sent = n
        figures.achieved_per_s = per_second(n, time.monotonic_ns() - schedule[0])
        await asyncio.gather(*deliveries)
        await wait_phase(phase, label, ctx.writer, ctx.collector, stall_s=ctx.cfg.stall_s,
                         cap_s=120 + ctx.cfg.duration_s * 3)
    finally:
        gc.enable()
        figures.writer_cpu_pct, figures.bench_cpu_pct, figures.system_cpu_pct = cpu.close()
        ctx.collector.done(phase)
        figures.received, figures.accepted, figures.rejected = (
            phase.received, phase.accepted, phase.rejected)
        figures.max_send_lag_ms = max_lag / 1e6
        latencies = [r - s for r, s in zip(phase.recv_ns, schedule, strict=False) if r]
        figures.latency = summarize_ns(latencies)
        figures.histogram_us = histogram_ns(latencies)
        figures.complete = phase.complete
        ctx.report.latency.append(figures)
    figures.stages = await stage_breakdown(ctx.pool, prefix, phase, schedule, wall_minus_mono_ns)
    lat = figures.latency
    if lat is not None:
        ctx.say(f"{label}: p50 {lat.p50_ms:.1f} ms, p99 {lat.p99_ms:.1f} ms, "
                f"max {lat.max_ms:.1f} ms")
    return figures


# --------------------------------------------------------------------------------------------
# The raw PostgreSQL ceiling
# --------------------------------------------------------------------------------------------


async def _seed_ceiling_db(conn: asyncpg.Connection, accounts: Sequence[str]) -> None:
    await conn.copy_records_to_table("assets", schema_name="ledger", records=[(ASSET, SCALE)],
                                     columns=("code", "scale"))
    await conn.copy_records_to_table(
        "accounts", schema_name="ledger", columns=("id", "participant", "asset",
                                                   "debits_must_not_exceed_credits"),
        records=[(a, PARTICIPANT, ASSET, True) for a in accounts])
    await conn.copy_records_to_table(
        "balances", schema_name="ledger", columns=("account_id", "credits_posted"),
        records=[(a, FUNDING_MINOR) for a in accounts])


@dataclass
class _CeilingBatch:
    ids: list[str]
    postings: list[tuple[Any, ...]]
    entries: list[tuple[Any, ...]]
    results: list[tuple[Any, ...]]
    deltas: dict[str, d.BalanceDelta]
    heads: dict[int, tuple[int, bytes]]
    first_offsets: dict[int, int]
    next_offsets: dict[int, int]

    @property
    def rows(self) -> int:
        return (len(self.postings) + len(self.entries) + len(self.results) + len(self.deltas))


def _ceiling_batches(prefix: str, transfers: Sequence[Transfer], batch_size: int,
                     sequences: dict[int, int], offsets: dict[int, int]
                     ) -> list[_CeilingBatch]:
    """The rows the writer would write for ``transfers``, cut into writer-sized batches."""
    now = datetime.now(UTC)
    batches = []
    for start in range(0, len(transfers), batch_size):
        b = _CeilingBatch([], [], [], [], {}, {}, {}, {})
        deltas: dict[str, list[int]] = {}
        for t in transfers[start:start + batch_size]:
            pid = f"{prefix}-{t.posting_id}"
            partition = zlib.crc32(t.debit.encode()) % COMMAND_PARTITIONS
            seq = sequences[partition] = sequences.get(partition, 0) + 1
            offset = offsets[partition] = offsets.get(partition, -1) + 1
            b.first_offsets.setdefault(partition, offset)
            b.next_offsets[partition] = offset + 1
            digest = random.randbytes(32)
            b.heads[partition] = (seq, digest)
            b.ids.append(pid)
            b.postings.append((pid, "post", partition, seq, [], None, None, now, now, "{}",
                               digest))
            b.entries.append((pid, 0, t.debit, ASSET, "D", "posted", t.amount_minor))
            b.entries.append((pid, 1, t.credit, ASSET, "C", "posted", t.amount_minor))
            b.results.append((pid, random.randbytes(32), "post", True, None, None, pid, partition,
                              seq, digest, now, partition, offset))
            deltas.setdefault(t.debit, [0, 0])[0] += t.amount_minor
            deltas.setdefault(t.credit, [0, 0])[1] += t.amount_minor
        b.deltas = {a: d.BalanceDelta(a, dp, cp) for a, (dp, cp) in sorted(deltas.items())}
        batches.append(b)
    return batches


async def _write_rows(conn: asyncpg.Connection, b: _CeilingBatch) -> None:
    await repo.copy_journal(conn, b.postings, b.entries, b.results)
    await repo.apply_balance_deltas(conn, b.deltas)


async def _writer_sql(conn: asyncpg.Connection, b: _CeilingBatch, topic: str) -> None:
    """The writer's statement sequence for a batch of plain postings, without Kafka or domain."""
    await repo.lock_offsets(conn, topic, b.first_offsets)  # also reads the chain heads
    await repo.load_results(conn, b.ids)
    await repo.load_accounts(conn, b.deltas)
    await _write_rows(conn, b)
    await repo.save_progress(conn, topic, b.next_offsets, b.heads)


async def run_ceiling(url: str, accounts: Sequence[str], transfers: Sequence[Transfer],
                      batch_size: int, ctx: _Run) -> None:
    conn = await asyncpg.connect(url, timeout=30)
    try:
        await _seed_ceiling_db(conn, accounts)
        sequences: dict[int, int] = {}
        offsets: dict[int, int] = {}
        kinds: list[tuple[str, str, Callable[[_CeilingBatch], Awaitable[None]]]] = [
            ("raw rows", "COPY postings/entries/results, balances UPDATE..unnest (answers go "
             "to Kafka, not to a table)", lambda b: _write_rows(conn, b)),
            ("writer SQL replay", "the above + offset lock, asset/result/account loads "
             "FOR UPDATE, chain heads, offsets", lambda b: _writer_sql(conn, b, "raw")),
        ]
        # One untimed batch first, so neither variant pays for a cold cache alone.
        for b in _ceiling_batches("warm", transfers[:batch_size], batch_size, sequences, offsets):
            async with conn.transaction():
                await _writer_sql(conn, b, "raw")
        for n, (label, includes, write) in enumerate(kinds):
            batches = _ceiling_batches(f"raw{n}", transfers, batch_size, sequences, offsets)
            ctx.say(f"ceiling ({label}): {len(transfers):,} postings in {len(batches)} "
                    f"transactions of {batch_size}")
            start = time.monotonic_ns()
            for b in batches:
                async with conn.transaction():
                    await write(b)
            elapsed = time.monotonic_ns() - start
            rows = sum(b.rows for b in batches)
            fig = CeilingFigures(label, includes, len(transfers), batch_size, len(batches), rows,
                                 elapsed / 1e9, per_second(rows, elapsed),
                                 per_second(len(transfers), elapsed))
            ctx.report.ceilings.append(fig)
            ctx.say(f"ceiling ({label}): {fig.postings_per_s:,.0f} postings/s, "
                    f"{fig.rows_per_s:,.0f} rows/s")
    finally:
        await conn.close(timeout=5)


async def run_pgbench(url: str, seconds: int, say: Say) -> PgbenchFigures:
    from shared.localstack.postgres import pg_tool

    fig = PgbenchFigures(scale=10, clients=4, threads=2, seconds=seconds)
    exe = pg_tool("pgbench")
    if not exe.exists():
        fig.error = f"{exe} not found"
        return fig

    async def run(*args: str, limit_s: float) -> str:
        proc = await asyncio.create_subprocess_exec(
            str(exe), *args, url, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), limit_s)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 5)
            raise
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise BenchError(f"pgbench {' '.join(args)} failed: {text[-500:]}")
        return text

    try:
        say(f"pgbench: init scale {fig.scale}")
        await run("-i", "-q", "-s", str(fig.scale), limit_s=300)
        say(f"pgbench: TPC-B-like, {fig.clients} clients, {seconds} s")
        text = await run("-c", str(fig.clients), "-j", str(fig.threads), "-T", str(seconds),
                         limit_s=seconds + 120)
        if m := re.search(r"tps = ([0-9.]+) \(without initial connection time\)", text):
            fig.tps = float(m.group(1))  # float ok: pgbench output
        if m := re.search(r"latency average = ([0-9.]+) ms", text):
            fig.latency_avg_ms = float(m.group(1))  # float ok: pgbench output
    except (BenchError, TimeoutError, OSError) as exc:
        fig.error = str(exc)[:500]
    return fig


# --------------------------------------------------------------------------------------------
# Profile summary
# --------------------------------------------------------------------------------------------

_IDLE = ("method 'poll' of 'select.epoll'", "method 'select' of 'select.", "select.epoll")


def _func_name(key: tuple[str, int, str]) -> str:
    file, line, name = key
    if file == "~" and line == 0:
        return name  # a builtin, e.g. "<method 'poll' of 'select.epoll' objects>"
    return f"{file}:{line}({name})"


def summarize_cprofile(path: Path, top: int = 30) -> list[ProfileLine]:
    """The functions with the most own time (tottime) in a cProfile file."""
    stats = pstats.Stats(str(path))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values()) or 1e-9
    idle = sum(v[2] for k, v in raw.items() if any(s in _func_name(k) for s in _IDLE))
    busy = max(total - idle, 1e-9)
    lines = []
    for k, (_cc, nc, tt, ct, _callers) in sorted(raw.items(), key=lambda kv: -kv[1][2])[:top]:
        name = _func_name(k).replace(str(_REPO_ROOT) + "/", "")
        name = re.sub(r".*/site-packages/", "", name)
        lines.append(ProfileLine(name, nc, tt, ct, 100 * tt / total, 100 * tt / busy))
    return lines


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class _Run:
    cfg: BenchConfig
    report: BenchReport
    say: Say
    commands_topic: str
    results_topic: str
    writer: WriterProcess = field(init=False)
    collector: ResultCollector = field(init=False)
    producer: AIOKafkaProducer = field(init=False)
    pool: asyncpg.Pool = field(init=False)


async def _wait_for_leaders(bootstrap: str, specs: Sequence[TopicSpec], limit_s: float = 30
                            ) -> None:
    """Until every partition of ``specs`` has a leader (fresh topics take a moment)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            described = await admin.describe_topics([s.name for s in specs])
            ready = {t["topic"]: sum(1 for p in t["partitions"] if p["leader"] >= 0)
                     for t in described if t["error_code"] == 0}
            if all(ready.get(s.name) == s.partitions for s in specs):
                return
            await asyncio.sleep(0.2)
        raise BenchError(f"topics {[s.name for s in specs]} got no leaders in {limit_s:.0f} s")
    finally:
        await admin.close()


async def run_bench(cfg: BenchConfig, say: Say) -> BenchReport:
    """Run the whole benchmark; the report carries ``error`` when a phase failed."""
    run_id = uuid.uuid4().hex[:12]
    settings = LedgerSettings()
    report = BenchReport(run_id, datetime.now(UTC).isoformat(timespec="seconds"),
                         {k: str(v) if isinstance(v, Path) else v
                          for k, v in asdict(cfg).items() if k != "database_url"})
    report.writer_batch = settings.max_batch
    report.funding = (f"accounts open with debits_must_not_exceed_credits (no overdraft), funded "
                      f"{format_amount(FUNDING_MINOR, SCALE)} {ASSET} each from a flagless "
                      f"treasury; transfers 0.01..{format_amount(MAX_TRANSFER_MINOR, SCALE)}")
    # The writer answers only on topics named like ledger results (codec.REPLY_TOPIC_RE).
    ctx = _Run(cfg, report, say, f"ledger.commands.bench-{run_id}",
               f"ledger.results.bench-{run_id}")
    group = f"harbour.ledger.writer.bench-{run_id}"
    db_name, raw_name, pgb_name = f"bench_{run_id}", f"bench_{run_id}_raw", f"bench_{run_id}_pgb"
    workdir = Path(tempfile.mkdtemp(prefix=f"harbour-bench-{run_id}-"))
    rng = random.Random(cfg.seed)
    accounts = [f"acct-{i:06d}" for i in range(cfg.accounts)]
    hot = [f"hot-{i:02d}" for i in range(HOT_ACCOUNTS)] if cfg.hot else []
    latency_n = max(1, round(cfg.rate * cfg.duration_s))

    # Ctrl-C or SIGTERM (also when started with SIGINT ignored, as background jobs are): cancel
    # the run once, let the cleanup below stop the writer and drop what the run made.
    me = asyncio.current_task()
    interrupted: list[int] = []
    loop = asyncio.get_running_loop()

    def interrupt(sig: int) -> None:
        if not interrupted and me is not None:
            say(f"signal {signal.Signals(sig).name}: stopping and cleaning up")
            me.cancel()
        interrupted.append(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupt, sig)

    async with contextlib.AsyncExitStack() as cleanup:
        cleanup.callback(_remove_signal_handlers, loop)
        try:
            say(f"run {run_id}: machine facts")
            report.machine = await machine_facts(cfg.bootstrap, cfg.database_url)

            from . import codec

            pattern = getattr(codec, "REPLY_TOPIC_RE", None)
            if pattern is not None and not pattern.match(ctx.results_topic):
                raise BenchError(f"{ctx.results_topic} is not a reply topic the writer accepts")

            # Database and topics of our own.
            say(f"creating database {db_name} and migrating it")
            bench_url = await _create_database(cfg.database_url, db_name)
            if not cfg.keep:
                cleanup.push_async_callback(_quiet, _drop_database, cfg.database_url, db_name)
            from shared.store.migrate import migrate

            await migrate(bench_url)
            from shared.messaging.admin import ensure_topics

            specs = [TopicSpec(ctx.commands_topic, COMMAND_PARTITIONS, retention_ms=3_600_000),
                     TopicSpec(ctx.results_topic, RESULT_PARTITIONS, retention_ms=3_600_000),
                     TopicSpec(dlq_topic(group), 1, retention_ms=3_600_000)]
            await ensure_topics(cfg.bootstrap, specs)
            if not cfg.keep:
                cleanup.push_async_callback(
                    _quiet, delete_topics, cfg.bootstrap, [s.name for s in specs])
            await _wait_for_leaders(cfg.bootstrap, specs)
            ctx.pool = await asyncpg.create_pool(bench_url, min_size=1, max_size=2)
            cleanup.push_async_callback(_quiet, ctx.pool.close)

            # The ledger service, as ops would run it.
            env = {**os.environ, "HARBOUR_KAFKA_BOOTSTRAP": cfg.bootstrap,
                   "HARBOUR_DATABASE_URL": bench_url,
                   "HARBOUR_LEDGER_COMMANDS_TOPIC": ctx.commands_topic,
                   "HARBOUR_LEDGER_GROUP_ID": group, "PYTHONUNBUFFERED": "1",
                   "HARBOUR_LEDGER_METRICS_PORT": "0"}
            profile = cfg.profile.resolve() if cfg.profile else None
            ctx.writer = WriterProcess(env, workdir / "ledger.log", profile, cfg.profiler)
            say(f"starting the ledger writer (log {ctx.writer.log_path})")
            await ctx.writer.start()
            cleanup.push_async_callback(_quiet, ctx.writer.stop)

            ctx.collector = ResultCollector(cfg.bootstrap, ctx.results_topic, RESULT_PARTITIONS)
            await ctx.collector.start()
            cleanup.push_async_callback(_quiet, ctx.collector.stop)
            ctx.producer = _producer(cfg.bootstrap)
            await ctx.producer.start()
            cleanup.push_async_callback(_quiet, ctx.producer.stop)

            # Setup: one partition keeps asset -> accounts -> funding in order.
            setup = setup_commands(accounts + hot, ctx.results_topic)
            report.setup_commands = len(setup)
            phase = ctx.collector.expect([k for k, _ in setup])
            say(f"setup: {len(setup):,} commands ({len(accounts) + len(hot):,} accounts, funding)")
            start = time.monotonic_ns()
            deliveries = [await ctx.producer.send(ctx.commands_topic, v, key=b"setup", partition=0)
                          for _, v in setup]
            await asyncio.gather(*deliveries)
            await wait_phase(phase, "setup", ctx.writer, ctx.collector, stall_s=cfg.stall_s,
                             cap_s=300 + len(setup) / 50)
            ctx.collector.done(phase)
            report.setup_s = (time.monotonic_ns() - start) / 1e9
            if phase.rejected:
                raise BenchError(f"setup: {phase.rejected} commands rejected: {dict(phase.codes)}")
            ctx.writer.profile_start()  # the measured phases only, not the setup

            main = plan_transfers("tp", cfg.postings, accounts, rng)
            await run_throughput(f"throughput, {len(accounts):,} accounts", "tp", accounts,
                                 main, ctx)
            await run_latency(f"latency, {len(accounts):,} accounts", "lt", accounts,
                              plan_transfers("lt", latency_n, accounts, rng), ctx)
            if hot:
                await run_throughput(f"throughput, {len(hot)} hot accounts", "hp", hot,
                                     plan_transfers("hp", cfg.postings, hot, rng), ctx)
                await run_latency(f"latency, {len(hot)} hot accounts", "hl", hot,
                                  plan_transfers("hl", latency_n, hot, rng), ctx)

            _read_rss(report, ctx)
            if profile is not None:
                say(f"writing the writer's profile to {profile}")
                if await ctx.writer.profile_stop():
                    report.profile_path = str(profile)
                    if cfg.profiler == "cprofile":
                        report.profile_top = summarize_cprofile(profile)
                else:
                    report.notes.append("the writer's profile was not written in time")
            say("stopping the ledger writer")
            code = await ctx.writer.stop()
            if code not in (0, None):
                report.notes.append(f"ledger writer exited with code {code}")

            # The ceiling, with the writer stopped: same server, same schema, same rows.
            say(f"creating database {raw_name} for the raw ceiling")
            raw_url = await _create_database(cfg.database_url, raw_name)
            if not cfg.keep:
                cleanup.push_async_callback(_quiet, _drop_database, cfg.database_url, raw_name)
            await migrate(raw_url)
            await run_ceiling(raw_url, accounts, main, settings.max_batch, ctx)
            if cfg.pgbench:
                pgb_url = await _create_database(cfg.database_url, pgb_name)
                cleanup.push_async_callback(_quiet, _drop_database, cfg.database_url, pgb_name)
                report.pgbench = await run_pgbench(pgb_url, cfg.pgbench_seconds, say)
        except asyncio.CancelledError:
            if not interrupted or me is None:
                raise
            me.uncancel()
            report.interrupted = True
            report.error = f"interrupted by {signal.Signals(interrupted[0]).name}"
        except BenchError as exc:
            report.error = str(exc)
        except Exception as exc:  # Kafka or PostgreSQL trouble: report it, clean up all the same
            report.error = f"{type(exc).__name__}: {exc}"

        finally:
            _read_rss(report, ctx)
            report.machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
            _finish(report, ctx)
            if cfg.keep:
                report.kept = {"databases": [db_name, raw_name], "topics": [
                    ctx.commands_topic, ctx.results_topic], "writer_group": group,
                    "writer_log": str(workdir / "ledger.log")}
            say("cleaning up" if not cfg.keep else "keeping databases and topics (--keep)")
    if report.error is None and not cfg.keep:
        _remove_workdir(workdir)
    elif report.error is not None:
        report.notes.append(f"ledger writer log kept at {workdir / 'ledger.log'}")
    return report


def _remove_signal_handlers(loop: asyncio.AbstractEventLoop) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)


def _read_rss(report: BenchReport, ctx: _Run) -> None:
    writer = getattr(ctx, "writer", None)
    if writer is None or report.writer_vmhwm_mb is not None or not writer.alive:
        return
    hwm = writer.vmhwm_bytes()
    report.writer_vmhwm_mb = hwm / 2**20 if hwm else None
    report.writer_peak_rss_mb = writer.peak_rss / 2**20 or None


def _remove_workdir(workdir: Path) -> None:
    with contextlib.suppress(OSError):
        (workdir / "ledger.log").unlink(missing_ok=True)
        workdir.rmdir()


async def _quiet(step: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """Run one cleanup step, bounded; a failing step never stops the next one."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(step(*args), 60)


def _finish(report: BenchReport, ctx: _Run) -> None:
    main = report.throughput[0] if report.throughput else None
    raw = next((c for c in report.ceilings if c.label == "raw rows"), None)
    replay = next((c for c in report.ceilings if c.label == "writer SQL replay"), None)
    if main is not None:
        report.ledger_vs_ceiling = ratio(main.postings_per_s, raw.postings_per_s if raw else None)
        report.ledger_vs_writer_sql = ratio(main.postings_per_s,
                                            replay.postings_per_s if replay else None)
    load = report.machine.get("loadavg_start", [0])[0]
    cores = report.machine.get("cores_logical") or 1
    if load > cores / 2:
        report.notes.append(f"machine was busy before the run (load {load} on {cores} cores): "
                            "figures are noisy")
    if ctx.cfg.profile is not None:
        report.notes.append(f"writer ran under {ctx.cfg.profiler}: its figures include the "
                            "profiler's overhead")


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _bar(value: float | None, resolve: float, target: float, *, lower_is_better: bool) -> str:
    if value is None:
        return ""
    if lower_is_better:
        ok_target, ok_resolve = value < target, value < resolve
    else:
        ok_target, ok_resolve = value >= target, value >= resolve
    if ok_target:
        return f"[green]meets target ({target:,g})[/]"
    if ok_resolve:
        return f"[yellow]meets bar ({resolve:,g}), not target ({target:,g})[/]"
    return f"[red]below bar ({resolve:,g})[/]"


def render(report: BenchReport, console: Any) -> None:
    from rich.table import Table

    m = report.machine
    table = Table(title=f"harbour bench ledger  (run {report.run_id}, {report.started_at})",
                  show_lines=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("note")
    pg = m.get("postgres_settings", {})
    table.add_row("machine", f"{m.get('cores_logical')} cores",
                  f"{m.get('cpu', '')}, {m.get('memory_gb')} GB, load "
                  f"{m.get('loadavg_start')} -> {m.get('loadavg_end')}")
    table.add_row("PostgreSQL", str(m.get("postgres", "?")),
                  ", ".join(f"{k}={v}" for k, v in pg.items()) +
                  f"; {m.get('postgres_connections')} client connections at start")
    table.add_row("Kafka", str(m.get("kafka", "?")), f"{m.get('kafka_brokers')} broker(s); "
                  f"aiokafka {m.get('aiokafka')}, asyncpg {m.get('asyncpg')}, "
                  f"Python {m.get('python')}")
    table.add_row("setup", f"{report.setup_s:.1f} s",
                  f"{report.setup_commands:,} commands; {report.funding}")
    table.add_section()
    for t in report.throughput:
        note = _bar(t.postings_per_s, RESOLVE_POSTINGS_PER_S, TARGET_POSTINGS_PER_S,
                    lower_is_better=False)
        if not t.complete:
            note = f"[red]INCOMPLETE {t.received:,}/{t.postings:,}[/]"
        table.add_row(t.label, f"{t.postings_per_s:,.0f} postings/s",
                      f"{note}; {t.postings:,} in {t.elapsed_s:.2f} s first publish -> last "
                      "result")
        table.add_row("", f"{t.accepted:,} accepted", f"{t.rejected:,} rejected "
                      f"{t.rejection_codes or ''}; published in {t.publish_s:.2f} s "
                      f"({t.publish_per_s:,.0f}/s)")
        table.add_row("", f"{t.postings_per_transaction:,.0f} postings/txn",
                      f"{t.transactions:,} writer transactions; writer CPU "
                      f"{t.writer_cpu_us_per_posting:,.0f} us/posting; CPU writer "
                      f"{t.writer_cpu_pct:.0f}%, bench {t.bench_cpu_pct:.0f}%, machine "
                      f"{t.system_cpu_pct:.0f}% of all cores")
    table.add_section()
    for lat in report.latency:
        s = lat.latency
        if s is None:
            table.add_row(lat.label, "no results", "")
            continue
        note = _bar(s.p99_ms, RESOLVE_P99_MS, TARGET_P99_MS, lower_is_better=True)
        if not lat.complete:
            note = f"[red]INCOMPLETE {lat.received:,}/{lat.sent:,}[/]"
        table.add_row(lat.label, f"p99 {s.p99_ms:,.1f} ms",
                      f"{note}; {lat.offered_per_s:,}/s offered for {lat.duration_s:g} s "
                      f"({lat.achieved_per_s:,.0f}/s sent, max pacing lag "
                      f"{lat.max_send_lag_ms:.1f} ms)")
        table.add_row("", f"p50 {s.p50_ms:,.1f} ms",
                      f"p90 {s.p90_ms:,.1f}, p99.9 {s.p999_ms:,.1f}, max {s.max_ms:,.1f}, mean "
                      f"{s.mean_ms:,.1f} ms; {lat.accepted:,} accepted, {lat.rejected:,} "
                      f"rejected; CPU: writer {lat.writer_cpu_pct:.0f}%, bench "
                      f"{lat.bench_cpu_pct:.0f}%, machine {lat.system_cpu_pct:.0f}%")
        for stage, st in lat.stages.items():
            table.add_row("", f"p50 {st.p50_ms:,.1f} / p99 {st.p99_ms:,.1f} ms", stage)
    table.add_section()
    table.add_row("writer peak RSS", f"{report.writer_vmhwm_mb or 0:,.0f} MiB",
                  f"VmHWM; highest sample {report.writer_peak_rss_mb or 0:,.0f} MiB")
    table.add_section()
    for c in report.ceilings:
        table.add_row(f"PostgreSQL ceiling: {c.label}", f"{c.postings_per_s:,.0f} postings/s",
                      f"{c.rows_per_s:,.0f} rows/s ({c.rows:,} rows, {c.transactions} txns of "
                      f"{c.batch_size}, {c.elapsed_s:.2f} s); {c.includes}")
    if report.ledger_vs_ceiling is not None:
        table.add_row("ledger / raw ceiling", f"{report.ledger_vs_ceiling:.2f}",
                      "sustained ledger postings/s (10k accounts) over raw-rows postings/s")
    if report.ledger_vs_writer_sql is not None:
        table.add_row("ledger / writer SQL replay", f"{report.ledger_vs_writer_sql:.2f}",
                      "the rest is Kafka, decoding, the domain and publishing answers")
    if report.pgbench is not None:
        p = report.pgbench
        value = f"{p.tps:,.0f} tps" if p.tps is not None else "failed"
        table.add_row("pgbench TPC-B-like", value,
                      p.error or f"scale {p.scale}, {p.clients} clients, {p.threads} threads, "
                      f"{p.seconds} s, avg latency {p.latency_avg_ms} ms")
    console.print(table)
    if report.profile_top:
        prof = Table(title=f"writer profile (cProfile, own time) {report.profile_path}")
        for col in ("function", "calls", "own s", "% all", "% busy", "cum s"):
            prof.add_column(col, justify="left" if col == "function" else "right")
        for p_ in report.profile_top[:25]:
            prof.add_row(p_.function[:90], f"{p_.ncalls:,}", f"{p_.tottime_s:.2f}",
                         f"{p_.pct_total:.1f}", f"{p_.pct_busy:.1f}", f"{p_.cumtime_s:.2f}")
        console.print(prof)
    elif report.profile_path:
        console.print(f"writer profile written to {report.profile_path}")
    for note in report.notes:
        console.print(f"[yellow]note[/] {note}")
    if report.kept:
        console.print(f"kept: {report.kept}")
    if report.error:
        console.print(f"[red]bench failed:[/] {report.error}")


# --------------------------------------------------------------------------------------------
# Pooling several runs (``harbour bench pool``)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PooledLatency:
    """One latency case (by label) over several runs: each run's p99, and the distribution of
    every posting of every run together."""

    label: str
    window_p99_ms: list[float]  # one per run, in the order given
    pooled: LatencySummary | None

    @property
    def runs(self) -> int:
        return len(self.window_p99_ms)

    @property
    def windows_over_bar(self) -> int:
        return sum(1 for p in self.window_p99_ms if p >= RESOLVE_P99_MS)


def pool_reports(reports: Sequence[dict[str, Any]]) -> list[PooledLatency]:
    """Pool the latency phases of ``--json`` reports by label. A machine shared with other
    tenants runs some phases slower than others; one run's 10 s p99 says how that run went, the
    pooled p99 how the ledger does over all the load offered."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for report in reports:
        for phase in report.get("latency", []):
            by_label.setdefault(phase["label"], []).append(phase)
    pooled = []
    for label, phases in by_label.items():
        if any(not p.get("complete") for p in phases):
            # Postings that never came back are not in its histogram: pooled, they would flatter.
            raise ValueError(f"{label}: a run did not receive every result; leave it out")
        if any(not p.get("histogram_us") for p in phases):
            raise ValueError(f"{label}: a report has no histogram (written before it was added)")
        pooled.append(PooledLatency(
            label, [p["latency"]["p99_ms"] for p in phases],
            pooled_summary(p["histogram_us"] for p in phases)))
    return pooled


def render_pooled(pooled: Sequence[PooledLatency], console: Any) -> None:
    from rich.table import Table

    table = Table(title="harbour bench pool: latency over every run given")
    for column in ("case", "runs", "p99 per run (min / median / max)", "runs at or over the bar",
                   "pooled p50 / p90 / p99 / p99.9 / max", "bar"):
        table.add_column(column)
    for p in pooled:
        per_run = sorted(p.window_p99_ms)
        s = p.pooled
        table.add_row(
            p.label, str(p.runs),
            f"{per_run[0]:,.1f} / {per_run[len(per_run) // 2]:,.1f} / {per_run[-1]:,.1f} ms"
            if per_run else "",
            f"{p.windows_over_bar} of {len(per_run)} (p99 >= {RESOLVE_P99_MS:g} ms)",
            f"{s.p50_ms:,.1f} / {s.p90_ms:,.1f} / {s.p99_ms:,.1f} / {s.p999_ms:,.1f} / "
            f"{s.max_ms:,.1f} ms ({s.count:,} postings)" if s else "",
            _bar(s.p99_ms if s else None, RESOLVE_P99_MS, TARGET_P99_MS, lower_is_better=True))
    console.print(table)


# --------------------------------------------------------------------------------------------
# ``python -m services.ledger.bench``: the ledger app under a signal-controlled profiler
# --------------------------------------------------------------------------------------------


class _SignalProfiler:
    """SIGUSR1 starts profiling the main thread, SIGUSR2 stops it and writes the file."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path, self.kind = path, kind
        self._profiler: Any = None

    def start(self, *_: object) -> None:
        if self._profiler is not None:
            return
        if self.kind == "pyinstrument":
            from pyinstrument import Profiler

            self._profiler = Profiler(interval=0.0005, async_mode="disabled")
            self._profiler.start()
        else:
            import cProfile

            self._profiler = cProfile.Profile()
            self._profiler.enable()

    def stop(self, *_: object) -> None:
        profiler, self._profiler = self._profiler, None
        if profiler is None:
            return
        if self.kind == "pyinstrument":
            profiler.stop()
            self.path.write_text(profiler.output_text(show_all=False))
            self.path.with_suffix(self.path.suffix + ".flat.txt").write_text(
                profiler.output_text(flat=True, time="percent_of_total"))
        else:
            profiler.disable()
            profiler.dump_stats(str(self.path))
        self.path.with_suffix(self.path.suffix + ".done").touch()


def _profiled_writer() -> None:
    from services.ledger.app import main as ledger_main

    profiler = _SignalProfiler(Path(os.environ[PROFILE_ENV]),
                               os.environ.get(PROFILER_ENV, "cprofile"))
    signal.signal(signal.SIGUSR1, profiler.start)
    signal.signal(signal.SIGUSR2, profiler.stop)
    try:
        ledger_main()
    finally:
        profiler.stop()


if __name__ == "__main__":
    _profiled_writer()
