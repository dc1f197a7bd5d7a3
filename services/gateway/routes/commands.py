"""POST deposit commands: issue, redeem, transfer, cancel. Each answers 202 with the command id
once Kafka has confirmed the record (``acks=all``), or an error; nothing is published unless
the key, the role, the body, the amount and the acting participant are all in order."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Request
from fastapi.responses import JSONResponse

from services.gateway.auth import Principal, Role, require_roles
from services.gateway.body import read_json_object, request_hash, validate
from services.gateway.context import Gateway, gateway_of
from services.gateway.errors import ApiError
from services.gateway.repository import transfer_status
from services.gateway.routes.common import check_amount, error_responses, json_body
from services.gateway.schemas import (
    CancelRequest,
    CommandAccepted,
    ConversionRequest,
    TransferRequest,
)
from services.gateway.service import Submission, check_idempotency_key, submit
from shared.events.deposits import (
    UETR_PATTERN,
    CancelTransfer,
    InstructTransfer,
    IssueDepositToken,
    RedeemDepositToken,
)
from shared.events.registry import Payload

router = APIRouter(prefix="/v1/deposits", tags=["deposit commands"])

IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", description="same key + same body returns the first response; "
    "same key + another body is 409 idempotency_conflict (per participant, kept 7 days)")]
BankKey = Annotated[Principal, Depends(require_roles(Role.BANK))]
Ctx = Annotated[Gateway, Depends(gateway_of)]
_ERRORS = error_responses(400, 401, 403, 409, 413, 415, 422, 429, 503)


def _route(path: str, model: type[Any], summary: str) -> Any:
    return router.post(path, status_code=202, response_model=CommandAccepted, summary=summary,
                       response_description="accepted: Kafka confirmed the command (acks=all)",
                       responses=_ERRORS, openapi_extra=json_body(model))


@_route("/issue", ConversionRequest, "Issue (mint) deposit tokens into a customer wallet")
async def issue(request: Request, principal: BankKey, gateway: Ctx,
                idempotency_key: IdempotencyKey = None) -> JSONResponse:
    return await _conversion(request, principal, gateway, idempotency_key, IssueDepositToken)


@_route("/redeem", ConversionRequest, "Redeem (burn) deposit tokens from a customer wallet")
async def redeem(request: Request, principal: BankKey, gateway: Ctx,
                 idempotency_key: IdempotencyKey = None) -> JSONResponse:
    return await _conversion(request, principal, gateway, idempotency_key, RedeemDepositToken)


async def _conversion(request: Request, principal: Principal, gateway: Gateway,
                      idempotency_key: str | None, command: type[Payload]) -> JSONResponse:
    key = check_idempotency_key(idempotency_key)
    body = await read_json_object(request, gateway.settings.max_body_bytes)
    req = validate(ConversionRequest, body)
    participant = req.participant_id or principal.participant_id
    principal.require_acts_for(participant)
    await check_amount(gateway, req.currency, req.amount)
    payload = validate(command, {**req.model_dump(), "participant_id": participant})
    submission = Submission(payload, req.uetr, payer=participant)
    return await submit(gateway, principal, submission, key,
                        request_hash("POST", request.url.path, body))


@_route("/transfers", TransferRequest, "Instruct a transfer from a wallet of the caller")
async def instruct_transfer(request: Request, principal: BankKey, gateway: Ctx,
                            idempotency_key: IdempotencyKey = None) -> JSONResponse:
    key = check_idempotency_key(idempotency_key)
    body = await read_json_object(request, gateway.settings.max_body_bytes)
    req = validate(TransferRequest, body)
    payer = req.payer_participant or principal.participant_id
    principal.require_acts_for(payer)
    await check_amount(gateway, req.currency, req.amount)
    fields = req.model_dump(exclude_none=True)
    payload = validate(InstructTransfer, {**fields, "payer_participant": payer})
    submission = Submission(payload, req.uetr, payer=payer, payee=req.payee_participant,
                            status_url=f"/v1/deposits/transfers/{req.uetr}")
    return await submit(gateway, principal, submission, key,
                        request_hash("POST", request.url.path, body))


@_route("/transfers/{uetr}/cancel", CancelRequest,
        "Cancel a queued transfer (its payer bank, or ops)")
async def cancel_transfer(
    request: Request, gateway: Ctx,
    principal: Annotated[Principal, Depends(require_roles(Role.BANK, Role.OPS))],
    uetr: Annotated[str, Path(pattern=UETR_PATTERN)],
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    key = check_idempotency_key(idempotency_key)
    body = await read_json_object(request, gateway.settings.max_body_bytes)
    req = validate(CancelRequest, body)
    transfer = await transfer_status(gateway.pool, uetr)
    if transfer is None:
        raise ApiError(404, "transfer_not_found", f"no transfer {uetr} was accepted here",
                       uetr=uetr)
    if principal.role is Role.BANK:
        principal.require_acts_for(transfer["payer_participant"])
    payload = CancelTransfer(uetr=uetr, reason=req.reason, requested_by=principal.participant_id)
    submission = Submission(payload, uetr, payer=transfer["payer_participant"],
                            payee=transfer["payee_participant"],
                            status_url=f"/v1/deposits/transfers/{uetr}")
    return await submit(gateway, principal, submission, key,
                        request_hash("POST", request.url.path, body))
