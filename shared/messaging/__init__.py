"""Kafka plumbing: broker factory with safe defaults, dead-letter middleware, topic admin.

Exports load lazily, so ``shared.messaging.admin`` (the CLI, the local stack) does not pay for
importing FastStream.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.messaging.broker import (
        BROKER_DEFAULTS,
        SUBSCRIBER_DEFAULTS,
        HarbourKafkaBroker,
        UnsafeConfigError,
        check_subscribers,
        make_broker,
        subscriber_options,
    )
    from shared.messaging.dlq import DeadLetterMiddleware, DeadLetterScope, Failure, classify

_EXPORTS = {
    "BROKER_DEFAULTS": "shared.messaging.broker",
    "SUBSCRIBER_DEFAULTS": "shared.messaging.broker",
    "HarbourKafkaBroker": "shared.messaging.broker",
    "UnsafeConfigError": "shared.messaging.broker",
    "check_subscribers": "shared.messaging.broker",
    "make_broker": "shared.messaging.broker",
    "subscriber_options": "shared.messaging.broker",
    "DeadLetterMiddleware": "shared.messaging.dlq",
    "DeadLetterScope": "shared.messaging.dlq",
    "Failure": "shared.messaging.dlq",
    "classify": "shared.messaging.dlq",
}

__all__ = [
    "BROKER_DEFAULTS",
    "SUBSCRIBER_DEFAULTS",
    "DeadLetterMiddleware",
    "DeadLetterScope",
    "Failure",
    "HarbourKafkaBroker",
    "UnsafeConfigError",
    "check_subscribers",
    "classify",
    "make_broker",
    "subscriber_options",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
