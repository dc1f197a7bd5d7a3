"""The deposits service's FastStream subscriber: one batch subscriber, one transaction per batch.

One subscriber in the deposits consumer group reads ``deposits.commands`` and the deposits ledger
reply topic together (``subscriber_options``: read_committed, earliest, ``AckPolicy.MANUAL`` as
``shared.messaging.broker`` requires of batch subscribers). Each poll is one batch, up to
``max_batch`` records, handed to :class:`~services.deposits.consumer.BatchHandler` (decode,
decide in partition order, record in one transaction; malformed records dead-lettered). Then:

- ``ack()``: the offsets of the batch are committed, only after its transaction committed. A
  crash in between redelivers the batch and the inbox makes every message of it a no-op;
- when the database is unreachable, every partition of the batch is sought back to its first
  record after a pause, so the whole batch is read again; nothing is lost and nothing
  dead-lettered for an outage. The same for any unexpected error here, which must not leave a
  batch unacknowledged and unread (under ``MANUAL`` FastStream would move on).

Records whose headers FastStream's batch parser cannot decode (null or non-UTF-8 values) would
make it drop the batch silently; ``_parse_any_headers`` keeps that from happening.

Batches rather than a transaction per message (DESIGN.md's per-message pattern) because on the
two-core reference machine that pattern measured 60 to 76 transfers/s end to end: two round trips,
a commit and an offset commit per message. Batches are whatever arrived since the last poll, so
they stay small when the load is light and nothing waits for a batch to fill.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError
from faststream.kafka import KafkaRouter
from faststream.kafka.annotations import KafkaMessage
from faststream.middlewares import AckPolicy

from shared.messaging.broker import subscriber_options

from .consumer import BatchHandler, RetryBatch
from .metrics import DepositsMetrics
from .service import Outcome
from .settings import DepositsSettings

__all__ = ["build_router"]

log = logging.getLogger("harbour.deposits")

AfterHook = Callable[[Sequence[Outcome]], Awaitable[None]]
_DATABASE_DOWN_WAIT_S = 1.0


async def _whole(msg: KafkaMessage) -> KafkaMessage:
    """The batch message itself as the handler's argument: its records (``raw_message``), and
    ``ack``/``nack``. (Not through FastStream's Context field, which fast_depends resolves in a
    worker thread.)"""
    return msg


async def _nothing(_: Sequence[Outcome]) -> None:
    return None


async def _parse_any_headers(records: tuple[ConsumerRecord[bytes, bytes], ...],
                             parse: Callable[[Any], Awaitable[Any]]) -> Any:
    """FastStream's batch parser, fed headers it cannot fail on.

    It decodes every header value of every record as UTF-8 before the handler runs; a null or
    non-UTF-8 value makes it raise, and FastStream 0.7.8 then drops the error and the batch
    (no ack, no nack under MANUAL: the batch would be skipped unread). Headers are nobody's
    business here (envelopes carry everything), so the parser gets a copy with safe values and
    the handler the original records, headers intact for a dead letter.
    """
    safe = tuple(replace(r, headers=[(k, (v or b"").decode("utf-8", "replace").encode())
                                     for k, v in (r.headers or ())]) for r in records)
    message = await parse(safe)
    message.raw_message = records
    return message


def build_router(handler: BatchHandler, settings: DepositsSettings, metrics: DepositsMetrics,
                 *, after: AfterHook = _nothing) -> KafkaRouter:
    """The batch subscriber on the topics named by ``settings``.

    ``after`` runs once the batch's transaction has committed (the app wakes settlement queues
    there); its failures are logged, never redelivered: the periodic queue retry covers a
    wake-up that did not happen.
    """
    router = KafkaRouter()
    options = subscriber_options(
        settings.group_id, batch=True, max_records=settings.max_batch,
        batch_timeout_ms=settings.batch_wait_ms, ack_policy=AckPolicy.MANUAL)

    @router.subscriber(settings.commands_topic, settings.ledger_results_topic,
                       parser=_parse_any_headers, decoder=_whole, **options)
    async def on_batch(batch: Any) -> None:
        records = batch.raw_message if isinstance(batch.raw_message, tuple) else (
            batch.raw_message,)
        began = asyncio.get_running_loop().time()
        try:
            outcomes = await handler.handle(records)
        except Exception as exc:
            reason = "database_unavailable" if isinstance(exc, RetryBatch) else "error"
            log.warning("batch of %d not handled (%s), reading it again: %r", len(records),
                        reason, exc, exc_info=not isinstance(exc, RetryBatch))
            metrics.batch_retries.labels(reason).inc()
            await asyncio.sleep(_DATABASE_DOWN_WAIT_S)
            _rewind(batch.consumer, records)
            return
        await batch.ack()
        metrics.batch(len(records), asyncio.get_running_loop().time() - began)
        try:
            await after(outcomes)
        except Exception:  # committed already; the periodic queue round covers a lost wake-up
            log.exception("post-commit hook failed")

    return router


def _rewind(consumer: Any, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
    """Seek every partition of the batch back to its first record: the whole batch is read
    again. (Done here rather than by ``nack()``, whose batch behaviour changed across
    FastStream releases.) A partition revoked meanwhile is its next owner's, from the commit."""
    first: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        first[tp] = min(first.get(tp, r.offset), r.offset)
    for tp, offset in first.items():
        with contextlib.suppress(IllegalStateError):
            consumer.seek(tp, offset)
