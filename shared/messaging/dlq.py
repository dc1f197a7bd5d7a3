"""Retry limit + dead-letter topic for FastStream 0.7 Kafka subscribers.

Why this exists: with ``AckPolicy.NACK_ON_ERROR`` FastStream seeks back to a failed record and
redelivers it forever, so one poison record blocks its partition; with ``ACK`` it commits past the
failure and the record is lost. Neither is acceptable (DESIGN.md "Exactly-once, end to end" 3).
This middleware bounds the retries and then parks the record, byte for byte, on its consumer
group's dead-letter topic ``<group>.dlq`` before the offset may be committed.

How it hooks into FastStream 0.7.8 (read from ``faststream/_internal/endpoint/subscriber/
usecase.py::process_message``): for every raw record the subscriber builds the middleware stack
``[AcknowledgementMiddleware, CriticalLogMiddleware, *broker/router middlewares]`` and enters each
as an async context manager, outermost first. Parsing (``AioKafkaParser.parse_message``, which
decodes every header value as UTF-8), body decoding, argument validation, the handler and the
publishing of its return value all run inside those contexts; ``consume_scope`` wraps only the
handler call. This middleware therefore works in ``after_processed`` (``__aexit__``):

* it sees every failure, including a record whose headers cannot even be parsed (which never
  reaches ``consume_scope``);
* swallowing there (returning ``True``) also skips publishing the handler's result, whereas
  swallowing in ``consume_scope`` would publish ``None`` to the handler's ``@publisher`` topics;
* it runs *before* ``AcknowledgementMiddleware.__aexit__`` (contexts exit innermost first), so
  the dead letter is confirmed by the broker (``acks=all`` producer of ``make_broker``) before
  the acknowledgement middleware commits. When this middleware swallows the error the ack
  middleware sees a clean exit and commits (``consumer.commit()`` of every consumed position);
  when it lets the error through, ``NACK_ON_ERROR`` seeks back to the record.

The rule for what is retried (``classify``):

* ``DuplicateError`` is not a failure ("already processed: a no-op"): swallowed and committed.
* ``InfrastructureError`` is retried while ``retryable`` is true, dead-lettered at once otherwise.
* ``ConcurrencyError`` is retried (a lost optimistic-concurrency race; reloading helps).
* Every other ``HarbourError`` (``ValidationError``, ``DomainError``, ``IdempotencyConflictError``,
  ...) is deterministic: dead-lettered at the first failure. So are input errors raised by
  FastStream itself: pydantic validation of handler arguments, undecodable bytes and JSON,
  and "no handler matched" (``SubscriberNotFound``).
* Anything else (unknown exceptions) is retried; the ``max_attempts``-th failure dead-letters it.

Between retries the middleware sleeps a short exponential backoff (``backoff_s`` doubling up to
``backoff_max_s``; the consumer handles nothing else meanwhile, so keep it short) and seeks the
consumer back to the record itself. The seek duplicates ``NACK_ON_ERROR``'s own, on purpose: it
also makes the retry happen under ``ACK``/``REJECT_ON_ERROR`` (whose commit then stores the rewound
position) and ``MANUAL``, and when the record could not be parsed (then the ack middleware has no
message to nack and would silently move past it). For the same reason, after parking a record that
could not be parsed the middleware commits past it itself (FastStream's ack middleware then logs a
CRITICAL parse error of its own and commits nothing). If publishing the dead letter fails, the
original error is re-raised after the same seek: the record is redelivered, never lost.

Attempt counts live in memory, per process, keyed by (group, topic, partition, offset). A restart
or a rebalance to another process starts counting again, so a record gets *at least*
``max_attempts`` tries overall, never fewer. A dead letter may be written twice if the commit that
follows it fails (FastStream logs commit failures and carries on); the ``x-harbour-original-*``
headers identify the record, so DLQ readers dedupe on them.

Batch subscribers are not supported: FastStream hands a batch to middlewares as one tuple of
records, and one failed record cannot be dead-lettered without re-running the others. The
middleware passes batches through untouched; ``shared.messaging.broker`` refuses at start-up any
batch subscriber whose ack policy is not ``AckPolicy.MANUAL`` (the ledger writer handles its own
batch failures).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiokafka import TopicPartition
from aiokafka.errors import IllegalStateError
from faststream import BaseMiddleware
from faststream.exceptions import IgnoredException, SubscriberNotFound
from pydantic import ValidationError as PydanticValidationError

from shared.errors import (
    ConcurrencyError,
    DuplicateError,
    HarbourError,
    InfrastructureError,
    ValidationError,
)
from shared.events.topics import dlq_topic

if TYPE_CHECKING:
    from types import TracebackType

    from aiokafka import AIOKafkaProducer, ConsumerRecord
    from faststream._internal.context.repository import ContextRepo
    from faststream.kafka import KafkaBroker
    from faststream.message import StreamMessage

log = logging.getLogger("harbour.dlq")

# Header names of a dead letter (the original record's own headers come first, unchanged).
H_ERROR_CODE = "x-harbour-error-code"
H_ERROR = "x-harbour-error"
H_ERROR_TYPE = "x-harbour-error-type"
H_ERROR_DETAILS = "x-harbour-error-details"
H_ATTEMPTS = "x-harbour-attempts"
H_ORIGINAL_TOPIC = "x-harbour-original-topic"
H_ORIGINAL_PARTITION = "x-harbour-original-partition"
H_ORIGINAL_OFFSET = "x-harbour-original-offset"
H_ORIGINAL_TIMESTAMP = "x-harbour-original-timestamp"
H_ORIGINAL_VALUE_NULL = "x-harbour-original-value-null"
H_GROUP = "x-harbour-group"
H_DEAD_LETTERED_AT = "x-harbour-dead-lettered-at"

CODE_INVALID_INPUT = ValidationError.code
CODE_NO_HANDLER = "no_handler"
CODE_UNHANDLED = "unhandled_error"


@dataclass(frozen=True, slots=True)
class Failure:
    """How the middleware treats one exception."""

    code: str
    retryable: bool
    duplicate: bool = False


def classify(exc: BaseException) -> Failure:
    """The retry rule (module docstring): machine-readable code and whether retrying can help."""
    if isinstance(exc, DuplicateError):
        return Failure(exc.code, retryable=False, duplicate=True)
    if isinstance(exc, InfrastructureError):
        return Failure(exc.code, retryable=exc.retryable)
    if isinstance(exc, ConcurrencyError):
        return Failure(exc.code, retryable=True)
    if isinstance(exc, HarbourError):
        return Failure(exc.code, retryable=False)
    if isinstance(exc, PydanticValidationError | UnicodeDecodeError | json.JSONDecodeError):
        return Failure(CODE_INVALID_INPUT, retryable=False)
    if isinstance(exc, SubscriberNotFound):
        return Failure(CODE_NO_HANDLER, retryable=False)
    return Failure(CODE_UNHANDLED, retryable=True)


class _Metrics:
    """Prometheus counters when prometheus-client is installed, otherwise nothing."""

    def __init__(self) -> None:
        try:
            from prometheus_client import Counter
        except ImportError:  # pragma: no cover - prometheus-client is optional
            self.dead_letters = self.retries = self.publish_failures = None
            return
        self.dead_letters = Counter(
            "harbour_dead_letters_total",
            "Records parked on a dead-letter topic",
            ["group", "topic", "code"],
        )
        self.retries = Counter(
            "harbour_consume_retries_total",
            "Failed deliveries that will be retried",
            ["group", "topic"],
        )
        self.publish_failures = Counter(
            "harbour_dead_letter_publish_failures_total",
            "Dead letters that could not be published (record redelivered)",
            ["group"],
        )

    def inc(self, counter: Any, **labels: str) -> None:
        if counter is not None:
            counter.labels(**labels).inc()


_METRICS = _Metrics()  # one registration per process: prometheus names are global


def _default_clock() -> datetime:
    return datetime.now(UTC)


def _truncate(text: str, limit: int) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return raw
    marker = b"...[truncated]"
    # errors="ignore" drops a multi-byte character cut in half
    head = raw[: max(limit - len(marker), 0)].decode("utf-8", "ignore").encode("utf-8")
    return head + marker


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return f"{cls.__module__}.{cls.__qualname__}"


def _message_of(exc: BaseException) -> str:
    if isinstance(exc, HarbourError):
        return exc.message
    return str(exc) or repr(exc)


def _aiokafka_producer(broker: KafkaBroker) -> AIOKafkaProducer | None:
    """The broker's own connected aiokafka producer (``acks=all``, idempotent via make_broker).

    FastStream 0.7.8 exposes it only through private attributes
    (``broker.config.producer._producer.producer``); ``None`` when that path is absent (e.g. under
    ``TestKafkaBroker``, whose fake producer replaces it) or the broker is not connected.
    """
    state = getattr(broker.config.producer, "_producer", None)
    try:
        return getattr(state, "producer", None)
    except Exception:  # EmptyProducerState.producer raises IncorrectState before connect()
        return None


class DeadLetterMiddleware:
    """Broker/router middleware factory: ``KafkaBroker(middlewares=[DeadLetterMiddleware()])``.

    ``make_broker`` installs one by default. One instance keeps the attempt counts and the
    counters for every subscriber it wraps: ``dead_lettered``, ``retried``, ``duplicates`` and
    ``publish_failures`` (plain ints; Prometheus counters are updated too when available).
    """

    def __init__(
        self,
        *,
        max_attempts: int = 5,
        backoff_s: float = 0.1,
        backoff_max_s: float = 2.0,
        max_error_bytes: int = 2048,
        max_tracked: int = 10_000,
        classify: Callable[[BaseException], Failure] = classify,
        clock: Callable[[], datetime] = _default_clock,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if backoff_s < 0 or backoff_max_s < 0:
            raise ValueError("backoff must be >= 0")
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.max_error_bytes = max_error_bytes
        self.max_tracked = max_tracked
        self.classify = classify
        self.clock = clock
        self.dead_lettered = 0
        self.retried = 0
        self.duplicates = 0
        self.publish_failures = 0
        self._attempts: OrderedDict[tuple[str, str, int, int], int] = OrderedDict()

    def __call__(self, msg: Any | None, /, *, context: ContextRepo) -> DeadLetterScope:
        return DeadLetterScope(msg, context=context, policy=self)

    # --- attempt bookkeeping -------------------------------------------------------------------

    def attempts(self, group: str, record: ConsumerRecord[Any, Any]) -> int:
        """Failed attempts recorded so far for ``record`` in ``group`` (0 when none)."""
        return self._attempts.get((group, record.topic, record.partition, record.offset), 0)

    def _fail(self, key: tuple[str, str, int, int]) -> int:
        attempt = self._attempts.pop(key, 0) + 1
        self._attempts[key] = attempt  # re-insert: most recent last
        while len(self._attempts) > self.max_tracked:
            self._attempts.popitem(last=False)  # a partition we lost long ago; start over
        return attempt

    def _forget(self, key: tuple[str, str, int, int]) -> None:
        if self._attempts:
            self._attempts.pop(key, None)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before try ``attempt + 1`` (exponential, capped)."""
        return float(min(self.backoff_s * 2 ** (attempt - 1), self.backoff_max_s))  # float ok

    # --- the dead letter -----------------------------------------------------------------------

    def dead_letter_headers(
        self,
        record: ConsumerRecord[Any, Any],
        *,
        group: str,
        exc: BaseException,
        failure: Failure,
        attempts: int,
    ) -> list[tuple[str, bytes]]:
        """The original headers, unchanged and in order, then the ``x-harbour-*`` ones."""
        headers: list[tuple[str, bytes]] = list(record.headers or ())
        ours = [
            (H_ERROR_CODE, failure.code.encode()),
            (H_ERROR, _truncate(_message_of(exc), self.max_error_bytes)),
            (H_ERROR_TYPE, _type_name(exc).encode()),
            (H_ATTEMPTS, str(attempts).encode()),
            (H_ORIGINAL_TOPIC, record.topic.encode()),
            (H_ORIGINAL_PARTITION, str(record.partition).encode()),
            (H_ORIGINAL_OFFSET, str(record.offset).encode()),
            (H_ORIGINAL_TIMESTAMP, str(record.timestamp).encode()),
            (H_GROUP, group.encode()),
            (H_DEAD_LETTERED_AT, self.clock().isoformat().encode()),
        ]
        if isinstance(exc, HarbourError) and exc.details:
            details = json.dumps(exc.details, default=str, sort_keys=True)
            ours.append((H_ERROR_DETAILS, _truncate(details, self.max_error_bytes)))
        if record.value is None and record.key is None:
            ours.append((H_ORIGINAL_VALUE_NULL, b"true"))
        return headers + ours

    async def send_dead_letter(
        self,
        broker: KafkaBroker,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
    ) -> None:
        """Publish and wait for the broker's confirmation; raise if it is not confirmed."""
        if value is None and key is None:
            value = b""  # Kafka needs a key or a value; H_ORIGINAL_VALUE_NULL says it was null
        producer = _aiokafka_producer(broker)
        if producer is not None:
            # The raw producer keeps the original bytes exactly: FastStream's publish() takes
            # str headers (a dict: duplicate names would collapse) and adds its own.
            future = await producer.send(topic, value=value, key=key, headers=list(headers))
            await future
            return
        # In-memory test broker only: FastStream's publish with headers decoded as text.
        await broker.publish(
            value,
            topic,
            key=key,
            headers={k: v.decode("utf-8", "replace") for k, v in headers},
        )


