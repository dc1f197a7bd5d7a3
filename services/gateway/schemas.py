"""Request and response bodies of the HTTP API (v1).

Requests are strict: unknown fields are refused (``unknown_field``), nothing is coerced, and an
amount is a JSON string in the currency's units (``"1250.75"``); a JSON number, an exponent or
more decimals than the currency has is refused (``invalid_amount``). Responses carry amounts
the same way, formatted with the asset's scale.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from shared.events.deposits import (
    CURRENCY_PATTERN,
    END_TO_END_ID_PATTERN,
    PARTICIPANT_PATTERN,
    UETR_PATTERN,
    WALLET_PATTERN,
)
from shared.money import AmountStr

Uetr = Annotated[str, Field(pattern=UETR_PATTERN, description="ISO 20022 UETR (UUIDv4, lower "
                                                              "case); the idempotency key of the "
                                                              "instruction in deposits")]
EndToEndId = Annotated[str, Field(pattern=END_TO_END_ID_PATTERN)]
ParticipantId = Annotated[str, Field(pattern=PARTICIPANT_PATTERN, description="BIC8 or BIC11")]
WalletId = Annotated[str, Field(pattern=WALLET_PATTERN)]
Currency = Annotated[str, Field(pattern=CURRENCY_PATTERN)]
Amount = Annotated[AmountStr, Field(description='decimal string, e.g. "1250.75"; at most the '
                                                "currency's decimals; never a JSON number")]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ConversionRequest(_Request):
    """Issue (mint) or redeem (burn) deposit tokens for one customer wallet of the caller."""

    uetr: Uetr
    end_to_end_id: EndToEndId
    participant_id: ParticipantId | None = Field(
        None, description="the bank; defaults to the key's participant and must equal it")
    wallet_id: WalletId
    currency: Currency
    amount: Amount


class TransferRequest(_Request):
    """Pay from a wallet of the caller to any wallet (intra-bank or interbank)."""

    uetr: Uetr
    end_to_end_id: EndToEndId
    instruction_id: EndToEndId | None = None
    payer_participant: ParticipantId | None = Field(
        None, description="defaults to the key's participant and must equal it")
    payer_wallet: WalletId
    payee_participant: ParticipantId
    payee_wallet: WalletId
    currency: Currency
    amount: Amount
    remittance_info: str | None = Field(None, min_length=1, max_length=280)


class CancelRequest(_Request):
    """Cancel a transfer that has not reached the settlement agent (queued or waiting)."""

    reason: str = Field(min_length=1, max_length=280)


# --- responses ---------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable, stable; see the API description")
    message: str
    details: dict[str, Any] = Field(
        description="context; for validation errors `errors: [{field, message, type}]`")


class CommandAccepted(BaseModel):
    command_id: UUID = Field(description="the envelope event_id on the commands topic")
    command_type: str
    uetr: str
    status: Literal["accepted"] = "accepted"
    accepted_at: datetime = Field(description="when the broker confirmed the write")
    status_url: str | None = None


class TransferStatus(BaseModel):
    uetr: str
    status: str = Field(description="`received` (accepted by the gateway, not yet decided by "
                        "deposits), then the deposits state: `rejected`, `instructed`, "
                        "`awaiting_window`, `queued`, `settling`, `interbank_requested`, "
                        "`committing`, `blocked`, `settled`, `failed`, `cancelled`, `expired`")
    code: str | None = Field(None, description="reason code when rejected/failed/expired")
    detail: str | None = None
    payer_participant: str | None
    payer_wallet: str | None
    payee_participant: str | None
    payee_wallet: str | None
    currency: str | None
    amount: str | None
    end_to_end_id: str | None
    instructed_at: datetime | None
    updated_at: datetime | None


class AccountBalance(BaseModel):
    account_id: str
    participant: str
    asset: str
    scale: int
    status: str
    normal_side: Literal["debit", "credit"]
    posted: str = Field(description="posted balance on the account's normal side")
    pending_debits: str
    pending_credits: str
    pending: str = Field(description="net pending amount on the normal side")
    available: str = Field(description="posted minus pending outflows (holds)")


class BalancesPage(BaseModel):
    accounts: list[AccountBalance]
    next_after: str | None = Field(None, description="pass as `after` for the next page")


class StatementEntry(BaseModel):
    posting_id: str
    kind: str
    effective_at: datetime
    recorded_at: datetime
    direction: Literal["debit", "credit"]
    amount: str
    balance: str = Field(description="running posted balance after this entry")
    references: dict[str, Any]


class StatementPage(BaseModel):
    account_id: str
    asset: str
    scale: int
    from_: datetime = Field(alias="from")
    to: datetime
    opening_balance: str = Field(description="balance before the first entry of this page")
    closing_balance: str = Field(description="balance after the last entry of this page")
    entries: list[StatementEntry]
    next_cursor: str | None = None

    model_config = ConfigDict(populate_by_name=True)


class Check(BaseModel):
    ok: bool
    latency_ms: int
    error: str | None = None


class Health(BaseModel):
    status: Literal["ok"]
    checks: dict[str, Check]
