"""The ``harbour`` commands: operators manage participants and keys in the database; clients
instruct and read through a running gateway (``python -m services.gateway.app``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import asyncpg
from typer.testing import CliRunner, Result

from services.cli.main import app
from tests.integration.gateway.helpers import HSBC, SCB, subprocess_gateway, uetr

runner = CliRunner()


async def harbour(*args: str, **env: str) -> Result:
    """Run ``harbour args`` in a thread (the commands call asyncio.run themselves)."""
    return await asyncio.to_thread(runner.invoke, app, list(args), env=env)


async def test_operators_add_participants_issue_and_revoke_keys(
        db_url: str, kafka_bootstrap: str, commands_topic: str, pool: asyncpg.Pool,
        tmp_path: Path) -> None:
    db = {"HARBOUR_DATABASE_URL": db_url}
    added = await harbour("participants", "add", HSBC, "--name", "HSBC", "--role", "bank", **db)
    assert added.exit_code == 0, added.output
    again = await harbour("participants", "add", HSBC, "--name", "HSBC", "--role", "bank", **db)
    assert again.exit_code == 1 and "exists" in again.output
    not_bic = await harbour("participants", "add", "hsbc", "--name", "x", "--role", "bank", **db)
    assert not_bic.exit_code == 1 and "BIC" in not_bic.output
    fa = await harbour("participants", "add", "fa-1", "--name", "Admin", "--role", "fund_admin",
                       "--administers", f"{HSBC},{SCB}", **db)
    assert fa.exit_code == 0, fa.output
    listed = json.loads((await harbour("participants", "list", "--json", **db)).stdout)
    assert {p["id"]: p["administers"] for p in listed} == {HSBC: [], "fa-1": [HSBC, SCB]}

    issued = await harbour("keys", "issue", HSBC, "--label", "treasury", **db)
    assert issued.exit_code == 0, issued.output
    token = issued.stdout.strip().splitlines()[-1]
    assert token.startswith("hbk_")
    stored = await pool.fetchrow("SELECT key_id, secret_sha256 FROM gateway.api_keys")
    assert token not in json.dumps({k: str(v) for k, v in dict(stored).items()})
    unknown = await harbour("keys", "issue", "NOBODY", **db)
    assert unknown.exit_code == 1

    async with subprocess_gateway(db_url, kafka_bootstrap, commands_topic, tmp_path) as url:
        client = {"HARBOUR_GATEWAY_URL": url, "HARBOUR_API_KEY": token}
        assert (await harbour("balances", "--json", **client)).exit_code == 0
        revoked = await harbour("keys", "revoke", stored["key_id"], **db)
        assert revoked.exit_code == 0, revoked.output
        refused = await harbour("balances", **client)
        assert refused.exit_code == 1 and "api_key_revoked" in refused.output
        second = (await harbour("keys", "issue", HSBC, **db)).stdout.strip().splitlines()[-1]
        assert (await harbour("balances", HARBOUR_GATEWAY_URL=url,
                              HARBOUR_API_KEY=second)).exit_code == 0
        assert (await harbour("participants", "disable", HSBC, **db)).exit_code == 0
        disabled = await harbour("balances", HARBOUR_GATEWAY_URL=url, HARBOUR_API_KEY=second)
        assert disabled.exit_code == 1 and "participant_disabled" in disabled.output
    keys = json.loads((await harbour("keys", "list", "--json", **db)).stdout)
    assert [(k["label"], k["revoked_at"] is not None) for k in keys] == [("treasury", True),
                                                                         ("", False)]


async def test_clients_instruct_and_read_through_the_gateway(
        db_url: str, kafka_bootstrap: str, commands_topic: str, pool: asyncpg.Pool,
        tmp_path: Path) -> None:
    from tests.integration.gateway.helpers import seed

    keys = await seed(pool)
    await pool.execute("""
        INSERT INTO ledger.accounts (id, participant, asset, debits_must_not_exceed_credits)
        VALUES ('td:HSBCHKHH:HKD:wallet:alice', 'HSBCHKHH', 'HKD', true);
        INSERT INTO ledger.balances (account_id, credits_posted)
        VALUES ('td:HSBCHKHH:HKD:wallet:alice', 12345)""")
    async with subprocess_gateway(db_url, kafka_bootstrap, commands_topic, tmp_path) as url:
        env = {"HARBOUR_GATEWAY_URL": url, "HARBOUR_API_KEY": keys.tokens[HSBC]}
        transfer_id = uetr()
        args = ("deposits", "transfer", "--payer-wallet", "alice", "--payee-participant", SCB,
                "--payee-wallet", "bob", "--currency", "HKD", "--amount", "12.34")
        sent = await harbour(*args, "--uetr", transfer_id, "--json", **env)
        assert sent.exit_code == 0, sent.output
        accepted: dict[str, Any] = json.loads(sent.stdout)
        assert (accepted["uetr"], accepted["status"]) == (transfer_id, "accepted")
        # Re-running the same command line replays (the UETR is the Idempotency-Key).
        replay = json.loads((await harbour(*args, "--uetr", transfer_id, "--json", **env)).stdout)
        assert replay["command_id"] == accepted["command_id"]
        table = await harbour(*args, **env)
        assert table.exit_code == 0 and "accepted" in table.stdout

        status = json.loads((await harbour("deposits", "status", transfer_id, "--json",
                                           **env)).stdout)
        assert (status["status"], status["amount"]) == ("received", "12.34")
        balances = json.loads((await harbour("balances", "--json", **env)).stdout)
        assert [(b["account_id"], b["posted"]) for b in balances] == [
            ("td:HSBCHKHH:HKD:wallet:alice", "123.45")]
        statement = await harbour("statement", "td:HSBCHKHH:HKD:wallet:alice", **env)
        assert statement.exit_code == 0, statement.output

        bad = await harbour(*args[:-1], "12.345", **env)
        assert bad.exit_code == 1 and "invalid_amount" in bad.output and "amount" in bad.output
        other = await harbour("balances", "--participant", SCB, **env)
        assert other.exit_code == 1 and "participant_forbidden" in other.output
        no_key = await harbour("balances", HARBOUR_GATEWAY_URL=url, HARBOUR_API_KEY="")
        assert no_key.exit_code == 1 and "HARBOUR_API_KEY" in no_key.output
    assert await pool.fetchval("SELECT count(*) FROM gateway.commands") == 2
