"""Tokenized deposits (HKMA Project Ensemble): the public contracts of ``services/deposits``.

Commands arrive on ``deposits.commands``; events leave on ``deposits.events`` keyed by their
stream (a transfer's or conversion's UETR, a participant's BIC, a wallet). Rules TD-1..TD-8 and
the chart of accounts are documented in ``services/deposits/accounts.py`` and ``domain.py``.

Conventions
-----------
- Amounts are decimal strings in the currency's units (``"1250.75"``); the domain converts them to
  integer minor units with the configured scale and refuses excess decimals (``invalid_amount``).
- Every transfer and conversion payload carries ``uetr`` (ISO 20022 UETR, a lower-case UUIDv4) and
  ``end_to_end_id`` (``Max35Text`` in the SWIFT character set) unchanged (TD-7). The UETR is the
  idempotency key: the same instruction again is a no-op; the same UETR with different details is
  refused (``id_conflict``).
- An instruction that a business rule refuses is *recorded*: ``TransferRejected``,
  ``ConversionRejected``, ``WalletOpenRejected``, ``ParticipantOnboardingFailed`` echo the
  instruction's fields with a machine-readable ``code`` (see :class:`DepositsCode`), so that a
  retry gets the same answer and the refusal stays in the audit trail (X-7).
- ``LedgerCommandRequested`` and ``LedgerCommandAnswered`` are internal: they live in the deposits
  event store (what was asked of the ledger, and its answer) and are never published on
  ``deposits.events``; the service sends ``LedgerCommandRequested.command`` to ``ledger.commands``.
  :data:`PUBLISHED_EVENTS` lists what is published.
"""

from __future__ import annotations

import json
from datetime import date
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

from pydantic import AwareDatetime, Field, model_validator

from shared.events.ledger import (
    CommitGroup,
    DefineAsset,
    FreezeAccount,
    OpenAccount,
    Post,
    PostPending,
    UnfreezeAccount,
    VoidGroup,
)
from shared.events.registry import Payload, register, resolve, type_of
from shared.money import AmountStr

__all__ = [
    "CURRENCY_PATTERN",
    "END_TO_END_ID_PATTERN",
    "FUNDING_ID_PATTERN",
    "PARTICIPANT_PATTERN",
    "PUBLISHED_EVENTS",
    "REFERENCE_PATTERN",
    "UETR_PATTERN",
    "WALLET_PATTERN",
    "CancelTransfer",
    "ConversionInstructed",
    "ConversionInstruction",
    "ConversionRejected",
    "CurrencyArrangement",
    "DepositTokensBurned",
    "DepositTokensMinted",
    "DepositsCode",
    "EarmarkReleased",
    "ExpiryCode",
    "FreezeWallet",
    "FundSettlementAccount",
    "FundsEarmarked",
    "InstructTransfer",
    "InterbankLegSettledAfterRelease",
    "InterbankSettlementQueued",
    "InterbankSettlementRejected",
    "InterbankSettlementRequested",
    "InterbankSettlementSettled",
    "IssueDepositToken",
    "LedgerCommand",
    "LedgerCommandAnswered",
    "LedgerCommandRequested",
    "LedgerPurpose",
    "OnboardParticipant",
    "OpenWallet",
    "ParticipantOnboarded",
    "ParticipantOnboardingFailed",
    "ParticipantOnboardingStarted",
    "ParticipantRequest",
    "RedeemDepositToken",
    "RejectInterbankLeg",
    "SettleInterbankLeg",
    "SettlementAccountFunded",
    "SettlementFundingReceived",
    "SettlementFundingRejected",
    "TransferAwaitingWindow",
    "TransferCancelled",
    "TransferExpired",
    "TransferFailed",
    "TransferInstructed",
    "TransferInstruction",
    "TransferRejected",
    "TransferSettled",
    "TransferSettlementBlocked",
    "UnfreezeWallet",
    "WalletFrozen",
    "WalletOpenRejected",
    "WalletOpenRequested",
    "WalletOpened",
    "WalletRequest",
    "WalletUnfrozen",
]

