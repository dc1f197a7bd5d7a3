"""Publishing commands to Kafka and answering only once the broker has confirmed them.

An idempotent producer with ``acks="all"`` (shared/messaging/broker.py's rules): the request
that publishes waits for the acknowledgement of every in-sync replica, so a 202 means the
command survives the loss of a broker. Concurrent requests share the producer, whose batches
carry many requests' records at once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer

from .errors import ApiError


@dataclass(frozen=True, slots=True)
class Confirmed:
    topic: str
    partition: int
    offset: int


class CommandPublisher:
    def __init__(self, bootstrap: str, *, client_id: str = "harbour-gateway",
                 timeout_s: float = 10.0) -> None:
        self._timeout_s = timeout_s
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, client_id=client_id,
            # Safety first: every in-sync replica has the record; retries never duplicate it.
            acks="all", enable_idempotence=True,
            # A couple of milliseconds lets concurrent requests share one produce request.
            linger_ms=2,
            request_timeout_ms=max(1000, int(timeout_s * 1000)),
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def publish(self, topic: str, key: bytes, value: bytes) -> Confirmed:
        """Send one record and wait for the broker's confirmation.

        Raises:
            ApiError: 503 ``broker_unavailable`` when Kafka refuses or does not confirm within
                the timeout. The record may still land; a retry with the same Idempotency-Key
                republishes the same command id, which consumers deduplicate.
        """
        try:
            # One deadline for both steps: send() itself waits for the topic's metadata when
            # the broker is unreachable. Cancelling that wait queues nothing; the delivery
            # future is shielded so a record already queued is still tracked by the producer.
            async with asyncio.timeout(self._timeout_s):
                delivery = await self._producer.send(topic, value, key=key)
                meta: Any = await asyncio.shield(delivery)
        except Exception as exc:  # KafkaError, TimeoutError: the client gets a retryable 503
            raise ApiError(503, "broker_unavailable", "Kafka did not confirm the command; "
                           "retry with the same Idempotency-Key", headers={"Retry-After": "1"},
                           error=type(exc).__name__) from exc
        return Confirmed(meta.topic, meta.partition, meta.offset)

    async def ping(self, timeout_s: float) -> int:
        """Fetch cluster metadata from a broker; return how many brokers it lists."""
        metadata = await asyncio.wait_for(self._producer.client.fetch_all_metadata(), timeout_s)
        return len(metadata.brokers())
