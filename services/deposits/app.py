"""Composition root of the deposits service: pool, broker and router, outbox relay, scheduler.

``python -m services.deposits.app`` runs it until SIGTERM/SIGINT (``make up`` starts it under the
supervisor). Environment: ``HARBOUR_KAFKA_BOOTSTRAP``, ``HARBOUR_DATABASE_URL`` and the
``HARBOUR_DEPOSITS_*`` settings (topics, group, timings, per-currency configuration).

The scheduler is the saga's clock (an injectable :class:`~shared.clock.Clock`): every
``tick_interval_s`` it sends a ``Tick`` to each transfer whose ``next_wakeup`` is due (a window
opens, a hold deadline or the agent's confirmation deadline passes) and every
``queue_retry_interval_s`` it wakes the head of every non-empty settlement queue
(``RetrySettlement``, TD-5). Several instances may run: each decision takes the stream's lock and
a tick that finds nothing to do records nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

from aiokafka import ConsumerRecord
from faststream.kafka import KafkaBroker

from shared.clock import Clock, SystemClock
from shared.config import KafkaSettings, PostgresSettings
from shared.events.topics import dlq_topic
from shared.messaging.broker import make_broker
from shared.messaging.dlq import DeadLetterMiddleware, Failure
from shared.metrics import serve_metrics
from shared.runtime import run_service
from shared.store.outbox import OutboxRelay
from shared.store.pool import create_pool

from . import domain as dm
from .consumer import BatchHandler, DeadLetter
from .metrics import DepositsMetrics
from .router import build_router
from .service import DepositsService, Outcome, Topics
from .settings import DepositsSettings

__all__ = ["Scheduler", "main", "run_deposits"]

log = logging.getLogger("harbour.deposits")
POSTPONE_FAILED_TICK_S = 60


class Scheduler:
    """Wakes due transfers and settlement queues by the clock (module docstring)."""

    def __init__(self, service: DepositsService, clock: Clock, *, tick_interval_s: float,
                 queue_retry_interval_s: float) -> None:
        self._service = service
        self._clock = clock
        self._tick_s = tick_interval_s
        self._queue_s = queue_retry_interval_s
        self._stopping = asyncio.Event()
        self.ticks = 0
        self.retries = 0

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_queue_round = 0.0  # at start: pick up queues a crash may have left un-woken
        while not self._stopping.is_set():
            try:
                await self.tick_due()
                if loop.time() >= next_queue_round:
                    self.retries += await self._service.dispatch(
                        await self._service.queue_keys())
                    next_queue_round = loop.time() + self._queue_s
            except Exception:  # keep the clock running; the next round tries again
                log.exception("scheduler round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._tick_s)

    async def tick_due(self) -> int:
        """One round: ``Tick`` every due transfer; wake queues the ticks moved."""
        woken = 0
        while True:
            due = await self._service.due_streams(self._clock.now())
            for stream in due:
                try:
                    outcome = await self._service.wake(stream, dm.Tick())
                    woken += 1
                    if outcome.wake_queues:
                        self.retries += await self._service.dispatch(outcome.wake_queues)
                except Exception:
                    # One transfer that cannot be decided must not hold up every other wake-up:
                    # look at it again later (ops see the error in the log).
                    log.exception("tick of %s failed; retrying in %s s", stream,
                                  POSTPONE_FAILED_TICK_S)
                    await self._service.postpone(stream, self._clock.now() + timedelta(
                        seconds=POSTPONE_FAILED_TICK_S))
            if len(due) < 500 or self._stopping.is_set():
                self.ticks += woken
                return woken


async def run_deposits(
    kafka: KafkaSettings,
    postgres: PostgresSettings,
    settings: DepositsSettings,
    stop: asyncio.Event,
    *,
    clock: Clock | None = None,
    started: Callable[[DepositsService], Awaitable[None] | None] | None = None,
    metrics: DepositsMetrics | None = None,
) -> None:
    """Run the subscribers, the relay and the scheduler until ``stop`` is set."""
    clock = clock or SystemClock()
    metrics = metrics or DepositsMetrics()
    # No reset query on release (asyncpg's default is a round trip per message): this service
    # leaves no session state behind (no LISTEN, no session locks, statements only in the
    # transactions they open). The relay, which LISTENs and holds a session lock, gets its own
    # connection instead of one from this pool.
    # force_custom_plan: the batch statements take arrays of keys. A generic plan made while
    # the tables were small (a fresh deployment, the first minute of a burst) keeps hash-joining
    # whole tables (events, inbox) until autovacuum's next ANALYZE, 10 ms and more per batch;
    # a custom plan sees each table's current size and probes the indexes. Planning costs a
    # fraction of a millisecond per batch.
    pool = await create_pool(postgres.database_url, min_size=2, max_size=settings.pool_size,
                             application_name="harbour-deposits", reset=_no_reset,
                             server_settings={"plan_cache_mode": "force_custom_plan"})
    service = DepositsService(
        pool, settings.deposits_config(), clock=clock, cache_size=settings.state_cache,
        topics=Topics(events=settings.events_topic,
                      ledger_commands=settings.ledger_commands_topic,
                      ledger_results=settings.ledger_results_topic))

    async def wake_queues(outcomes: Sequence[Outcome]) -> None:
        keys = frozenset().union(*(o.wake_queues for o in outcomes if o.refusal is None))
        if keys:
            await service.dispatch(keys)

    # FastStream logs every batch at INFO by default: per-batch lines belong at DEBUG.
    policy = DeadLetterMiddleware(max_attempts=settings.max_attempts)
    broker = make_broker(kafka, dead_letters=policy, log_level=logging.DEBUG)
    handler = BatchHandler(
        service, results_topic=settings.ledger_results_topic, policy=policy, metrics=metrics,
        dead_letter=_dead_letters(broker, policy, settings.group_id))
    broker.include_router(build_router(handler, settings, metrics, after=wake_queues))
    relay = OutboxRelay(postgres.database_url, "deposits", kafka.kafka_bootstrap,
                        batch_size=settings.relay_batch,
                        poll_interval_s=settings.relay_poll_s,
                        producer_options={"linger_ms": settings.relay_linger_ms})
    scheduler = Scheduler(service, clock, tick_interval_s=settings.tick_interval_s,
                          queue_retry_interval_s=settings.queue_retry_interval_s)
    metrics.watch(scheduler=scheduler, relay=relay.stats)
    serve_metrics(metrics.registry, settings.metrics_port)
    tasks: list[asyncio.Task[None]] = []
    gauges = asyncio.create_task(
        _refresh_queue_gauges(service, metrics, settings.metrics_refresh_s),
        name="deposits-metrics")
    try:
        tasks.append(asyncio.create_task(relay.run(), name="deposits-relay"))
        await broker.start()
        tasks.append(asyncio.create_task(scheduler.run(), name="deposits-scheduler"))
        if started is not None:
            maybe = started(service)
            if maybe is not None:
                await maybe
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([*tasks, stopped], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopped and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        stopped.cancel()
    finally:
        # The subscriber first (no new work), then the scheduler, then the relay drains what
        # is left.
        with contextlib.suppress(Exception):
            await broker.stop()
        scheduler.stop()
        relay.stop()
        gauges.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gauges
        for task in tasks:
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(task, timeout=15)
        await pool.close()


def _dead_letters(broker: KafkaBroker, policy: DeadLetterMiddleware, group: str) -> DeadLetter:
    """Park a record on ``<group>.dlq`` with the reason, confirmed by the broker (acks=all)."""

    async def park(record: ConsumerRecord[bytes, bytes], exc: BaseException, failure: Failure,
                   attempts: int) -> None:
        headers = policy.dead_letter_headers(record, group=group, exc=exc, failure=failure,
                                             attempts=attempts)
        await policy.send_dead_letter(broker, dlq_topic(group), key=record.key,
                                      value=record.value, headers=headers)

    return park


async def _refresh_queue_gauges(service: DepositsService, metrics: DepositsMetrics,
                                every_s: float) -> None:
    while True:
        try:
            metrics.queues(await service.queue_stats())
        except Exception:  # figures are never worth stopping for; the next round tries
            log.warning("settlement queue gauges not refreshed", exc_info=True)
        await asyncio.sleep(every_s)


async def _no_reset(_: object) -> None:
    return None


def main() -> None:
    run_service("deposits service", lambda stop: run_deposits(
        KafkaSettings(client_id="harbour-deposits"), PostgresSettings(), DepositsSettings(), stop))


if __name__ == "__main__":
    main()
