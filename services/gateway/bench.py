"""``harbour bench gateway``: POST transfer through the HTTP gateway at a fixed offered rate.

One run creates its own database and topics and starts, as subprocesses, the gateway
(``python -m services.gateway.app``) and, unless ``--accepted-only``, the ledger and the deposits
service. Two banks are onboarded in CNH (``wcbdc``: 24/7, the interbank leg settles on Harbour),
wallets issued tokens and settlement accounts funded, all over Kafka. Then transfers are offered
at ``--rate`` per second for ``--duration-s`` seconds by an open-loop pacer (a request is due at
``t0 + i / rate`` whether or not earlier ones were answered), each with a bank's API key and an
Idempotency-Key, and measured from its *due* time (no coordinated omission) to:

- **accepted**: the gateway's 202 (Kafka confirmed the command, acks=all);
- **settled**: ``TransferSettled`` consumed from the deposits events topic.

The client is a minimal keep-alive HTTP/1.1 client, not httpx: it shares the machine's cores
with everything it measures, so it must cost little. The database and topics are dropped
afterwards unless ``--keep``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import typer

from shared.benchkit import LatencySummary, summarize_ns

__all__ = ["GatewayBenchConfig", "GatewayBenchReport", "bench_gateway", "run_bench"]

_REPO = Path(__file__).resolve().parents[2]
BANKS = ("BENCHAHK", "BENCHBHK")
CURRENCY = "CNH"
Say = Callable[[str], None]


@dataclass(frozen=True)
class GatewayBenchConfig:
    bootstrap: str
    database_url: str
    rate: int = 200
    duration_s: float = 10.0
    warmup_s: float = 2.0
    wallets: int = 20
    connections: int = 64
    interbank: bool = True
    settle: bool = True
    keep: bool = False
    seed: int = 7
    stall_s: float = 60.0  # set-up steps fail after this long without progress
    settle_timeout_s: float = 120.0  # measured transfers not final by then count as not settled


@dataclass
class GatewayBenchReport:
    config: dict[str, Any]
    offered: int = 0
    offered_per_s: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    accepted_per_s: float | None = None
    accepted: LatencySummary | None = None
    settled_count: int = 0
    settled_per_s: float | None = None
    settled: LatencySummary | None = None
    not_settled: dict[str, int] = field(default_factory=dict)
    server_ms: dict[str, float] = field(default_factory=dict)
    cpu_pct: dict[str, float] = field(default_factory=dict)
    load_average: tuple[float, float, float] | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


class HttpPool:
    """Keep-alive HTTP/1.1 connections to one server; POST with a JSON body, read the reply.

    A connection idle longer than ``max_idle_s`` is dropped (the server closes idle ones after
    its keep-alive timeout, 5 s for uvicorn); a reused connection the server closed anyway is
    retried once on a fresh one, which is safe because every request has an Idempotency-Key.
    """

    def __init__(self, host: str, port: int, size: int, max_idle_s: float = 2.0) -> None:
        self.host, self.port, self.max_idle_s = host, port, max_idle_s
        self._idle: list[tuple[float, asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(size)

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: "
                   f"application/json\r\nContent-Length: {len(body)}\r\n{head}\r\n"
                   ).encode() + body
        return await self._send(request)

    async def get(self, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        return await self._send(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n{head}\r\n"
                                .encode())

    async def _send(self, request: bytes) -> tuple[int, bytes]:
        async with self._slots:
            reused, reader, writer = await self._connection()
            try:
                status, payload = await self._exchange(reader, writer, request)
            except (OSError, asyncio.IncompleteReadError):
                writer.close()
                if not reused:
                    raise
                reader, writer = await asyncio.open_connection(self.host, self.port)
                status, payload = await self._exchange(reader, writer, request)
            self._idle.append((time.monotonic(), reader, writer))
            return status, payload

    async def _connection(self) -> tuple[bool, asyncio.StreamReader, asyncio.StreamWriter]:
        now = time.monotonic()
        while self._idle:
            since, reader, writer = self._idle.pop()
            if now - since < self.max_idle_s:
                return True, reader, writer
            writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return False, reader, writer

    @staticmethod
    async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        request: bytes) -> tuple[int, bytes]:
        writer.write(request)
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        length = next((int(h.split(":", 1)[1]) for h in lines[1:]
                       if h.lower().startswith("content-length:")), 0)
        return int(lines[0].split()[1]), await reader.readexactly(length)

    async def close(self) -> None:
        for _, _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def run_bench(cfg: GatewayBenchConfig, say: Say) -> GatewayBenchReport:
    """Set up, offer the load, wait for settlement, tear down (see the module docstring)."""
    from .bench_stack import BenchStack

    report = GatewayBenchReport(config=asdict(cfg))
    stack = BenchStack(cfg, Path(tempfile.mkdtemp(prefix="harbour-bench-gateway-")))
    say(f"database {stack.db_name}, topics *{stack.tag}, logs in {stack.workdir}")
    try:
        await stack.start(say)
        pool = HttpPool("127.0.0.1", stack.port, cfg.connections)
        try:
            rng = random.Random(cfg.seed)
            if cfg.warmup_s > 0:
                say(f"warm-up: {cfg.warmup_s:.0f} s at {cfg.rate}/s (not measured)")
                await _offer(pool, stack, cfg, rng, cfg.warmup_s)
            say(f"measured: {cfg.rate}/s offered for {cfg.duration_s:.0f} s")
            cpu0 = stack.cpu()
            wall0 = time.monotonic()
            metrics0 = await _server_sums(pool, stack)
            runs = await _offer(pool, stack, cfg, rng, cfg.duration_s)
            _accepted_figures(report, runs, cfg)
            metrics1 = await _server_sums(pool, stack)
            wall = time.monotonic() - wall0
            report.cpu_pct = {k: round(100 * (v - cpu0.get(k, 0.0)) / wall, 1)
                              for k, v in stack.cpu().items()}
            report.load_average = os.getloadavg()
            report.server_ms = {
                name: round(1000 * (metrics1[name][0] - metrics0[name][0])
                            / max(1.0, metrics1[name][1] - metrics0[name][1]), 2)
                for name in metrics1}
            if cfg.settle:
                say("waiting for the accepted transfers to settle")
                await stack.events.wait_final([r[0] for r in runs if r[2] == 202],
                                              cfg.settle_timeout_s, stack.check)
                _settled_figures(report, runs, stack)
        finally:
            await pool.close()
    except (Exception, asyncio.CancelledError) as exc:
        report.error = f"{type(exc).__name__}: {exc}"
        report.notes.extend(stack.tails())
    finally:
        await stack.stop()
    return report


async def _offer(pool: HttpPool, stack: Any, cfg: GatewayBenchConfig, rng: random.Random,
                 duration_s: float) -> list[tuple[str, int, int, int]]:
    """Offer transfers open-loop; return (uetr, due ns, status, answered ns) per request."""
    count = max(1, int(cfg.rate * duration_s))
    start = time.monotonic_ns() + 20_000_000
    results: list[tuple[str, int, int, int]] = []

    async def one(i: int) -> None:
        due = start + i * 1_000_000_000 // cfg.rate
        payer = BANKS[i % 2] if cfg.interbank else BANKS[0]
        payee = BANKS[(i + 1) % 2] if cfg.interbank else BANKS[0]
        u = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        body = json.dumps({
            "uetr": u, "end_to_end_id": f"B-{u[:8]}", "payer_wallet": f"w{i % cfg.wallets:03d}",
            "payee_participant": payee, "payee_wallet": f"w{(i + 7) % cfg.wallets:03d}",
            "currency": CURRENCY, "amount": "1.00"}).encode()
        headers = {"Authorization": f"Bearer {stack.tokens[payer]}", "Idempotency-Key": u}
        await asyncio.sleep(max(0.0, (due - time.monotonic_ns()) / 1e9))
        try:
            status, _ = await pool.post("/v1/deposits/transfers", body, headers)
        except (OSError, asyncio.IncompleteReadError):
            status = 0
        results.append((u, due, status, time.monotonic_ns()))

    await asyncio.gather(*(one(i) for i in range(count)))
    return results


_SERVER_SERIES = {
    "request (mean, in the gateway)": 'harbour_gateway_request_seconds_{}{{method="POST",'
                                      'route="/v1/deposits/transfers"}}',
    "Kafka confirmation (mean)": "harbour_gateway_publish_seconds_{}",
}


async def _server_sums(pool: HttpPool, stack: Any) -> dict[str, tuple[float, float]]:
    """(sum seconds, count) of the gateway's own request and publish histograms."""
    status, body = await pool.get("/metrics", {"Authorization": f"Bearer {stack.ops_token}"})
    lines = body.decode().splitlines() if status == 200 else []
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines  # float ok
              if line and not line.startswith("#")}
    return {name: (values.get(series.format("sum"), 0.0), values.get(series.format("count"), 0.0))
            for name, series in _SERVER_SERIES.items()}


