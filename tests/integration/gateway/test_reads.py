"""Balances and statements through HTTP from the ledger's read side, written by the real ledger
writer from real Kafka commands."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from services.ledger.consumer import WriterLoop
from services.ledger.writer import LedgerWriter
from shared.events import ledger as wire
from shared.store.outbox import OutboxRelay
from tests.integration.gateway.conftest import Gw
from tests.integration.gateway.helpers import HSBC, SCB
from tests.support import ledger as L
from tests.support.ledger_run import publish, wait_for

T0 = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)
LIABILITY, ALICE, BOB = ("td:HSBCHKHH:HKD:liability", "td:HSBCHKHH:HKD:wallet:alice",
                         "td:SCBLHKHH:HKD:wallet:bob")


def post(posting_id: str, debit: str, credit: str, amount: str, at: datetime) -> bytes:
    return L.record(wire.Post(
        posting_id=posting_id, effective_at=at,
        entries=[L.entry(debit, "HKD", "debit", amount), L.entry(credit, "HKD", "credit", amount)],
        references=wire.References(uetr=f"uetr-{posting_id}", description=posting_id)))


def open_account(account_id: str, participant: str, **flags: bool) -> bytes:
    return L.record(wire.OpenAccount(account_id=account_id, participant=participant, asset="HKD",
                                     **flags), participant=participant)


async def run_ledger(gw: Gw, new_topic: Callable[..., Awaitable[str]]) -> None:
    """Accounts of HSBC (token liability, debit-normal; alice's wallet) and SCB (bob's wallet),
    three postings on distinct value dates and one pending, applied by the ledger writer."""
    topic = await new_topic("ledger.commands", partitions=1)
    commands = [  # HKD (scale 2) is on the ledger already: the gw fixture defined it
        open_account(LIABILITY, HSBC, credits_must_not_exceed_debits=True),
        open_account(ALICE, HSBC, debits_must_not_exceed_credits=True),
        open_account(BOB, SCB, debits_must_not_exceed_credits=True),
        post("p1", LIABILITY, ALICE, "100.00", T0),
        post("p2", ALICE, BOB, "30.00", T0 + timedelta(hours=1)),
        post("p3", LIABILITY, ALICE, "5.50", T0 + timedelta(hours=2)),
        L.pending("p4", ALICE, BOB, "HKD", "20.00", timeout_s=3600),
    ]
    pool = gw.pool
    writer = WriterLoop(pool, LedgerWriter(pool, topic=topic), gw.bootstrap, topic=topic,
                        group_id=f"writer-{topic}")
    relay = OutboxRelay(pool, "ledger", gw.bootstrap, poll_interval_s=0.2)
    tasks = [asyncio.create_task(writer.run()), asyncio.create_task(relay.run())]
    try:
        await publish(gw.bootstrap, topic, [(c, b"k") for c in commands])

        async def applied() -> bool:
            return await pool.fetchval("SELECT count(*) FROM ledger.results") == len(commands)

        await wait_for("ledger results", applied, timeout_s=60)
    finally:
        writer.stop()
        relay.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
    rejected = await pool.fetch("SELECT command_id, code FROM ledger.results WHERE NOT accepted")
    assert not rejected, rejected


async def get(gw: Gw, path: str, who: str, **params: Any) -> Any:
    response = await gw.client.get(path, headers=gw.keys.auth(who), params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def test_balances_posted_pending_available(gw: Gw, new_topic) -> None:  # type: ignore[no-untyped-def]
    await run_ledger(gw, new_topic)
    alice = await get(gw, f"/v1/accounts/{ALICE}/balance", HSBC)
    assert alice == {
        "account_id": ALICE, "participant": HSBC, "asset": "HKD", "scale": 2, "status": "open",
        "normal_side": "credit", "posted": "75.50", "pending_debits": "20.00",
        "pending_credits": "0.00", "pending": "-20.00", "available": "55.50"}
    liability = await get(gw, f"/v1/accounts/{LIABILITY}/balance", "fa")
    assert (liability["normal_side"], liability["posted"]) == ("debit", "105.50")
    bob = await get(gw, f"/v1/accounts/{quote(BOB)}/balance", SCB)
    assert (bob["posted"], bob["pending"], bob["available"]) == ("30.00", "20.00", "30.00")
    own = await get(gw, "/v1/balances", HSBC)
    assert [a["account_id"] for a in own["accounts"]] == [LIABILITY, ALICE]
    page = await get(gw, "/v1/balances", "ops", limit=2)
    assert [a["account_id"] for a in page["accounts"]] == [LIABILITY, ALICE]
    rest = await get(gw, "/v1/balances", "ops", limit=2, after=page["next_after"])
    assert ([a["account_id"] for a in rest["accounts"]], rest["next_after"]) == ([BOB], None)


async def test_statement_running_balance_pages_and_time_range(gw: Gw, new_topic) -> None:  # type: ignore[no-untyped-def]
    await run_ledger(gw, new_topic)
    path = f"/v1/accounts/{ALICE}/statement"
    whole = await get(gw, path, HSBC)
    assert [(e["posting_id"], e["direction"], e["amount"], e["balance"])
            for e in whole["entries"]] == [("p1", "credit", "100.00", "100.00"),
                                           ("p2", "debit", "30.00", "70.00"),
                                           ("p3", "credit", "5.50", "75.50")]
    assert (whole["opening_balance"], whole["closing_balance"]) == ("0.00", "75.50")
    assert whole["entries"][0]["references"] == {"uetr": "uetr-p1", "description": "p1"}
    assert whole["next_cursor"] is None

    first = await get(gw, path, HSBC, limit=2)
    assert [e["posting_id"] for e in first["entries"]] == ["p1", "p2"]
    second = await get(gw, path, HSBC, limit=2, cursor=first["next_cursor"])
    assert [e["posting_id"] for e in second["entries"]] == ["p3"]
    assert (second["opening_balance"], second["closing_balance"]) == ("70.00", "75.50")
    assert second["next_cursor"] is None

    ranged = await get(gw, path, HSBC, **{"from": (T0 + timedelta(minutes=30)).isoformat(),
                                          "to": (T0 + timedelta(hours=2)).isoformat()})
    assert [e["posting_id"] for e in ranged["entries"]] == ["p2"]
    assert (ranged["opening_balance"], ranged["closing_balance"]) == ("100.00", "70.00")
    # The debit-normal liability runs the other way round.
    liability = await get(gw, f"/v1/accounts/{LIABILITY}/statement", "ops")
    assert [e["balance"] for e in liability["entries"]] == ["100.00", "105.50"]