# ISO 20022 UETR: UUID version 4, lower case (SWIFT gpi).
UETR_PATTERN: Final = r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
# Max35Text restricted to the SWIFT "x" character set, so it is safe in every downstream system.
END_TO_END_ID_PATTERN: Final = r"^[A-Za-z0-9/?:().,'+ -]{1,35}$"
# BIC8 or BIC11 (ISO 9362): the participant id of a bank.
PARTICIPANT_PATTERN: Final = r"^[A-Z]{6}[A-Z0-9]{2}([A-Z0-9]{3})?$"
# No ':' so that a wallet id can never forge another ledger account name (accounts.py), and no
# '_', which ledger ids do not allow.
WALLET_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9.-]{0,63}$"
# ISO 4217 form; CNH is not ISO but has the same form. Never an enum: currencies are data.
CURRENCY_PATTERN: Final = r"^[A-Z]{3}$"
# Other business references (KYC and case references, agent references and account refs).
REFERENCE_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._/:-]{0,63}$"
# Ids that become part of a ledger posting id (the ledger's id alphabet: no '_').
FUNDING_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9.:/-]{0,63}$"

Uetr = Annotated[str, Field(pattern=UETR_PATTERN)]
EndToEndId = Annotated[str, Field(pattern=END_TO_END_ID_PATTERN)]
ParticipantId = Annotated[str, Field(pattern=PARTICIPANT_PATTERN)]
WalletId = Annotated[str, Field(pattern=WALLET_PATTERN)]
Currency = Annotated[str, Field(pattern=CURRENCY_PATTERN)]
Reference = Annotated[str, Field(pattern=REFERENCE_PATTERN)]
FundingId = Annotated[str, Field(pattern=FUNDING_ID_PATTERN)]
Text = Annotated[str, Field(min_length=1, max_length=280)]
Code = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
SettlementMode = Literal["rtgs", "wcbdc"]
Party = Literal["payer", "payee"]
ExpiryCode = Literal["queued_past_cutoff", "hold_timeout", "confirmation_timeout", "ledger_expired"]


class DepositsCode(StrEnum):
    """Machine-readable reason codes of the deposits domain (the ``code`` of refusals)."""

    CURRENCY_NOT_CONFIGURED = "currency_not_configured"
    INVALID_AMOUNT = "invalid_amount"
    UNKNOWN_PARTICIPANT = "unknown_participant"
    PARTICIPANT_NOT_ACTIVE = "participant_not_active"
    CURRENCY_NOT_ISSUED = "currency_not_issued"
    UNKNOWN_WALLET = "unknown_wallet"
    WALLET_NOT_OPEN = "wallet_not_open"
    WALLET_CURRENCY_NOT_OPEN = "wallet_currency_not_open"
    WALLET_FROZEN = "wallet_frozen"
    SAME_WALLET = "same_wallet"
    ID_CONFLICT = "id_conflict"
    UNKNOWN_TRANSFER = "unknown_transfer"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    INTERBANK_REJECTED = "interbank_rejected"
    ALREADY_SETTLED = "already_settled"
    ALREADY_FINAL = "already_final"
    SETTLEMENT_IN_PROGRESS = "settlement_in_progress"
    REFERENCE_MISMATCH = "reference_mismatch"
    UNEXPECTED_CONFIRMATION = "unexpected_confirmation"
    QUEUED_PAST_CUTOFF = "queued_past_cutoff"
    HOLD_TIMEOUT = "hold_timeout"
    CONFIRMATION_TIMEOUT = "confirmation_timeout"
    LEDGER_EXPIRED = "ledger_expired"
    LEDGER_REJECTED = "ledger_rejected"


# --- shared field sets --------------------------------------------------------------------------


class _TransferRefs(Payload):
    uetr: Uetr
    end_to_end_id: EndToEndId


class CurrencyArrangement(Payload):
    """How a bank settles one currency: its account with the settlement agent (pacs.009
    ``SttlmAcct``: a CHATS settlement account, or its wCBDC account)."""

    currency: Currency
    settlement_account_ref: Reference


class TransferInstruction(_TransferRefs):
    """The fields of a customer transfer instruction (pacs.008-like). Not registered itself."""

    instruction_id: EndToEndId | None = None
    payer_participant: ParticipantId
    payer_wallet: WalletId
    payee_participant: ParticipantId
    payee_wallet: WalletId
    currency: Currency
    amount: AmountStr
    remittance_info: Text | None = None


class ConversionInstruction(_TransferRefs):
    """The fields of an issue (mint) or redeem (burn) instruction. Not registered itself."""

    participant_id: ParticipantId
    wallet_id: WalletId
    currency: Currency
    amount: AmountStr


class WalletRequest(Payload):
    """The fields of a wallet opening. Not registered itself."""

    participant_id: ParticipantId
    wallet_id: WalletId
    currencies: tuple[Currency, ...] = Field(min_length=1, max_length=16)
    customer_ref: Reference
    kyc_ref: Reference
    """The bank's KYC record of the customer: only KYC'd customers get wallets (TD-8)."""

    @model_validator(mode="after")
    def _unique_currencies(self) -> WalletRequest:
        if len(set(self.currencies)) != len(self.currencies):
            raise ValueError("currencies must not repeat")
        return self