def _accepted_figures(report: GatewayBenchReport, runs: list[tuple[str, int, int, int]],
                      cfg: GatewayBenchConfig) -> None:
    report.offered = len(runs)
    first_due = min(r[1] for r in runs)
    report.offered_per_s = len(runs) * 1e9 / max(1, max(r[1] for r in runs) - first_due)
    report.statuses = {str(k): v for k, v in Counter(r[2] for r in runs).items()}
    ok = [r for r in runs if r[2] == 202]
    report.accepted = summarize_ns([r[3] - r[1] for r in ok])
    if ok:
        report.accepted_per_s = len(ok) * 1e9 / max(1, max(r[3] for r in ok) - first_due)


def _settled_figures(report: GatewayBenchReport, runs: list[tuple[str, int, int, int]],
                     stack: Any) -> None:
    events = stack.events
    ok = [r for r in runs if r[2] == 202]
    done = [(events.settled[u], due) for u, due, _, _ in ok if u in events.settled]
    report.settled_count = len(done)
    report.not_settled = dict(Counter(events.final.get(u, "pending") for u, *_ in ok
                                      if u not in events.settled))
    report.settled = summarize_ns([at - due for at, due in done])
    if done:
        first_due = min(r[1] for r in runs)
        report.settled_per_s = len(done) * 1e9 / max(1, max(at for at, _ in done) - first_due)


