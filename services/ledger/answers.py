"""The writer's answers to Kafka, straight after their batch commits.

The answers (PostingAccepted/PostingRejected to each request's reply topic, dead letters to the
writer's DLQ) used to go through ``ledger.outbox`` and the relay: per command an outbox row
inserted, NOTIFY, selected, published and deleted, and a relay hop of latency. They need none of
it, because the commands they answer are still in Kafka and their outcomes are in
``ledger.results``. So the writer publishes them itself and keeps, per partition, how far every
answer is acknowledged (``answered``); that watermark is stored with the progress
(``consumed_offsets.answered_offset``). A writer taking a partition over starts reading at the
watermark and answers the records between it and the next offset again from ``ledger.results``
(``LedgerWriter.apply_batch``): nothing is lost across a crash between commit and
acknowledgement. An answer sent again is the same answer (its event id is derived from the record
it answers, its body from the stored result), so consumers' inboxes drop the copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from aiokafka import AIOKafkaProducer

from shared.store.outbox import OutboxMessage

log = logging.getLogger(__name__)


Spill = Callable[[list[OutboxMessage]], Awaitable[None]]


class AnswerPublisher:
    """Publishes each batch's answers; tracks the acknowledged prefix per partition.

    Batches are acknowledged in the order they were handed over: the watermark of a partition
    moves to a batch's ``answered_to`` only once that batch and every batch before it are safe.
    Safe means in Kafka, or, when Kafka refused them after its own retries (a reply topic that
    does not exist, a broker down for longer than the producer's timeout), in the outbox
    (``spill``), whose relay keeps trying and shows the error: a refused answer must neither
    be lost nor stop settlement. Only when the spill fails too does the watermark stop and
    :attr:`failed` get set; the loop then re-reads from the stored watermarks, which answers
    everything after them again.
    """

    def __init__(self, bootstrap: str, *, spill: Spill | None = None,
                 refused_after_ms: int = 30_000,
                 client_id: str = "harbour-ledger-answers") -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            request_timeout_ms=refused_after_ms,  # then an answer counts as refused (spilled)
            acks="all",
            enable_idempotence=True,
            # No linger: a batch's answers are appended in one go before the sender runs, so they
            # leave together anyway; waiting would only add to every answer's latency.
            linger_ms=0,
            max_batch_size=256 * 1024,
        )
        self._queue: deque[tuple[asyncio.Task[None], dict[int, int]]] = deque()
        self.acknowledged: dict[int, int] = {}
        self.failed: BaseException | None = None
        self.spilled = 0  # answers Kafka refused that went to the outbox instead
        self._spill = spill
        self._stored: dict[int, int] = {}  # what the database holds, as far as this writer knows

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        """Wait for the answers in flight (their watermarks then count), then close."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.drain(), timeout=30)
        with contextlib.suppress(Exception):
            await self._producer.stop()

    async def drain(self) -> None:
        if self._queue:
            await asyncio.wait([task for task, _ in self._queue])

    def publish(self, answers: list[OutboxMessage], answered_to: dict[int, int]) -> None:
        """Send ``answers`` (of a committed batch) in the background."""
        task = asyncio.create_task(self._send(answers), name="ledger-answers")
        self._queue.append((task, answered_to))
        task.add_done_callback(self._advance)

    async def _send(self, answers: list[OutboxMessage]) -> None:
        refused = await self._deliver(answers)
        if not refused:
            return
        first = refused[0][1]
        if self._spill is None:
            raise first
        log.warning("Kafka refused %d of %d answers (%r); they go through the outbox instead",
                    len(refused), len(answers), first)
        await self._spill([m for m, _ in refused])
        self.spilled += len(refused)

    async def _deliver(self, answers: list[OutboxMessage]
                       ) -> list[tuple[OutboxMessage, BaseException]]:
        """Send every answer, wait for every acknowledgement; return the ones Kafka refused."""
        deliveries: list[tuple[OutboxMessage, asyncio.Future[Any]]] = []
        refused: list[tuple[OutboxMessage, BaseException]] = []
        for m in answers:
            try:
                deliveries.append((m, await self._producer.send(
                    m.topic, m.value, key=m.key,
                    headers=[(k, v.encode()) for k, v in m.headers.items()])))
            except Exception as exc:  # e.g. no metadata for the topic within the timeout
                refused.append((m, exc))
        outcomes = await asyncio.gather(*(f for _, f in deliveries), return_exceptions=True)
        refused += [(m, o) for (m, _), o in zip(deliveries, outcomes, strict=True)
                    if isinstance(o, BaseException)]
        return refused

    def _advance(self, _done: asyncio.Task[None]) -> None:
        while self._queue and self._queue[0][0].done():
            task, answered_to = self._queue.popleft()
            error = task.exception() if not task.cancelled() else asyncio.CancelledError()
            if error is not None:
                log.warning("answers not acknowledged, will answer again from the watermark: %r",
                            error)
                self.failed = error
                # Later batches' answers may arrive, but the watermark stays before this one.
                for later, _ in self._queue:
                    later.remove_done_callback(self._advance)
                    later.add_done_callback(_retrieve)
                self._queue.clear()
                return
            for partition, offset in answered_to.items():
                # A batch answering records again (after a re-seek) may end below what is known.
                if offset > self.acknowledged.get(partition, -1):
                    self.acknowledged[partition] = offset

    def assume(self, stored: dict[int, int]) -> None:
        """Partitions taken over: the database holds these watermarks, so they are both
        acknowledged and saved as far as this writer knows."""
        self.acknowledged.update(stored)
        self._stored.update(stored)

    def forget(self, partitions: Collection[int]) -> None:
        """Partitions given up in a rebalance: their watermarks are another writer's now."""
        for partition in partitions:
            self.acknowledged.pop(partition, None)
            self._stored.pop(partition, None)

    def reset_failure(self) -> None:
        self.failed = None

    def unsaved(self, partitions: Collection[int] | None = None) -> dict[int, int]:
        """Acknowledged watermarks the database does not have yet (of ``partitions``)."""
        return {p: a for p, a in self.acknowledged.items()
                if self._stored.get(p) != a and (partitions is None or p in partitions)}

    def saved(self, watermarks: dict[int, int]) -> None:
        self._stored.update(watermarks)


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a dropped batch's outcome as seen (its records are answered again anyway)."""
    if not task.cancelled():
        task.exception()