class ParticipantRequest(Payload):
    """The fields of an onboarding. Not registered itself."""

    participant_id: ParticipantId
    name: Text
    currencies: tuple[CurrencyArrangement, ...] = Field(min_length=1, max_length=16)

    @model_validator(mode="after")
    def _unique_currencies(self) -> ParticipantRequest:
        codes = [c.currency for c in self.currencies]
        if len(set(codes)) != len(codes):
            raise ValueError("currencies must not repeat")
        return self


class _WalletAction(Payload):
    participant_id: ParticipantId
    wallet_id: WalletId
    reason: Text
    case_ref: Reference


# --- commands (deposits.commands) ---------------------------------------------------------------


@register("deposits.OnboardParticipant")
class OnboardParticipant(ParticipantRequest):
    """A bank joins: its ledger accounts open per currency; active once the ledger accepted
    them all."""


@register("deposits.FundSettlementAccount")
class FundSettlementAccount(Payload):
    """The settlement agent credited a bank's settlement account (camt.054 CRDT from CHATS, or
    wCBDC issued to the bank). Funding is what lets queued transfers settle (TD-5)."""

    funding_id: FundingId
    participant_id: ParticipantId
    currency: Currency
    amount: AmountStr
    agent_reference: Reference | None = None


@register("deposits.OpenWallet")
class OpenWallet(WalletRequest):
    """Open a KYC'd customer's token wallet at its bank, one ledger account per currency."""


@register("deposits.FreezeWallet")
class FreezeWallet(_WalletAction):
    """Sanctions/AML hold: the wallet can neither send nor receive (TD-8). Freezing is an event."""


@register("deposits.UnfreezeWallet")
class UnfreezeWallet(_WalletAction):
    """Lift a freeze."""


@register("deposits.IssueDepositToken")
class IssueDepositToken(ConversionInstruction):
    """Mint tokens against a debit of the customer's conventional deposit (TD-2)."""


@register("deposits.RedeemDepositToken")
class RedeemDepositToken(ConversionInstruction):
    """Burn tokens with a credit back to the customer's conventional deposit (TD-2)."""


@register("deposits.InstructTransfer")
class InstructTransfer(TransferInstruction):
    """Pay from one wallet to another: intra-bank settles at once 24/7, interbank per currency."""


@register("deposits.SettleInterbankLeg")
class SettleInterbankLeg(_TransferRefs):
    """The settlement agent's pacs.002 ``ACSC``: the RTGS leg is final (TD-4)."""

    agent_reference: Reference
    settled_at: AwareDatetime | None = None
    interbank_settlement_date: date | None = None


@register("deposits.RejectInterbankLeg")
class RejectInterbankLeg(_TransferRefs):
    """The settlement agent's pacs.002 ``RJCT`` with its ISO status reason code (e.g. ``AC04``)."""

    agent_reference: Reference
    reason_code: str = Field(pattern=r"^[A-Z0-9]{4}$")
    detail: Text | None = None


@register("deposits.CancelTransfer")
class CancelTransfer(Payload):
    """Ops cancel a transfer that has not reached the settlement agent (TD-5: queued ones)."""

    uetr: Uetr
    reason: Text
    requested_by: Reference


# --- participant and wallet events --------------------------------------------------------------


@register("deposits.ParticipantOnboardingStarted")
class ParticipantOnboardingStarted(ParticipantRequest):
    """Onboarding accepted by the domain; its ledger accounts are being opened."""


@register("deposits.ParticipantOnboarded")
class ParticipantOnboarded(Payload):
    participant_id: ParticipantId
    currencies: tuple[Currency, ...]


@register("deposits.ParticipantOnboardingFailed")
class ParticipantOnboardingFailed(ParticipantRequest):
    code: Code
    detail: str = ""


@register("deposits.SettlementFundingReceived")
class SettlementFundingReceived(Payload):
    """A funding notice was accepted by the domain; its ledger posting is on its way."""

    funding_id: FundingId
    participant_id: ParticipantId
    currency: Currency
    amount: AmountStr
    agent_reference: Reference | None = None


@register("deposits.SettlementAccountFunded")
class SettlementAccountFunded(Payload):
    """The funding is on the ledger: queued transfers of this bank and currency may now settle."""

    funding_id: FundingId
    participant_id: ParticipantId
    currency: Currency
    amount: AmountStr
    posting_id: str


