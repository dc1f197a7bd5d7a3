"""Prometheus metrics of the deposits service (``/metrics``, ``HARBOUR_DEPOSITS_METRICS_PORT``).

- the consumer (``consumer.py``): messages by outcome, batch sizes and durations, batches read
  again or handled one at a time, the time of the last batch;
- the settlement queues (TD-5): an underfunded interbank transfer waits in its payer bank's queue
  for the currency, neither rejected nor partly settled. Ops watch how many wait and how long the
  head has waited (a queue that only grows needs funding, or a cancel);
- the scheduler, the saga's clock: transfers woken and queue heads retried;
- the outbox relay that publishes the service's events and ledger commands.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.metrics import RelayCollector
from shared.store.outbox import RelayStats

if TYPE_CHECKING:
    from .service import Outcome


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
        self.messages = Counter(
            "harbour_deposits_messages", "Commands and ledger answers handled, by outcome: "
            "decided (events recorded), refused (a rule's code recorded), unchanged, duplicate, "
            "ignored (an answer to nothing asked), dead_lettered", ["outcome"],
            registry=self.registry)
        self.batch_seconds = Histogram(
            "harbour_deposits_batch_seconds", "One batch: decode, decide, record, commit",
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry)
        self.batch_records = Histogram(
            "harbour_deposits_batch_records", "Records per batch",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500), registry=self.registry)
        self.batch_retries = Counter(
            "harbour_deposits_batch_retries", "Batches read again (database_unavailable) or "
            "handled one message at a time (one_at_a_time)", ["reason"], registry=self.registry)
        self.last_batch = Gauge(
            "harbour_deposits_last_batch_timestamp_seconds", "When the last batch committed",
            registry=self.registry)

    def decided(self, outcomes: Iterable[Outcome]) -> None:
        """Count what each handled message did."""
        for outcome in outcomes:
            self.messages.labels(_outcome(outcome)).inc()

    def batch(self, records: int, seconds: float) -> None:
        self.batch_records.observe(records)
        self.batch_seconds.observe(seconds)
        self.last_batch.set_to_current_time()

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


def _outcome(outcome: Outcome) -> str:
    if outcome.stream is None:
        return "ignored"
    if outcome.duplicate:
        return "duplicate"
    if outcome.refusal is not None:
        return "refused"
    return "decided" if outcome.events else "unchanged"


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