class DeadLetterScope(BaseMiddleware):
    """Per-record middleware built by :class:`DeadLetterMiddleware` (one per consumed record)."""

    def __init__(
        self, msg: Any | None, /, *, context: ContextRepo, policy: DeadLetterMiddleware
    ) -> None:
        super().__init__(msg, context=context)
        self.policy = policy
        self.parsed = False

    async def consume_scope(
        self, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any]
    ) -> Any:
        # Reached only when FastStream could parse the record (consume_scope wraps the handler).
        self.parsed = True
        return await call_next(msg)

    async def after_processed(
        self,
        exc_type: type[BaseException] | None = None,
        exc_val: BaseException | None = None,
        exc_tb: TracebackType | None = None,
    ) -> bool | None:
        record = self.msg
        if record is None or isinstance(record, tuple):
            # None: a publish-side instance; tuple: a batch (not supported, module docstring).
            return False
        subscriber = self.context.get_local("handler_")
        group: str | None = getattr(subscriber, "group_id", None)
        if not group:
            if exc_val is not None:
                log.error("no group id: cannot dead-letter %s", _where(record))
            return False
        key = (group, record.topic, record.partition, record.offset)

        if exc_val is None:
            self.policy._forget(key)
            return False
        if not isinstance(exc_val, Exception) or isinstance(exc_val, IgnoredException):
            # CancelledError, SystemExit, and FastStream's own control flow (AckMessage,
            # NackMessage, RejectMessage, SkipMessage, StopConsume) are not failures.
            return False

        policy = self.policy
        failure = policy.classify(exc_val)
        if failure.duplicate:
            policy._forget(key)
            policy.duplicates += 1
            log.info("duplicate %s in %s: committed as a no-op", _where(record), group)
            return True

        attempt = policy._fail(key)
        if failure.retryable and attempt < policy.max_attempts:
            policy.retried += 1
            _METRICS.inc(_METRICS.retries, group=group, topic=record.topic)
            log.warning(
                "%s failed in %s (attempt %d of %d, %s): %s; retrying",
                _where(record),
                group,
                attempt,
                policy.max_attempts,
                failure.code,
                _message_of(exc_val),
                exc_info=exc_val,
            )
            await asyncio.sleep(policy.backoff(attempt))
            self._seek_back(subscriber, record)
            return False  # re-raise: NACK_ON_ERROR seeks back too, nothing is committed past it

        target = dlq_topic(group)
        headers = policy.dead_letter_headers(
            record, group=group, exc=exc_val, failure=failure, attempts=attempt
        )
        broker = self.context.get_local("broker")
        try:
            await policy.send_dead_letter(
                broker, target, key=record.key, value=record.value, headers=headers
            )
        except Exception as publish_error:
            policy.publish_failures += 1
            _METRICS.inc(_METRICS.publish_failures, group=group)
            log.error(
                "could not dead-letter %s to %s; it will be redelivered: %r",
                _where(record),
                target,
                publish_error,
                exc_info=publish_error,
            )
            await asyncio.sleep(policy.backoff_max_s)
            self._seek_back(subscriber, record)
            return False  # the original error goes on: no commit, the record comes back
        if not self.parsed:
            # The ack middleware cannot ack what it cannot parse (its fallback parser fails
            # again, logged at CRITICAL): commit past the parked record here, or a restart
            # before the next record's commit would park it twice.
            await self._commit_past(subscriber, record)
        policy._forget(key)
        policy.dead_lettered += 1
        _METRICS.inc(_METRICS.dead_letters, group=group, topic=record.topic, code=failure.code)
        log.error(
            "%s dead-lettered to %s after %d attempt(s) (%s): %s",
            _where(record),
            target,
            attempt,
            failure.code,
            _message_of(exc_val),
            exc_info=exc_val,
        )
        return True  # swallowed: the ack middleware commits and the partition moves on

    @staticmethod
    async def _commit_past(subscriber: Any, record: ConsumerRecord[Any, Any]) -> None:
        consumer = _consumer_of(subscriber, record)
        if consumer is None:
            return
        tp = TopicPartition(record.topic, record.partition)
        try:
            await consumer.commit({tp: record.offset + 1})
        except Exception as e:  # like FastStream's own commits: log, the record may come back
            log.critical("commit after dead-lettering %s failed: %r", _where(record), e)

    @staticmethod
    def _seek_back(subscriber: Any, record: ConsumerRecord[Any, Any]) -> None:
        consumer = _consumer_of(subscriber, record)
        if consumer is None:
            return
        # IllegalStateError: partition revoked meanwhile; its next owner starts from the commit
        with contextlib.suppress(IllegalStateError):
            consumer.seek(TopicPartition(record.topic, record.partition), record.offset)


def _consumer_of(subscriber: Any, record: ConsumerRecord[Any, Any]) -> Any:
    # ConcurrentBetweenPartitionsSubscriber tags each record with its consumer; the others keep
    # theirs on the subscriber. None under TestKafkaBroker.
    return getattr(record, "consumer", None) or getattr(subscriber, "consumer", None)


def _where(record: ConsumerRecord[Any, Any]) -> str:
    return f"{record.topic}[{record.partition}]@{record.offset}"
