"""Thin FastStream handlers: bytes in, :class:`~services.deposits.service.DepositsService` out.

Two subscribers in the deposits consumer group (``subscriber_options``: NACK_ON_ERROR, earliest,
read_committed; the broker's dead-letter middleware bounds retries):

- ``deposits.commands``: any deposits command, decoded strictly (duplicate keys, unknown fields,
  wrong types, unknown types are a ``ValidationError``: dead-lettered at once with the reason,
  the partition moves on);
- the deposits ledger reply topic: ``PostingAccepted`` / ``PostingRejected``.

A business refusal is not an error here (the service records it); a transient database failure or
a lost optimistic-concurrency race raises and the record is redelivered; the handler commits the
offset only after the database transaction committed, so a crash in between redelivers the record
and the inbox makes it a no-op.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from faststream.kafka import KafkaRouter
from faststream.kafka.annotations import KafkaMessage

from shared.events.envelope import decode, typed_decoder
from shared.events.ledger import PostingAccepted, PostingRejected
from shared.messaging.broker import subscriber_options

from .service import DepositsService, Outcome
from .settings import DepositsSettings

__all__ = ["build_router"]

log = logging.getLogger("harbour.deposits")
_decode_result = typed_decoder(PostingAccepted, PostingRejected)

AfterHook = Callable[[Outcome], Awaitable[None]]


async def _raw(msg: KafkaMessage) -> bytes:
    """The record's value, undecoded: the envelope decoders above are the strict ones."""
    return bytes(msg.body)


async def _nothing(_: Outcome) -> None:
    return None


def build_router(service: DepositsService, settings: DepositsSettings, *,
                 after: AfterHook = _nothing) -> KafkaRouter:
    """The deposits subscribers on the topics named by ``settings``.

    ``after`` runs once the message's transaction has committed (the app wakes settlement
    queues there); its failures are logged, never redelivered: the periodic queue retry covers
    a wake-up that did not happen.
    """
    router = KafkaRouter()
    extra: dict[str, Any] = {"max_workers": settings.workers} if settings.workers > 1 else {}
    options = subscriber_options(settings.group_id, **extra)

    async def finish(outcome: Outcome) -> None:
        if outcome.refusal is not None:
            return
        try:
            await after(outcome)
        except Exception:  # the message is committed; a lost wake-up is retried periodically
            log.exception("post-commit hook failed for %s", outcome.stream)

    # The record's bytes as the handler's one argument (``_raw``), not the message through
    # FastStream's Context: fast_depends resolves that field in a worker thread for every record.
    @router.subscriber(settings.commands_topic, decoder=_raw, **options)
    async def on_command(body: bytes) -> None:
        envelope, payload = decode(body)
        await finish(await service.handle_command(envelope, payload))

    @router.subscriber(settings.ledger_results_topic, decoder=_raw, **options)
    async def on_ledger_result(body: bytes) -> None:
        envelope, payload = _decode_result(body)
        await finish(await service.handle_ledger_result(envelope, payload))

    return router
