"""Each deposit command lands on the commands topic as the deposits service expects it: the
registered payload, keyed by the UETR, the acting participant in the envelope; and what the
gateway answers when Kafka or PostgreSQL is gone."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg

from services.gateway.publisher import CommandPublisher
from shared.events import deposits as ev
from shared.events.envelope import decode
from tests.integration.gateway.conftest import Gw
from tests.integration.gateway.helpers import (
    HSBC,
    SCB,
    in_process_app,
    issue_body,
    read_records,
    seed,
    transfer_body,
)


async def test_issue_redeem_transfer_cancel_as_wire_commands(gw: Gw) -> None:
    c, hsbc = gw.client, gw.keys.auth(HSBC)
    issue, redeem, transfer = issue_body(), issue_body(amount="5.25"), transfer_body(
        instruction_id="INS-1", remittance_info="invoice 7")
    for path, body in (("/v1/deposits/issue", issue), ("/v1/deposits/redeem", redeem),
                       ("/v1/deposits/transfers", transfer)):
        answer = await c.post(path, json=body, headers=hsbc)
        assert answer.status_code == 202, answer.text
        assert answer.json()["uetr"] == body["uetr"]
    cancel_path = f"/v1/deposits/transfers/{transfer['uetr']}/cancel"
    by_payer = await c.post(cancel_path, json={"reason": "customer request"}, headers=hsbc)
    assert by_payer.status_code == 202, by_payer.text
    by_ops = await c.post(cancel_path, json={"reason": "sanctions hit"},
                          headers=gw.keys.auth("ops"))
    assert by_ops.status_code == 202, by_ops.text
    unknown = await c.post("/v1/deposits/transfers/0f8fad5b-d9cb-469f-a165-70867728950e/cancel",
                           json={"reason": "x"}, headers=hsbc)
    assert (unknown.status_code, unknown.json()["code"]) == (404, "transfer_not_found")

    records = await read_records(gw.bootstrap, gw.topic)
    decoded = {str(decode(r.value)[0].event_id): (r.key, *decode(r.value)) for r in records}
    assert len(decoded) == 5
    by_type: dict[type, list[tuple[bytes, str, object]]] = {}
    for key, envelope, payload in decoded.values():
        by_type.setdefault(type(payload), []).append((key, envelope.participant, payload))
    [(key, actor, minted)] = by_type[ev.IssueDepositToken]
    assert (key, actor) == (issue["uetr"].encode(), HSBC)
    assert minted == ev.IssueDepositToken(participant_id=HSBC, **issue)
    [(_, _, burned)] = by_type[ev.RedeemDepositToken]
    assert burned == ev.RedeemDepositToken(participant_id=HSBC, **redeem)
    [(key, _, instructed)] = by_type[ev.InstructTransfer]
    assert key == transfer["uetr"].encode()
    assert instructed == ev.InstructTransfer(payer_participant=HSBC, **transfer)
    cancels = sorted((actor, p.requested_by, p.reason) for _, actor, p in  # type: ignore[attr-defined]
                     by_type[ev.CancelTransfer])
    assert cancels == [(HSBC, HSBC, "customer request"), ("ops", "ops", "sanctions hit")]


async def test_kafka_or_postgres_gone_answers_503_with_a_code(
        db_url: str, kafka_bootstrap: str, pool: asyncpg.Pool,
        new_topic: Callable[..., Awaitable[str]]) -> None:
    keys = await seed(pool)
    topic = await new_topic("deposits.commands", partitions=1)
    async with in_process_app(db_url, kafka_bootstrap, topic) as (app, c):
        healthy = await c.get("/health", headers=keys.auth("ops"))
        assert healthy.status_code == 200 and healthy.json()["status"] == "ok"

        # From now on the broker is unreachable: a producer for a port where nothing listens.
        await app.state.gateway.publisher.stop()
        app.state.gateway.publisher = CommandPublisher("127.0.0.1:9", timeout_s=1)
        sick = await c.get("/health", headers=keys.auth("ops"))
        assert (sick.status_code, sick.json()["code"]) == (503, "unhealthy")
        checks = sick.json()["details"]["checks"]
        assert (checks["kafka"]["ok"], checks["postgres"]["ok"]) == (False, True)
        refused = await c.post("/v1/deposits/transfers", json=transfer_body(payee=SCB),
                               headers={**keys.auth(HSBC), "Idempotency-Key": "k"})
        assert (refused.status_code, refused.json()["code"]) == (503, "broker_unavailable")
        assert refused.headers["Retry-After"] == "1"

        await app.state.gateway.pool.close()  # and now the database too
        down = await c.get("/v1/balances", headers=keys.auth(HSBC))
        assert (down.status_code, down.json()["code"]) == (503, "database_unavailable")
    assert await read_records(kafka_bootstrap, topic) == []
