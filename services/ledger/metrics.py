"""Prometheus metrics of the ledger writer (``/metrics``, ``HARBOUR_LEDGER_METRICS_PORT``).

What an operator watches: commands decided per outcome, batch size and duration, batches retried
and why, and, per partition of ``ledger.commands``, how far the writer is behind the log (lag)
and how many applied records still wait for their answer to reach Kafka (unanswered). A growing
lag means the ledger falls behind its clients; unanswered records that stay above zero mean
answers are not getting out (the writer answers them again from the stored watermark).

Each writer loop has its own registry (see ``shared.metrics``); the service serves its one
loop's registry.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.metrics import RelayCollector
from shared.store.outbox import RelayStats

from .writer import BatchReport

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_RECORDS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000)


class WriterMetrics:
    """The writer loop's metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.commands = Counter(
            "harbour_ledger_commands", "Command records the writer handled, by outcome "
            "(accepted, rejected, dead_lettered; replayed: applied before, answered again; "
            "skipped: answered before)", ["outcome"], registry=r)
        self.batch_seconds = Histogram(
            "harbour_ledger_batch_seconds", "Duration of a committed batch, from taking a "
            "database connection to the commit", buckets=_SECONDS, registry=r)
        self.last_batch = Gauge(
            "harbour_ledger_last_batch_timestamp_seconds", "When the last batch committed (Unix "
            "time): with a lag above 0, a value that stops moving means the writer is stuck",
            registry=r)
        self.batch_records = Histogram(
            "harbour_ledger_batch_records", "Records per committed batch", buckets=_RECORDS,
            registry=r)
        self.retries = Counter(
            "harbour_ledger_batch_retries", "Times the writer read again from the stored "
            "offsets, by reason (raced, offset_gap, database_unavailable: the batch was rolled "
            "back; answers_failed: a committed batch's answers did not reach Kafka)", ["reason"],
            registry=r)
        self.answers_spilled = Counter(
            "harbour_ledger_answers_spilled", "Answers Kafka refused that went to the outbox "
            "for its relay to retry", registry=r)
        self.lag = Gauge(
            "harbour_ledger_consumer_lag", "Records of the partition not yet applied "
            "(high watermark minus the next offset to apply)", ["partition"], registry=r)
        self.unanswered = Gauge(
            "harbour_ledger_unanswered", "Applied records of the partition whose answers Kafka "
            "has not acknowledged yet", ["partition"], registry=r)
        for outcome in ("accepted", "rejected", "dead_lettered", "replayed", "skipped"):
            self.commands.labels(outcome)  # present at zero from the start, as rates need
        for reason in ("raced", "offset_gap", "database_unavailable", "answers_failed"):
            self.retries.labels(reason)

    def watch_relay(self, stats: RelayStats) -> None:
        """Also serve the in-process outbox relay's counters (it carries expiry answers and
        answers Kafka refused)."""
        self.registry.register(RelayCollector("harbour_ledger", stats))

    def batch(self, report: BatchReport, records: int, seconds: float) -> None:
        self.commands.labels("accepted").inc(report.accepted)
        self.commands.labels("rejected").inc(report.rejected)
        self.commands.labels("dead_lettered").inc(report.dead_lettered)
        self.commands.labels("replayed").inc(report.replayed)
        self.commands.labels("skipped").inc(report.skipped)
        self.batch_records.observe(records)
        self.batch_seconds.observe(seconds)
        self.last_batch.set_to_current_time()

    def partitions(self, applied_to: Mapping[int, int], highwater: Mapping[int, int | None],
                   answered: Mapping[int, int]) -> None:
        """Set lag and unanswered for the owned partitions, from the next offset to apply."""
        for partition, next_offset in applied_to.items():
            label = str(partition)
            top = highwater.get(partition)
            if top is not None:
                self.lag.labels(label).set(max(0, top - next_offset))
            self.unanswered.labels(label).set(
                max(0, next_offset - answered.get(partition, next_offset)))

    def forget(self, partitions: list[int]) -> None:
        """Partitions this writer no longer owns: their figures are another writer's now."""
        for partition in partitions:
            for gauge in (self.lag, self.unanswered):
                gauge.remove(str(partition))  # a no-op for a label never set
