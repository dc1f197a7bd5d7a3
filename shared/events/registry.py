"""The map between wire type names and payload classes, in both directions.

Every event and command payload is a :class:`Payload` subclass registered under a type name such as
``"deposits.TransferInstructed"`` and a schema version. Producers look up ``(type, version)`` from
the class; consumers resolve the class from the envelope's ``type`` and ``schema_version``.
Registration happens at import time, so a clash between two modules fails the process on start,
not on the first unlucky message.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Final, NamedTuple, TypeVar

from pydantic import BaseModel, ConfigDict

from shared.errors import ValidationError

__all__ = [
    "TYPE_NAME_PATTERN",
    "EventType",
    "Payload",
    "register",
    "registered",
    "resolve",
    "type_of",
]

# "<domain>.<Name>", domain lower-case and dotted if needed, Name in CamelCase.
TYPE_NAME_PATTERN: Final = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*\.[A-Z][A-Za-z0-9]*$"
_TYPE_NAME_RE: Final = re.compile(TYPE_NAME_PATTERN)


class Payload(BaseModel):
    """Base of every event and command payload.

    Strict so that nothing is coerced (a JSON number never becomes a string or a string a number),
    frozen because events are facts, and ``extra="forbid"`` so that a misspelt field is an error,
    not silently dropped. Payloads decoded from the wire are validated in JSON mode, where strict
    mode still accepts ISO 8601 strings for ``datetime`` and canonical strings for ``UUID``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class EventType(NamedTuple):
    """The wire identity of a payload class."""

    type: str
    schema_version: int


P = TypeVar("P", bound=type[Payload])

_lock = threading.Lock()
_by_type: dict[EventType, type[Payload]] = {}
_by_class: dict[type[Payload], EventType] = {}


def register(type_name: str, *, version: int = 1) -> Callable[[P], P]:
    """Class decorator registering a payload class under a type name and schema version.

    Example::

        @register("ledger.Post", version=1)
        class Post(Payload): ...

    Args:
        type_name: ``"<domain>.<Name>"``, e.g. ``"deposits.TransferInstructed"``.
        version: Schema version, 1 or more; a breaking change registers a new version.

    Returns:
        The decorator; it returns the class unchanged.

    Raises:
        ValueError: The name is malformed, the version is below 1, or the type/version (or the
            class) is already registered to something else.
        TypeError: The decorated class is not a :class:`Payload` subclass.
    """
    if not _TYPE_NAME_RE.fullmatch(type_name):
        raise ValueError(f"type name {type_name!r} must look like 'domain.EventName'")
    if type(version) is not int or version < 1:
        raise ValueError(f"schema version must be an int >= 1, got {version!r}")
    key = EventType(type_name, version)

    def decorate(cls: P) -> P:
        if not (isinstance(cls, type) and issubclass(cls, Payload)):
            raise TypeError(f"@register needs a Payload subclass, got {cls!r}")
        with _lock:
            _check_free(key, cls)
            _by_type[key] = cls
            _by_class[cls] = key
        return cls

    return decorate


def resolve(type_name: str, version: int) -> type[Payload]:
    """Return the payload class registered for a type name and schema version.

    Args:
        type_name: The envelope's ``type``.
        version: The envelope's ``schema_version``.

    Returns:
        The registered :class:`Payload` subclass.

    Raises:
        ValidationError: ``code="unknown_type"`` when nothing is registered under that pair.
    """
    cls = _by_type.get(EventType(type_name, version))
    if cls is None:
        raise ValidationError(
            f"unknown event type {type_name!r} version {version}",
            code="unknown_type",
            type=type_name,
            schema_version=version,
        )
    return cls


def type_of(payload: Payload | type[Payload]) -> EventType:
    """Return the ``(type, schema_version)`` a payload class or instance is registered under.

    Args:
        payload: A registered payload class or an instance of one.

    Returns:
        Its :class:`EventType`.

    Raises:
        TypeError: The class was never registered (a programming error, not bad input).
    """
    cls = payload if isinstance(payload, type) else type(payload)
    key = _by_class.get(cls)
    if key is None:
        raise TypeError(f"{cls.__qualname__} is not registered; decorate it with @register")
    return key


def registered() -> dict[EventType, type[Payload]]:
    """Return a snapshot of every registration, e.g. to generate schema docs or snapshot tests."""
    with _lock:
        return dict(_by_type)


def _check_free(key: EventType, cls: type[Payload]) -> None:
    current = _by_type.get(key)
    if current is not None and not _same_class(current, cls):
        raise ValueError(
            f"{key.type} v{key.schema_version} is already registered to "
            f"{current.__module__}.{current.__qualname__}"
        )
    previous = _by_class.get(cls)
    if previous is not None and previous != key:
        raise ValueError(
            f"{cls.__qualname__} is already registered as "
            f"{previous.type} v{previous.schema_version}"
        )


def _same_class(a: type[Payload], b: type[Payload]) -> bool:
    # The same definition re-imported (importlib.reload) is the same contract, not a clash.
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)
