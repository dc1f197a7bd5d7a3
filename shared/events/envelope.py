"""The JSON envelope around every Kafka record, and the deterministic JSON used for hashing.

A record on the wire is a JSON object: envelope fields plus ``payload``, whose shape is given by the
payload class registered for ``(type, schema_version)``. :func:`decode` turns any bytes into either
a valid ``(Envelope, Payload)`` pair or a :class:`shared.errors.ValidationError` whose ``code`` and
``details`` say what is wrong, so that a consumer can reject or dead-letter a record but never crash
on one.
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, Any, Final, Literal, Union
from uuid import UUID

import pydantic
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from shared.clock import Clock, SystemClock
from shared.errors import ValidationError
from shared.events.registry import Payload, resolve, type_of
from shared.ids import new_id

__all__ = [
    "Envelope",
    "canonical_json",
    "decode",
    "encode",
    "new_envelope",
    "typed_decoder",
    "validate_payload",
]

# Kafka's own rule for topic names.
TOPIC_PATTERN: Final = r"^[A-Za-z0-9._-]{1,249}$"


class _EnvelopeFields(BaseModel):
    """The envelope's metadata fields, shared by :class:`Envelope` and the typed envelopes."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    event_id: UUID
    type: str = Field(min_length=1, max_length=200)
    schema_version: int = Field(ge=1)
    occurred_at: AwareDatetime
    recorded_at: AwareDatetime
    producer: str = Field(min_length=1, max_length=200)
    correlation_id: UUID
    causation_id: UUID | None
    participant: str = Field(min_length=1, max_length=200)
    reply_to: str | None = Field(default=None, pattern=TOPIC_PATTERN)


class Envelope(_EnvelopeFields):
    """Metadata every record carries, plus the raw payload.

    ``payload`` holds JSON-native values only; :func:`decode` (or :func:`validate_payload`)
    validates it against the class registered for ``type`` and ``schema_version``.
    """

    payload: dict[str, Any]


def new_envelope(
    payload: Payload,
    *,
    producer: str,
    participant: str,
    correlation_id: UUID | None = None,
    causation_id: UUID | None = None,
    reply_to: str | None = None,
    clock: Clock | None = None,
    event_id: UUID | None = None,
    occurred_at: datetime | None = None,
) -> Envelope:
    """Wrap a registered payload in a new envelope.

    Args:
        payload: A payload whose class is registered with ``@register``.
        producer: The service that writes the record, e.g. ``"deposits"``.
        participant: Who is acting, e.g. the bank's participant id.
        correlation_id: The conversation this record belongs to; a new conversation (the default)
            is identified by this record's own ``event_id``.
        causation_id: The ``event_id`` of the record that caused this one, if any.
        reply_to: Topic on which the consumer should publish the result.
        clock: Source of ``recorded_at`` (and of ``occurred_at`` when not given).
        event_id: A fixed id, e.g. a deterministic one for idempotent retries; default UUIDv7.
        occurred_at: When the business fact happened, if earlier than now; must be tz-aware.

    Returns:
        The frozen envelope.

    Raises:
        TypeError: The payload's class is not registered.
        ValidationError: ``code="invalid_envelope"`` when a field is invalid (empty producer,
            naive ``occurred_at``, bad topic name).
    """
    key = type_of(payload)
    now = (clock or SystemClock()).now()
    event_id = new_id() if event_id is None else event_id
    fields = {
        "event_id": event_id,
        "type": key.type,
        "schema_version": key.schema_version,
        "occurred_at": now if occurred_at is None else occurred_at,
        "recorded_at": now,
        "producer": producer,
        "correlation_id": event_id if correlation_id is None else correlation_id,
        "causation_id": causation_id,
        "participant": participant,
        # JSON mode so the envelope holds exactly what goes on the wire (UUIDs as str, ...).
        "payload": payload.model_dump(mode="json"),
        "reply_to": reply_to,
    }
    try:
        return Envelope.model_validate(fields)
    except pydantic.ValidationError as exc:
        raise _validation_error("invalid_envelope", "invalid envelope", exc) from None


def encode(envelope: Envelope) -> bytes:
    """Serialise an envelope to compact UTF-8 JSON for the wire.

    Args:
        envelope: The envelope to send.

    Returns:
        JSON bytes without insignificant whitespace.
    """
    return envelope.model_dump_json().encode("utf-8")


