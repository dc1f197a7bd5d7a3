"""One batch of deposits records: decode, decide, record (the router's handler does the Kafka part).

Every record of the batch is decoded strictly (``shared.events.envelope``); one that cannot be
(bad bytes, bad JSON, unknown fields or type, a type that does not belong on its topic) is
dead-lettered at once with the reason (``<group>.dlq``, the headers of ``shared.messaging.dlq``)
and the others go on. The decoded messages go to :meth:`DepositsService.handle_batch`: decided in
partition order, recorded in one transaction (inbox claims, events, outbox rows, read models).

Failures:

- the database is unreachable or refuses writes for a reason no record causes (a transient
  ``InfrastructureError`` once the service's own retries are spent; disk full, read-only, a
  missing table): :class:`RetryBatch`; nothing was committed and the router reads the whole
  batch again. Nothing is dead-lettered for it; malformed records are parked only once their
  batch is through, so a batch read again parks nothing twice;
- any other failure of the batch (a record that makes a decision raise, a race lost too often):
  the batch is handled again one message at a time, each in its own transaction, with the
  dead-letter rule of ``shared.messaging.dlq.classify`` (deterministic errors parked at once,
  others retried up to ``max_attempts``). One poison record costs one slow batch, not a partition.

Kafka-free, so that tests drive it with records of their own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka import ConsumerRecord

from shared.errors import InfrastructureError
from shared.events.envelope import decode, typed_decoder
from shared.events.ledger import PostingAccepted, PostingRejected
from shared.messaging.dlq import DeadLetterMiddleware, Failure, classify

from .metrics import DepositsMetrics
from .service import DepositsService, Message, Outcome

__all__ = ["BatchHandler", "DeadLetter", "RetryBatch"]

log = logging.getLogger("harbour.deposits")
_decode_result = typed_decoder(PostingAccepted, PostingRejected)

DeadLetter = Callable[[ConsumerRecord[bytes, bytes], BaseException, Failure, int],
                      Awaitable[None]]


class RetryBatch(Exception):
    """The batch must be read again from its first records (nothing of it was lost)."""


class BatchHandler:
    """Decode, decide and record one batch of records (module docstring)."""

    def __init__(self, service: DepositsService, *, results_topic: str, dead_letter: DeadLetter,
                 policy: DeadLetterMiddleware, metrics: DepositsMetrics) -> None:
        self._service = service
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
        malformed: list[tuple[ConsumerRecord[bytes, bytes], Exception]] = []
        for record in records:
            try:
                messages.append(self._decode(record))
                kept.append(record)
            except Exception as refused:  # malformed: parked with its reason, never retried
                malformed.append((record, refused))
        outcomes = await self._decide(messages, kept) if messages else []
        # Parked once the batch is through: a batch read again (an outage) parks nothing twice.
        for bad, error in malformed:
            await self._park(bad, error, classify(error), 1)
        return outcomes

    async def _decide(self, messages: Sequence[Message],
                      records: Sequence[ConsumerRecord[bytes, bytes]]) -> list[Outcome]:
        try:
            outcomes = await self._service.handle_batch(messages)
        except Exception as exc:
            if _database_down(exc):
                raise RetryBatch(str(exc)) from exc
            log.warning("batch of %d failed (%r); one at a time", len(messages), exc)
            self._metrics.batch_retries.labels("one_at_a_time").inc()
            return await self._one_at_a_time(messages, records)
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
                if _database_down(exc):
                    raise RetryBatch(str(exc)) from exc  # not this record's fault
                if failure.retryable and attempt < self._policy.max_attempts:
                    log.warning("%s failed (attempt %d of %d, %s): %r; retrying", _where(record),
                                attempt, self._policy.max_attempts, failure.code, exc)
                    await asyncio.sleep(self._policy.backoff(attempt))
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


def _database_down(exc: BaseException) -> bool:
    """A database failure no record causes: waited out, never dead-lettered. Transient ones
    (connection lost, failover, deadlock), and also disk full, a read-only primary or a missing
    table: everything except a data exception (22) or integrity violation (23), which a
    record's content can cause."""
    if not isinstance(exc, InfrastructureError):
        return False
    sqlstate = str(exc.details.get("sqlstate") or "")
    return exc.retryable or sqlstate[:2] not in ("22", "23")


def _where(record: ConsumerRecord[Any, Any]) -> str:
    return f"{record.topic}[{record.partition}]@{record.offset}"
