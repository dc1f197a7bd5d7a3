"""``harbour participants|keys ...`` (operators, straight to PostgreSQL) and
``harbour deposits ...``, ``harbour balances``, ``harbour statement`` (clients of the gateway,
with ``HARBOUR_API_KEY`` and ``HARBOUR_GATEWAY_URL``; rich tables, or ``--json``)."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import httpx
import typer
from rich.console import Console
from rich.table import Table

from shared.config import PostgresSettings

from . import repository as repo
from .auth import Role
from .settings import GatewayClientSettings

participants_app = typer.Typer(help="Gateway participants (operator; direct database access).",
                               no_args_is_help=True)
keys_app = typer.Typer(help="Gateway API keys (operator; direct database access).",
                       no_args_is_help=True)
deposits_app = typer.Typer(help="Tokenized-deposit instructions through the gateway.",
                           no_args_is_help=True)
client_app = typer.Typer(help="Reads through the gateway.")
console = Console()
T = TypeVar("T")
JsonOpt = typer.Option(False, "--json", help="print the gateway's JSON instead of a table")


# --- operator commands (database) ---------------------------------------------------------------


def _with_db(work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    async def run() -> T:
        conn = await asyncpg.connect(PostgresSettings().database_url)
        try:
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(run())


@participants_app.command("add")
def participants_add(
    participant_id: str = typer.Argument(..., help="BIC for a bank; any id for others"),
    name: str = typer.Option(..., help="display name"),
    role: Role = typer.Option(..., help="bank | fund_admin | ops"),
    administers: str = typer.Option("", help="fund_admin: comma-separated participant ids"),
) -> None:
    """Register a participant that may hold API keys."""
    from shared.events.deposits import PARTICIPANT_PATTERN

    if role is Role.BANK and not _matches(PARTICIPANT_PATTERN, participant_id):
        _fail("a bank's participant id is its BIC (8 or 11 characters, e.g. HSBCHKHH)")
    managed = [p.strip() for p in administers.split(",") if p.strip()]
    try:
        _with_db(lambda c: repo.add_participant(c, participant_id, name, role, managed))
    except (repo.ParticipantExistsError, ValueError, asyncpg.CheckViolationError) as exc:
        _fail(str(exc))
    console.print(f"participant [bold]{participant_id}[/] added as {role.value}")


@participants_app.command("disable")
def participants_disable(participant_id: str = typer.Argument(...)) -> None:
    """Disable a participant: all its keys are refused (401 participant_disabled) at once."""
    if not _with_db(lambda c: repo.disable_participant(c, participant_id)):
        _fail(f"no participant {participant_id}")
    console.print(f"participant {participant_id} disabled")


@participants_app.command("list")
def participants_list(as_json: bool = JsonOpt) -> None:
    """Every participant with its role and number of active keys."""
    rows = _with_db(repo.list_participants)
    _records(rows, as_json, ("id", "name", "role", "administers", "active_keys", "disabled_at"))


@keys_app.command("issue")
def keys_issue(
    participant_id: str = typer.Argument(...),
    label: str = typer.Option("", help="what the key is for (shown in keys list)"),
    expires_days: int | None = typer.Option(None, min=1, help="expire after this many days"),
) -> None:
    """Issue a key; the token is printed once and never stored (only its sha256 is)."""
    expires = None if expires_days is None else datetime.now(UTC) + timedelta(days=expires_days)
    try:
        key = _with_db(lambda c: repo.issue_key(c, participant_id, label, expires))
    except repo.UnknownParticipantError as exc:
        _fail(str(exc))
    console.print(f"key id {key.key_id} for {participant_id}; store the token now, it is not "
                  "shown again:", highlight=False)
    print(key.token)  # plain stdout, so `TOKEN=$(harbour keys issue X | tail -1)` works


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(...)) -> None:
    """Revoke a key; the next request with it is refused (401 api_key_revoked)."""
    if not _with_db(lambda c: repo.revoke_key(c, key_id)):
        _fail(f"no key {key_id}")
    console.print(f"key {key_id} revoked")


@keys_app.command("list")
def keys_list(participant: str | None = typer.Option(None), as_json: bool = JsonOpt) -> None:
    """Keys (never their secrets), active and revoked."""
    rows = _with_db(lambda c: repo.list_keys(c, participant))
    _records(rows, as_json, ("key_id", "participant_id", "label", "created_at", "expires_at",
                             "revoked_at"))


# --- gateway clients (HTTP) ---------------------------------------------------------------------


def _call(method: str, path: str, *, body: dict[str, Any] | None = None,
          params: dict[str, Any] | None = None, idempotency_key: str | None = None) -> Any:
    settings = GatewayClientSettings()
    api_key = settings.api_key.get_secret_value() if settings.api_key is not None else ""
    if not api_key:
        _fail("set HARBOUR_API_KEY to a gateway API key (harbour keys issue)")
    headers = {"Authorization": f"Bearer {api_key}"}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    try:
        with httpx.Client(base_url=settings.gateway_url,
                          timeout=settings.gateway_timeout_s) as client:
            response = client.request(method, path, json=body, headers=headers,
                                      params={k: v for k, v in (params or {}).items()
                                              if v is not None})
    except httpx.HTTPError as exc:
        _fail(f"gateway {settings.gateway_url} unreachable: {exc}")
    data = response.json() if response.content else {}
    if response.status_code >= 400:
        _api_failure(response.status_code, data)
    return data


def _api_failure(status: int, data: Any) -> None:
    if isinstance(data, dict) and "code" in data:
        console.print(f"[red]{status} {data['code']}[/]: {data.get('message', '')}",
                      highlight=False)
        for err in data.get("details", {}).get("errors", []):
            console.print(f"  {err.get('field')}: {err.get('message')}", highlight=False)
    else:
        console.print(f"[red]{status}[/] {data}")
    raise typer.Exit(1)


def _command(path: str, body: dict[str, Any], idempotency_key: str | None, as_json: bool) -> None:
    # The UETR is the natural idempotency key of an instruction: a re-run of the same command
    # line (same --uetr) replays the first answer instead of instructing twice.
    data = _call("POST", path, body=body, idempotency_key=idempotency_key or body.get("uetr"))
    _records(data, as_json, ("command_id", "command_type", "uetr", "status", "accepted_at"))


@deposits_app.command("transfer")
def deposits_transfer(
    payer_wallet: str = typer.Option(...), payee_participant: str = typer.Option(...),
    payee_wallet: str = typer.Option(...), currency: str = typer.Option(...),
    amount: str = typer.Option(..., help='decimal string, e.g. "1250.75"'),
    uetr: str | None = typer.Option(None, help="UETR (UUIDv4); generated when omitted"),
    end_to_end_id: str = typer.Option("NOTPROVIDED"),
    remittance_info: str | None = typer.Option(None),
    idempotency_key: str | None = typer.Option(None, help="default: the UETR"),
    as_json: bool = JsonOpt,
) -> None:
    """Instruct a transfer from one of your wallets; prints the accepted command."""
    body = {"uetr": uetr or str(uuid.uuid4()), "end_to_end_id": end_to_end_id,
            "payer_wallet": payer_wallet, "payee_participant": payee_participant,
            "payee_wallet": payee_wallet, "currency": currency, "amount": amount,
            "remittance_info": remittance_info}
    _command("/v1/deposits/transfers", {k: v for k, v in body.items() if v is not None},
             idempotency_key, as_json)


def _conversion(kind: str, wallet: str, currency: str, amount: str, uetr: str | None,
                end_to_end_id: str, as_json: bool) -> None:
    body = {"uetr": uetr or str(uuid.uuid4()), "end_to_end_id": end_to_end_id,
            "wallet_id": wallet, "currency": currency, "amount": amount}
    _command(f"/v1/deposits/{kind}", body, None, as_json)


@deposits_app.command("issue")
def deposits_issue(wallet: str = typer.Option(...), currency: str = typer.Option(...),
                   amount: str = typer.Option(...), uetr: str | None = typer.Option(None),
                   end_to_end_id: str = typer.Option("NOTPROVIDED"),
                   as_json: bool = JsonOpt) -> None:
    """Issue (mint) deposit tokens into one of your customers' wallets."""
    _conversion("issue", wallet, currency, amount, uetr, end_to_end_id, as_json)


