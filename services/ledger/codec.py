"""Wire <-> domain for the ledger: records on ``ledger.commands`` become domain commands, results
become envelopes for the reply topic, and undecodable records become dead letters.

Three outcomes per record, so that accepted + rejected + dead-lettered always equals records sent:

- a command (possibly one the domain will reject);
- a :class:`~services.ledger.domain.MalformedCommand` when the envelope is readable but the payload
  is not: it is answered with a rejection code on the reply topic, under the posting id when one
  can be read (so a client's retry finds the same answer) or else the envelope's event id;
- a dead letter when not even an envelope can be read (there is nobody to answer).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _esc
from typing import Any

from shared.errors import ValidationError
from shared.events import ledger as wire
from shared.events.envelope import Envelope, typed_decoder
from shared.events.topics import LEDGER_RESULTS
from shared.ids import new_id
from shared.store.outbox import OutboxMessage

from . import domain as d

PRODUCER = "harbour.ledger"
_decode = typed_decoder(
    wire.Post, wire.PostPending, wire.CommitPending, wire.VoidPending, wire.CommitGroup,
    wire.VoidGroup, wire.DefineAsset, wire.OpenAccount, wire.FreezeAccount,
    wire.UnfreezeAccount, wire.CloseAccount,
)
_AMOUNT_FIELDS = frozenset({"amount", "limit"})


@dataclass(frozen=True, slots=True)
class Incoming:
    """A record read well enough to answer: the command and where its answer goes."""

    command: d.Command
    envelope: Envelope | None
    reply_to: str
    key: bytes | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record nobody can be answered for: kept whole with the reason."""

    error: ValidationError


def _entries(items: list[wire.EntryIn] | None) -> tuple[d.DecimalEntry, ...] | None:
    if items is None:
        return None
    return tuple(d.DecimalEntry(e.account_id, e.asset, e.direction, e.amount) for e in items)


def _refs(refs: wire.References) -> dict[str, Any]:
    return refs.model_dump(exclude_none=True)


def to_domain(payload: Any, envelope: Envelope) -> d.Command:
    """Map one validated wire payload to its domain command (pure field mapping)."""
    event_id = str(envelope.event_id)
    match payload:
        case wire.Post():
            return d.Post(
                payload.posting_id,
                _entries(payload.entries) or (),
                payload.effective_at,
                _refs(payload.references),
            )
        case wire.PostPending():
            return d.PostPending(
                payload.posting_id,
                _entries(payload.entries) or (),
                payload.timeout_s,
                payload.settlement_group,
                payload.effective_at,
                _refs(payload.references),
            )
        case wire.CommitPending():
            return d.CommitPending(
                payload.posting_id, payload.pending_id, _entries(payload.entries)
            )
        case wire.VoidPending():
            return d.VoidPending(payload.posting_id, payload.pending_id)
        case wire.CommitGroup():
            return d.CommitGroup(payload.posting_id, payload.settlement_group)
        case wire.VoidGroup():
            return d.VoidGroup(payload.posting_id, payload.settlement_group)
        case wire.DefineAsset():
            return d.DefineAsset(event_id, payload.code, payload.scale)
        case wire.OpenAccount():
            return d.OpenAccount(
                event_id,
                payload.account_id,
                payload.participant,
                payload.asset,
                payload.debits_must_not_exceed_credits,
                payload.credits_must_not_exceed_debits,
                payload.limit,
            )
        case wire.FreezeAccount():
            return d.FreezeAccount(event_id, payload.account_id)
        case wire.UnfreezeAccount():
            return d.UnfreezeAccount(event_id, payload.account_id)
        case wire.CloseAccount():
            return d.CloseAccount(event_id, payload.account_id)
    raise ValidationError(f"{type(payload).__name__} is not a ledger command", code="unknown_type")


# Reply topics a command may name: the default and per-consumer result topics. Anything else is
# refused, because a reply to a topic that does not exist would stall the results relay.
REPLY_TOPIC_RE = re.compile(
    r"^ledger\.results(\.[A-Za-z0-9_-]{1,64})?$|^[a-z0-9_-]{1,64}\.ledger-results$"
)


def read_record(value: bytes | None, key: bytes | None) -> Incoming | DeadLetter:
    """Decode one ``ledger.commands`` record (never raises for bad input)."""
    if value and b"\\u0000" in value:
        # NUL is valid JSON but PostgreSQL text and jsonb cannot hold it: in an id, a participant,
        # a reference or an error message it would fail the whole batch's transaction. Strict
        # JSON cannot carry a raw NUL in a string, so the escape is the only way in.
        return DeadLetter(ValidationError(
            "record contains \\u0000 (NUL), which the ledger cannot store", code="malformed_json"))
    try:
        envelope, payload = _decode(value or b"")
        command = to_domain(payload, envelope)
    except ValidationError as exc:
        return _malformed(value or b"", key, exc)
    reply_to = envelope.reply_to or LEDGER_RESULTS
    if not REPLY_TOPIC_RE.match(reply_to):
        refused = d.MalformedCommand(command.command_id, value or b"",
                                     f"reply_to {reply_to[:80]!r} is not a ledger results topic")
        return Incoming(refused, envelope, LEDGER_RESULTS, key)
    return Incoming(command, envelope, reply_to, key)


