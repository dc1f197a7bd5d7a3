"""Submitting a command: Idempotency-Key claim, publish with broker confirmation, record.

Order, and what a failure at each step leaves behind:

1. claim the Idempotency-Key (if sent) with a fresh command id, or replay / refuse (409);
2. publish the envelope (``event_id`` = command id, key = UETR) and wait for ``acks=all``;
   a failure releases the claim for an immediate retry, keeping the command id;
3. record the command and complete the claim with the response, in one transaction;
   a failure here answers 503, and the claim is taken over by a retry once stale
   (``stale_claim_s``), republishing the same command id, which consumers deduplicate.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Final

from fastapi.responses import JSONResponse

from shared.clock import SystemClock
from shared.events.envelope import encode, new_envelope
from shared.events.registry import Payload, type_of
from shared.ids import new_id

from .auth import Principal
from .context import Gateway
from .errors import ApiError
from .repository import AcceptedCommand, record_command
from .schemas import CommandAccepted

_IDEMPOTENCY_KEY_RE: Final = re.compile(r"[\x21-\x7e]{1,255}")
PRODUCER: Final = "gateway"


@dataclass(frozen=True, slots=True)
class Submission:
    payload: Payload
    uetr: str
    payer: str | None = None
    payee: str | None = None
    status_url: str | None = None


def check_idempotency_key(value: str | None) -> str | None:
    if value is not None and not _IDEMPOTENCY_KEY_RE.fullmatch(value):
        raise ApiError(400, "invalid_idempotency_key",
                       "Idempotency-Key must be 1-255 printable ASCII characters, no spaces",
                       field="Idempotency-Key")
    return value


async def submit(gateway: Gateway, principal: Principal, submission: Submission,
                 idempotency_key: str | None, request_hash: bytes) -> JSONResponse:
    """Publish ``submission`` and answer 202 once Kafka confirmed it (see the module doc)."""
    command_id = new_id()
    if idempotency_key is not None:
        claim = await gateway.idempotency.claim(principal.participant_id, idempotency_key,
                                                request_hash, command_id)
        if claim.replay is not None:
            gateway.metrics.idempotent_replays.inc()
            status, body = claim.replay
            return JSONResponse(body, status_code=status, headers={"Idempotent-Replayed": "true"})
        command_id = claim.command_id
    envelope = new_envelope(submission.payload, producer=PRODUCER,
                            participant=principal.participant_id, event_id=command_id)
    topic = gateway.settings.commands_topic
    started = time.perf_counter()
    try:
        confirmed = await gateway.publisher.publish(topic, submission.uetr.encode(),
                                                    encode(envelope))
    except ApiError:
        gateway.metrics.publish_failures.inc()
        if idempotency_key is not None:
            await gateway.idempotency.release(principal.participant_id, idempotency_key)
        raise
    gateway.metrics.publish_latency.observe(time.perf_counter() - started)
    command_type = type_of(submission.payload).type
    gateway.metrics.published.labels(command_type).inc()
    body = _accepted_body(command_id, command_type, submission)
    command = AcceptedCommand(
        command_id=command_id, participant_id=principal.participant_id, key_id=principal.key_id,
        command_type=command_type, uetr=submission.uetr, payer_participant=submission.payer,
        payee_participant=submission.payee, payload=envelope.payload, topic=confirmed.topic,
        partition=confirmed.partition, offset=confirmed.offset)
    completion = None if idempotency_key is None else (idempotency_key, 202, body)
    await record_command(gateway.pool, command, completion)
    return JSONResponse(body, status_code=202)


def _accepted_body(command_id: Any, command_type: str, submission: Submission) -> dict[str, Any]:
    accepted = CommandAccepted(command_id=command_id, command_type=command_type,
                               uetr=submission.uetr, accepted_at=SystemClock().now(),
                               status_url=submission.status_url)
    return accepted.model_dump(mode="json")
