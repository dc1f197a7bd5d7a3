"""Hostile and careless requests: each gets the right status and code, and nothing reaches Kafka
(the commands topic's end offsets do not move)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from tests.integration.gateway.conftest import Gw
from tests.integration.gateway.helpers import (
    BOCHK,
    HSBC,
    SCB,
    in_process,
    issue_body,
    seed,
    transfer_body,
)

TRANSFERS = "/v1/deposits/transfers"


def expect(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message", "details"}, body
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    return body


async def open_accounts(pool: asyncpg.Pool) -> None:
    """Two accounts on the ledger's read side, one per bank (reads need nothing else)."""
    await pool.execute("""
        INSERT INTO ledger.accounts (id, participant, asset, debits_must_not_exceed_credits)
        VALUES ('td:HSBCHKHH:HKD:wallet:alice', 'HSBCHKHH', 'HKD', true),
               ('td:SCBLHKHH:HKD:wallet:bob', 'SCBLHKHH', 'HKD', true);
        INSERT INTO ledger.balances (account_id) VALUES ('td:HSBCHKHH:HKD:wallet:alice'),
               ('td:SCBLHKHH:HKD:wallet:bob')""")


async def test_bad_keys_are_refused_and_nothing_is_published(gw: Gw) -> None:
    c, body = gw.client, transfer_body()
    key_id = gw.keys.key_ids[HSBC]
    wrong_secret = f"hbk_{key_id}_{'A' * 43}"
    unknown_id = f"hbk_{'0' * 16}_{'A' * 43}"
    cases = [
        ({}, "missing_api_key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "missing_api_key"),
        ({"Authorization": "Bearer not-a-key"}, "invalid_api_key"),
        ({"Authorization": f"Bearer {wrong_secret}"}, "invalid_api_key"),
        ({"Authorization": f"Bearer {unknown_id}"}, "invalid_api_key"),
        (gw.keys.auth("revoked"), "api_key_revoked"),
    ]
    for headers, code in cases:
        response = await c.post(TRANSFERS, json=body, headers=headers)
        expect(response, 401, code)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        expect(await c.get("/v1/balances", headers=headers), 401, code)
    assert await gw.records() == 0


async def test_no_participant_acts_or_reads_for_another(gw: Gw) -> None:
    c, keys = gw.client, gw.keys
    await open_accounts(gw.pool)
    # Control: a valid instruction by SCB does reach Kafka, so "0 more records" below means
    # the refusals stopped them, not a broken topic.
    scb_transfer = transfer_body(payee=BOCHK)
    accepted = await c.post(TRANSFERS, json=scb_transfer, headers=keys.auth(SCB))
    assert accepted.status_code == 202, accepted.text
    assert await gw.records() == 1
    hsbc = keys.auth(HSBC)

    acting = [
        (TRANSFERS, transfer_body(payer_participant=SCB), hsbc, 403, "participant_forbidden"),
        ("/v1/deposits/issue", issue_body(participant_id=SCB), hsbc, 403,
         "participant_forbidden"),
        ("/v1/deposits/redeem", issue_body(participant_id=SCB), hsbc, 403,
         "participant_forbidden"),
        (f"{TRANSFERS}/{scb_transfer['uetr']}/cancel", {"reason": "mine now"}, hsbc, 403,
         "participant_forbidden"),
        (TRANSFERS, transfer_body(payer_participant=HSBC), keys.auth("fa"), 403,
         "role_forbidden"),
        (TRANSFERS, transfer_body(), keys.auth("ops"), 403, "role_forbidden"),
    ]
    for path, body, headers, status, code in acting:
        expect(await c.post(path, json=body, headers=headers), status, code)

    scb_account = "td:SCBLHKHH:HKD:wallet:bob"
    reading = [
        (f"/v1/accounts/{scb_account}/balance", hsbc, 403, "account_forbidden"),
        (f"/v1/accounts/{scb_account}/statement", hsbc, 403, "account_forbidden"),
        ("/v1/accounts/td:nope/balance", hsbc, 403, "account_forbidden"),
        ("/v1/accounts/td:nope/balance", keys.auth("ops"), 404, "account_not_found"),
        (f"/v1/accounts/{scb_account}/balance", keys.auth("fa"), 403, "account_forbidden"),
        (f"/v1/balances?participant={SCB}", hsbc, 403, "participant_forbidden"),
        (f"{TRANSFERS}/{scb_transfer['uetr']}", hsbc, 403, "transfer_forbidden"),
        (f"{TRANSFERS}/{scb_transfer['uetr']}", keys.auth("fa"), 403, "transfer_forbidden"),
        ("/health", hsbc, 403, "role_forbidden"),
        ("/metrics", keys.auth("fa"), 403, "role_forbidden"),
    ]
    for path, headers, status, code in reading:
        expect(await c.get(path, headers=headers), status, code)
    # ...while the owners (and the fund admin of HSBC, and ops) do read theirs.
    own = await c.get("/v1/accounts/td:HSBCHKHH:HKD:wallet:alice/balance", headers=hsbc)
    assert own.status_code == 200 and own.json()["posted"] == "0.00"
    fa = await c.get("/v1/balances", headers=keys.auth("fa"))
    assert [a["account_id"] for a in fa.json()["accounts"]] == ["td:HSBCHKHH:HKD:wallet:alice"]
    ops = await c.get("/v1/balances", headers=keys.auth("ops"))
    assert len(ops.json()["accounts"]) == 2
    status = await c.get(f"{TRANSFERS}/{scb_transfer['uetr']}", headers=keys.auth(SCB))
    assert status.status_code == 200 and status.json()["status"] == "received"
    assert await gw.records() == 1


async def test_bodies_that_are_too_big_malformed_or_invalid(gw: Gw) -> None:
    c, hsbc = gw.client, gw.keys.auth(HSBC)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while streaming
        for _ in range(40):
            yield b" " * 1024

    def raw(text: str | bytes, **extra: str) -> dict[str, Any]:
        return {"content": text, "headers": {**hsbc, "Content-Type": "application/json",
                                             **extra}}

    big = transfer_body(remittance_info="x" * 20_000)
    cases: list[tuple[dict[str, Any], int, str, str | None]] = [
        ({"json": big, "headers": hsbc}, 413, "payload_too_large", None),
        ({"content": chunks(), "headers": {**hsbc, "Content-Type": "application/json"}}, 413,
         "payload_too_large", None),
        (raw('{"uetr": '), 400, "malformed_json", None),
        (raw('{"amount": "1.00", "amount": "1000.00"}'), 400, "malformed_json", None),
        (raw("[1, 2]"), 400, "malformed_json", None),
        (raw('{"amount": NaN}'), 400, "malformed_json", None),
        (raw(b"\xff\xfe"), 400, "malformed_json", None),
        ({"content": json.dumps(transfer_body()), "headers": {**hsbc, "Content-Type":
                                                              "text/plain"}}, 415,
         "unsupported_media_type", None),
        ({"json": {**transfer_body(), "surprise": 1}, "headers": hsbc}, 422, "unknown_field",
         "surprise"),
        ({"json": transfer_body(amount=10.5), "headers": hsbc}, 422, "invalid_amount", "amount"),
        ({"json": transfer_body(amount=10), "headers": hsbc}, 422, "invalid_amount", "amount"),
        ({"json": transfer_body(amount="10.001"), "headers": hsbc}, 422, "invalid_amount",
         "amount"),
        ({"json": transfer_body(amount="1e3"), "headers": hsbc}, 422, "invalid_amount",
         "amount"),
        ({"json": transfer_body(amount="-5.00"), "headers": hsbc}, 422, "invalid_amount",
         "amount"),
        ({"json": transfer_body(amount="0.00"), "headers": hsbc}, 422, "invalid_amount",
         "amount"),
        ({"json": transfer_body(currency="JPY", amount="10.5"), "headers": hsbc}, 422,
         "invalid_amount", "amount"),
        ({"json": transfer_body(currency="EUR"), "headers": hsbc}, 422, "unknown_currency",
         "currency"),
        ({"json": {k: v for k, v in transfer_body().items() if k != "payee_wallet"},
          "headers": hsbc}, 422, "invalid_input", "payee_wallet"),
        ({"json": transfer_body(uetr="not-a-uetr"), "headers": hsbc}, 422, "invalid_input",
         "uetr"),
        ({"json": transfer_body(payee_wallet=7), "headers": hsbc}, 422, "invalid_input",
         "payee_wallet"),
        ({"json": transfer_body(), "headers": {**hsbc, "Idempotency-Key": "has space"}}, 400,
         "invalid_idempotency_key", None),
        ({"json": transfer_body(), "headers": {**hsbc, "Idempotency-Key": "k" * 256}}, 400,
         "invalid_idempotency_key", None),
    ]
    for kwargs, status, code, field in cases:
        body = expect(await c.post(TRANSFERS, **kwargs), status, code)
        if field is not None:
            fields = [e["field"] for e in body["details"]["errors"]]
            assert field in fields, body
            assert field in body["message"], body
    assert await gw.records() == 0


async def test_unknown_routes_and_bad_query_parameters(gw: Gw) -> None:
    c, hsbc = gw.client, gw.keys.auth(HSBC)
    expect(await c.get("/v1/nothing-here", headers=hsbc), 404, "not_found")
    expect(await c.delete(TRANSFERS, headers=hsbc), 405, "method_not_allowed")
    body = expect(await c.get("/v1/balances?limit=0", headers=hsbc), 422, "invalid_input")
    assert body["details"]["errors"][0]["field"] == "limit"
    await open_accounts(gw.pool)
    account = "/v1/accounts/td:HSBCHKHH:HKD:wallet:alice/statement"
    expect(await c.get(f"{account}?cursor=garbage", headers=hsbc), 400, "invalid_cursor")
    body = expect(await c.get(f"{account}?from=2026-01-01T00:00:00", headers=hsbc), 422,
                  "invalid_input")
    assert body["details"]["errors"][0]["field"] == "from"


@pytest.mark.parametrize("path", ["/v1/balances", TRANSFERS])
async def test_rate_limit_per_key(db_url: str, kafka_bootstrap: str, commands_topic: str,
                                  pool: asyncpg.Pool, path: str) -> None:
    keys = await seed(pool)
    async with in_process(db_url, kafka_bootstrap, commands_topic, rate_per_s=0.01,
                          rate_burst=2) as c:
        reading = path == "/v1/balances"
        send = c.get if reading else c.post
        kwargs: dict[str, Any] = {} if reading else {"json": transfer_body()}
        for _ in range(2):
            assert (await send(path, headers=keys.auth(HSBC), **kwargs)).status_code != 429
        body = expect(await send(path, headers=keys.auth(HSBC), **kwargs), 429, "rate_limited")
        assert body["details"]["retry_after_s"] >= 1
        # The bucket is per key: SCB is unaffected.
        assert (await c.get("/v1/balances", headers=keys.auth(SCB))).status_code == 200
