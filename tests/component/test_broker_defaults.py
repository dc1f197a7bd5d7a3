"""Fast checks of the broker factory's safe defaults (no Kafka needed).

These inspect FastStream 0.7.8 config objects (some private), which is fine for this tier: they
pin what make_broker/subscriber_options hand to FastStream and aiokafka, and fail loudly if an
upgrade moves them. The behaviour itself is proven against a real broker in
tests/integration/test_dead_letters.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from faststream.kafka import KafkaRouter, TestKafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.middlewares import AckPolicy
from pydantic import BaseModel

from shared.config import KafkaSettings
from shared.errors import (
    ConcurrencyError,
    DomainError,
    DuplicateError,
    IdempotencyConflictError,
    InfrastructureError,
    InvalidAmountError,
    ValidationError,
)
from shared.events.topics import dlq_topic
from shared.messaging import (
    DeadLetterMiddleware,
    HarbourKafkaBroker,
    UnsafeConfigError,
    check_subscribers,
    classify,
    make_broker,
    subscriber_options,
)

SETTINGS = KafkaSettings(kafka_bootstrap="kafka-a:9092, kafka-b:9092", client_id="harbour-test")


def _broker(**overrides: Any) -> HarbourKafkaBroker:
    broker = make_broker(SETTINGS, **overrides)
    assert isinstance(broker, HarbourKafkaBroker)
    return broker


# --- make_broker ------------------------------------------------------------------------------


def test_producer_is_idempotent_with_acks_all() -> None:
    conn = _broker()._connection_kwargs  # what aiokafka's producer is built from
    assert conn["acks"] == "all"
    assert conn["enable_idempotence"] is True
    assert conn["transactional_id"] is None
    assert conn["client_id"] == "harbour-test"
    assert conn["bootstrap_servers"] == ["kafka-a:9092", "kafka-b:9092"]


def test_broker_defaults() -> None:
    broker = _broker()
    config = broker.config.broker_config
    assert config.ack_policy is AckPolicy.NACK_ON_ERROR
    assert config.graceful_timeout is not None and config.graceful_timeout > 0
    assert config.allow_auto_create_topics is False  # topics are declared once, not invented
    assert config.client_id == "harbour-test"


def test_dead_letter_middleware_is_installed_first() -> None:
    class Other:
        def __call__(self, msg: Any, /, *, context: Any) -> Any:
            raise NotImplementedError

    other = Other()
    broker = _broker(middlewares=(other,))
    assert list(broker.middlewares) == [broker.dead_letters, other]
    assert isinstance(broker.dead_letters, DeadLetterMiddleware)

    mine = DeadLetterMiddleware(max_attempts=2)
    assert _broker(dead_letters=mine).dead_letters is mine
    assert _broker().dead_letters is not _broker().dead_letters  # no shared attempt counts


@pytest.mark.parametrize(
    "overrides",
    [
        {"acks": 1},
        {"acks": 0},
        {"enable_idempotence": False},
        {"ack_policy": AckPolicy.ACK_FIRST},
        {"transactional_id": "tx-1"},
        {"value_serializer": lambda v: v},
        {"middlewares": (DeadLetterMiddleware(),)},
    ],
    ids=lambda o: next(iter(o)),
)
def test_make_broker_refuses_unsafe_options(overrides: dict[str, Any]) -> None:
    with pytest.raises(UnsafeConfigError):
        make_broker(SETTINGS, **overrides)


def test_make_broker_accepts_harmless_overrides() -> None:
    broker = _broker(linger_ms=5, acks=-1, graceful_timeout=30.0)
    assert broker._connection_kwargs["linger_ms"] == 5
    assert broker.config.broker_config.graceful_timeout == 30.0


# --- subscriber_options -----------------------------------------------------------------------


def test_subscriber_options_defaults() -> None:
    options = subscriber_options("harbour.deposits")
    assert options["group_id"] == "harbour.deposits"
    assert options["ack_policy"] is AckPolicy.NACK_ON_ERROR
    assert options["auto_offset_reset"] == "earliest"
    assert options["max_poll_interval_ms"] >= 60_000


def test_subscriber_built_from_options_commits_after_the_handler() -> None:
    broker = _broker()
    sub = broker.subscriber("deposits.commands", **subscriber_options("harbour.deposits"))
    assert sub.group_id == "harbour.deposits"
    assert sub.ack_policy is AckPolicy.NACK_ON_ERROR
    # what the AIOKafkaConsumer is built with
    assert sub._connection_args["enable_auto_commit"] is False
    assert sub._connection_args["auto_offset_reset"] == "earliest"
    check_subscribers(broker)


def test_overrides_win_but_unsafe_ones_are_refused() -> None:
    options = subscriber_options("g", max_poll_interval_ms=60_000, ack_policy=AckPolicy.ACK)
    assert options["max_poll_interval_ms"] == 60_000
    assert options["ack_policy"] is AckPolicy.ACK


@pytest.mark.parametrize(
    ("group", "overrides"),
    [
        ("", {}),
        ("   ", {}),
        (None, {}),
        ("g", {"ack_policy": AckPolicy.ACK_FIRST}),
        ("g", {"ack_policy": "ack_first"}),
        ("g", {"batch": True}),
        ("g", {"batch": True, "ack_policy": AckPolicy.NACK_ON_ERROR}),
        ("g", {"value_deserializer": bytes.decode}),
        ("g", {"key_deserializer": bytes.decode}),
    ],
)
def test_subscriber_options_refuses(group: Any, overrides: dict[str, Any]) -> None:
    with pytest.raises(UnsafeConfigError):
        subscriber_options(group, **overrides)


def test_batch_subscriber_with_manual_ack_is_allowed() -> None:
    broker = _broker()
    broker.subscriber(
        "ledger.commands",
        **subscriber_options("harbour.ledger.writer", batch=True, ack_policy=AckPolicy.MANUAL),
    )
    check_subscribers(broker)


# --- check_subscribers: what a bare @subscriber would get wrong --------------------------------


def test_subscriber_without_group_is_refused() -> None:
    broker = _broker()
    broker.subscriber("deposits.commands")
    with pytest.raises(UnsafeConfigError, match="no group_id"):
        check_subscribers(broker)


def test_router_subscribers_do_not_inherit_the_broker_ack_policy() -> None:
    """FastStream 0.7.8 resolves a subscriber's ack policy when it is declared.

    On a KafkaRouter that is before include_router(), so the broker's NACK_ON_ERROR does not
    reach it: it silently gets ACK_FIRST (auto-commit). check_subscribers catches that.
    """
    broker = _broker()
    router = KafkaRouter()
    sub = router.subscriber("deposits.commands", group_id="harbour.deposits")
    broker.include_router(router)
    assert sub.ack_policy is AckPolicy.ACK_FIRST
    assert sub._connection_args["enable_auto_commit"] is True
    with pytest.raises(UnsafeConfigError, match="ACK_FIRST"):
        check_subscribers(broker)

    safe = _broker()
    safe_router = KafkaRouter()
    safe_router.subscriber("deposits.commands", **subscriber_options("harbour.deposits"))
    safe.include_router(safe_router)
    check_subscribers(safe)


def test_batch_subscriber_without_manual_ack_is_refused() -> None:
    broker = _broker()
    broker.subscriber("ledger.commands", group_id="harbour.ledger.writer", batch=True)
    with pytest.raises(UnsafeConfigError, match="batch"):
        check_subscribers(broker)


def test_transient_subscribers_of_the_test_broker_are_not_checked() -> None:
    broker = _broker()
    broker.subscriber("some.reply.topic", persistent=False)  # what TestKafkaBroker adds
    check_subscribers(broker)


async def test_broker_refuses_to_start_with_an_unsafe_subscriber() -> None:
    broker = _broker()
    broker.subscriber("deposits.commands")
    with pytest.raises(UnsafeConfigError):
        await broker.start()  # refused before any connection attempt


# --- the retry rule ---------------------------------------------------------------------------


class _Model(BaseModel):
    n: int


def _pydantic_error() -> Exception:
    try:
        _Model(n="x")
    except Exception as e:
        return e
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    ("exc", "code", "retryable"),
    [
        (ValidationError("bad"), "invalid_input", False),
        (InvalidAmountError("bad"), "invalid_amount", False),
        (DomainError("no"), "domain_rejected", False),
        (IdempotencyConflictError("no"), "id_conflict", False),
        (InfrastructureError("db down"), "infrastructure", True),
        (InfrastructureError("bad sql", retryable=False), "infrastructure", False),
        (ConcurrencyError("lost race"), "concurrency_conflict", True),
        (_pydantic_error(), "invalid_input", False),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte"), "invalid_input", False),
        (RuntimeError("?"), "unhandled_error", True),
        (TimeoutError(), "unhandled_error", True),
    ],
)
def test_retry_rule(exc: Exception, code: str, retryable: bool) -> None:
    failure = classify(exc)
    assert (failure.code, failure.retryable, failure.duplicate) == (code, retryable, False)


def test_duplicate_is_not_a_failure() -> None:
    assert classify(DuplicateError("seen")).duplicate


def test_error_text_is_truncated() -> None:
    dlq = DeadLetterMiddleware(max_error_bytes=64)

    class _Rec:
        topic, partition, offset, timestamp = "t", 0, 7, 1
        key, value, headers = b"k", b"v", (("h", b"1"),)

    headers = dlq.dead_letter_headers(
        _Rec(),
        group="g",
        exc=RuntimeError("é" * 500),
        failure=classify(RuntimeError()),
        attempts=5,
    )
    error = dict(headers)["x-harbour-error"]
    assert len(error) <= 64 and error.endswith(b"[truncated]")
    error.decode("utf-8")  # never cut inside a character
    assert headers[0] == ("h", b"1")


# --- in-memory smoke test (TestKafkaBroker: no redelivery, offsets, or commits) ----------------


async def test_in_memory_broker_dead_letters_a_validation_error() -> None:
    broker = _broker(dead_letters=DeadLetterMiddleware(max_attempts=3, backoff_s=0))
    group = "harbour.deposits"
    seen: list[bytes] = []
    parked: list[dict[str, str]] = []

    @broker.subscriber("deposits.commands", **subscriber_options(group))
    async def handle(body: str) -> None:
        if body == "bad":
            raise ValidationError("unknown type")
        seen.append(body.encode())

    @broker.subscriber(dlq_topic(group), **subscriber_options("harbour.ops"))
    async def dead(body: str, msg: KafkaMessage) -> None:
        parked.append(dict(msg.headers))

    async with TestKafkaBroker(broker) as br:
        await br.publish("bad", "deposits.commands", key=b"k")
        await br.publish("good", "deposits.commands", key=b"k")

    assert seen == [b"good"]
    assert len(parked) == 1
    assert parked[0]["x-harbour-error-code"] == "invalid_input"
    assert parked[0]["x-harbour-group"] == group
    assert broker.dead_letters.dead_lettered == 1
