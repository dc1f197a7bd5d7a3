"""Prometheus metrics of the deposits service (``/metrics``, ``HARBOUR_DEPOSITS_METRICS_PORT``).

Messages handled per subscriber, with their duration and outcome, come from FastStream's own
Prometheus middleware (``harbour_received_messages_total``,
``harbour_received_processed_messages_duration_seconds`` and the rest, labelled by handler and
status). On top of those, what only this service knows:

- the settlement queues (TD-5): an underfunded interbank transfer waits in its payer bank's queue
  for the currency, neither rejected nor partly settled. Ops watch how many wait and how long the
  head has waited (a queue that only grows needs funding, or a cancel);
- the scheduler, the saga's clock: transfers woken and queue heads retried;
- the outbox relay that publishes the service's events and ledger commands.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.metrics import RelayCollector
from shared.store.outbox import RelayStats


class DepositsMetrics:
    """The service's metrics, in a registry of their own (see ``shared.metrics``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.queue_depth = Gauge(
            "harbour_deposits_queue_depth", "Interbank transfers waiting in a settlement queue "
            "(queue: payer bank:currency)", ["queue"], registry=self.registry)
        self.queue_oldest = Gauge(
            "harbour_deposits_queue_oldest_seconds", "How long the head of a settlement queue "
            "has waited", ["queue"], registry=self.registry)
        self._queues: set[str] = set()

    def middleware(self) -> KafkaPrometheusMiddleware:
        """FastStream's per-subscriber message metrics, into this registry."""
        return KafkaPrometheusMiddleware(registry=self.registry, app_name="harbour-deposits",
                                         metrics_prefix="harbour")

    def watch(self, *, scheduler: _Counts, relay: RelayStats) -> None:
        self.registry.register(_SchedulerCollector(scheduler))
        self.registry.register(RelayCollector("harbour_deposits", relay))

    def queues(self, waiting: Mapping[str, tuple[int, float]]) -> None:
        """Set every queue's (depth, seconds the head has waited); a queue that emptied reads
        0, so an alert sees it drain instead of a series that vanished."""
        for queue in self._queues - waiting.keys():
            self.queue_depth.labels(queue).set(0)
            self.queue_oldest.labels(queue).set(0)
        for queue, (depth, oldest_s) in waiting.items():
            self.queue_depth.labels(queue).set(depth)
            self.queue_oldest.labels(queue).set(oldest_s)
        self._queues |= waiting.keys()


class _Counts(Protocol):
    """What the scheduler counts (``services.deposits.app.Scheduler``)."""

    ticks: int
    retries: int


class _SchedulerCollector(Collector):
    """Read at scrape time: the scheduler keeps plain ints, which are read whole."""

    def __init__(self, scheduler: _Counts) -> None:
        self._scheduler = scheduler

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(
            "harbour_deposits_scheduler_wakeups", "Transfers the clock woke (a window opened, a "
            "deadline passed)", value=self._scheduler.ticks)
        yield CounterMetricFamily(
            "harbour_deposits_scheduler_queue_retries", "Settlement queue heads retried",
            value=self._scheduler.retries)