@deposits_app.command("redeem")
def deposits_redeem(wallet: str = typer.Option(...), currency: str = typer.Option(...),
                    amount: str = typer.Option(...), uetr: str | None = typer.Option(None),
                    end_to_end_id: str = typer.Option("NOTPROVIDED"),
                    as_json: bool = JsonOpt) -> None:
    """Redeem (burn) deposit tokens from one of your customers' wallets."""
    _conversion("redeem", wallet, currency, amount, uetr, end_to_end_id, as_json)


@deposits_app.command("cancel")
def deposits_cancel(uetr: str = typer.Argument(...), reason: str = typer.Option(...),
                    as_json: bool = JsonOpt) -> None:
    """Cancel a queued transfer you pay (or any, with an ops key)."""
    _command(f"/v1/deposits/transfers/{uetr}/cancel", {"reason": reason},
             f"cancel:{uetr}", as_json)


@deposits_app.command("status")
def deposits_status(uetr: str = typer.Argument(...), as_json: bool = JsonOpt) -> None:
    """Status of a transfer you pay or receive."""
    data = _call("GET", f"/v1/deposits/transfers/{uetr}")
    _records(data, as_json, ("uetr", "status", "code", "payer_participant",
                               "payee_participant", "currency", "amount", "updated_at"))


