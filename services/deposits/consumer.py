"""The deposits service's Kafka loop: batches of commands and ledger answers, one transaction each.

One aiokafka consumer in the deposits group reads ``deposits.commands`` and the deposits ledger
reply topic (``read_committed``, from the earliest offset, no auto-commit). Each poll is one batch:

1. every record is decoded strictly (``shared.events.envelope``); one that cannot be (bad bytes,
   bad JSON, unknown fields or type, a wrong-topic type) is dead-lettered at once with the reason
   (``<group>.dlq``, the headers of ``shared.messaging.dlq``) and the rest go on;
2. the decoded messages go to :meth:`DepositsService.handle_batch`: decided in partition order,
   recorded in one transaction (inbox claims, events, outbox rows, read models);
3. only then are the batch's offsets committed to Kafka. A crash before that redelivers the
   batch, and the inbox makes every message of it a no-op.

Failures:

- the database is unreachable (a retryable ``InfrastructureError`` after the service's own
  retries): nothing was committed; the loop seeks every partition of the batch back to its first
  record, waits and reads it again. Nothing is dead-lettered for an outage;
- any other failure of the batch (a record that makes a decision raise, a race lost too often):
  the batch is handled again one message at a time, each in its own transaction, with the
  dead-letter rule of ``shared.messaging.dlq.classify`` (deterministic errors parked at once,
  others retried up to ``max_attempts``). One poison record costs one slow batch, not a partition.

Why not FastStream's batch subscriber: it flattens partitions into one tuple and its nack re-reads
only the first record's partition (../shared/STYLE.md section 4), and it sleeps a full batch
timeout after an empty poll. The per-record subscribers it replaced cost a transaction, two round
trips and an offset commit per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from shared.errors import InfrastructureError
from shared.events.envelope import decode, typed_decoder
from shared.events.ledger import PostingAccepted, PostingRejected
from shared.events.topics import dlq_topic
from shared.messaging.dlq import DeadLetterMiddleware, Failure, classify

from .metrics import DepositsMetrics
from .service import DepositsService, Message, Outcome

__all__ = ["BatchHandler", "DepositsConsumer", "RetryBatch"]

log = logging.getLogger("harbour.deposits")
_decode_result = typed_decoder(PostingAccepted, PostingRejected)

AfterHook = Callable[[Sequence[Outcome]], Awaitable[None]]
DeadLetter = Callable[[ConsumerRecord[bytes, bytes], BaseException, Failure, int],
                      Awaitable[None]]
_IDLE_POLL_MS = 200
_DATABASE_DOWN_WAIT_S = 1.0
_COMMIT_EVERY_S = 0.2


class RetryBatch(Exception):
    """The batch must be read again from its first records (nothing of it was lost)."""


class BatchHandler:
    """Decode, decide and record one batch of records (module docstring, steps 1 and 2).

    Kafka-free, so that tests drive it with records of their own.
    """

    def __init__(self, service: DepositsService, *, commands_topic: str, results_topic: str,
                 dead_letter: DeadLetter, policy: DeadLetterMiddleware,
                 metrics: DepositsMetrics) -> None:
        self._service = service
        self._commands = commands_topic
        self._results = results_topic
        self._dead_letter = dead_letter
        self._policy = policy
        self._metrics = metrics

    async def handle(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> list[Outcome]:
        """Handle ``records`` (in partition order); returns the outcomes of the decided ones.

        Raises:
            RetryBatch: the database is unavailable; read the batch again later.
        """
        messages: list[Message] = []
        kept: list[ConsumerRecord[bytes, bytes]] = []
        for record in records:
            try:
                messages.append(self._decode(record))
                kept.append(record)
            except Exception as exc:  # malformed input: parked with its reason, never retried
                await self._park(record, exc, classify(exc), 1)
        if not messages:
            return []
        try:
            outcomes = await self._service.handle_batch(messages)
        except InfrastructureError as exc:
            if exc.retryable:
                raise RetryBatch(str(exc)) from exc
            log.warning("batch of %d failed (%s); one at a time", len(messages), exc.code)
            self._metrics.batch_retries.labels("one_at_a_time").inc()
            return await self._one_at_a_time(messages, kept)
        except Exception as exc:
            log.warning("batch of %d failed (%r); one at a time", len(messages), exc)
            self._metrics.batch_retries.labels("one_at_a_time").inc()
            return await self._one_at_a_time(messages, kept)
        self._metrics.decided(outcomes)
        return outcomes

    def _decode(self, record: ConsumerRecord[bytes, bytes]) -> Message:
        body = record.value if record.value is not None else b""
        if record.topic == self._results:
            return self._service.result_message(*_decode_result(body))
        return self._service.command_message(*decode(body))

    async def _one_at_a_time(self, messages: Sequence[Message],
                             records: Sequence[ConsumerRecord[bytes, bytes]]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for message, record in zip(messages, records, strict=True):
            outcome = await self._one(message, record)
            if outcome is not None:
                outcomes.append(outcome)
        self._metrics.decided(outcomes)
        return outcomes

    async def _one(self, message: Message, record: ConsumerRecord[bytes, bytes]
                   ) -> Outcome | None:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._service.handle(message)
            except Exception as exc:
                failure = classify(exc)
                if failure.duplicate:
                    return None
                if isinstance(exc, InfrastructureError) and exc.retryable:
                    raise RetryBatch(str(exc)) from exc  # an outage, not this record's fault
                if failure.retryable and attempt < self._policy.max_attempts:
                    log.warning("%s failed (attempt %d of %d, %s): %r; retrying", _where(record),
                                attempt, self._policy.max_attempts, failure.code, exc)
                    await asyncio.sleep(min(self._policy.backoff_s * 2 ** (attempt - 1),
                                            self._policy.backoff_max_s))
                    continue
                await self._park(record, exc, failure, attempt)
                return None

    async def _park(self, record: ConsumerRecord[bytes, bytes], exc: BaseException,
                    failure: Failure, attempts: int) -> None:
        try:
            await self._dead_letter(record, exc, failure, attempts)
        except Exception as publish_error:  # read again: the record is never dropped unparked
            raise RetryBatch(f"dead letter not confirmed: {publish_error!r}") from publish_error
        self._metrics.messages.labels("dead_lettered").inc()
        log.error("%s dead-lettered after %d attempt(s) (%s): %s", _where(record), attempts,
                  failure.code, exc)


class _CommitOnRevoke(ConsumerRebalanceListener):
    """Partitions leave with their handled offsets committed (the next owner redoes less)."""

    def __init__(self, loop: DepositsConsumer) -> None:
        self._loop = loop

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        async with self._loop.handling:  # let a batch in hand finish first
            await self._loop.commit()

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        return None


class DepositsConsumer:
    """Poll, handle, commit; until :meth:`stop` (module docstring)."""

    def __init__(self, service: DepositsService, bootstrap: str, *, commands_topic: str,
                 results_topic: str, group_id: str, policy: DeadLetterMiddleware,
                 metrics: DepositsMetrics, after: AfterHook, max_records: int = 500,
                 client_id: str = "harbour-deposits") -> None:
        self._group = group_id
        self._topics = [commands_topic, results_topic]
        self._after = after
        self._metrics = metrics
        self._max_records = max_records
        self._stopping = asyncio.Event()
        self._handled: dict[TopicPartition, int] = {}
        self._committed_at = 0.0
        self.handling = asyncio.Lock()
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group_id, client_id=client_id,
            enable_auto_commit=False, auto_offset_reset="earliest",
            isolation_level="read_committed", fetch_max_wait_ms=20,
            max_poll_interval_ms=300_000, session_timeout_ms=10_000)
        # Dead letters are confirmed by every in-sync replica before the offset moves past them.
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, client_id=client_id,
                                          acks="all", enable_idempotence=True)
        self.handler = BatchHandler(service, commands_topic=commands_topic,
                                    results_topic=results_topic, dead_letter=self._send_dead,
                                    policy=policy, metrics=metrics)
        self._policy = policy

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        await self._producer.start()
        self.consumer.subscribe(self._topics, listener=_CommitOnRevoke(self))
        await self.consumer.start()
        try:
            while not self._stopping.is_set():
                batch = await self.consumer.getmany(timeout_ms=_IDLE_POLL_MS,
                                                    max_records=self._max_records)
                if batch:
                    async with self.handling:
                        await self._handle(batch)
                # Busy, commit a few times a second (each commit is a broker request the
                # batches compete for; a redelivery is a no-op); idle, at once.
                if not batch or time.monotonic() - self._committed_at >= _COMMIT_EVERY_S:
                    await self.commit()
        finally:
            with contextlib.suppress(Exception):
                await self.commit()
            with contextlib.suppress(Exception):
                await self.consumer.stop()
            await self._producer.stop()

    async def _handle(self, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
                      ) -> None:
        records = [r for tp in sorted(batch, key=lambda tp: (tp.topic, tp.partition))
                   for r in batch[tp]]
        began = time.perf_counter()
        try:
            outcomes = await self.handler.handle(records)
        except RetryBatch as down:
            log.warning("database unavailable, reading the batch again: %s", down)
            self._metrics.batch_retries.labels("database_unavailable").inc()
            self._seek_back(batch)
            await asyncio.sleep(_DATABASE_DOWN_WAIT_S)
            return
        self._metrics.batch(len(records), time.perf_counter() - began)
        self._handled.update({tp: rs[-1].offset + 1 for tp, rs in batch.items() if rs})
        try:
            await self._after(outcomes)
        except Exception:  # committed already; the periodic queue round covers a lost wake-up
            log.exception("post-commit hook failed")

    def _seek_back(self, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
                   ) -> None:
        for tp, records in batch.items():
            if records and tp in self.consumer.assignment():
                self.consumer.seek(tp, records[0].offset)

    async def commit(self) -> None:
        """Commit the offsets past every handled record (a failed commit only redelivers)."""
        offsets, self._handled = self._handled, {}
        self._committed_at = time.monotonic()
        owned = self.consumer.assignment()
        offsets = {tp: o for tp, o in offsets.items() if tp in owned}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except Exception as exc:  # the inbox makes the redelivery of those records a no-op
            log.warning("offset commit failed (records may be redelivered): %r", exc)

    async def _send_dead(self, record: ConsumerRecord[bytes, bytes], exc: BaseException,
                         failure: Failure, attempts: int) -> None:
        headers = self._policy.dead_letter_headers(record, group=self._group, exc=exc,
                                                   failure=failure, attempts=attempts)
        value = record.value if record.value is not None or record.key is not None else b""
        future = await self._producer.send(dlq_topic(self._group), value=value, key=record.key,
                                           headers=list(headers))
        await future


def _where(record: ConsumerRecord[Any, Any]) -> str:
    return f"{record.topic}[{record.partition}]@{record.offset}"
