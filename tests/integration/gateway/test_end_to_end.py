"""Through HTTP, with the ledger and the deposits service running (in-process, real Kafka and
PostgreSQL; tests/integration/deposits/harness.py): a bank issues tokens and pays another bank;
both read the settled transfer, their balances and statements. And the issue's load check:
1,000 POSTs from 50 concurrent clients all settle, counted as the ledger's postings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest_asyncio

from services.gateway import repository as repo
from services.gateway.auth import Role
from tests.integration.deposits.harness import ALWAYS_OPEN, HASE, HSBC, World
from tests.integration.gateway.helpers import in_process, uetr

CNH_ALICE, CNH_CAROL, CNH_BOB = ("td:HSBCHKHH:CNH:wallet:alice", "td:HSBCHKHH:CNH:wallet:carol",
                                 "td:HASEHKHH:CNH:wallet:bob")


@pytest_asyncio.fixture
async def world(kafka_bootstrap: str, db_url: str, pool: asyncpg.Pool,
                tmp_path: Path) -> AsyncIterator[World]:
    """HSBC (wallets alice, carol) and Hang Seng (bob) onboarded in CNH, which settles
    interbank in tokenised central-bank money 24/7; HSBC's settlement account funded."""
    w = World(kafka_bootstrap, db_url, pool, config=ALWAYS_OPEN, clock=None, tmp=tmp_path)
    await w.start()
    try:
        await w.onboard(currencies=("CNH",),
                        wallets=((HSBC, "alice"), (HSBC, "carol"), (HASE, "bob")))
        await w.fund(HSBC, "CNH", "1000000.00")
        yield w
    finally:
        await w.close()


async def bank_keys(pool: asyncpg.Pool) -> dict[str, dict[str, str]]:
    headers = {}
    async with pool.acquire() as conn:
        for bank in (HSBC, HASE):
            await repo.add_participant(conn, bank, bank, Role.BANK)
            key = await repo.issue_key(conn, bank)
            headers[bank] = {"Authorization": f"Bearer {key.token}"}
    return headers


async def until(what: str, check: Any, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def test_a_bank_issues_and_pays_another_bank_through_http(world: World,
                                                               pool: asyncpg.Pool) -> None:
    keys = await bank_keys(pool)
    async with in_process(world.db_url, world.bootstrap, world.commands) as c:
        issue = {"uetr": uetr(), "end_to_end_id": "ISSUE-1", "wallet_id": "alice",
                 "currency": "CNH", "amount": "100.00"}
        assert (await c.post("/v1/deposits/issue", json=issue,
                             headers=keys[HSBC])).status_code == 202
        transfer = {"uetr": uetr(), "end_to_end_id": "PAY-1", "payer_wallet": "alice",
                    "payee_participant": HASE, "payee_wallet": "bob", "currency": "CNH",
                    "amount": "30.00", "remittance_info": "invoice 42"}
        sent = await c.post("/v1/deposits/transfers", json=transfer, headers=keys[HSBC])
        assert sent.status_code == 202, sent.text
        status_url = sent.json()["status_url"]

        async def settled() -> Any:
            body = (await c.get(status_url, headers=keys[HASE])).json()
            return body if body["status"] in ("settled", "failed", "rejected") else None

        final = await until("transfer settled", settled)
        assert (final["status"], final["code"]) == ("settled", None), final
        assert (await c.get(status_url, headers=keys[HSBC])).json()["status"] == "settled"

        alice = (await c.get(f"/v1/accounts/{CNH_ALICE}/balance", headers=keys[HSBC])).json()
        bob = (await c.get(f"/v1/accounts/{CNH_BOB}/balance", headers=keys[HASE])).json()
        assert (alice["posted"], alice["available"], alice["pending"]) == ("70.00", "70.00",
                                                                           "0.00")
        assert (bob["posted"], bob["available"]) == ("30.00", "30.00")
        paid = (await c.get(f"/v1/accounts/{CNH_ALICE}/statement", headers=keys[HSBC])).json()
        assert [(e["direction"], e["amount"], e["balance"]) for e in paid["entries"]] == [
            ("credit", "100.00", "100.00"), ("debit", "30.00", "70.00")]
        # The interbank leg posts when its settlement group commits (td:<uetr>:commit).
        assert paid["entries"][1]["posting_id"] == f"td:{transfer['uetr']}:commit"
        got = (await c.get(f"/v1/accounts/{CNH_BOB}/statement", headers=keys[HASE])).json()
        assert [(e["direction"], e["amount"], e["balance"]) for e in got["entries"]] == [
            ("credit", "30.00", "30.00")]
        # Neither bank reads the other's wallet.
        other = await c.get(f"/v1/accounts/{CNH_BOB}/balance", headers=keys[HSBC])
        assert (other.status_code, other.json()["code"]) == (403, "account_forbidden")
    await world.assert_books()


async def test_1000_posts_from_50_clients_all_settle_as_ledger_postings(
        world: World, pool: asyncpg.Pool) -> None:
    """Intra-bank transfers settle as one ledger posting each (``td:<uetr>:transfer``): every
    accepted POST must turn into exactly one posting."""
    keys = await bank_keys(pool)
    await world.issue(HSBC, "alice", "CNH", "100000.00")
    clients, per_client = 50, 20
    async with in_process(world.db_url, world.bootstrap, world.commands,
                          rate_per_s=100000, rate_burst=100000) as c:

        async def client() -> list[httpx.Response]:
            out = []
            for _ in range(per_client):
                body = {"uetr": uetr(), "end_to_end_id": "LOAD", "payer_wallet": "alice",
                        "payee_participant": HSBC, "payee_wallet": "carol", "currency": "CNH",
                        "amount": "1.00"}
                out.append(await c.post("/v1/deposits/transfers", json=body, headers={
                    **keys[HSBC], "Idempotency-Key": body["uetr"]}))
            return out

        answers = [r for batch in await asyncio.gather(*(client() for _ in range(clients)))
                   for r in batch]
    assert [r.status_code for r in answers] == [202] * clients * per_client
    accepted = {r.json()["uetr"] for r in answers}
    sql = "SELECT count(*) FROM ledger.postings WHERE id LIKE 'td:%:transfer'"

    async def all_posted() -> bool:
        return await pool.fetchval(sql) >= len(accepted)

    await until("1000 postings", all_posted, timeout_s=180)
    postings = {r["id"].split(":")[1] for r in await pool.fetch(
        "SELECT id FROM ledger.postings WHERE id LIKE 'td:%:transfer'")}
    assert postings == accepted
    carol = await pool.fetchval("SELECT credits_posted - debits_posted FROM ledger.balances "
                                "WHERE account_id = $1", CNH_CAROL)
    assert carol == 100 * len(accepted)
    await world.quiet()
    await world.assert_books()
