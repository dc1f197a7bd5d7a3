"""GET transfer status, balances and statements. A bank reads its own accounts, a fund
administrator those of the participants it administers, ops everything. An account the key may
not read answers 403 ``account_forbidden`` whether or not it exists, so ids cannot be probed."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Final

import asyncpg
from fastapi import APIRouter, Depends, Path, Query
from pydantic import AwareDatetime

from services.gateway.auth import Principal, authenticate
from services.gateway.context import Gateway, gateway_of
from services.gateway.errors import ApiError
from services.gateway.ledger_read import Position, metadata_of, signed
from services.gateway.repository import transfer_status
from services.gateway.routes.common import error_responses
from services.gateway.schemas import (
    AccountBalance,
    BalancesPage,
    StatementEntry,
    StatementPage,
    TransferStatus,
)
from shared.events.deposits import UETR_PATTERN
from shared.money import format_amount

router = APIRouter(prefix="/v1", tags=["reads"])

AnyKey = Annotated[Principal, Depends(authenticate)]
Ctx = Annotated[Gateway, Depends(gateway_of)]
AccountId = Annotated[str, Path(min_length=1, max_length=128, description="ledger account id")]
_ERRORS = error_responses(400, 401, 403, 404, 422, 429, 503)
_BEGINNING: Final = datetime(1970, 1, 1, tzinfo=UTC)
_END_OF_TIME: Final = datetime(9999, 1, 1, tzinfo=UTC)


@router.get("/deposits/transfers/{uetr}", response_model=TransferStatus, responses=_ERRORS,
            summary="Status of a transfer the caller pays or receives")
async def get_transfer(uetr: Annotated[str, Path(pattern=UETR_PATTERN)], principal: AnyKey,
                       gateway: Ctx) -> TransferStatus:
    row = await transfer_status(gateway.pool, uetr)
    if row is None:
        raise ApiError(404, "transfer_not_found", f"no transfer {uetr} was accepted here",
                       uetr=uetr)
    if not (principal.can_read(row["payer_participant"])
            or principal.can_read(row["payee_participant"])):
        raise ApiError(403, "transfer_forbidden", "this transfer is not one of yours", uetr=uetr)
    fields = {name: row[name] for name in TransferStatus.model_fields}
    return TransferStatus.model_validate(fields)


@router.get("/balances", response_model=BalancesPage, responses=_ERRORS,
            summary="Balances of every readable account (paginated by account id)")
async def list_balances(
    principal: AnyKey, gateway: Ctx,
    participant: Annotated[str | None, Query(max_length=64)] = None,
    asset: Annotated[str | None, Query(max_length=64)] = None,
    after: Annotated[str, Query(max_length=128, description="last account id seen")] = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> BalancesPage:
    owners: frozenset[str] | None
    if participant is not None:
        if not principal.can_read(participant):
            raise ApiError(403, "participant_forbidden", f"this key may not read {participant}",
                           participant=participant)
        owners = frozenset({participant})
    else:
        owners = principal.readable()
    rows = await gateway.ledger.accounts(owners, asset, after, limit + 1)
    page = [balance_of(r) for r in rows[:limit]]
    return BalancesPage(accounts=page, next_after=page[-1].account_id if len(rows) > limit
                        else None)


@router.get("/accounts/{account_id:path}/balance", response_model=AccountBalance,
            responses=_ERRORS, summary="Posted, pending and available balance of one account")
async def get_balance(account_id: AccountId, principal: AnyKey, gateway: Ctx) -> AccountBalance:
    return balance_of(await _readable_account(gateway, principal, account_id))


@router.get("/accounts/{account_id:path}/statement", response_model=StatementPage,
            responses=_ERRORS, response_model_by_alias=True,
            summary="Posted entries by value date with the running balance (paginated)")
async def get_statement(
    account_id: AccountId, principal: AnyKey, gateway: Ctx,
    start: Annotated[AwareDatetime | None, Query(alias="from", description="value date from "
                                                 "(inclusive), ISO 8601 with offset")] = None,
    end: Annotated[AwareDatetime | None, Query(alias="to", description="value date before "
                                               "(exclusive)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=512, description="next_cursor of the "
                                        "previous page")] = None,
) -> StatementPage:
    account = await _readable_account(gateway, principal, account_id)
    start, end = start or _BEGINNING, end or _END_OF_TIME
    after = Position(start)
    if cursor is not None:
        after = max(Position.decode(cursor), after, key=_order)
    opening, rows = await gateway.ledger.statement(account_id, start, end, after, limit + 1)
    scale, debit_normal = account["scale"], account["debit_normal"]
    running = signed(debit_normal, opening)
    opening_balance = running
    entries = []
    for r in rows[:limit]:
        amount = int(r["amount"])
        running += signed(debit_normal, amount if r["direction"] == "D" else -amount)
        entries.append(StatementEntry(
            posting_id=r["posting_id"], kind=r["kind"], effective_at=r["effective_at"],
            recorded_at=r["recorded_at"], direction="debit" if r["direction"] == "D" else "credit",
            amount=format_amount(amount, scale), balance=format_amount(running, scale),
            references=metadata_of(r)))
    last = rows[limit - 1] if len(rows) > limit else None
    next_cursor = None if last is None else Position(
        last["effective_at"], last["partition"], last["sequence"], last["idx"]).encode()
    return StatementPage(account_id=account_id, asset=account["asset"], scale=scale,
                         from_=start, to=end, opening_balance=format_amount(opening_balance, scale),
                         closing_balance=format_amount(running, scale), entries=entries,
                         next_cursor=next_cursor)


def _order(p: Position) -> tuple[datetime, int, int, int]:
    return (p.effective_at, p.partition, p.sequence, p.idx)


async def _readable_account(gateway: Gateway, principal: Principal,
                            account_id: str) -> asyncpg.Record:
    row = await gateway.ledger.account(account_id)
    if row is not None and principal.can_read(row["participant"]):
        return row
    if row is None and principal.reads_all:
        raise ApiError(404, "account_not_found", f"no account {account_id}",
                       account_id=account_id)
    raise ApiError(403, "account_forbidden", "this key may not read that account (or it does "
                   "not exist)", account_id=account_id)


def balance_of(row: asyncpg.Record) -> AccountBalance:
    debit_normal, scale = row["debit_normal"], row["scale"]
    dp, cp = int(row["debits_posted"]), int(row["credits_posted"])
    dpend, cpend = int(row["debits_pending"]), int(row["credits_pending"])
    posted = signed(debit_normal, dp - cp)
    outflow = cpend if debit_normal else dpend
    return AccountBalance(
        account_id=row["id"], participant=row["participant"], asset=row["asset"], scale=scale,
        status=row["status"], normal_side="debit" if debit_normal else "credit",
        posted=format_amount(posted, scale), pending_debits=format_amount(dpend, scale),
        pending_credits=format_amount(cpend, scale),
        pending=format_amount(signed(debit_normal, dpend - cpend), scale),
        available=format_amount(posted - outflow, scale))