def decode(raw: bytes, *, reject_duplicate_keys: bool = True) -> tuple[Envelope, Payload]:
    """Parse and validate a record from the wire.

    Args:
        raw: The record value as received.
        reject_duplicate_keys: Refuse an object with a repeated key instead of letting the last
            one win. Parsers disagree on which duplicate wins, so this is on for anything a bank
            can write; the check costs a second (stdlib) parse, roughly doubling decode time, so
            consumers of records that only Harbour's own :func:`encode` produced may turn it off.

    Returns:
        The envelope and its payload, validated against the registered class.

    Raises:
        ValidationError: ``code`` is ``malformed_json`` (not bytes, not UTF-8, not JSON, not an
            object, duplicate keys, NaN/Infinity), ``invalid_envelope`` (missing, unknown or
            wrong-typed envelope fields), ``unknown_type`` (no class for ``type`` and
            ``schema_version``; ``details`` has both) or ``invalid_payload``. For
            ``invalid_envelope`` and ``invalid_payload``, ``details["errors"]`` lists
            ``{"loc", "msg", "type"}`` per offending field, e.g. ``{"loc": "payload.amount"}``.
    """
    data = _as_bytes(raw)
    if reject_duplicate_keys:
        _check_strict_json(data)
    envelope = _parse_envelope(data)
    return envelope, validate_payload(envelope)


def typed_decoder(*payload_classes: type[Payload]) -> Callable[[bytes], tuple[Any, Payload]]:
    """A decoder that validates envelope and payload in one pass, for a consumer's hot path.

    Same contract as :func:`decode` (duplicate keys refused, same error codes), but records of
    the given payload classes are validated by one discriminated-union ``validate_json`` call
    instead of validating the envelope, re-encoding the payload and validating it again. Any other
    record, and every invalid one, goes through :func:`decode`, so errors stay precise. The
    envelope returned for the fast path has the metadata fields of :class:`Envelope` and the
    typed payload in ``payload``.
    """
    models: list[Any] = []
    for cls in payload_classes:
        name, version = type_of(cls)
        type_field: Any = Literal[name]
        version_field: Any = Literal[version]
        models.append(pydantic.create_model(
            f"{cls.__name__}Envelope", __base__=_EnvelopeFields,
            type=(type_field, ...), schema_version=(version_field, ...), payload=(cls, ...),
        ))
    union: Any = Annotated[Union[tuple(models)], Field(discriminator="type")]  # noqa: UP007
    adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(union)

    def decode_typed(raw: bytes) -> tuple[Any, Payload]:
        data = _as_bytes(raw)
        _check_strict_json(data)
        try:
            envelope = adapter.validate_json(data)
        except pydantic.ValidationError:
            return decode(data, reject_duplicate_keys=False)  # raises the precise error
        return envelope, envelope.payload

    return decode_typed


def validate_payload(envelope: Envelope) -> Payload:
    """Validate an envelope's raw payload against the class registered for its type.

    Args:
        envelope: An envelope, e.g. decoded from the wire or loaded from an event store.

    Returns:
        The payload instance.

    Raises:
        ValidationError: ``code`` is ``unknown_type`` or ``invalid_payload``.
    """
    cls = resolve(envelope.type, envelope.schema_version)
    try:
        # JSON mode, not Python mode: strict validation must accept ISO strings for datetimes
        # and UUIDs exactly as they arrive on the wire, and nothing looser.
        return cls.model_validate_json(_payload_json(envelope))
    except pydantic.ValidationError as exc:
        raise _validation_error(
            "invalid_payload",
            f"invalid payload for {envelope.type} v{envelope.schema_version}",
            exc,
            prefix="payload",
            event_id=str(envelope.event_id),
            type=envelope.type,
            schema_version=envelope.schema_version,
        ) from None