@register("deposits.SettlementFundingRejected")
class SettlementFundingRejected(Payload):
    funding_id: FundingId
    participant_id: ParticipantId
    currency: Currency
    code: Code
    detail: str = ""


@register("deposits.WalletOpenRequested")
class WalletOpenRequested(WalletRequest):
    """Wallet opening accepted by the domain; its ledger accounts are being opened."""


@register("deposits.WalletOpened")
class WalletOpened(Payload):
    participant_id: ParticipantId
    wallet_id: WalletId
    currencies: tuple[Currency, ...]


@register("deposits.WalletOpenRejected")
class WalletOpenRejected(WalletRequest):
    code: Code
    detail: str = ""


@register("deposits.WalletFrozen")
class WalletFrozen(_WalletAction):
    pass


@register("deposits.WalletUnfrozen")
class WalletUnfrozen(_WalletAction):
    pass


# --- conversion (issue / redeem) events ---------------------------------------------------------

ConversionKind = Literal["issue", "redeem"]


@register("deposits.ConversionInstructed")
class ConversionInstructed(ConversionInstruction):
    kind: ConversionKind


@register("deposits.ConversionRejected")
class ConversionRejected(ConversionInstruction):
    """Refused by a business rule, or by the ledger (e.g. ``insufficient_funds`` on redeem)."""

    kind: ConversionKind
    code: Code
    detail: str = ""


@register("deposits.DepositTokensMinted")
class DepositTokensMinted(_TransferRefs):
    participant_id: ParticipantId
    wallet_id: WalletId
    currency: Currency
    amount: AmountStr
    cause: Literal["issue", "interbank"]
    posting_id: str


@register("deposits.DepositTokensBurned")
class DepositTokensBurned(_TransferRefs):
    participant_id: ParticipantId
    wallet_id: WalletId
    currency: Currency
    amount: AmountStr
    cause: Literal["redeem", "interbank"]
    posting_id: str


# --- transfer events ----------------------------------------------------------------------------


@register("deposits.TransferInstructed")
class TransferInstructed(TransferInstruction):
    route: Literal["intra_bank", "interbank"]
    settlement_mode: SettlementMode | None
    instructed_at: AwareDatetime
    hold_deadline: AwareDatetime | None
    ledger_expiry_at: AwareDatetime | None


@register("deposits.TransferRejected")
class TransferRejected(TransferInstruction):
    """The instruction was refused before anything moved; ``party`` says whose side failed."""

    code: Code
    detail: str = ""
    party: Party | None = None


@register("deposits.FundsEarmarked")
class FundsEarmarked(_TransferRefs):
    participant_id: ParticipantId
    wallet_id: WalletId
    currency: Currency
    amount: AmountStr
    posting_id: str
    settlement_group: str


@register("deposits.TransferAwaitingWindow")
class TransferAwaitingWindow(_TransferRefs):
    currency: Currency
    window_opens_at: AwareDatetime


@register("deposits.InterbankSettlementQueued")
class InterbankSettlementQueued(_TransferRefs):
    """The payer bank's settlement position is short, or earlier transfers are queued (FIFO):
    the transfer waits, neither rejected nor partially settled (TD-5). Emitted again after each
    attempt that is still short; ``queued_since`` keeps the queue position."""

    participant_id: ParticipantId
    currency: Currency
    queue_key: str
    queued_since: AwareDatetime
    attempt: int = Field(ge=0)
    reason: Literal["insufficient_settlement_funds", "queue_not_empty"]


@register("deposits.InterbankSettlementRequested")
class InterbankSettlementRequested(_TransferRefs):
    """``rtgs``: send the pacs.009 to the settlement agent now (all ledger legs are held)."""

    instructing_agent: ParticipantId
    instructed_agent: ParticipantId
    debtor_settlement_account: Reference
    creditor_settlement_account: Reference
    currency: Currency
    amount: AmountStr
    interbank_settlement_date: date
    confirm_by: AwareDatetime


@register("deposits.InterbankSettlementSettled")
class InterbankSettlementSettled(_TransferRefs):
    settlement_mode: SettlementMode
    settled_at: AwareDatetime
    agent_reference: Reference | None = None


@register("deposits.InterbankSettlementRejected")
class InterbankSettlementRejected(_TransferRefs):
    agent_reference: Reference
    reason_code: str
    detail: str = ""


@register("deposits.TransferSettled")
class TransferSettled(_TransferRefs):
    route: Literal["intra_bank", "interbank"]
    settled_at: AwareDatetime
    posting_id: str