def _malformed(value: bytes, key: bytes | None, exc: ValidationError) -> Incoming | DeadLetter:
    raw = _raw_envelope(value)
    if raw is None or not isinstance(raw.get("event_id"), str):
        return DeadLetter(_reason_only(exc))
    payload = raw.get("payload")
    posting_id = payload.get("posting_id") if isinstance(payload, dict) else None
    command_id = posting_id if isinstance(posting_id, str) and posting_id else raw["event_id"]
    reply_to = raw.get("reply_to")
    if not isinstance(reply_to, str) or not REPLY_TOPIC_RE.match(reply_to):
        reply_to = LEDGER_RESULTS
    code = d.RejectionCode.INVALID_AMOUNT if _amount_error(exc) else None
    detail = f"{exc.code}: {exc.message}"
    errors = exc.details.get("errors")
    if errors:
        detail += " " + json.dumps(errors)[:600]
    command = d.MalformedCommand(command_id, value, detail, code=code)
    return Incoming(command, None, reply_to, key)


def _reason_only(exc: ValidationError) -> ValidationError:
    """The error without the stack it was raised through. A dead letter waits for its batch to
    commit; with its traceback it would keep the decoding frames, and through them the caller's
    frame and the whole batch being prepared, in a reference cycle that only the cyclic collector
    frees (which the writer runs as a safety net only: ``services/ledger/app.py``)."""
    exc.__traceback__ = exc.__context__ = exc.__cause__ = None
    return exc


def _raw_envelope(value: bytes) -> dict[str, Any] | None:
    try:
        raw = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return None
    return raw if isinstance(raw, dict) else None


def _amount_error(exc: ValidationError) -> bool:
    errors = exc.details.get("errors") or []
    return bool(errors) and all(
        str(e.get("loc", "")).rsplit(".", 1)[-1] in _AMOUNT_FIELDS for e in errors
    )


@dataclass(frozen=True, slots=True)
class ChainPlace:
    partition: int
    sequence: int
    hash: bytes


def result_message(
    result: d.Result,
    incoming: Incoming,
    place: ChainPlace | None,
    now: datetime | None = None,
    event_id: str | None = None,
) -> OutboxMessage:
    """The PostingAccepted/PostingRejected envelope for one result, bound for the reply topic.

    ``event_id``: the answer's id; the writer derives it from the record answered, so an answer
    sent again after a crash carries the same id and consumers' inboxes drop the copy.

    Assembled as JSON text rather than through the pydantic models: the writer makes one per
    command on its hot path and produces every field itself. Tests decode these messages with
    the strict decoder, which keeps this in step with the contracts in shared.events.ledger.
    """
    cid = _esc(result.command_id)
    if result.accepted:
        type_name = "ledger.PostingAccepted"
        posting = result.kind in d.POSTING_KINDS
        payload = (
            '{"command_id":' + cid + ',"command_type":' + _esc(result.kind)
            + ',"posting_id":' + (cid if posting else "null")
            + ',"partition":' + (str(place.partition) if place else "null")
            + ',"sequence":' + (str(place.sequence) if place else "null")
            + ',"hash":' + ('"' + place.hash.hex() + '"' if place else "null")
            + ',"duplicate":' + ("true" if result.duplicate else "false") + "}"
        )
    else:
        type_name = "ledger.PostingRejected"
        payload = (
            '{"command_id":' + cid + ',"command_type":' + _esc(result.kind)
            + ',"code":' + _esc(str(result.code)) + ',"detail":' + _esc(result.detail[:1000])
            + ',"duplicate":' + ("true" if result.duplicate else "false") + "}"
        )
    source = incoming.envelope
    stamp = _stamp(now or datetime.now(UTC))
    event_id_json = '"' + (event_id or str(new_id())) + '"'
    envelope = (
        '{"event_id":' + event_id_json + ',"type":"' + type_name + '","schema_version":1'
        + ',"occurred_at":' + stamp + ',"recorded_at":' + stamp
        + ',"producer":"' + PRODUCER + '"'
        + ',"correlation_id":'
        + ('"' + str(source.correlation_id) + '"' if source else event_id_json)
        + ',"causation_id":' + ('"' + str(source.event_id) + '"' if source else "null")
        + ',"participant":' + (_esc(source.participant) if source else '"unknown"')
        + ',"payload":' + payload + ',"reply_to":null}'
    )
    return OutboxMessage(
        incoming.reply_to, result.command_id.encode(), envelope.encode("ascii"),
        _HEADERS[type_name],
    )


@functools.lru_cache(maxsize=4)
def _stamp(moment: datetime) -> str:
    """A JSON timestamp; a batch answers every command with the same moment, so it is formatted
    once per batch, not once per answer."""
    return '"' + moment.isoformat() + '"'


_HEADERS = {
    "ledger.PostingAccepted": {"type": "PostingAccepted"},
    "ledger.PostingRejected": {"type": "PostingRejected"},
}