def _payload_json(envelope: Envelope) -> str:
    try:
        return json.dumps(envelope.payload, allow_nan=False)
    except (TypeError, ValueError) as exc:
        # NaN/Infinity in an untyped part of the payload (pydantic's parser lets them through
        # when the duplicate-key check is off), or an envelope built in-process from non-JSON.
        raise ValidationError(
            f"payload is not JSON-serialisable: {exc}",
            code="invalid_payload",
            errors=[{"loc": "payload", "msg": str(exc), "type": "not_json"}],
            event_id=str(envelope.event_id),
        ) from None


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON for request hashes and the ledger's hash chain.

    The rules below are part of every stored hash. They must never change: changing any of them
    breaks verification of every chain and idempotency key already written.

    - Object keys sorted by code point; no whitespace; ASCII only (``\\uXXXX`` escapes), so the
      bytes never depend on an encoder's Unicode handling.
    - ``None``/``bool``/``int``/``str`` as JSON; lists and tuples as arrays; mappings need ``str``
      keys; pydantic models as their ``model_dump()``.
    - ``UUID``: lower-case hyphenated string.
    - ``datetime``: tz-aware only, converted to UTC, ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (always six
      fractional digits), so the same instant hashes the same whatever offset it came with or
      how PostgreSQL returns it. ``date``: ``YYYY-MM-DD``.
    - ``Decimal``: finite only, positional notation with its exponent kept (``"1.50"`` stays
      ``"1.50"``, ``1E+2`` becomes ``"100"``).
    - ``float`` and anything else: ``TypeError``. Money is never a float.

    Args:
        obj: The value to render.

    Returns:
        The canonical bytes.

    Raises:
        TypeError: A value of an unsupported type, a non-``str`` key or a naive datetime.
        ValueError: A NaN or infinite ``Decimal``.
    """
    return json.dumps(
        _canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _canonical(obj: Any) -> Any:
    # Exact-type checks first: this runs for every ledger entry's hash, and isinstance chains on
    # the common JSON-native values dominated its cost.
    kind = type(obj)
    if obj is None or kind is str or kind is int or kind is bool:
        return obj
    if kind is dict:
        return {_canonical_key(key): _canonical(value) for key, value in obj.items()}
    if kind is list or kind is tuple:
        return [_canonical(item) for item in obj]
    return _canonical_other(obj)


def _canonical_other(obj: Any) -> Any:
    # str/int subclasses (StrEnum, IntEnum; bool too): json renders their plain value exactly.
    if isinstance(obj, str | int):
        return obj
    if isinstance(obj, BaseModel):
        return _canonical(obj.model_dump())
    if isinstance(obj, Mapping):
        return {_canonical_key(key): _canonical(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_canonical(item) for item in obj]
    return _canonical_scalar(obj)


def _canonical_key(key: Any) -> str:
    # json.dumps would quietly turn 1, 1.0 and True into "1", "1.0" and "true": refuse instead.
    if not isinstance(key, str):
        raise TypeError(f"canonical_json needs str keys, got {type(key).__name__}")
    return key


def _canonical_scalar(obj: Any) -> str:
    if isinstance(obj, UUID):
        return str(obj)
    if isinstance(obj, datetime):
        if obj.tzinfo is None or obj.utcoffset() is None:
            raise TypeError(f"canonical_json refuses naive datetime {obj.isoformat()}")
        return obj.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    if isinstance(obj, date):
        return obj.isoformat()
    if isinstance(obj, Decimal):
        if not obj.is_finite():
            raise ValueError(f"canonical_json refuses non-finite Decimal {obj}")
        return format(obj, "f")
    raise TypeError(f"canonical_json cannot render {type(obj).__name__}")


def _as_bytes(raw: Any) -> bytes:
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise _malformed(f"record must be bytes, got {type(raw).__name__}", "bytes_type")
    return bytes(raw)


def _parse_envelope(data: bytes) -> Envelope:
    try:
        return Envelope.model_validate_json(data)
    except pydantic.ValidationError as exc:
        code = "malformed_json" if _is_not_json_object(exc) else "invalid_envelope"
        raise _validation_error(code, "invalid envelope", exc) from None


def _is_not_json_object(exc: pydantic.ValidationError) -> bool:
    # json_invalid: bad syntax or bad UTF-8; model_type at the root: valid JSON, but no object.
    return any(
        error["type"] == "json_invalid" or (error["type"] == "model_type" and not error["loc"])
        for error in exc.errors(include_url=False)
    )


def _check_strict_json(data: bytes) -> None:
    try:
        _strict_decoder().decode(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _malformed(f"record is not strict UTF-8 JSON: {exc}", "json_invalid") from None


@functools.cache
def _strict_decoder() -> json.JSONDecoder:
    # One decoder for every record: json.loads with hooks builds a new one per call, which on a
    # consumer's hot path costs as much as a third of the parse.
    return json.JSONDecoder(object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant,
                            parse_float=_finite_number)


def _malformed(message: str, error_type: str) -> ValidationError:
    # Same details shape as every other decode error, so dead-letter tooling has one format.
    errors = [{"loc": "", "msg": message, "type": error_type}]
    return ValidationError(message, code="malformed_json", errors=errors)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on which duplicate wins; for an instruction that moves money, refuse both.
    result = dict(pairs)
    if len(result) != len(pairs):
        counts = Counter(key for key, _ in pairs)
        raise ValueError(f"duplicate keys {sorted(k for k, n in counts.items() if n > 1)}")
    return result


def _finite_number(text: str) -> Any:
    # 1e999 parses to inf, which no amount, version or count can mean.
    value = float(text)  # float ok: infinity check on a JSON number, never money
    if math.isinf(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _validation_error(
    code: str,
    message: str,
    exc: pydantic.ValidationError,
    *,
    prefix: str | None = None,
    **extra: Any,
) -> ValidationError:
    errors = [_error_entry(error, prefix) for error in exc.errors(include_url=False)]
    fields = ", ".join(entry["loc"] or "<record>" for entry in errors)
    return ValidationError(f"{message}: {fields}", code=code, errors=errors, **extra)


def _error_entry(error: Any, prefix: str | None) -> dict[str, str]:
    # Only loc/msg/type: pydantic's "input" and "ctx" may hold large or non-JSON values.
    loc = [str(part) for part in error["loc"]]
    if prefix:
        loc.insert(0, prefix)
    return {"loc": ".".join(loc), "msg": str(error["msg"]), "type": str(error["type"])}
