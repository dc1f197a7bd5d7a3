"""The Kafka broker factory and subscriber options every Harbour service uses.

Safe defaults, so that no service can forget them (DESIGN.md "Exactly-once, end to end"):

* producer: ``acks="all"`` with the idempotent producer; no ``transactional_id`` (FastStream has no
  transaction support and aiokafka then refuses every ``send`` outside a transaction);
* subscribers: a group id, never ``AckPolicy.ACK_FIRST``, ``auto_offset_reset="earliest"``;
* a :class:`~shared.messaging.dlq.DeadLetterMiddleware` on every broker: bounded retries, then the
  record goes to ``<group>.dlq`` and the partition moves on.

What the ack policies do for Kafka in FastStream 0.7.8 (read from the code, not the docs):

* ``ACK_FIRST`` (FastStream's Kafka default when nothing is set): ``KafkaSubscriberConfig`` sets
  ``enable_auto_commit=True`` and disables the acknowledgement middleware, so aiokafka commits in
  the background whatever the handler does: at-most-once. Refused here.
* ``ACK`` / ``REJECT_ON_ERROR``: ``consumer.commit()`` after the handler, error or not.
* ``NACK_ON_ERROR`` (our default): ``consumer.commit()`` after a clean exit; on an exception
  ``KafkaAckableMessage.nack()`` seeks the partition back to the record, so the consumer reads it
  again: without a retry limit a poison record blocks its partition forever, hence the DLQ
  middleware. ``commit()`` takes no offsets: it commits the position of every assigned partition,
  which is exact for a single-record subscriber because records are handled one at a time.
  ``asyncio.CancelledError`` (shutdown) neither commits nor seeks.
* ``MANUAL``: the handler calls ``msg.ack()`` / ``msg.nack()``. Required for batch subscribers,
  which the DLQ middleware does not cover.
* Commit failures (e.g. ``CommitFailedError`` in a rebalance) are logged at CRITICAL by
  ``AcknowledgementMiddleware`` and swallowed; the record may then be delivered again to the next
  owner, so every handler is idempotent (inbox, ledger idempotency keys).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from weakref import WeakSet

from faststream.kafka import KafkaBroker
from faststream.kafka.subscriber.usecase import BatchSubscriber
from faststream.middlewares import AckPolicy

from shared.config import KafkaSettings
from shared.errors import HarbourError
from shared.messaging.dlq import DeadLetterMiddleware

# Long enough for a handler to finish its Postgres transaction and a dead letter to be confirmed
# at acks=all; short enough to fit in an orchestrator's stop grace period (set compose
# ``stop_grace_period`` above it).
GRACEFUL_TIMEOUT_S = 15.0

BROKER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "enable_idempotence": True,
    # Broker-wide default, so even a bare @broker.subscriber gets it. Not a KafkaRouter's
    # subscribers: FastStream resolves their policy when they are declared, before
    # include_router(), and they get ACK_FIRST; subscriber_options / check_subscribers cover it.
    "ack_policy": AckPolicy.NACK_ON_ERROR,
    "graceful_timeout": GRACEFUL_TIMEOUT_S,
    # FastStream 0.7.8 creates every subscribed topic that is missing, with ONE partition, when a
    # subscriber starts (LogicSubscriber._ensure_topics). Topics are declared once, in
    # shared/events/topics.py, and created by `harbour topics`; a typo must fail, not invent a
    # one-partition topic.
    "allow_auto_create_topics": False,
}

SUBSCRIBER_DEFAULTS: dict[str, Any] = {
    "auto_offset_reset": "earliest",
    "ack_policy": AckPolicy.NACK_ON_ERROR,
    # Harbour produces without Kafka transactions; read_committed costs nothing then and keeps
    # aborted records out should any producer ever use them.
    "isolation_level": "read_committed",
    # Between two polls a handler may run a Postgres transaction plus DLQ retry backoff; far
    # below this. Exceeding it makes the group evict the consumer.
    "max_poll_interval_ms": 300_000,
    # aiokafka keeps one fetch in flight per broker, and a partition that still had records
    # buffered when it was sent is not in it (aiokafka/consumer/fetcher.py,
    # _get_actions_per_node): new records of that partition wait until that fetch returns,
    # which with aiokafka's default (500 ms) can take half a second when the partitions in it
    # stay quiet. The ledger writer's own consumer uses the same bound when idle.
    "fetch_max_wait_ms": 20,
    "session_timeout_ms": 10_000,
    "heartbeat_interval_ms": 3_000,
}


class UnsafeConfigError(HarbourError, ValueError):
    """A broker or subscriber option that would lose, duplicate or block records."""

    code = "unsafe_kafka_config"


class HarbourKafkaBroker(KafkaBroker):
    """A ``KafkaBroker`` that runs :func:`check_subscribers` before it starts."""

    dead_letters: DeadLetterMiddleware

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # persistent=False subscribers are the ones TestKafkaBroker(with_real=True) invents for
        # publishers without a subscriber (no group id); they are not the service's consumers.
        self._transient_subscribers: WeakSet[Any] = WeakSet()

    def subscriber(self, *topics: Any, **kwargs: Any) -> Any:
        sub = super().subscriber(*topics, **kwargs)
        if kwargs.get("persistent", True) is False:
            self._transient_subscribers.add(sub)
        return sub

    async def start(self) -> None:
        check_subscribers(self)
        await super().start()


def make_broker(
    settings: KafkaSettings,
    *,
    middlewares: Sequence[Any] = (),
    dead_letters: DeadLetterMiddleware | None = None,
    **overrides: Any,
) -> KafkaBroker:
    """A ``KafkaBroker`` with Harbour's safe defaults (``BROKER_DEFAULTS``).

    ``dead_letters`` is the retry-limit + DLQ middleware (a default ``DeadLetterMiddleware()``
    when ``None``); it goes first, outside ``middlewares``, so those still see every failure.
    ``overrides`` are passed to ``KafkaBroker``; the unsafe ones raise ``UnsafeConfigError``.
    """
    _refuse_unsafe_broker_options(overrides)
    dlq = dead_letters if dead_letters is not None else DeadLetterMiddleware()
    rest = tuple(m for m in middlewares if not isinstance(m, DeadLetterMiddleware))
    if len(rest) != len(middlewares):
        raise UnsafeConfigError(
            "pass the DeadLetterMiddleware as dead_letters=, not in middlewares "
            "(one per broker, outermost)"
        )
    options = {**BROKER_DEFAULTS, "client_id": settings.client_id, **overrides}
    servers = [s.strip() for s in settings.kafka_bootstrap.split(",") if s.strip()]
    broker = HarbourKafkaBroker(servers, middlewares=(dlq, *rest), **options)
    broker.dead_letters = dlq
    return broker


def _refuse_unsafe_broker_options(overrides: dict[str, Any]) -> None:
    if overrides.get("acks", "all") not in ("all", -1):
        raise UnsafeConfigError("acks must be 'all': ledger records must survive a broker loss")
    if overrides.get("enable_idempotence", True) is not True:
        raise UnsafeConfigError("the idempotent producer is required (no duplicates on retry)")
    if overrides.get("ack_policy") is AckPolicy.ACK_FIRST:
        raise UnsafeConfigError(_ACK_FIRST)
    if overrides.get("transactional_id") is not None:
        raise UnsafeConfigError(
            "transactional_id: FastStream 0.7 has no Kafka transactions and aiokafka refuses "
            "every send outside one; use the Postgres outbox instead"
        )
    for name in ("key_serializer", "value_serializer"):
        if overrides.get(name) is not None:
            raise UnsafeConfigError(
                f"{name}: serialize in code; the dead-letter path republishes raw bytes "
                "with the broker's producer"
            )


_ACK_FIRST = (
    "AckPolicy.ACK_FIRST commits before the handler runs (auto-commit): at-most-once. "
    "Use NACK_ON_ERROR (the default here), ACK or MANUAL"
)


def subscriber_options(group_id: str, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``broker.subscriber(topic, **subscriber_options(group))``.

    ``SUBSCRIBER_DEFAULTS`` plus ``group_id``; ``overrides`` win, except that a missing group id,
    ``AckPolicy.ACK_FIRST``, key/value deserializers (the DLQ needs the raw bytes) and a batch
    subscriber without ``AckPolicy.MANUAL`` raise ``UnsafeConfigError``.
    """
    if not isinstance(group_id, str) or not group_id.strip():
        raise UnsafeConfigError(
            "a consumer group id is required: without one nothing is committed or balanced"
        )
    options = {**SUBSCRIBER_DEFAULTS, "group_id": group_id, **overrides}
    ack_policy = options["ack_policy"]
    if not isinstance(ack_policy, AckPolicy):
        raise UnsafeConfigError(f"ack_policy must be an AckPolicy, got {ack_policy!r}")
    if ack_policy is AckPolicy.ACK_FIRST:
        raise UnsafeConfigError(_ACK_FIRST)
    if options.get("batch") and ack_policy is not AckPolicy.MANUAL:
        raise UnsafeConfigError(_BATCH)
    for name in ("key_deserializer", "value_deserializer"):
        if options.get(name) is not None:
            raise UnsafeConfigError(
                f"{name}: decode in the handler; the dead-letter path needs the raw bytes"
            )
    return options


