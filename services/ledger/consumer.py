"""The ledger writer's Kafka loop: batches from ``ledger.commands`` into :class:`LedgerWriter`.

aiokafka is used directly, not a FastStream subscriber, because the writer owns its offsets: they
are stored in PostgreSQL with the effects, and on every assignment the consumer seeks to them
(FastStream's batch acknowledgement would commit to Kafka, which is not the source of truth here).
Kafka commits still happen after each batch so that lag tools show the truth, but nothing depends
on them. Expired pendings are released by the same loop for the partitions it owns, so each
partition's hash chain has exactly one writer at a time. Each committed batch's answers go to
Kafka from here too (``answers.py``), and the loop seeks back to the stored answered watermark
whenever one may be missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from shared.store.outbox import Outbox, OutboxMessage

from . import repository as repo
from .answers import AnswerPublisher
from .metrics import WriterMetrics
from .writer import LedgerWriter, OffsetGapError, Record

log = logging.getLogger(__name__)


def _records(batch: dict[TopicPartition, list[ConsumerRecord]]) -> list[Record]:
    return [
        Record(tp.partition, r.offset, r.key, r.value, tuple(r.headers or ()))
        for tp, rs in sorted(batch.items(), key=lambda kv: kv[0].partition)
        for r in rs
    ]


_POLL_IDLE_MS = 100  # with nothing to do, wait this long for records (then check expiries)
_KAFKA_COMMIT_EVERY_S = 1.0
_DECODE_CHUNK = 64  # records decoded between yields to the batch in flight (about 3 ms)
# Records taken from aiokafka per fetch: decoded before the loop looks at the batch in flight
# again, so this bounds how long a finished batch can wait for the next to start (~10 ms).
_FETCH_RECORDS = 256
_BUSY_FETCH = (8192, 5)  # (fetch_min_bytes, fetch_max_wait_ms) while a batch is in flight
_IDLE_FETCH = (1, 20)  # ... and while none is


async def _cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait for it; whatever it returned or raised is dropped."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


class _Staged:
    """Records fetched and decoded, not yet applied: the next batch, in the making."""

    def __init__(self) -> None:
        self.by_partition: dict[TopicPartition, list[ConsumerRecord]] = {}
        self.records: list[Record] = []
        self.prepared: list[Any] = []

    @property
    def size(self) -> int:
        return len(self.records)

    def add(self, tp: TopicPartition, records: list[ConsumerRecord], writer: LedgerWriter
            ) -> None:
        mine = _records({tp: records})
        self.prepared += writer.prepare(mine)
        self.records += mine
        self.by_partition.setdefault(tp, []).extend(records)

    def take(self) -> tuple[dict[TopicPartition, list[ConsumerRecord]], list[Record], list[Any]]:
        """The staged records in partition order (the order the writer applies them in)."""
        order = sorted(range(len(self.records)),
                       key=lambda i: (self.records[i].partition, self.records[i].offset))
        return (self.by_partition, [self.records[i] for i in order],
                [self.prepared[i] for i in order])


class _SeekToStored(ConsumerRebalanceListener):
    """On assignment, continue where PostgreSQL says the ledger is, not where Kafka says."""

    def __init__(self, loop: WriterLoop) -> None:
        self._loop = loop

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        # Progress is committed with every batch. What may lag is the answered watermark: let
        # the batch in flight finish and its answers reach Kafka, then store the watermark, so
        # the next owner answers again as little as possible (never less than needed).
        if self._loop.batch_in_flight is not None:
            await asyncio.wait([self._loop.batch_in_flight])
        await self._loop.answers.drain()
        await self._loop.save_answered()
        self._loop.forget([tp.partition for tp in revoked])

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        # aiokafka fetches newly assigned partitions while this callback waits for PostgreSQL.
        # Paused, none of their records reaches a batch before the seek: they would be applied
        # from Kafka's committed offset and then, after the seek, answered all over again.
        partitions = list(assigned)
        self._loop.consumer.pause(*partitions)
        if await self._loop.seek_or_park(partitions):
            self._loop.consumer.resume(*partitions)
            # Seeked now: a retry left over from before this rebalance must not seek them again
            # while they are being read.
            self._loop.unseeked.difference_update(partitions)


class WriterLoop:
    """Consume, apply, repeat; until :meth:`stop`."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        writer: LedgerWriter,
        bootstrap: str,
        *,
        topic: str,
        group_id: str,
        max_records: int = 2000,
        expiry_interval_s: float = 0.5,
        instance_id: str | None = None,
        answers_refused_after_ms: int = 30_000,
        metrics: WriterMetrics | None = None,
    ) -> None:
        self._pool = pool
        self.metrics = metrics or WriterMetrics()
        self._applied_to: dict[int, int] = {}  # per owned partition: the next offset to apply
        self.unseeked: set[TopicPartition] = set()  # assigned, paused until the seek succeeds
        self._seek_again_at = 0.0
        self._writer = writer
        self._topic = topic
        self._expiry_interval_s = expiry_interval_s
        self._max_records = max_records
        self._stopping = asyncio.Event()
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group_id,
            group_instance_id=instance_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_min_bytes=_IDLE_FETCH[0],
            fetch_max_wait_ms=_IDLE_FETCH[1],
            max_poll_interval_ms=300_000,
            session_timeout_ms=10_000,
        )
        self.answers = AnswerPublisher(bootstrap, spill=self._spill,
                                       refused_after_ms=answers_refused_after_ms)
        self.batch_in_flight: asyncio.Task[bool] | None = None
        self.applied = 0
        self._pending_commit: dict[TopicPartition, int] = {}
        self._commit_task: asyncio.Task[None] | None = None
        self._last_commit_at = 0.0

    async def seek_to_stored(self, partitions: list[TopicPartition]) -> None:
        async with self._pool.acquire() as conn:
            stored = await repo.stored_offsets(conn, self._topic)
        for tp in partitions:
            if tp.partition in stored:
                start, next_offset = stored[tp.partition]
                self.consumer.seek(tp, start)
                self._applied_to[tp.partition] = next_offset
                self.answers.assume({tp.partition: start})
            else:
                await self.consumer.seek_to_beginning(tp)

    async def seek_or_park(self, partitions: list[TopicPartition]) -> bool:
        """Seek ``partitions`` to the stored offsets; if PostgreSQL cannot say what they are,
        park them paused (the loop tries again every second) and return False. Read from
        anywhere else, Kafka's committed offset say, they could skip records not yet answered
        or applied; and the loop must outlive an outage, not die of it."""
        try:
            await self.seek_to_stored(partitions)
        except Exception as exc:  # whatever stopped the seek, reading on unseeked is worse
            log.warning("seek to the stored offsets failed, retrying in 1 s: %r", exc)
            # A rebalance may have taken some of them while PostgreSQL was being asked: only
            # partitions still owned can be paused (and are this writer's to seek later).
            owned = self.consumer.assignment()
            parked = [tp for tp in partitions if tp in owned]
            self.consumer.pause(*parked)
            self.unseeked.update(parked)
            self._seek_again_at = asyncio.get_running_loop().time() + 1.0
            return False
        return True

    async def _seek_unseeked(self) -> None:
        """Retry the seek of partitions parked by :meth:`seek_or_park`."""
        partitions = [tp for tp in self.unseeked if tp in self.consumer.assignment()]
        if await self.seek_or_park(partitions):
            owned = self.consumer.assignment()  # a rebalance may have run during the seek
            self.consumer.resume(*(tp for tp in partitions if tp in owned))
            # Only what this retry seeked: a rebalance meanwhile may have parked others.
            self.unseeked.difference_update(partitions)

    async def run(self) -> None:
        self.consumer.subscribe([self._topic], listener=_SeekToStored(self))
        await self.answers.start()
        await self.consumer.start()
        next_expiry = 0.0
        # One batch in flight, and one fetch always waiting beside it. aiokafka sends no new
        # fetch to a broker while records it fetched before sit unread in its buffer, so the
        # loop takes every fetch the moment it lands and decodes it while the batch is with
        # PostgreSQL (on the other core). When that batch commits, everything that arrived
        # meanwhile is the next batch: a record waits for at most the one transaction ahead of
        # it (reading only between batches, as before, made most wait for two), and batches
        # still apply strictly in order. (Two batches in flight at once, of disjoint
        # partitions, were tried: with 10,000 accounts they share balance rows, so the second
        # waits on the first's row locks and nothing is gained.)
        inflight: asyncio.Task[bool] | None = None
        fetch: asyncio.Task[dict[TopicPartition, list[ConsumerRecord]]] | None = None
        sweep: asyncio.Task[None] | None = None
        staged = _Staged()
        gauges = asyncio.create_task(self._refresh_gauges(), name="ledger-metrics")
        try:
            while not self._stopping.is_set():
                if self.unseeked and asyncio.get_running_loop().time() >= self._seek_again_at:
                    await self._seek_unseeked()
                if inflight is None and self.answers.failed is not None:
                    # Answers of a committed batch did not reach Kafka: read again from the
                    # stored watermarks, which answers everything after them again.
                    self.answers.reset_failure()
                    self.metrics.retries.labels("answers_failed").inc()
                    fetch, staged = await self._read_again(fetch)
                if inflight is None and not staged.size:  # idle
                    self._commit_to_kafka(force=True)
                    await self.save_answered()
                room = self._max_records - staged.size
                if fetch is None and room > 0:
                    self._fetch_settings(busy=inflight is not None)
                    fetch = asyncio.create_task(self.consumer.getmany(
                        timeout_ms=_POLL_IDLE_MS, max_records=min(room, _FETCH_RECORDS)))
                await asyncio.wait([t for t in (fetch, inflight) if t is not None],
                                   return_when=asyncio.FIRST_COMPLETED)
                if fetch is not None and fetch.done():
                    fetched, fetch = fetch.result(), None
                    await self._decode(fetched, staged)
                if inflight is not None and inflight.done():
                    ok, inflight = inflight.result(), None
                    if not ok:
                        # It failed: its records, and what is staged or being fetched
                        # behind them, go back to the stored offsets, every partition.
                        fetch, staged = await self._read_again(fetch)
                        continue
                if inflight is None and staged.size and self.answers.failed is None:
                    inflight = asyncio.create_task(self._apply(*staged.take()))
                    self.batch_in_flight = inflight
                    staged = _Staged()
                now = asyncio.get_running_loop().time()
                if now >= next_expiry and (sweep is None or sweep.done()):
                    # In the background: its round trips must not hold up the next batch.
                    sweep = asyncio.create_task(self._expire(), name="ledger-expiry")
                    next_expiry = now + self._expiry_interval_s
        finally:
            await _cancel(gauges)
            await _cancel(fetch)
            for task in (inflight, sweep):
                if task is not None:
                    with contextlib.suppress(Exception):
                        await task
            await self.answers.stop()
            await self.save_answered()
            with contextlib.suppress(Exception):
                await self.consumer.stop()

    def _fetch_settings(self, *, busy: bool) -> None:
        """While a batch is in flight, a fetch has time: let the broker gather a few KiB (or
        wait 5 ms) before answering, instead of answering every record or two (measured at
        2,000 postings/s: 5 to 8% of a core less for the writer, and fewer requests for the
        broker). Idle, answer at once: a lone record must not wait for company. aiokafka
        takes both per consumer only; its fetcher reads these private attributes each time
        it builds a request (a unit test fails if an aiokafka upgrade renames them)."""
        fetcher = self.consumer._fetcher
        fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms = (
            _BUSY_FETCH if busy else _IDLE_FETCH)

    async def _read_again(self, fetch: asyncio.Task[Any] | None) -> tuple[None, _Staged]:
        """Drop what is staged and being fetched; read every owned partition again from the
        offsets stored in PostgreSQL (once it can say what they are)."""
        await _cancel(fetch)
        await self.seek_or_park(list(self.consumer.assignment()))
        return None, _Staged()

    async def _decode(self, fetched: dict[TopicPartition, list[ConsumerRecord]],
                      staged: _Staged) -> None:
        """Decode fetched records into ``staged``, in small chunks with a yield between them,
        so that the batch in flight carries on the moment PostgreSQL answers it."""
        for tp, records in fetched.items():
            for start in range(0, len(records), _DECODE_CHUNK):
                staged.add(tp, records[start:start + _DECODE_CHUNK], self._writer)
                await asyncio.sleep(0)

    async def _apply(self, batch: dict[TopicPartition, list[ConsumerRecord]],
                     records: list[Record], prepared: list[Any]) -> bool:
        """Apply one batch; on failure return False (the loop then reads every owned partition
        again from the stored offsets)."""
        answered = self.answers.unsaved({r.partition for r in records})
        began = asyncio.get_running_loop().time()
        try:
            report = await self._writer.apply_batch(records, prepared, answered)
        except OffsetGapError as gap:
            log.warning("re-seeking: %s", gap)
            self.metrics.retries.labels("offset_gap").inc()
            return False
        except (
            asyncpg.UniqueViolationError,
            asyncpg.DeadlockDetectedError,
            asyncpg.SerializationError,
        ) as race:
            # Another writer got there first (same new id, asset or account): the batch runs
            # again from the stored offsets; the retry sees that writer's rows and answers
            # accordingly.
            log.info("batch raced another writer, retrying: %s", race)
            self.metrics.retries.labels("raced").inc()
            return False
        except (
            OSError,
            asyncpg.PostgresConnectionError,
            asyncpg.InterfaceError,
            # Shut down, restarted or crashed under us (57P01, 57P02, 57P03), or out of
            # connections, memory or disk (53xxx).
            asyncpg.OperatorInterventionError,
            asyncpg.InsufficientResourcesError,
        ) as down:
            # PostgreSQL is unreachable: nothing was committed. Wait; the batch is read again
            # from the stored offsets, its records are still in Kafka.
            log.warning("database unavailable, retrying batch: %s", down)
            self.metrics.retries.labels("database_unavailable").inc()
            await asyncio.sleep(1.0)
            return False
        if report.answered_to:  # the batch stored its progress, watermarks included
            self.answers.saved(answered)
        self.answers.publish(report.answers, report.answered_to)
        self.applied += report.applied
        self.metrics.batch(report, len(records), asyncio.get_running_loop().time() - began)
        next_offsets = {tp: rs[-1].offset + 1 for tp, rs in batch.items() if rs}
        self._pending_commit.update(next_offsets)
        self._applied_to.update((tp.partition, o) for tp, o in next_offsets.items())
        self._commit_to_kafka(force=False)
        return True

    async def _refresh_gauges(self) -> None:
        """Lag and unanswered once a second, from a task of their own: a batch that hangs (a
        lock wait, a database gone) must show as a growing lag, not as the last value."""
        while True:
            try:
                owned = {tp.partition: tp for tp in self.consumer.assignment()}
                self.metrics.partitions(
                    {p: o for p, o in self._applied_to.items() if p in owned},
                    {p: self.consumer.highwater(tp) for p, tp in owned.items()},
                    self.answers.acknowledged)
            except Exception:  # figures are never worth stopping for; the next round tries
                log.debug("metrics refresh failed", exc_info=True)
            await asyncio.sleep(1.0)

    def forget(self, partitions: list[int]) -> None:
        """Partitions lost in a rebalance: their progress figures are another writer's now."""
        for partition in partitions:
            self._applied_to.pop(partition, None)
        self.answers.forget(partitions)
        self.unseeked = {tp for tp in self.unseeked if tp.partition not in partitions}
        self.metrics.forget(partitions)

    async def _spill(self, answers: list[OutboxMessage]) -> None:
        """Answers Kafka refused go to the outbox; its relay retries them and shows the error."""
        async with self._pool.acquire() as conn, conn.transaction():
            await Outbox("ledger").add_many(conn, answers)
        self.metrics.answers_spilled.inc(len(answers))

    async def save_answered(self) -> None:
        """Store how far answers are acknowledged while no batch is doing it (idle, stopping),
        so that a restart answers as little as possible again."""
        unsaved = self.answers.unsaved()
        if not unsaved:
            return
        try:
            async with self._pool.acquire() as conn:
                await repo.save_answered(conn, self._topic, unsaved)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.info("answered watermark not saved (next time): %r", exc)
            return
        self.answers.saved(unsaved)

    def _commit_to_kafka(self, *, force: bool) -> None:
        """Kafka offsets are informational (lag tools); PostgreSQL holds the truth. So commit in
        the background, one request at a time and at most every ``_KAFKA_COMMIT_EVERY_S`` while
        busy (a request per batch is broker CPU the batches compete for), and at once when idle.
        """
        loop_time = asyncio.get_running_loop().time()
        if not self._pending_commit or (
                self._commit_task is not None and not self._commit_task.done()):
            return
        if not force and loop_time - self._last_commit_at < _KAFKA_COMMIT_EVERY_S:
            return
        offsets, self._pending_commit = self._pending_commit, {}
        self._last_commit_at = loop_time
        self._commit_task = asyncio.create_task(self._commit(offsets))

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        with contextlib.suppress(Exception):
            await self.consumer.commit(offsets)

    async def _expire(self) -> None:
        owned = sorted(tp.partition for tp in self.consumer.assignment())
        if not owned:
            return
        try:
            await self._writer.expire_due(owned)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # A race with another writer's batch or a lost connection: nothing was written, and
            # the next sweep (half a second on) finds the same pendings still due.
            log.warning("expiry sweep failed, retrying at the next one: %r", exc)

    def stop(self) -> None:
        self._stopping.set()
