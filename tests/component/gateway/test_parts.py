"""The gateway's pure parts, without Kafka or PostgreSQL: keys, roles, the rate limiter, strict
body parsing, error codes, statement cursors."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from services.gateway.auth import (
    Principal,
    Role,
    new_key,
    parse_key_id,
    secret_matches,
    token_digest,
)
from services.gateway.body import parse_json_object, request_hash, validate
from services.gateway.errors import ApiError
from services.gateway.ledger_read import Position
from services.gateway.ratelimit import TokenBucketLimiter
from services.gateway.schemas import TransferRequest
from services.gateway.service import check_idempotency_key


def test_keys_are_random_prefixed_and_only_their_digest_verifies() -> None:
    a, b = new_key(), new_key()
    assert a.token != b.token and a.key_id != b.key_id
    assert a.token.startswith(f"hbk_{a.key_id}_") and len(a.token) == 4 + 16 + 1 + 43
    assert parse_key_id(a.token) == a.key_id
    assert a.digest == token_digest(a.token)
    assert secret_matches(a.token, a.digest)
    assert not secret_matches(b.token, a.digest)
    assert not secret_matches(a.token, None)
    for bad in ("", "hbk_", f"hbk_{a.key_id}", a.token + "x", a.token.upper(), "Bearer x"):
        assert parse_key_id(bad) is None, bad


def test_roles_decide_what_a_key_reads_and_acts_for() -> None:
    bank = Principal("k1", "HSBCHKHH", Role.BANK)
    admin = Principal("k2", "fa", Role.FUND_ADMIN, frozenset({"HSBCHKHH"}))
    ops = Principal("k3", "ops", Role.OPS)
    assert bank.can_read("HSBCHKHH") and not bank.can_read("SCBLHKHH")
    assert admin.can_read("HSBCHKHH") and not admin.can_read("SCBLHKHH")
    assert ops.can_read("anyone") and ops.readable() is None
    assert not bank.can_read(None)
    bank.require_acts_for("HSBCHKHH")
    for who, participant in ((bank, "SCBLHKHH"), (admin, "HSBCHKHH"), (ops, "HSBCHKHH")):
        with pytest.raises(ApiError) as err:
            who.require_acts_for(participant)
        assert (err.value.status, err.value.code) == (403, "participant_forbidden")


def test_token_bucket_allows_a_burst_then_refills_per_key() -> None:
    now = [0.0]
    limiter = TokenBucketLimiter(rate_per_s=2, burst=3, clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(3)] == [0, 0, 0]
    assert limiter.acquire("a") == pytest.approx(0.5)
    assert limiter.acquire("b") == 0  # another key has its own bucket
    now[0] = 0.5
    assert limiter.acquire("a") == 0
    assert limiter.acquire("a") > 0
    now[0] = 100.0  # refills to the burst, not beyond
    assert [limiter.acquire("a") for _ in range(4)][-1] > 0


def test_token_bucket_forgets_the_least_recently_used_keys() -> None:
    limiter = TokenBucketLimiter(rate_per_s=1, burst=1, max_keys=2, clock=lambda: 0.0)
    assert limiter.acquire("a") == 0 and limiter.acquire("a") > 0
    limiter.acquire("b")
    limiter.acquire("c")  # evicts "a", which starts full again
    assert limiter.acquire("a") == 0


@pytest.mark.parametrize("raw", [
    b'{"a": 1, "a": 2}', b"[1]", b'"x"', b"{", b'{"a": NaN}', b'{"a": Infinity}', b"\xff",
    b"",
])
def test_strict_json_refuses(raw: bytes) -> None:
    with pytest.raises(ApiError) as err:
        parse_json_object(raw)
    assert (err.value.status, err.value.code) == (400, "malformed_json")


def test_json_numbers_never_become_floats() -> None:
    assert parse_json_object(b'{"amount": 10.10}') == {"amount": Decimal("10.10")}


def _body(**overrides: object) -> dict[str, object]:
    return {"uetr": "0f8fad5b-d9cb-469f-a165-70867728950e", "end_to_end_id": "E2E",
            "payer_wallet": "alice", "payee_participant": "SCBLHKHH", "payee_wallet": "bob",
            "currency": "HKD", "amount": "1.00", **overrides}


@pytest.mark.parametrize(("overrides", "code", "field"), [
    ({"amount": Decimal("1.00")}, "invalid_amount", "amount"),
    ({"amount": 1}, "invalid_amount", "amount"),
    ({"amount": "1,000.00"}, "invalid_amount", "amount"),
    ({"extra": "x"}, "unknown_field", "extra"),
    ({"currency": "hkd"}, "invalid_input", "currency"),
    ({"payee_participant": "nobank"}, "invalid_input", "payee_participant"),
    ({"uetr": "0F8FAD5B-D9CB-469F-A165-70867728950E"}, "invalid_input", "uetr"),
])
def test_validation_errors_name_the_field_and_pick_the_code(
        overrides: dict[str, object], code: str, field: str) -> None:
    with pytest.raises(ApiError) as err:
        validate(TransferRequest, _body(**overrides))
    assert (err.value.status, err.value.code) == (422, code)
    assert field in [e["field"] for e in err.value.details["errors"]]
    assert field in err.value.message


def test_request_hash_ignores_key_order_but_not_values_or_route() -> None:
    body = _body()
    same = dict(reversed(list(body.items())))
    assert request_hash("POST", "/x", body) == request_hash("POST", "/x", same)
    assert request_hash("POST", "/x", body) != request_hash("POST", "/y", body)
    assert request_hash("POST", "/x", body) != request_hash("POST", "/x", _body(amount="1.01"))


def test_idempotency_keys_are_printable_ascii() -> None:
    assert check_idempotency_key(None) is None
    assert check_idempotency_key("a-b_c:1") == "a-b_c:1"
    for bad in ("", "a b", "k" * 256, "ключ", "a\n"):
        with pytest.raises(ApiError):
            check_idempotency_key(bad)


def test_statement_cursor_round_trips_and_refuses_garbage() -> None:
    position = Position(datetime(2026, 3, 2, 1, tzinfo=UTC), 3, 17, 1)
    assert Position.decode(position.encode()) == position
    for bad in ("", "garbage", Position(datetime(2026, 1, 1), 1, 1, 1).encode(), "W10"):
        with pytest.raises(ApiError) as err:
            Position.decode(bad)
        assert err.value.code == "invalid_cursor"