_BATCH = (
    "batch subscribers are not covered by the dead-letter middleware (a batch is one tuple of "
    "records): use ack_policy=AckPolicy.MANUAL and handle failures in the handler"
)


def check_subscribers(broker: KafkaBroker) -> None:
    """Raise ``UnsafeConfigError`` listing every subscriber that breaks the rules.

    Run by :class:`HarbourKafkaBroker` before it starts (routers are included by then), so a
    subscriber declared without :func:`subscriber_options` cannot slip through.
    """
    problems: list[str] = []
    transient = getattr(broker, "_transient_subscribers", ())
    for sub in broker.subscribers:
        if sub in transient:
            continue
        name = ",".join(getattr(sub, "topic_names", ())) or repr(sub)
        group = getattr(sub, "group_id", None)
        policy = sub.ack_policy
        if not group:
            problems.append(f"{name}: no group_id")
        if policy is AckPolicy.ACK_FIRST:
            problems.append(f"{name}: {_ACK_FIRST}")
        if isinstance(sub, BatchSubscriber):
            if policy is not AckPolicy.MANUAL:
                problems.append(f"{name}: {_BATCH}")
            continue
        chain = getattr(sub, "_broker_middlewares", ())
        if policy is not AckPolicy.MANUAL and not any(
            isinstance(m, DeadLetterMiddleware) for m in chain
        ):
            problems.append(
                f"{name}: no DeadLetterMiddleware: a poison record would block the partition "
                "(NACK_ON_ERROR) or be skipped (ACK)"
            )
        conn = getattr(sub, "_connection_args", {})
        for arg in ("key_deserializer", "value_deserializer"):
            if conn.get(arg) is not None:
                problems.append(f"{name}: {arg} set; the dead-letter path needs the raw bytes")
    if problems:
        raise UnsafeConfigError("unsafe Kafka subscribers:\n  " + "\n  ".join(problems))
