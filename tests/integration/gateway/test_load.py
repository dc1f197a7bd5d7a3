"""Load through a real server: ``python -m services.gateway.app`` under uvicorn, 1,000 POSTs
from 50 concurrent clients (each its own connection). Every request is answered 202, and the
commands topic holds exactly the accepted commands: none lost, none duplicated.

(With the deposits service running, the issue counts the ledger's postings instead;
test_end_to_end.py does that for a smaller run.)"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import httpx

from shared.events.envelope import decode
from tests.integration.gateway.helpers import (
    HSBC,
    SCB,
    read_records,
    seed,
    subprocess_gateway,
    transfer_body,
)

CLIENTS, PER_CLIENT = 50, 20


async def test_1000_posts_from_50_clients_none_lost(
        db_url: str, kafka_bootstrap: str, commands_topic: str, pool: asyncpg.Pool,
        tmp_path: Path) -> None:
    keys = await seed(pool)
    async with subprocess_gateway(db_url, kafka_bootstrap, commands_topic, tmp_path,
                                  rate_per_s="100000", rate_burst="100000") as url:

        async def client(n: int) -> list[httpx.Response]:
            bank, payee = (HSBC, SCB) if n % 2 else (SCB, HSBC)
            out = []
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                for i in range(PER_CLIENT):
                    headers = {**keys.auth(bank), "Idempotency-Key": f"load-{n}-{i}"}
                    out.append(await http.post("/v1/deposits/transfers", headers=headers,
                                               json=transfer_body(payee=payee)))
            return out

        started = time.perf_counter()
        answers = [r for batch in await asyncio.gather(*(client(n) for n in range(CLIENTS)))
                   for r in batch]
        elapsed = time.perf_counter() - started
        async with httpx.AsyncClient(base_url=url, headers=keys.auth("ops")) as ops:
            health = await ops.get("/health")
            metrics = (await ops.get("/metrics")).text

    assert len(answers) == CLIENTS * PER_CLIENT
    assert {r.status_code for r in answers} == {202}, {r.text for r in answers
                                                       if r.status_code != 202}
    accepted = {r.json()["command_id"] for r in answers}
    assert len(accepted) == CLIENTS * PER_CLIENT
    on_kafka = [str(decode(r.value)[0].event_id) for r in
                await read_records(kafka_bootstrap, commands_topic)]
    assert len(on_kafka) == len(accepted) and set(on_kafka) == accepted
    assert await pool.fetchval("SELECT count(*) FROM gateway.commands") == len(accepted)
    assert health.status_code == 200, health.text
    assert health.json()["checks"]["kafka"]["ok"] and health.json()["checks"]["postgres"]["ok"]
    assert ('harbour_gateway_commands_published_total{type="deposits.InstructTransfer"} 1000.0'
            in metrics)
    print(f"\n1,000 POSTs from {CLIENTS} clients in {elapsed:.2f} s "
          f"({CLIENTS * PER_CLIENT / elapsed:.0f} requests/s)")
