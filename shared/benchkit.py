"""What every ``harbour bench`` shares: latency statistics, pacing, and the throwaway resources
(databases, topics, child processes) a run creates and removes.

The statistics are pure and unit tested (``tests/unit/test_bench_stats.py``); each service's bench
module keeps only what it measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil
from aiokafka.admin import AIOKafkaAdminClient

from shared.runtime import die_with_parent

__all__ = [
    "HISTOGRAM_BUCKET_US", "LatencySummary", "ServiceProcess", "admin_execute", "delete_topics",
    "die_with_parent", "histogram_ns", "pacing_schedule", "per_second", "percentile",
    "pooled_summary", "ratio", "summarize_ns", "with_database",
]

_REPO = Path(__file__).resolve().parents[1]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of ascending ``sorted_values`` (``q`` in [0, 100]).

    Nearest rank returns an observed value (as HdrHistogram and most latency tools do): p100 is the
    maximum, p0 the minimum, and p99 of 100 values is the 99th smallest.

    Raises:
        ValueError: empty input or ``q`` outside [0, 100].
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside [0, 100]")
    return sorted_values[_nearest_rank(q, len(sorted_values)) - 1]


def _nearest_rank(q: float, count: int) -> int:
    """The 1-based rank of the ``q``-th percentile among ``count`` ordered values."""
    return max(1, math.ceil(q / 100 * count))


@dataclass(frozen=True, slots=True)
class LatencySummary:
    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float


def summarize_ns(values_ns: Iterable[int]) -> LatencySummary | None:
    """p50/p90/p99/p99.9/max/mean in milliseconds of nanosecond samples; None when empty."""
    ordered = sorted(values_ns)
    if not ordered:
        return None
    ms = [v / 1e6 for v in ordered]
    return LatencySummary(
        count=len(ms),
        p50_ms=percentile(ms, 50),
        p90_ms=percentile(ms, 90),
        p99_ms=percentile(ms, 99),
        p999_ms=percentile(ms, 99.9),
        max_ms=ms[-1],
        mean_ms=sum(ms) / len(ms),
    )


# A run's latencies are kept as counts per 100 µs: a few kilobytes of JSON per phase, and the
# phases of many runs can then be pooled into one distribution (``harbour bench pool``).
HISTOGRAM_BUCKET_US = 100


def histogram_ns(values_ns: Iterable[int]) -> dict[int, int]:
    """Counts of nanosecond samples per bucket of ``HISTOGRAM_BUCKET_US``, keyed by the bucket's
    upper bound in µs (a sample is rounded up, so a percentile read back is never flattered)."""
    counts: dict[int, int] = {}
    width_ns = HISTOGRAM_BUCKET_US * 1000
    for v in values_ns:
        bound = max(1, -(-v // width_ns)) * HISTOGRAM_BUCKET_US
        counts[bound] = counts.get(bound, 0) + 1
    return dict(sorted(counts.items()))


def pooled_summary(histograms: Iterable[dict[int, int]]) -> LatencySummary | None:
    """One distribution from several histograms of :func:`histogram_ns` (runs, phases):
    nearest-rank percentiles as :func:`percentile`, to the bucket's resolution (so at most
    0.1 ms above the exact value, the mean too); None when empty."""
    pooled: dict[int, int] = {}
    for histogram in histograms:
        for bound, count in histogram.items():
            pooled[int(bound)] = pooled.get(int(bound), 0) + count
    total = sum(pooled.values())
    if not total:
        return None
    bounds = sorted(pooled)

    def at(q: float) -> float:
        rank, seen = _nearest_rank(q, total), 0
        for bound in bounds:
            seen += pooled[bound]
            if seen >= rank:
                return bound / 1000
        return bounds[-1] / 1000  # pragma: no cover - rank <= total

    return LatencySummary(
        count=total, p50_ms=at(50), p90_ms=at(90), p99_ms=at(99), p999_ms=at(99.9),
        max_ms=bounds[-1] / 1000, mean_ms=sum(b * c for b, c in pooled.items()) / total / 1000)


def per_second(count: int, elapsed_ns: int) -> float:
    """Events per second; 0 when no time elapsed."""
    return count * 1e9 / elapsed_ns if elapsed_ns > 0 else 0.0


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return numerator / denominator


def pacing_schedule(start_ns: int, rate_per_s: float, count: int) -> list[int]:
    """Scheduled send times (monotonic ns) of ``count`` records offered at ``rate_per_s``.

    Latency is measured from these, not from the actual send: a sender that falls behind adds
    its lag to every figure instead of hiding it (no coordinated omission).
    """
    if rate_per_s <= 0:
        raise ValueError("rate must be positive")
    interval = 1e9 / rate_per_s
    return [start_ns + round(i * interval) for i in range(count)]


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` of the same server."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def admin_execute(url: str, sql: str, database: str | None = "postgres") -> None:
    """Run ``sql`` on ``database`` of ``url``'s server (``None``: on ``url``'s own database)."""
    target = url if database is None else with_database(url, database)
    conn = await asyncpg.connect(target, timeout=30)
    try:
        await conn.execute(sql, timeout=120)
    finally:
        await conn.close(timeout=5)


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    await admin.start()
    try:
        await admin.delete_topics(names, timeout_ms=30000)
    finally:
        await admin.close()


class ServiceProcess:
    """``python -m services.<name>.app`` with its own environment and log, sampled for RSS.

    ``HARBOUR_BENCH_PROFILE_<NAME>=<path>`` runs it under cProfile, whose statistics are written
    to ``<path>`` when it exits (figures then include the profiler's overhead).
    """

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name, self.env, self.log_path = name, env, log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.ps: psutil.Process | None = None
        self.peak_rss = 0
        self._sampler: asyncio.Task[None] | None = None

    async def start(self) -> None:
        argv = ["-m", f"services.{self.name}.app"]
        profile = os.environ.get(f"HARBOUR_BENCH_PROFILE_{self.name.upper()}")
        if profile:
            argv = ["-m", "cProfile", "-o", profile, *argv]
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, *argv, cwd=str(_REPO),
                env={**os.environ, **self.env, "PYTHONUNBUFFERED": "1"},
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, preexec_fn=die_with_parent)
        self.ps = psutil.Process(self.proc.pid)
        self._sampler = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while self.proc is not None and self.proc.returncode is None and self.ps is not None:
            with contextlib.suppress(psutil.Error):
                self.peak_rss = max(self.peak_rss, self.ps.memory_info().rss)
            await asyncio.sleep(0.2)

    def cpu_s(self) -> float:
        with contextlib.suppress(psutil.Error):
            if self.ps is not None:
                t = self.ps.cpu_times()
                return float(t.user + t.system)  # float ok: CPU seconds
        return 0.0

    def check(self) -> None:
        """Raise if the process has exited (a bench must not wait on a dead service)."""
        if self.proc is not None and self.proc.returncode is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: "
                               f"{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s."""
        if self._sampler is not None:
            self._sampler.cancel()
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