@register("deposits.TransferFailed")
class TransferFailed(_TransferRefs):
    code: Code
    detail: str = ""


@register("deposits.TransferCancelled")
class TransferCancelled(_TransferRefs):
    reason: Text
    requested_by: Reference


@register("deposits.TransferExpired")
class TransferExpired(_TransferRefs):
    code: ExpiryCode
    deadline: AwareDatetime | None


@register("deposits.EarmarkReleased")
class EarmarkReleased(_TransferRefs):
    participant_id: ParticipantId
    wallet_id: WalletId
    currency: Currency
    amount: AmountStr
    posting_id: str


@register("deposits.TransferSettlementBlocked")
class TransferSettlementBlocked(_TransferRefs):
    """The RTGS leg is final but the ledger refused the token legs (e.g. a wallet frozen after
    the pacs.009 went out). Needs ops: commit after the cause is cleared, or return (pacs.004)."""

    code: Code
    detail: str = ""


@register("deposits.InterbankLegSettledAfterRelease")
class InterbankLegSettledAfterRelease(_TransferRefs):
    """An ACSC arrived after the transfer was released (timeout): a break for ops (pacs.004)."""

    agent_reference: Reference
    settled_at: AwareDatetime


# --- internal: the ledger conversation ----------------------------------------------------------

LedgerPurpose = Literal[
    "define_asset", "open_account", "freeze_account", "unfreeze_account", "fund",
    "issue", "redeem", "transfer", "burn", "mint", "settle", "commit", "void",
]
LedgerCommand = (
    DefineAsset | OpenAccount | FreezeAccount | UnfreezeAccount | Post | PostPending
    | CommitGroup | VoidGroup
)
_LEDGER_TYPES: Final = frozenset(type_of(c).type for c in LedgerCommand.__args__)


@register("deposits.LedgerCommandRequested")
class LedgerCommandRequested(Payload):
    """Send ``command`` to ``ledger.commands`` (internal; stored, never published).

    ``command_id`` is the deposits' readable id of the request; ``ledger_key`` is the
    ``command_id`` the ledger's result will carry: the posting id for postings, else the envelope
    event id the service must use, ``accounts.ledger_event_id(command_id)``.
    """

    purpose: LedgerPurpose
    command_id: str = Field(min_length=1, max_length=128)
    ledger_key: str = Field(min_length=1, max_length=128)
    command_type: str
    command: LedgerCommand
    uetr: Uetr | None = None
    end_to_end_id: EndToEndId | None = None

    @model_validator(mode="before")
    @classmethod
    def _typed_command(cls, data: Any) -> Any:
        # CommitGroup and VoidGroup (and Freeze/Unfreeze) have identical shapes, so a plain
        # union cannot tell them apart: command_type picks the class.
        if isinstance(data, dict) and isinstance(data.get("command"), dict):
            name = data.get("command_type")
            if not isinstance(name, str) or name not in _LEDGER_TYPES:
                raise ValueError(f"command_type must be one of {sorted(_LEDGER_TYPES)}")
            cls_ = resolve(name, 1)
            data = {**data, "command": cls_.model_validate_json(json.dumps(data["command"]))}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> LedgerCommandRequested:
        if type_of(self.command).type != self.command_type:
            raise ValueError("command_type does not match the command")
        return self


@register("deposits.LedgerCommandAnswered")
class LedgerCommandAnswered(Payload):
    """The ledger's answer to one request (internal; stored, never published)."""

    purpose: LedgerPurpose
    ledger_key: str
    accepted: bool
    code: str | None = None
    detail: str = ""


PUBLISHED_EVENTS: Final[tuple[type[Payload], ...]] = (
    ParticipantOnboardingStarted, ParticipantOnboarded, ParticipantOnboardingFailed,
    SettlementFundingReceived, SettlementAccountFunded, SettlementFundingRejected,
    WalletOpenRequested, WalletOpened, WalletOpenRejected, WalletFrozen, WalletUnfrozen,
    ConversionInstructed, ConversionRejected, DepositTokensMinted, DepositTokensBurned,
    TransferInstructed, TransferRejected, FundsEarmarked, TransferAwaitingWindow,
    InterbankSettlementQueued, InterbankSettlementRequested, InterbankSettlementSettled,
    InterbankSettlementRejected, TransferSettled, TransferFailed, TransferCancelled,
    TransferExpired, EarmarkReleased, TransferSettlementBlocked, InterbankLegSettledAfterRelease,
)
"""Events the service publishes on ``deposits.events``; the ledger conversation stays internal."""
