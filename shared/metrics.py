"""Prometheus plumbing every Harbour service shares: serving ``/metrics`` and the outbox relay's
counters.

Each service keeps its metrics in a registry of its own (not Prometheus' global one), so several
instances in one process (tests) never clash on metric names; the service serves that registry.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.store.outbox import RelayStats

__all__ = ["RelayCollector", "serve_metrics"]

log = logging.getLogger(__name__)


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> bool:
    """Serve ``registry`` at ``/metrics`` on ``port`` (0: not at all), together with the
    process-wide default registry: the process's CPU and memory, and the dead-letter counters
    (``shared.messaging.dlq``), which are registered once per process. A port already taken is
    logged, not fatal: settlement must not stop for want of a metrics endpoint."""
    if port == 0:
        return False
    try:
        served = CollectorRegistry()
        served.register(_Forward(registry))
        served.register(_Forward(REGISTRY))
        start_http_server(port, addr=host, registry=served)
    except OSError as exc:
        log.error("metrics endpoint not started on port %d: %s", port, exc)
        return False
    log.info("metrics on http://%s:%d/metrics", host, port)
    return True


class _Forward(Collector):
    """A registry's metrics, collected into another (served ones never share a name)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        yield from self._registry.collect()


class RelayCollector(Collector):
    """An outbox relay's counters as ``<prefix>_relay_*``, read at scrape time (the relay keeps
    plain ints, which are read whole)."""

    def __init__(self, prefix: str, stats: RelayStats) -> None:
        self._prefix = prefix
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(
            f"{self._prefix}_relay_published", "Outbox rows the relay published",
            value=self._stats.published)
        yield CounterMetricFamily(
            f"{self._prefix}_relay_errors", "Relay rounds that failed (logged; the rows are "
            "retried)", value=self._stats.errors)
        yield GaugeMetricFamily(
            f"{self._prefix}_relay_leader", "1 while this process's relay holds the outbox lock "
            "and publishes (one relay per schema does; others stand by)",
            value=int(self._stats.is_leader))
