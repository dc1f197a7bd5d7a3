"""shared.events: payload registry, envelope round trips, decode errors, canonical JSON."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import AwareDatetime

from shared.clock import ManualClock
from shared.errors import InvalidAmountError, ValidationError
from shared.events.envelope import (
    Envelope,
    canonical_json,
    decode,
    encode,
    new_envelope,
    validate_payload,
)
from shared.events.registry import (
    EventType,
    Payload,
    register,
    registered,
    resolve,
    type_of,
)
from shared.money import AmountStr, Asset, parse_amount

# Test-only contracts: the "test_envelope" domain exists nowhere else.


@register("test_envelope.WidgetShipped", version=1)
class WidgetShipped(Payload):
    widget_id: UUID
    asset: str
    amount: AmountStr
    shipped_at: AwareDatetime
    count: int


@register("test_envelope.WidgetShipped", version=2)
class WidgetShippedV2(Payload):
    widget_id: UUID
    amount: AmountStr


@register("test_envelope.NoteAdded")
class NoteAdded(Payload):
    text: str
    meta: dict[str, Any] = {}


HKT = timezone(timedelta(hours=8))
START = datetime(2025, 3, 3, 9, 30, 0, 125000, tzinfo=UTC)
WIDGET_ID = UUID("01956a1e-0000-7000-8000-000000000001")
HKD = Asset(code="HKD", scale=2)


def widget(amount: str = "1250.75") -> WidgetShipped:
    return WidgetShipped(
        widget_id=WIDGET_ID,
        asset="HKD",
        amount=amount,
        shipped_at=datetime(2025, 3, 3, 17, 0, tzinfo=HKT),
        count=3,
    )


def wire(**changes: Any) -> dict[str, Any]:
    """A valid record as a JSON object, with top-level fields replaced or (value ...) removed."""
    record = json.loads(encode(new_envelope(widget(), producer="tests", participant="bank-a")))
    for key, value in changes.items():
        if value is ...:
            del record[key]
        else:
            record[key] = value
    return record


def payload_with(**changes: Any) -> dict[str, Any]:
    payload = wire()["payload"]
    for key, value in changes.items():
        if value is ...:
            del payload[key]
        else:
            payload[key] = value
    return payload


def decode_error(raw: bytes, **kwargs: Any) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        decode(raw, **kwargs)
    # Whatever went wrong, the error must be ready for a rejection event or a dead letter.
    json.dumps(caught.value.as_dict())
    return caught.value


def locs(error: ValidationError) -> list[str]:
    return [entry["loc"] for entry in error.details["errors"]]


# --- registry -----------------------------------------------------------------------------------


def test_registry_maps_both_ways() -> None:
    assert resolve("test_envelope.WidgetShipped", 1) is WidgetShipped
    assert resolve("test_envelope.WidgetShipped", 2) is WidgetShippedV2
    assert type_of(WidgetShipped) == EventType("test_envelope.WidgetShipped", 1)
    assert type_of(widget()) == ("test_envelope.WidgetShipped", 1)
    assert registered()[EventType("test_envelope.NoteAdded", 1)] is NoteAdded


def test_resolve_unknown_type_or_version() -> None:
    for name, version in [("test_envelope.Nope", 1), ("test_envelope.WidgetShipped", 9)]:
        with pytest.raises(ValidationError) as caught:
            resolve(name, version)
        assert caught.value.code == "unknown_type"
        assert caught.value.details == {"type": name, "schema_version": version}


def test_registering_a_taken_type_version_fails_at_import_time() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @register("test_envelope.WidgetShipped", version=1)
        class Impostor(Payload):
            widget_id: UUID

    assert resolve("test_envelope.WidgetShipped", 1) is WidgetShipped


def test_a_class_registers_under_one_name_only() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register("test_envelope.Alias", version=1)(WidgetShipped)
    with pytest.raises(ValidationError):
        resolve("test_envelope.Alias", 1)


def test_registering_the_same_class_again_is_harmless() -> None:
    assert register("test_envelope.WidgetShipped", version=1)(WidgetShipped) is WidgetShipped


@pytest.mark.parametrize(
    "name", ["WidgetShipped", "test_envelope.widgetShipped", "Test.Widget", "a..B", "a.B-C", ""]
)
def test_register_refuses_malformed_type_names(name: str) -> None:
    with pytest.raises(ValueError, match=r"domain\.EventName"):
        register(name)


def test_register_refuses_bad_versions_and_non_payloads() -> None:
    with pytest.raises(ValueError, match="version"):
        register("test_envelope.Zero", version=0)
    with pytest.raises(TypeError, match="Payload"):
        register("test_envelope.Plain")(pydantic.BaseModel)  # type: ignore[type-var]


def test_type_of_an_unregistered_class_is_a_programming_error() -> None:
    class Loose(Payload):
        x: int

    with pytest.raises(TypeError, match="not registered"):
        type_of(Loose)


def test_payloads_are_strict_frozen_and_closed() -> None:
    with pytest.raises(pydantic.ValidationError):
        WidgetShipped.model_validate({**widget().model_dump(), "count": "3"})
    with pytest.raises(pydantic.ValidationError):
        WidgetShipped.model_validate({**widget().model_dump(), "colour": "red"})
    with pytest.raises(pydantic.ValidationError):
        widget().count = 4  # type: ignore[misc]


def test_strict_payloads_still_read_uuids_and_datetimes_from_json_strings() -> None:
    raw = json.dumps(payload_with())
    parsed = WidgetShipped.model_validate_json(raw)
    assert parsed.widget_id == WIDGET_ID
    assert parsed.shipped_at == datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
    assert parsed == widget()


# --- new_envelope / encode / decode round trip ----------------------------------------------------


def test_round_trip() -> None:
    original = new_envelope(
        widget(), producer="deposits", participant="bank-a", clock=ManualClock(START)
    )
    raw = encode(original)
    envelope, payload = decode(raw)
    assert envelope == original
    assert payload == widget()
    assert isinstance(payload, WidgetShipped)
    assert isinstance(payload.widget_id, UUID)
    assert payload.shipped_at.utcoffset() == timedelta(hours=8)
    assert decode(raw, reject_duplicate_keys=False) == (envelope, payload)


def test_new_envelope_fills_in_identity_and_times() -> None:
    envelope = new_envelope(
        widget(), producer="deposits", participant="bank-a", clock=ManualClock(START)
    )
    assert envelope.type == "test_envelope.WidgetShipped"
    assert envelope.schema_version == 1
    assert envelope.event_id.version == 7
    assert envelope.correlation_id == envelope.event_id
    assert envelope.causation_id is None
    assert envelope.reply_to is None
    assert envelope.occurred_at == envelope.recorded_at == START
    assert envelope.payload["widget_id"] == str(WIDGET_ID)
    assert envelope.payload["amount"] == "1250.75"


def test_new_envelope_keeps_what_it_is_given() -> None:
    event_id, correlation_id, causation_id = (
        UUID(int=1, version=4),
        UUID(int=2, version=4),
        UUID(int=3, version=4),
    )
    envelope = new_envelope(
        widget(),
        producer="deposits",
        participant="bank-a",
        correlation_id=correlation_id,
        causation_id=causation_id,
        reply_to="ledger.results",
        clock=ManualClock(START),
        event_id=event_id,
        occurred_at=START - timedelta(hours=1),
    )
    assert (envelope.event_id, envelope.correlation_id, envelope.causation_id) == (
        event_id,
        correlation_id,
        causation_id,
    )
    assert envelope.reply_to == "ledger.results"
    assert envelope.occurred_at == START - timedelta(hours=1)
    assert envelope.recorded_at == START
    assert decode(encode(envelope))[0] == envelope


def test_encode_is_compact_utf8() -> None:
    envelope = new_envelope(widget(), producer="deposits", participant="銀行-甲")
    raw = encode(envelope)
    assert isinstance(raw, bytes)
    assert "銀行-甲".encode() in raw
    assert b", " not in raw
    assert b": " not in raw
    assert decode(raw)[0].participant == "銀行-甲"


def test_new_envelope_wraps_field_errors() -> None:
    with pytest.raises(TypeError, match="not registered"):

        class Loose(Payload):
            x: int

        new_envelope(Loose(x=1), producer="p", participant="q")
    cases: list[dict[str, Any]] = [
        {"producer": ""},
        {"participant": ""},
        {"reply_to": "bad topic!"},
        {"occurred_at": datetime(2025, 1, 1)},
    ]
    for case in cases:
        arguments: dict[str, Any] = {"producer": "p", "participant": "q", **case}
        with pytest.raises(ValidationError) as caught:
            new_envelope(widget(), **arguments)
        assert caught.value.code == "invalid_envelope"
        assert locs(caught.value) == [next(iter(case))]


# --- decode: malformed_json ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"{",
        b"\xff\xfe{}",
        b"[1, 2]",
        b"null",
        b'"a string"',
        b"42",
        b"[" * 100_000,
    ],
)
@pytest.mark.parametrize("reject_duplicate_keys", [True, False])
def test_decode_malformed_json(raw: bytes, reject_duplicate_keys: bool) -> None:
    error = decode_error(raw, reject_duplicate_keys=reject_duplicate_keys)
    assert error.code == "malformed_json"
    assert locs(error) == [""]


def test_decode_refuses_text_and_other_non_bytes() -> None:
    assert decode_error('{"a": 1}').code == "malformed_json"  # type: ignore[arg-type]
    assert decode_error(None).code == "malformed_json"  # type: ignore[arg-type]


def test_decode_refuses_duplicate_keys_nan_and_overflow() -> None:
    good = json.dumps(wire())
    duplicated = good[:-1] + ', "producer": "evil"}'
    nested = good.replace('"amount": "1250.75"', '"amount": "1.00", "amount": "1250.75"')
    not_a_number = json.dumps(wire(payload={"text": "x", "meta": {"v": float("nan")}}))
    overflow = json.dumps(wire(payload={"text": "x", "meta": {"v": 1}})).replace(": 1}", ": 1e999}")
    for raw in [duplicated, nested, not_a_number, overflow]:
        error = decode_error(raw.encode())
        assert error.code == "malformed_json", raw


def test_fast_decode_still_keeps_nan_out_of_payloads() -> None:
    record = wire(type="test_envelope.NoteAdded", payload={"text": "x", "meta": {"v": 1}})
    raw = json.dumps(record).replace('"v": 1', '"v": NaN').encode()
    error = decode_error(raw, reject_duplicate_keys=False)
    assert error.code == "invalid_payload"
    assert locs(error) == ["payload"]


# --- decode: invalid_envelope -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "loc", "error_type"),
    [
        ({"producer": ...}, "producer", "missing"),
        ({"causation_id": ...}, "causation_id", "missing"),
        ({"payload": ...}, "payload", "missing"),
        ({"priority": "high"}, "priority", "extra_forbidden"),
        ({"schema_version": "1"}, "schema_version", "int_type"),
        ({"schema_version": 1.0}, "schema_version", "int_type"),
        ({"schema_version": 0}, "schema_version", "greater_than_equal"),
        ({"event_id": "not-a-uuid"}, "event_id", "uuid_parsing"),
        ({"event_id": 12}, "event_id", "uuid_type"),
        ({"occurred_at": "2025-03-03T09:30:00"}, "occurred_at", "timezone_aware"),
        ({"recorded_at": 1741000000}, "recorded_at", "datetime_type"),
        ({"participant": ""}, "participant", "string_too_short"),
        ({"payload": [1, 2]}, "payload", "dict_type"),
        ({"reply_to": "two words"}, "reply_to", "string_pattern_mismatch"),
    ],
)
def test_decode_invalid_envelope(changes: dict[str, Any], loc: str, error_type: str) -> None:
    error = decode_error(json.dumps(wire(**changes)).encode())
    assert error.code == "invalid_envelope"
    assert error.details["errors"] == [
        {"loc": loc, "msg": error.details["errors"][0]["msg"], "type": error_type}
    ]
    assert loc in error.message


def test_decode_reports_every_bad_envelope_field() -> None:
    error = decode_error(json.dumps(wire(producer=..., colour="red", schema_version="x")).encode())
    assert sorted(locs(error)) == ["colour", "producer", "schema_version"]


# --- decode: unknown_type -----------------------------------------------------------------------


def test_decode_unknown_type() -> None:
    error = decode_error(json.dumps(wire(type="test_envelope.Nope")).encode())
    assert error.code == "unknown_type"
    assert error.details == {"type": "test_envelope.Nope", "schema_version": 1}


def test_decode_unknown_version_of_a_known_type() -> None:
    error = decode_error(json.dumps(wire(schema_version=7)).encode())
    assert error.code == "unknown_type"
    assert error.details["schema_version"] == 7


def test_decode_picks_the_class_by_version() -> None:
    record = wire(schema_version=2, payload={"widget_id": str(WIDGET_ID), "amount": "5"})
    envelope, payload = decode(json.dumps(record).encode())
    assert isinstance(payload, WidgetShippedV2)
    assert envelope.schema_version == 2


# --- decode: invalid_payload --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "loc", "error_type"),
    [
        ({"amount": 1250.75}, "payload.amount", "amount_not_string"),
        ({"amount": 125075}, "payload.amount", "amount_not_string"),
        ({"amount": "1.2e3"}, "payload.amount", "amount_malformed"),
        ({"amount": ...}, "payload.amount", "missing"),
        ({"colour": "red"}, "payload.colour", "extra_forbidden"),
        ({"count": "3"}, "payload.count", "int_type"),
        ({"count": 3.0}, "payload.count", "int_type"),
        ({"count": True}, "payload.count", "int_type"),
        ({"widget_id": 7}, "payload.widget_id", "uuid_type"),
        ({"shipped_at": "2025-03-03T09:00:00"}, "payload.shipped_at", "timezone_aware"),
    ],
)
def test_decode_invalid_payload(changes: dict[str, Any], loc: str, error_type: str) -> None:
    record = wire(payload=payload_with(**changes))
    error = decode_error(json.dumps(record).encode())
    assert error.code == "invalid_payload"
    assert [(e["loc"], e["type"]) for e in error.details["errors"]] == [(loc, error_type)]
    assert error.details["type"] == "test_envelope.WidgetShipped"
    assert error.details["event_id"] == record["event_id"]


def test_json_number_amount_gets_a_message_that_says_why() -> None:
    error = decode_error(json.dumps(wire(payload=payload_with(amount=1250.75))).encode())
    (entry,) = error.details["errors"]
    assert entry["loc"] == "payload.amount"
    assert '"1250.75"' in entry["msg"]
    assert "payload.amount" in error.message


def test_scale_is_checked_against_the_asset_after_decoding() -> None:
    # The payload only knows "a decimal string"; the asset (data) says 2 decimals.
    _, payload = decode(json.dumps(wire(payload=payload_with(amount="1.005"))).encode())
    assert isinstance(payload, WidgetShipped)
    with pytest.raises(InvalidAmountError) as caught:
        parse_amount(payload.amount, HKD.scale)
    assert caught.value.details == {"reason": "too_many_decimals"}
    assert parse_amount(widget().amount, HKD.scale) == 125075


def test_validate_payload_of_a_stored_envelope() -> None:
    envelope = new_envelope(widget(), producer="deposits", participant="bank-a")
    assert validate_payload(envelope) == widget()
    broken = envelope.model_copy(update={"payload": {"amount": 5}})
    with pytest.raises(ValidationError) as caught:
        validate_payload(broken)
    assert caught.value.code == "invalid_payload"


def test_envelope_itself_is_frozen_and_strict() -> None:
    envelope = new_envelope(widget(), producer="deposits", participant="bank-a")
    with pytest.raises(pydantic.ValidationError):
        envelope.producer = "other"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        Envelope.model_validate({**envelope.model_dump(), "schema_version": "1"})


# --- decode never crashes -----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
RECORD = wire()


def decodes_or_rejects_cleanly(raw: bytes, *, reject_duplicate_keys: bool) -> None:
    try:
        decode(raw, reject_duplicate_keys=reject_duplicate_keys)
    except ValidationError as exc:
        json.dumps(exc.as_dict())


@given(st.binary(max_size=300), st.booleans())
def test_decode_of_any_bytes_is_a_record_or_a_validation_error(raw: bytes, strict: bool) -> None:
    decodes_or_rejects_cleanly(raw, reject_duplicate_keys=strict)


@given(
    st.sampled_from(sorted(RECORD)),
    json_values,
    st.sampled_from(sorted(RECORD["payload"])),
    json_values,
    st.booleans(),
)
def test_decode_of_any_mutated_record_is_a_record_or_a_validation_error(
    key: str, value: Any, payload_key: str, payload_value: Any, strict: bool
) -> None:
    record = json.loads(json.dumps(RECORD))
    record[key] = value
    if isinstance(record.get("payload"), dict):
        record["payload"][payload_key] = payload_value
    decodes_or_rejects_cleanly(json.dumps(record).encode(), reject_duplicate_keys=strict)


# --- canonical_json -----------------------------------------------------------------------------


def test_canonical_json_is_pinned() -> None:
    # Part of every stored hash: if this test has to change, every hash chain breaks.
    value = {
        "b": [1, True, None, "x"],
        "a": {"z": Decimal("1.50"), "y": UUID("01956A1E-0000-7000-8000-000000000001")},
        "t": datetime(2025, 3, 3, 17, 0, tzinfo=HKT),
        "d": date(2025, 3, 3),
        "s": '銀行\n"q"',
    }
    assert canonical_json(value) == (
        b'{"a":{"y":"01956a1e-0000-7000-8000-000000000001","z":"1.50"},"b":[1,true,null,"x"],'
        b'"d":"2025-03-03","s":"\\u9280\\u884c\\n\\"q\\"","t":"2025-03-03T09:00:00.000000Z"}'
    )


def test_canonical_json_ignores_insertion_order_and_offsets() -> None:
    instant = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
    left = {"x": 1, "when": instant}
    right = {"when": instant.astimezone(HKT), "x": 1}
    assert canonical_json(left) == canonical_json(right)


def test_canonical_json_renders_models_and_envelopes() -> None:
    envelope = new_envelope(widget(), producer="deposits", participant="bank-a")
    rendered = json.loads(canonical_json(envelope))
    assert rendered["event_id"] == str(envelope.event_id)
    assert rendered["payload"]["amount"] == "1250.75"
    assert canonical_json(widget()) == canonical_json(widget().model_dump())
    assert canonical_json((1, 2)) == b"[1,2]"


def test_canonical_json_decimals_are_positional() -> None:
    assert canonical_json(Decimal("1E+2")) == b'"100"'
    assert canonical_json(Decimal("-0.05")) == b'"-0.05"'


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (1.5, TypeError),
        ({"amount": 0.1}, TypeError),
        ({1: "x"}, TypeError),
        ({"s": {1, 2}}, TypeError),
        (datetime(2025, 1, 1), TypeError),
        (Decimal("NaN"), ValueError),
        (Decimal("Infinity"), ValueError),
        (b"bytes", TypeError),
    ],
)
def test_canonical_json_refuses_ambiguous_values(value: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        canonical_json(value)