def render(report: GatewayBenchReport, console: Any) -> None:
    from rich.table import Table

    cfg = report.config
    route = "interbank wcbdc" if cfg["interbank"] else "intra-bank"
    table = Table(title=f"harbour bench gateway: POST /v1/deposits/transfers ({route} CNH), "
                        f"{cfg['rate']}/s offered for {cfg['duration_s']:.0f} s")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("requests offered", f"{report.offered} ({report.offered_per_s:,.0f}/s)")
    table.add_row("answers by status", ", ".join(f"{k}: {v}" for k, v in
                                                 sorted(report.statuses.items())))
    for name, lat, rate in (("accepted (202)", report.accepted, report.accepted_per_s),
                            ("settled (TransferSettled)", report.settled,
                             report.settled_per_s)):
        if lat is not None:
            table.add_row(f"{name} /s", f"{rate:,.0f}" if rate else "-")
            table.add_row(f"{name} p50 / p90 / p99 / max ms",
                          f"{lat.p50_ms:.1f} / {lat.p90_ms:.1f} / {lat.p99_ms:.1f} / "
                          f"{lat.max_ms:.1f}")
    if report.not_settled:
        table.add_row("not settled", json.dumps(report.not_settled))
    for name, value in report.server_ms.items():
        table.add_row(f"{name} ms", f"{value:.2f}")
    table.add_row("CPU % while offering (100 = one core)", ", ".join(f"{k} {v}" for k, v in
                                                      report.cpu_pct.items()))
    if report.load_average:
        table.add_row("load average after offering (1/5/15 min)", " / ".join(f"{x:.2f}" for x in
                                                              report.load_average))
    console.print(table)
    if report.error:
        console.print(f"[red]error[/]: {report.error}")
    for note in report.notes:
        console.print(note)


def bench_gateway(
    rate: int = typer.Option(200, "--rate", min=1, help="offered POSTs per second"),
    duration_s: float = typer.Option(10.0, "--duration-s", min=0.5, help="measured seconds"),
    warmup_s: float = typer.Option(2.0, "--warmup-s", min=0.0, help="unmeasured warm-up"),
    connections: int = typer.Option(64, "--connections", min=1, help="client keep-alive "
                                    "connections at most"),
    intra: bool = typer.Option(False, "--intra", help="intra-bank transfers (one posting) "
                               "instead of interbank (three pendings and a commit)"),
    accepted_only: bool = typer.Option(False, "--accepted-only", help="run only the gateway: "
                                       "measure to 202 accepted, not to settled"),
    keep: bool = typer.Option(False, "--keep", help="keep the database and topics afterwards"),
    json_path: Path | None = typer.Option(None, "--json", help="write the report as JSON here"),
) -> None:
    """POST transfer through the gateway at a fixed rate: requests/s and p50/p99 to 202
    accepted and to settled.

    Uses HARBOUR_KAFKA_BOOTSTRAP and HARBOUR_DATABASE_URL; creates and drops its own database
    and topics; runs the gateway, the ledger and the deposits service as subprocesses.
    """
    from rich.console import Console

    from shared.config import KafkaSettings, PostgresSettings

    console = Console(width=None if sys.stdout.isatty() else 150)
    cfg = GatewayBenchConfig(
        bootstrap=KafkaSettings().kafka_bootstrap, database_url=PostgresSettings().database_url,
        rate=rate, duration_s=duration_s, warmup_s=warmup_s, connections=connections,
        interbank=not intra, settle=not accepted_only, keep=keep)
    report = asyncio.run(run_bench(cfg, lambda line: console.print(f"[bold cyan]bench[/] {line}")))
    render(report, console)
    if json_path is not None:
        json_path.write_text(report.to_json())
    if report.error:
        raise typer.Exit(1)