@client_app.command("balances")
def balances(participant: str | None = typer.Option(None, help="default: all you may read"),
             asset: str | None = typer.Option(None), as_json: bool = JsonOpt) -> None:
    """Posted, pending and available balances of your accounts (every page)."""
    accounts: list[dict[str, Any]] = []
    after: str | None = ""
    while after is not None:
        page = _call("GET", "/v1/balances", params={"participant": participant, "asset": asset,
                                                      "after": after, "limit": 1000})
        accounts.extend(page["accounts"])
        after = page["next_after"]
    _records(accounts, as_json, ("account_id", "participant", "asset", "status", "posted",
                                 "pending", "available"))


@client_app.command("statement")
def statement(account: str = typer.Argument(..., help="ledger account id"),
              from_: datetime | None = typer.Option(None, "--from", help="value date from (UTC "
                                                    "if no offset)"),
              to: datetime | None = typer.Option(None, help="value date before"),
              limit: int = typer.Option(1000, min=1, help="entries to print at most"),
              as_json: bool = JsonOpt) -> None:
    """Posted entries of one account with the running balance."""
    params: dict[str, Any] = {"from": _iso(from_), "to": _iso(to), "limit": min(limit, 1000)}
    first = page = _call("GET", f"/v1/accounts/{account}/statement", params=params)
    entries: list[dict[str, Any]] = list(page["entries"])
    while len(entries) < limit and page["next_cursor"] is not None:
        params["cursor"] = page["next_cursor"]
        page = _call("GET", f"/v1/accounts/{account}/statement", params=params)
        entries.extend(page["entries"])
    entries = entries[:limit]
    closing = entries[-1]["balance"] if entries else first["opening_balance"]
    more = len(entries) == limit and page["next_cursor"] is not None
    if as_json:
        print(json.dumps({**first, "entries": entries, "closing_balance": closing,
                          "next_cursor": page["next_cursor"] if more else None}, indent=2))
        return
    console.print(f"{account} ({first['asset']}): opening {first['opening_balance']}, "
                  f"closing {closing}{' (more entries: raise --limit)' if more else ''}",
                  highlight=False)
    _records(entries, False, ("effective_at", "posting_id", "kind", "direction", "amount",
                              "balance"))


# --- output -------------------------------------------------------------------------------------


def _records(data: Any, as_json: bool, columns: tuple[str, ...]) -> None:
    """A dict or a list of rows: as a table, or (``--json``) as JSON of the same shape."""
    items = [dict(data)] if isinstance(data, dict) else [dict(r) for r in data]
    if as_json:
        out = items[0] if isinstance(data, dict) else items
        print(json.dumps(out, indent=2, default=str))
        return
    table = Table(*columns)
    for item in items:
        table.add_row(*("" if item.get(c) is None else str(item.get(c)) for c in columns))
    console.print(table)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def _matches(pattern: str, value: str) -> bool:
    return re.fullmatch(pattern, value) is not None


def _fail(message: str) -> Any:
    console.print(f"[red]error[/]: {message}", highlight=False)
    raise typer.Exit(1)
