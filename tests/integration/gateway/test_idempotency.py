"""Idempotency-Key: replay, conflict, concurrency, and recovery after a failed publish."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable

import asyncpg

from services.gateway.body import request_hash
from shared.events.envelope import decode
from shared.events.topics import TopicSpec
from shared.messaging.admin import ensure_topics
from tests.integration.gateway.conftest import Gw
from tests.integration.gateway.helpers import (
    HSBC,
    SCB,
    in_process,
    read_records,
    seed,
    transfer_body,
)

TRANSFERS = "/v1/deposits/transfers"


def with_key(gw: Gw, bank: str, key: str) -> dict[str, str]:
    return {**gw.keys.auth(bank), "Idempotency-Key": key}


async def test_same_key_and_body_replays_the_first_response(gw: Gw) -> None:
    body = transfer_body()
    first = await gw.client.post(TRANSFERS, json=body, headers=with_key(gw, HSBC, "k-1"))
    assert first.status_code == 202, first.text
    assert "Idempotent-Replayed" not in first.headers
    # Same JSON value, other key order and whitespace: the same request.
    same = json.dumps(dict(reversed(list(body.items()))), indent=4)
    headers = {**with_key(gw, HSBC, "k-1"), "Content-Type": "application/json"}
    for _ in range(3):
        again = await gw.client.post(TRANSFERS, content=same, headers=headers)
        assert again.status_code == 202
        assert again.json() == first.json()
        assert again.headers["Idempotent-Replayed"] == "true"
    records = await read_records(gw.bootstrap, gw.topic)
    assert len(records) == 1
    envelope, payload = decode(records[0].value)
    assert str(envelope.event_id) == first.json()["command_id"]
    assert envelope.participant == HSBC and envelope.producer == "gateway"
    assert payload.model_dump()["payer_participant"] == HSBC
    assert records[0].key == body["uetr"].encode()


async def test_same_key_other_body_or_route_is_a_conflict(gw: Gw) -> None:
    body = transfer_body()
    first = await gw.client.post(TRANSFERS, json=body, headers=with_key(gw, HSBC, "k-2"))
    assert first.status_code == 202
    other = {**body, "amount": "11.00"}
    conflict = await gw.client.post(TRANSFERS, json=other, headers=with_key(gw, HSBC, "k-2"))
    assert conflict.status_code == 409
    assert conflict.json()["code"] == "idempotency_conflict"
    issue = {k: body[k] for k in ("uetr", "end_to_end_id", "currency", "amount")}
    elsewhere = await gw.client.post("/v1/deposits/issue", json={**issue, "wallet_id": "alice"},
                                     headers=with_key(gw, HSBC, "k-2"))
    assert elsewhere.json()["code"] == "idempotency_conflict"
    # Keys are per participant: SCB's "k-2" is its own.
    scb = await gw.client.post(TRANSFERS, json=transfer_body(payee=HSBC),
                               headers=with_key(gw, SCB, "k-2"))
    assert scb.status_code == 202
    assert len(await read_records(gw.bootstrap, gw.topic)) == 2


async def test_concurrent_requests_with_one_key_publish_once(gw: Gw) -> None:
    body = transfer_body()
    answers = await asyncio.gather(*(
        gw.client.post(TRANSFERS, json=body, headers=with_key(gw, HSBC, "k-3"))
        for _ in range(20)))
    accepted = [a for a in answers if a.status_code == 202]
    busy = [a for a in answers if a.status_code == 409]
    assert len(accepted) + len(busy) == 20
    assert {a.json()["code"] for a in busy} <= {"idempotency_in_progress"}
    assert len({a.json()["command_id"] for a in accepted}) == 1
    assert all(a.headers.get("Retry-After") == "1" for a in busy)
    assert len(await read_records(gw.bootstrap, gw.topic)) == 1


async def test_a_stale_claim_is_taken_over_with_its_command_id(gw: Gw) -> None:
    """A gateway that died between claim and answer leaves a pending row; a retry after the
    stale time republishes under the claimed command id (consumers dedupe on it)."""
    body = transfer_body()
    claimed = uuid.uuid4()
    await gw.pool.execute(
        "INSERT INTO gateway.idempotency (participant_id, idem_key, request_hash, command_id, "
        "state, claimed_at) VALUES ($1, 'k-4', $2, $3, 'pending', now() - interval '1 hour')",
        HSBC, request_hash("POST", TRANSFERS, body), claimed)
    fresh = await gw.client.post(TRANSFERS, json=body, headers=with_key(gw, HSBC, "k-4"))
    assert fresh.status_code == 202, fresh.text
    assert fresh.json()["command_id"] == str(claimed)
    # A claim that is not stale yet answers "in progress".
    await gw.pool.execute(
        "INSERT INTO gateway.idempotency (participant_id, idem_key, request_hash, command_id, "
        "state) VALUES ($1, 'k-5', $2, $3, 'pending')",
        HSBC, request_hash("POST", TRANSFERS, body), uuid.uuid4())
    busy = await gw.client.post(TRANSFERS, json=body, headers=with_key(gw, HSBC, "k-5"))
    assert busy.status_code == 409 and busy.json()["code"] == "idempotency_in_progress"


async def test_failed_publish_answers_503_and_a_retry_reuses_the_command_id(
        db_url: str, kafka_bootstrap: str, pool: asyncpg.Pool,
        new_topic: Callable[..., Awaitable[str]]) -> None:
    """Kafka cannot take the record (its topic does not exist yet): 503, nothing stored as an
    answer; once it can, the retry with the same key is accepted under the first command id."""
    keys = await seed(pool)
    missing = f"deposits.commands.missing-{uuid.uuid4().hex[:8]}"
    body = transfer_body()
    headers = {**keys.auth(HSBC), "Idempotency-Key": "k-6"}
    async with in_process(db_url, kafka_bootstrap, missing, publish_timeout_s=1.5) as c:
        failed = await c.post(TRANSFERS, json=body, headers=headers)
        assert failed.status_code == 503, failed.text
        assert failed.json()["code"] == "broker_unavailable"
        row = await pool.fetchrow("SELECT state, command_id FROM gateway.idempotency "
                                  "WHERE idem_key = 'k-6'")
        assert row["state"] == "pending"
        await ensure_topics(kafka_bootstrap, [TopicSpec(missing, 2)])
        retried = await c.post(TRANSFERS, json=body, headers=headers)
        assert retried.status_code == 202, retried.text
        assert retried.json()["command_id"] == str(row["command_id"])
    records = await read_records(kafka_bootstrap, missing)
    assert [str(decode(r.value)[0].event_id) for r in records] == [str(row["command_id"])]
