"""The pure tokenized-deposits domain: participants, wallets, conversions and transfers.

No I/O: no asyncpg, faststream or os imports; the time is ``Context.now``. Functional style
(eventsourcing's aggregate7): frozen pydantic state, and per aggregate

- ``decide_<aggregate>(state | None, command, ctx) -> list[event]``: the events the command
  causes, ``[]`` for a duplicate (X-3). A refusal of a command that *creates* an aggregate is an
  event (``TransferRejected`` ...), recorded so that a retry gets the same answer; a refusal of a
  command on an existing aggregate raises a :class:`DepositsError` (a ``DomainError`` with
  ``code``) and records nothing. The same UETR/id with different details raises
  :class:`InstructionConflictError` (``id_conflict``).
- ``evolve_<aggregate>(state | None, event) -> state``; :func:`fold` replays a stream.

What the domain needs from the ledger it emits as ``LedgerCommandRequested`` events (built in
``accounts.py``; ids derived from the UETR, so a replayed decision asks for the same ids). The
service appends them with the other events and writes ``event.command`` to its outbox for
``ledger.commands`` in the same transaction (envelope ``event_id = accounts.ledger_event_id(
command_id)``, record key ``accounts.record_key(command)``), and remembers ``ledger_key ->
stream``. A ledger result (``PostingAccepted``/``PostingRejected``) whose ``command_id`` matches
an outstanding ``ledger_key`` is decided on that stream and recorded as ``LedgerCommandAnswered``;
anything else (a redelivery, an old answer) is a no-op.

Context
-------
:class:`Context` carries the pure inputs the service gathers before deciding: ``now`` from the
clock, the per-currency :class:`~services.deposits.calendar.DepositsConfig`, the participant and
wallet states a command names (read models), and ``queue_depth`` per ``queue_key(bank, ccy)``.

Transfer state machine
----------------------
::

    InstructTransfer --refused--> rejected
        | intra-bank: Post td:U:transfer ----------accepted--> settled (24/7)
        |                                  \\------rejected--> failed
        | interbank: PostPending burn + mint (group td:U); in wcbdc mode, with the window open
        | and the payer's queue empty, the settle pending too (commit once all three are held)
        v
    instructed --both held--> [window closed] awaiting_window --Tick, window open--+
        |                     [queue not empty] queued <---------------------+     |
        |                     [else] settling (PostPending td:U:settle:n) <--+-----+
        |                                |  insufficient_funds -> queued     |
        |                                |  (RetrySettlement from the queue) +
        |                                v accepted
        |           wcbdc: committing (CommitGroup) --accepted--> settled
        |           rtgs:  interbank_requested (pacs.009) --ACSC--> committing --> settled
        |                                     \\--RJCT / confirm_by passed--> failed / expired
        +-- any leg refused --> failed;  CancelTransfer --> cancelled;  Tick past the
            hold deadline --> expired (queued_past_cutoff | hold_timeout)

``failed``/``cancelled``/``expired`` release: once no member pending is in flight (so the void
cannot overtake a member on another partition and find no group), ``VoidGroup td:U:void`` goes
out; its acceptance emits ``EarmarkReleased`` when the payer's burn was held. A commit refused
after the RTGS leg is final (ACSC) is ``blocked`` for ops, never voided: the interbank money has
moved (TD-4). A late ACSC after a release is reported (``InterbankLegSettledAfterRelease``).

Queue (TD-5)
------------
The ledger refuses an interbank leg that would overdraw the payer bank's settlement account
(``debits_must_not_exceed_credits``) with ``insufficient_funds``; the transfer becomes ``queued``
with its earmark and mint still held: nothing is rejected, nothing partially settled. The queue
is a read model, one per ``queue_key(payer bank, currency)``, ordered by :func:`queue_order`
(``queued_since``, then UETR): strict FIFO, as CHATS. A transfer ready to settle while its queue
is not empty joins it (``queue_not_empty``) instead of overtaking it. The service wakes the *head*
of a queue with :class:`RetrySettlement` when the bank's settlement account is credited
(``SettlementAccountFunded``, or an incoming interbank leg settles), when the head leaves the queue
(settled, cancelled, expired) and on a periodic retry tick; each retry is a new attempt id
(``td:U:settle:n+1``: the ledger keeps refusals forever under their id). Ops cancel a queued
transfer with ``CancelTransfer``; at the window's cut-off a :class:`Tick` expires it
(``queued_past_cutoff``) and releases the earmark (DOMAIN.md 1.2 step 5).

Windows (TD-6, X-5): an interbank transfer earmarks at once, then waits in ``awaiting_window``
until a :class:`Tick` finds the currency's window open (:func:`next_wakeup` says when). Intra-bank
transfers, issues and redemptions ignore windows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final, Generic, Literal, NamedTuple, TypeVar

from pydantic import BaseModel, ConfigDict

from shared.errors import DomainError, IdempotencyConflictError, InvalidAmountError
from shared.events import deposits as ev
from shared.events.ledger import PostingAccepted, PostingRejected
from shared.events.registry import Payload
from shared.money import parse_amount

from . import accounts as acc
from . import calendar as cal

__all__ = [
    "Context",
    "Conversion",
    "DepositsError",
    "InstructionConflictError",
    "Participant",
    "QueueEntry",
    "RetrySettlement",
    "Tick",
    "Transfer",
    "TransferStatus",
    "Wallet",
    "decide_conversion",
    "decide_participant",
    "decide_transfer",
    "decide_wallet",
    "evolve_conversion",
    "evolve_participant",
    "evolve_transfer",
    "evolve_wallet",
    "fold",
    "next_wakeup",
    "queue_entry",
    "queue_key",
    "queue_order",
    "stream_of",
    "wallet_key",
]

Code = ev.DepositsCode
LedgerResult = PostingAccepted | PostingRejected
# The wire caps a pending's timeout at 30 days (shared/events/ledger.py).
_MAX_TIMEOUT_S: Final = 30 * 24 * 3600
# Ledger answers that mean "already there": shared assets and accounts opened by someone else.
_ALREADY_THERE: Final = frozenset({"asset_exists", "account_exists"})
_MEMBERS: Final = frozenset({"burn", "mint", "settle"})


# --- errors and internal commands ---------------------------------------------------------------


class DepositsError(DomainError):
    """A business rule refused a command on an existing aggregate; nothing is recorded."""

    def __init__(self, code: ev.DepositsCode, message: str, **details: Any) -> None:
        super().__init__(message, code=code.value, **details)


class InstructionConflictError(IdempotencyConflictError):
    """The same UETR (or wallet, participant, funding id) came with different details."""


@dataclass(frozen=True, slots=True)
class Tick:
    """The clock woke a stream: deadlines pass, windows open (the time is ``Context.now``)."""


@dataclass(frozen=True, slots=True)
class RetrySettlement:
    """The queue dispatcher: this queued transfer is at the head of its queue; try again."""


# --- context ------------------------------------------------------------------------------------


def wallet_key(participant_id: str, wallet_id: str) -> str:
    return f"{participant_id}:{wallet_id}"


def queue_key(participant_id: str, currency: str) -> str:
    """The settlement queue of one payer bank and currency (TD-5)."""
    return f"{participant_id}:{currency}"


@dataclass(frozen=True, slots=True)
class Context:
    """Pure inputs of a decision, gathered by the service before it calls ``decide_*``."""

    now: datetime
    config: cal.DepositsConfig
    participants: Mapping[str, Participant] = field(default_factory=dict)
    wallets: Mapping[str, Wallet] = field(default_factory=dict)
    """Keyed by :func:`wallet_key`."""
    queue_depth: Mapping[str, int] = field(default_factory=dict)
    """Queued transfers per :func:`queue_key`, not counting the one being decided."""

    def __post_init__(self) -> None:
        if self.now.tzinfo is None or self.now.utcoffset() is None:
            raise ValueError("Context.now must be timezone-aware")


# --- state --------------------------------------------------------------------------------------


class _State(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


M = TypeVar("M", bound=BaseModel)


def _as(cls: type[M], value: BaseModel) -> M:
    """The ``cls`` part of an event/command (already validated), for comparisons."""
    return cls.model_construct(**{name: getattr(value, name) for name in cls.model_fields})


class ParticipantStatus(StrEnum):
    ONBOARDING = "onboarding"
    ACTIVE = "active"
    FAILED = "failed"


class Participant(_State):
    request: ev.ParticipantRequest
    status: ParticipantStatus
    outstanding: dict[str, ev.LedgerPurpose] = {}
    fundings: dict[str, ev.SettlementFundingReceived] = {}
    failure_code: str | None = None

    @property
    def participant_id(self) -> str:
        return self.request.participant_id

    def arrangement(self, currency: str) -> ev.CurrencyArrangement | None:
        return next((a for a in self.request.currencies if a.currency == currency), None)


class WalletStatus(StrEnum):
    OPENING = "opening"
    OPEN = "open"
    REJECTED = "rejected"


class Wallet(_State):
    request: ev.WalletRequest
    status: WalletStatus
    frozen: bool = False
    freeze_generation: int = 0
    outstanding: dict[str, ev.LedgerPurpose] = {}
    failure_code: str | None = None


class ConversionStatus(StrEnum):
    REJECTED = "rejected"
    REQUESTED = "requested"
    COMPLETED = "completed"


class Conversion(_State):
    instruction: ev.ConversionInstruction
    kind: Literal["issue", "redeem"]
    status: ConversionStatus
    outstanding: dict[str, ev.LedgerPurpose] = {}
    code: str | None = None


class TransferStatus(StrEnum):
    REJECTED = "rejected"
    INSTRUCTED = "instructed"
    AWAITING_WINDOW = "awaiting_window"
    QUEUED = "queued"
    SETTLING = "settling"
    INTERBANK_REQUESTED = "interbank_requested"
    COMMITTING = "committing"
    BLOCKED = "blocked"
    SETTLED = "settled"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


TS = TransferStatus
_FINAL: Final = frozenset({TS.REJECTED, TS.SETTLED, TS.FAILED, TS.CANCELLED, TS.EXPIRED})
_RELEASING: Final = frozenset({TS.FAILED, TS.CANCELLED, TS.EXPIRED})
_WAITING: Final = frozenset({TS.INSTRUCTED, TS.AWAITING_WINDOW, TS.QUEUED, TS.SETTLING})


class Transfer(_State):
    instruction: ev.TransferInstruction
    status: TransferStatus
    route: Literal["intra_bank", "interbank"] | None = None
    mode: cal.SettlementMode | None = None
    instructed_at: datetime | None = None
    hold_deadline: datetime | None = None
    ledger_expiry_at: datetime | None = None
    confirm_by: datetime | None = None
    held: frozenset[str] = frozenset()
    """Group members the ledger accepted: ``burn``, ``mint``, ``settle``."""
    attempts: int = 0
    queued_since: datetime | None = None
    outstanding: dict[str, ev.LedgerPurpose] = {}
    requested: bool = False
    agent_settled: bool = False
    void_requested: bool = False
    released: bool = False
    late_confirmation: bool = False
    outcome_code: str | None = None
    settled_at: datetime | None = None

    @property
    def uetr(self) -> str:
        return self.instruction.uetr

    @property
    def final(self) -> bool:
        return self.status in _FINAL

    @property
    def members_in_flight(self) -> bool:
        return any(p in _MEMBERS for p in self.outstanding.values())


S = TypeVar("S")


def fold(evolve: Callable[[S | None, Payload], S], events: Iterable[Payload],
         state: S | None = None) -> S | None:
    """Replay ``events`` onto ``state`` (``None``: a new stream)."""
    for event in events:
        state = evolve(state, event)
    return state


class _Decision(Generic[S]):
    """Collects a decision's events, evolving the state as it goes so rules see the effect."""

    def __init__(self, state: S, evolve: Callable[[S | None, Payload], S]) -> None:
        self.state = state
        self.events: list[Payload] = []
        self._evolve = evolve

    def emit(self, *events: Payload) -> None:
        for event in events:
            self.events.append(event)
            self.state = self._evolve(self.state, event)


def _fields(cls: type[BaseModel], value: BaseModel) -> dict[str, Any]:
    return {name: getattr(value, name) for name in cls.model_fields}


def _same_or_conflict(stored: BaseModel, incoming: BaseModel, what: str) -> list[Payload]:
    if stored == _as(type(stored), incoming):
        return []
    raise InstructionConflictError(f"{what} was already used with different details",
                                   code=Code.ID_CONFLICT.value)


def _timeout_s(until: datetime, now: datetime) -> int:
    return max(1, min(_MAX_TIMEOUT_S, int((until - now).total_seconds()) + 1))


class _Refusal(NamedTuple):
    code: ev.DepositsCode
    detail: str
    party: ev.Party | None = None


def _amount_refusal(amount: str, rules: cal.CurrencyRules) -> _Refusal | None:
    try:
        parse_amount(amount, rules.scale)
    except InvalidAmountError as exc:
        return _Refusal(Code.INVALID_AMOUNT, f"{exc.details.get('reason')}: {exc.message}")
    return None


def _party_refusal(ctx: Context, bank: str, wallet_id: str, currency: str,
                   party: ev.Party | None) -> _Refusal | None:
    """Checks in order: participant known, active, issues the currency; wallet known, open,
    holds the currency, not frozen (TD-8)."""
    p = ctx.participants.get(bank)
    if p is None:
        return _Refusal(Code.UNKNOWN_PARTICIPANT, f"{bank} is not onboarded", party)
    if p.status is not ParticipantStatus.ACTIVE:
        return _Refusal(Code.PARTICIPANT_NOT_ACTIVE, f"{bank} is {p.status}", party)
    if p.arrangement(currency) is None:
        return _Refusal(Code.CURRENCY_NOT_ISSUED, f"{bank} issues no {currency} tokens", party)
    w = ctx.wallets.get(wallet_key(bank, wallet_id))
    if w is None:
        return _Refusal(Code.UNKNOWN_WALLET, f"no wallet {wallet_id} at {bank}", party)
    if w.status is not WalletStatus.OPEN:
        return _Refusal(Code.WALLET_NOT_OPEN, f"wallet {wallet_id} is {w.status}", party)
    if currency not in w.request.currencies:
        return _Refusal(Code.WALLET_CURRENCY_NOT_OPEN, f"wallet {wallet_id} holds no {currency}",
                        party)
    if w.frozen:
        return _Refusal(Code.WALLET_FROZEN, f"wallet {wallet_id} is frozen", party)
    return None


def _ledger_code(code: str | None, purpose: str) -> ev.DepositsCode:
    if purpose in ("burn", "mint", "transfer", "issue", "redeem"):
        if code == "insufficient_funds":
            return Code.INSUFFICIENT_FUNDS
        if code == "account_frozen":
            return Code.WALLET_FROZEN
    return Code.LEDGER_REJECTED


def _rules(ctx: Context, currency: str) -> cal.CurrencyRules:
    rules = ctx.config.rules(currency)
    if rules is None:
        raise DepositsError(Code.CURRENCY_NOT_CONFIGURED, f"{currency} is not configured")
    return rules


# --- participants -------------------------------------------------------------------------------


def decide_participant(
    state: Participant | None,
    command: ev.OnboardParticipant | ev.FundSettlementAccount | LedgerResult,
    ctx: Context,
) -> list[Payload]:
    """Onboarding (complete once the ledger accepted every account) and settlement funding."""
    match command:
        case ev.OnboardParticipant():
            if state is not None:
                return _same_or_conflict(state.request, command, "participant id")
            missing = [a.currency for a in command.currencies if ctx.config.rules(a.currency)
                       is None]
            if missing:
                return [ev.ParticipantOnboardingFailed(
                    **_fields(ev.ParticipantRequest, command),
                    code=Code.CURRENCY_NOT_CONFIGURED, detail=", ".join(missing))]
            requests = [r for a in command.currencies
                        for r in acc.onboarding_requests(command.participant_id,
                                                         _rules(ctx, a.currency))]
            return [ev.ParticipantOnboardingStarted(**_fields(ev.ParticipantRequest, command)),
                    *requests]
        case ev.FundSettlementAccount():
            return _fund(state, command, ctx)
    _require_ledger_result(command)
    if state is None:
        raise DepositsError(Code.UNKNOWN_PARTICIPANT, "no such participant")
    return _participant_ledger_result(state, command)


def _fund(state: Participant | None, cmd: ev.FundSettlementAccount, ctx: Context
          ) -> list[Payload]:
    if state is None:
        raise DepositsError(Code.UNKNOWN_PARTICIPANT, f"{cmd.participant_id} is not onboarded")
    if state.status is not ParticipantStatus.ACTIVE:
        raise DepositsError(Code.PARTICIPANT_NOT_ACTIVE, f"{cmd.participant_id} is {state.status}")
    if state.arrangement(cmd.currency) is None:
        raise DepositsError(Code.CURRENCY_NOT_ISSUED, f"no {cmd.currency} settlement account")
    rules = _rules(ctx, cmd.currency)
    seen = state.fundings.get(cmd.funding_id)
    if seen is not None:
        return _same_or_conflict(seen, cmd, "funding id")
    refusal = _amount_refusal(cmd.amount, rules)
    if refusal is not None:
        raise DepositsError(refusal.code, refusal.detail)
    post = acc.funding_post(cmd.funding_id, cmd.participant_id, rules,
                            parse_amount(cmd.amount, rules.scale))
    return [ev.SettlementFundingReceived(**_fields(ev.SettlementFundingReceived, cmd)),
            acc.ledger_request("fund", post.posting_id, post)]


def _require_ledger_result(command: object) -> None:
    if not isinstance(command, PostingAccepted | PostingRejected):
        raise TypeError(f"{type(command).__name__} is not a command of this aggregate")


def _participant_ledger_result(state: Participant, result: LedgerResult) -> list[Payload]:
    purpose = state.outstanding.get(result.command_id)
    if purpose is None:
        return []
    d = _Decision(state, evolve_participant)
    ok, code, detail = _answer(d, result, purpose)
    if purpose == "fund":
        funding = next(f for f in state.fundings.values()
                       if acc.funding_posting_id(f.funding_id) == result.command_id)
        if ok:
            d.emit(ev.SettlementAccountFunded(**_funded_fields(funding, result.command_id)))
        else:
            d.emit(ev.SettlementFundingRejected(
                funding_id=funding.funding_id, participant_id=funding.participant_id,
                currency=funding.currency, code=Code.LEDGER_REJECTED, detail=f"{code}: {detail}"))
        return d.events
    if d.state.status is ParticipantStatus.ONBOARDING:
        if not ok:
            d.emit(ev.ParticipantOnboardingFailed(
                **_fields(ev.ParticipantRequest, state.request), code=Code.LEDGER_REJECTED,
                detail=f"{purpose} {result.command_id}: {code} {detail}".strip()))
        elif not d.state.outstanding:
            d.emit(ev.ParticipantOnboarded(
                participant_id=state.participant_id,
                currencies=tuple(a.currency for a in state.request.currencies)))
    return d.events


def _funded_fields(funding: ev.SettlementFundingReceived, posting_id: str) -> dict[str, Any]:
    return {"funding_id": funding.funding_id, "participant_id": funding.participant_id,
            "currency": funding.currency, "amount": funding.amount, "posting_id": posting_id}


def _answer(d: _Decision[Any], result: LedgerResult, purpose: ev.LedgerPurpose
            ) -> tuple[bool, str | None, str]:
    """Record the ledger's answer; "already there" counts as accepted for account set-up."""
    accepted = isinstance(result, PostingAccepted)
    code = None if isinstance(result, PostingAccepted) else result.code
    detail = "" if isinstance(result, PostingAccepted) else result.detail
    d.emit(ev.LedgerCommandAnswered(purpose=purpose, ledger_key=result.command_id,
                                    accepted=accepted, code=code, detail=detail[:280]))
    ok = accepted or (code in _ALREADY_THERE and purpose in ("define_asset", "open_account"))
    return ok, code, detail


def evolve_participant(state: Participant | None, event: Payload) -> Participant:
    match event:
        case ev.ParticipantOnboardingStarted():
            return Participant(request=_as(ev.ParticipantRequest, event),
                               status=ParticipantStatus.ONBOARDING)
        case ev.ParticipantOnboardingFailed() if state is None:
            return Participant(request=_as(ev.ParticipantRequest, event),
                               status=ParticipantStatus.FAILED, failure_code=event.code)
    assert state is not None, f"{type(event).__name__} before the participant exists"
    match event:
        case ev.ParticipantOnboardingFailed():
            return state.model_copy(update={"status": ParticipantStatus.FAILED,
                                            "failure_code": event.code})
        case ev.ParticipantOnboarded():
            return state.model_copy(update={"status": ParticipantStatus.ACTIVE})
        case ev.SettlementFundingReceived():
            return state.model_copy(update={"fundings": {**state.fundings,
                                                         event.funding_id: event}})
        case ev.LedgerCommandRequested() | ev.LedgerCommandAnswered():
            return state.model_copy(update={"outstanding": _track(state.outstanding, event)})
    return state


def _track(outstanding: Mapping[str, ev.LedgerPurpose], event: Payload
           ) -> dict[str, ev.LedgerPurpose]:
    if isinstance(event, ev.LedgerCommandRequested):
        return {**outstanding, event.ledger_key: event.purpose}
    assert isinstance(event, ev.LedgerCommandAnswered)
    return {k: v for k, v in outstanding.items() if k != event.ledger_key}


# --- wallets ------------------------------------------------------------------------------------


def decide_wallet(
    state: Wallet | None,
    command: ev.OpenWallet | ev.FreezeWallet | ev.UnfreezeWallet | LedgerResult,
    ctx: Context,
) -> list[Payload]:
    """Open a KYC'd customer's wallet (TD-8), freeze and unfreeze it (events, never deletions)."""
    match command:
        case ev.OpenWallet():
            if state is not None:
                return _same_or_conflict(state.request, command, "wallet id")
            return _open_wallet(command, ctx)
    if not isinstance(command, ev.FreezeWallet | ev.UnfreezeWallet):
        _require_ledger_result(command)
    if state is None:
        raise DepositsError(Code.UNKNOWN_WALLET, "no such wallet")
    req = state.request
    match command:
        case ev.FreezeWallet():
            if state.status is not WalletStatus.OPEN:
                raise DepositsError(Code.WALLET_NOT_OPEN, f"wallet is {state.status}")
            if state.frozen:
                return []
            return [ev.WalletFrozen(**_fields(ev.WalletFrozen, command)),
                    *acc.wallet_freeze_requests(req.participant_id, req.wallet_id,
                                                req.currencies, freeze=True,
                                                generation=state.freeze_generation + 1)]
        case ev.UnfreezeWallet():
            if not state.frozen:
                return []
            return [ev.WalletUnfrozen(**_fields(ev.WalletUnfrozen, command)),
                    *acc.wallet_freeze_requests(req.participant_id, req.wallet_id,
                                                req.currencies, freeze=False,
                                                generation=state.freeze_generation)]
    return _wallet_ledger_result(state, command)


def _open_wallet(cmd: ev.OpenWallet, ctx: Context) -> list[Payload]:
    refusal: _Refusal | None = None
    p = ctx.participants.get(cmd.participant_id)
    if p is None:
        refusal = _Refusal(Code.UNKNOWN_PARTICIPANT, f"{cmd.participant_id} is not onboarded")
    elif p.status is not ParticipantStatus.ACTIVE:
        refusal = _Refusal(Code.PARTICIPANT_NOT_ACTIVE, f"{cmd.participant_id} is {p.status}")
    else:
        for ccy in cmd.currencies:
            if ctx.config.rules(ccy) is None:
                refusal = _Refusal(Code.CURRENCY_NOT_CONFIGURED, f"{ccy} is not configured")
            elif p.arrangement(ccy) is None:
                refusal = _Refusal(Code.CURRENCY_NOT_ISSUED,
                                   f"{cmd.participant_id} issues no {ccy} tokens")
            if refusal is not None:
                break
    if refusal is not None:
        return [ev.WalletOpenRejected(**_fields(ev.WalletRequest, cmd), code=refusal.code,
                                      detail=refusal.detail)]
    return [ev.WalletOpenRequested(**_fields(ev.WalletRequest, cmd)),
            *acc.wallet_open_requests(cmd.participant_id, cmd.wallet_id, cmd.currencies)]


def _wallet_ledger_result(state: Wallet, result: LedgerResult) -> list[Payload]:
    purpose = state.outstanding.get(result.command_id)
    if purpose is None:
        return []
    d = _Decision(state, evolve_wallet)
    ok, code, detail = _answer(d, result, purpose)
    if purpose == "open_account" and d.state.status is WalletStatus.OPENING:
        req = state.request
        if not ok:
            d.emit(ev.WalletOpenRejected(**_fields(ev.WalletRequest, req),
                                         code=Code.LEDGER_REJECTED, detail=f"{code} {detail}"))
        elif not any(p == "open_account" for p in d.state.outstanding.values()):
            d.emit(ev.WalletOpened(participant_id=req.participant_id, wallet_id=req.wallet_id,
                                   currencies=req.currencies))
    return d.events


def evolve_wallet(state: Wallet | None, event: Payload) -> Wallet:
    match event:
        case ev.WalletOpenRequested():
            return Wallet(request=_as(ev.WalletRequest, event), status=WalletStatus.OPENING)
        case ev.WalletOpenRejected() if state is None:
            return Wallet(request=_as(ev.WalletRequest, event), status=WalletStatus.REJECTED,
                          failure_code=event.code)
    assert state is not None, f"{type(event).__name__} before the wallet exists"
    match event:
        case ev.WalletOpenRejected():
            return state.model_copy(update={"status": WalletStatus.REJECTED,
                                            "failure_code": event.code})
        case ev.WalletOpened():
            return state.model_copy(update={"status": WalletStatus.OPEN})
        case ev.WalletFrozen():
            return state.model_copy(update={"frozen": True,
                                            "freeze_generation": state.freeze_generation + 1})
        case ev.WalletUnfrozen():
            return state.model_copy(update={"frozen": False})
        case ev.LedgerCommandRequested() | ev.LedgerCommandAnswered():
            return state.model_copy(update={"outstanding": _track(state.outstanding, event)})
    return state


# --- conversions (issue / redeem) ---------------------------------------------------------------


def decide_conversion(
    state: Conversion | None,
    command: ev.IssueDepositToken | ev.RedeemDepositToken | LedgerResult,
    ctx: Context,
) -> list[Payload]:
    """Mint against the conventional deposit, or burn back to it (TD-2); 24/7, one posting."""
    if isinstance(command, ev.IssueDepositToken | ev.RedeemDepositToken):
        kind: Literal["issue", "redeem"] = (
            "issue" if isinstance(command, ev.IssueDepositToken) else "redeem")
        if state is not None:
            if state.kind != kind:
                raise InstructionConflictError("UETR already used by the other conversion kind",
                                               code=Code.ID_CONFLICT.value)
            return _same_or_conflict(state.instruction, command, "UETR")
        return _convert(command, kind, ctx)
    _require_ledger_result(command)
    if state is None:
        raise DepositsError(Code.UNKNOWN_TRANSFER, "no such conversion")
    purpose = state.outstanding.get(command.command_id)
    if purpose is None:
        return []
    d = _Decision(state, evolve_conversion)
    ok, code, detail = _answer(d, command, purpose)
    i = state.instruction
    common = _fields(ev.ConversionInstruction, i)
    if not ok:
        d.emit(ev.ConversionRejected(**common, kind=state.kind,
                                     code=_ledger_code(code, purpose), detail=f"{code} {detail}"))
    elif state.kind == "issue":
        d.emit(ev.DepositTokensMinted(**common, cause="issue", posting_id=command.command_id))
    else:
        d.emit(ev.DepositTokensBurned(**common, cause="redeem", posting_id=command.command_id))
    return d.events


def _convert(cmd: ev.ConversionInstruction, kind: Literal["issue", "redeem"], ctx: Context
             ) -> list[Payload]:
    rules = ctx.config.rules(cmd.currency)
    common = _fields(ev.ConversionInstruction, cmd)
    if rules is None:
        return [ev.ConversionRejected(**common, kind=kind, code=Code.CURRENCY_NOT_CONFIGURED,
                                      detail=f"{cmd.currency} is not configured")]
    refusal = _amount_refusal(cmd.amount, rules) or _party_refusal(
        ctx, cmd.participant_id, cmd.wallet_id, cmd.currency, None)
    if refusal is not None:
        return [ev.ConversionRejected(**common, kind=kind, code=refusal.code,
                                      detail=refusal.detail)]
    build = acc.issue_post if kind == "issue" else acc.redeem_post
    post = build(cmd.uetr, cmd.end_to_end_id, cmd.participant_id, cmd.wallet_id, cmd.currency,
                 parse_amount(cmd.amount, rules.scale), rules.scale)
    return [ev.ConversionInstructed(**common, kind=kind),
            acc.ledger_request(kind, post.posting_id, post, uetr=cmd.uetr,
                               end_to_end_id=cmd.end_to_end_id)]


def evolve_conversion(state: Conversion | None, event: Payload) -> Conversion:
    match event:
        case ev.ConversionInstructed():
            return Conversion(instruction=_as(ev.ConversionInstruction, event), kind=event.kind,
                              status=ConversionStatus.REQUESTED)
        case ev.ConversionRejected():
            return Conversion(instruction=_as(ev.ConversionInstruction, event), kind=event.kind,
                              status=ConversionStatus.REJECTED, code=event.code,
                              outstanding=state.outstanding if state else {})
    assert state is not None, f"{type(event).__name__} before the conversion exists"
    match event:
        case ev.DepositTokensMinted() | ev.DepositTokensBurned():
            return state.model_copy(update={"status": ConversionStatus.COMPLETED})
        case ev.LedgerCommandRequested() | ev.LedgerCommandAnswered():
            return state.model_copy(update={"outstanding": _track(state.outstanding, event)})
    return state


# --- transfers ----------------------------------------------------------------------------------

TransferCommand = (
    ev.InstructTransfer | ev.SettleInterbankLeg | ev.RejectInterbankLeg | ev.CancelTransfer
    | PostingAccepted | PostingRejected | Tick | RetrySettlement
)
_TRANSFER_COMMANDS: Final = (ev.SettleInterbankLeg, ev.RejectInterbankLeg, ev.CancelTransfer,
                             PostingAccepted, PostingRejected, Tick, RetrySettlement)


def decide_transfer(state: Transfer | None, command: TransferCommand, ctx: Context
                    ) -> list[Payload]:
    """Decide one command on a transfer (see the module docstring for the state machine)."""
    if isinstance(command, ev.InstructTransfer):
        if state is not None:
            return _same_or_conflict(state.instruction, command, "UETR")
        return _instruct(command, ctx)
    if not isinstance(command, _TRANSFER_COMMANDS):
        raise TypeError(f"{type(command).__name__} is not a transfer command")
    if state is None:
        raise DepositsError(Code.UNKNOWN_TRANSFER, "no such transfer")
    d = _Decision(state, evolve_transfer)
    match command:
        case PostingAccepted() | PostingRejected():
            _on_ledger_result(d, command, ctx)
        case ev.SettleInterbankLeg():
            _on_settled_leg(d, command, ctx)
        case ev.RejectInterbankLeg():
            _on_rejected_leg(d, command)
        case ev.CancelTransfer():
            _on_cancel(d, command)
        case Tick():
            _on_tick(d, ctx)
        case RetrySettlement():
            _on_retry(d, ctx)
    return d.events


def _transfer_refusal(cmd: ev.InstructTransfer, ctx: Context) -> _Refusal | None:
    """Checks in order: currency configured, amount, payer side, payee side, same wallet."""
    rules = ctx.config.rules(cmd.currency)
    if rules is None:
        return _Refusal(Code.CURRENCY_NOT_CONFIGURED, f"{cmd.currency} is not configured")
    return (
        _amount_refusal(cmd.amount, rules)
        or _party_refusal(ctx, cmd.payer_participant, cmd.payer_wallet, cmd.currency, "payer")
        or _party_refusal(ctx, cmd.payee_participant, cmd.payee_wallet, cmd.currency, "payee")
        or (_Refusal(Code.SAME_WALLET, "payer and payee are the same wallet")
            if (cmd.payer_participant, cmd.payer_wallet)
            == (cmd.payee_participant, cmd.payee_wallet) else None)
    )


def _instruct(cmd: ev.InstructTransfer, ctx: Context) -> list[Payload]:
    common = _fields(ev.TransferInstruction, cmd)
    refusal = _transfer_refusal(cmd, ctx)
    if refusal is not None:
        return [ev.TransferRejected(**common, code=refusal.code, detail=refusal.detail,
                                    party=refusal.party)]
    rules = _rules(ctx, cmd.currency)
    amount, now = parse_amount(cmd.amount, rules.scale), ctx.now.astimezone(UTC)
    refs = {"uetr": cmd.uetr, "end_to_end_id": cmd.end_to_end_id}
    if cmd.payer_participant == cmd.payee_participant:
        post = acc.intra_transfer_post(cmd.uetr, cmd.end_to_end_id, cmd.payer_participant,
                                       cmd.payer_wallet, cmd.payee_wallet, cmd.currency, amount,
                                       rules.scale)
        return [ev.TransferInstructed(**common, route="intra_bank", settlement_mode=None,
                                      instructed_at=now, hold_deadline=None,
                                      ledger_expiry_at=None),
                acc.ledger_request("transfer", post.posting_id, post, **refs)]
    deadline = cal.hold_deadline(rules, now)
    expiry = deadline + timedelta(seconds=rules.confirmation_timeout_s
                                  + rules.ledger_timeout_margin_s)
    timeout = _timeout_s(expiry, now)
    burn = acc.burn_pending(cmd.uetr, cmd.end_to_end_id, cmd.payer_participant,
                            cmd.payer_wallet, cmd.currency, amount, rules.scale, timeout)
    mint = acc.mint_pending(cmd.uetr, cmd.end_to_end_id, cmd.payee_participant,
                            cmd.payee_wallet, cmd.currency, amount, rules.scale, timeout)
    events: list[Payload] = [
        ev.TransferInstructed(**common, route="interbank", settlement_mode=rules.settlement_mode,
                              instructed_at=now, hold_deadline=deadline, ledger_expiry_at=expiry),
        acc.ledger_request("burn", burn.posting_id, burn, **refs),
        acc.ledger_request("mint", mint.posting_id, mint, **refs)]
    if _settles_at_once(cmd, rules, ctx):
        # All three members of the group go to the ledger together; the commit follows once
        # each is held. One ledger round trip fewer than holding the token legs first, and
        # nothing changes if a leg is refused: the group is voided as before (TD-3).
        settle = acc.settle_pending(cmd.uetr, cmd.end_to_end_id, cmd.payer_participant,
                                    cmd.payee_participant, rules, amount, 1, timeout)
        events.append(acc.ledger_request("settle", settle.posting_id, settle, **refs))
    return events


def _settles_at_once(cmd: ev.InstructTransfer, rules: cal.CurrencyRules, ctx: Context) -> bool:
    """A ``wcbdc`` leg can be asked for with the token legs: the settlement asset is on the
    ledger, its window is open and no transfer of the payer bank waits ahead (TD-5 order)."""
    return (rules.settlement_mode == "wcbdc" and cal.window_open(rules, ctx.now)
            and not ctx.queue_depth.get(queue_key(cmd.payer_participant, cmd.currency), 0))


def _refs(t: Transfer) -> dict[str, Any]:
    return {"uetr": t.instruction.uetr, "end_to_end_id": t.instruction.end_to_end_id}


def _on_ledger_result(d: _Decision[Transfer], result: LedgerResult, ctx: Context) -> None:
    purpose = d.state.outstanding.get(result.command_id)
    if purpose is None:
        return  # a redelivered or stale answer: nothing to do
    ok, code, detail = _answer(d, result, purpose)
    t = d.state
    if purpose == "transfer":
        if ok:
            d.emit(ev.TransferSettled(**_refs(t), route="intra_bank", settled_at=ctx.now,
                                      posting_id=result.command_id))
        else:
            d.emit(ev.TransferFailed(**_refs(t), code=_ledger_code(code, purpose),
                                     detail=f"{code} {detail}".strip()))
    elif purpose in ("burn", "mint"):
        if ok and purpose == "burn":
            i = t.instruction
            d.emit(ev.FundsEarmarked(**_refs(t), participant_id=i.payer_participant,
                                     wallet_id=i.payer_wallet, currency=i.currency,
                                     amount=i.amount, posting_id=result.command_id,
                                     settlement_group=acc.settlement_group(t.uetr)))
        if not ok and not t.final:
            d.emit(ev.TransferFailed(**_refs(t), code=_ledger_code(code, purpose),
                                     detail=f"{purpose}: {code} {detail}".strip()))
        _advance(d, ctx)
    elif purpose == "settle":
        _on_settle_answer(d, ok, code, detail, ctx)
    elif purpose == "commit":
        _on_commit_answer(d, ok, code, detail, ctx)
    elif purpose == "void" and (ok or code == "already_voided") and "burn" in t.held:
        i = t.instruction
        d.emit(ev.EarmarkReleased(**_refs(t), participant_id=i.payer_participant,
                                  wallet_id=i.payer_wallet, currency=i.currency, amount=i.amount,
                                  posting_id=result.command_id))
    _release_if_idle(d)


def _advance(d: _Decision[Transfer], ctx: Context) -> None:
    """Both token legs held: wait for the window, join the queue, or try the interbank leg;
    commit at once if a ``wcbdc`` leg asked for with them is already held."""
    t = d.state
    if t.status is TS.SETTLING and t.mode == "wcbdc" and t.held >= _MEMBERS:
        _commit(d)
        return
    if t.status is not TS.INSTRUCTED or not {"burn", "mint"} <= t.held:
        return
    rules = _rules(ctx, t.instruction.currency)
    if t.hold_deadline is not None and ctx.now >= t.hold_deadline:
        _expire(d, "hold_timeout", t.hold_deadline)
    elif not cal.window_open(rules, ctx.now):
        d.emit(ev.TransferAwaitingWindow(**_refs(t), currency=rules.currency,
                                         window_opens_at=cal.window_opens_at(rules, ctx.now)))
    else:
        _attempt(d, ctx, rules, respect_queue=True)


def _attempt(d: _Decision[Transfer], ctx: Context, rules: cal.CurrencyRules, *,
             respect_queue: bool) -> None:
    t, i = d.state, d.state.instruction
    key = queue_key(i.payer_participant, i.currency)
    if respect_queue and ctx.queue_depth.get(key, 0) > 0:
        d.emit(ev.InterbankSettlementQueued(
            **_refs(t), participant_id=i.payer_participant, currency=i.currency, queue_key=key,
            queued_since=t.queued_since or ctx.now, attempt=t.attempts, reason="queue_not_empty"))
        return
    assert t.ledger_expiry_at is not None
    pending = acc.settle_pending(t.uetr, i.end_to_end_id, i.payer_participant,
                                 i.payee_participant, rules, parse_amount(i.amount, rules.scale),
                                 t.attempts + 1, _timeout_s(t.ledger_expiry_at, ctx.now))
    d.emit(acc.ledger_request("settle", pending.posting_id, pending, **_refs(t)))


def _on_settle_answer(d: _Decision[Transfer], ok: bool, code: str | None, detail: str,
                      ctx: Context) -> None:
    t, i = d.state, d.state.instruction
    if t.final:
        return  # released meanwhile: the void (sent once idle) takes this leg too
    if ok and t.mode == "rtgs" and t.hold_deadline is not None and ctx.now >= t.hold_deadline:
        _expire(d, "hold_timeout", t.hold_deadline)  # too late for today's pacs.009
    elif ok and t.mode == "wcbdc":
        if {"burn", "mint"} <= t.held:
            _commit(d)
        # else: asked for with the token legs; the last of their answers commits (_advance)
    elif ok:
        rules = _rules(ctx, i.currency)
        payer, payee = ctx.participants.get(i.payer_participant), ctx.participants.get(
            i.payee_participant)
        d.emit(ev.InterbankSettlementRequested(
            **_refs(t), instructing_agent=i.payer_participant,
            instructed_agent=i.payee_participant,
            debtor_settlement_account=_settlement_ref(payer, i.currency, i.payer_participant),
            creditor_settlement_account=_settlement_ref(payee, i.currency, i.payee_participant),
            currency=i.currency, amount=i.amount,
            interbank_settlement_date=cal.settlement_date(rules, ctx.now),
            confirm_by=ctx.now + timedelta(seconds=rules.confirmation_timeout_s)))
    elif code == "insufficient_funds":
        d.emit(ev.InterbankSettlementQueued(
            **_refs(t), participant_id=i.payer_participant, currency=i.currency,
            queue_key=queue_key(i.payer_participant, i.currency),
            queued_since=t.queued_since or ctx.now, attempt=t.attempts,
            reason="insufficient_settlement_funds"))
    else:
        d.emit(ev.TransferFailed(**_refs(t), code=_ledger_code(code, "settle"),
                                 detail=f"settle: {code} {detail}".strip()))


def _commit(d: _Decision[Transfer]) -> None:
    t = d.state
    d.emit(acc.ledger_request("commit", acc.transfer_posting_id(t.uetr, "commit"),
                              acc.commit_group(t.uetr), **_refs(t)))


def _settlement_ref(p: Participant | None, currency: str, bank: str) -> str:
    a = p.arrangement(currency) if p is not None else None
    return a.settlement_account_ref if a is not None else bank


def _on_commit_answer(d: _Decision[Transfer], ok: bool, code: str | None, detail: str,
                      ctx: Context) -> None:
    t, i = d.state, d.state.instruction
    if ok:
        if t.mode == "wcbdc":
            d.emit(ev.InterbankSettlementSettled(**_refs(t), settlement_mode="wcbdc",
                                                 settled_at=ctx.now))
        legs = {"currency": i.currency, "amount": i.amount}
        d.emit(ev.DepositTokensBurned(**_refs(t), participant_id=i.payer_participant,
                                      wallet_id=i.payer_wallet, **legs, cause="interbank",
                                      posting_id=acc.transfer_posting_id(t.uetr, "burn")),
               ev.DepositTokensMinted(**_refs(t), participant_id=i.payee_participant,
                                      wallet_id=i.payee_wallet, **legs, cause="interbank",
                                      posting_id=acc.transfer_posting_id(t.uetr, "mint")),
               ev.TransferSettled(**_refs(t), route="interbank", settled_at=ctx.now,
                                  posting_id=acc.transfer_posting_id(t.uetr, "commit")))
    elif t.agent_settled:
        d.emit(ev.TransferSettlementBlocked(**_refs(t), code=_ledger_code(code, "commit"),
                                            detail=f"commit: {code} {detail}".strip()))
    elif code == "pending_expired":
        _expire(d, "ledger_expired", t.ledger_expiry_at)
    else:
        d.emit(ev.TransferFailed(**_refs(t), code=_ledger_code(code, "commit"),
                                 detail=f"commit: {code} {detail}".strip()))


def _expire(d: _Decision[Transfer], code: ev.ExpiryCode, deadline: datetime | None) -> None:
    d.emit(ev.TransferExpired(**_refs(d.state), code=code, deadline=deadline))
    _release_if_idle(d)


def _release_if_idle(d: _Decision[Transfer]) -> None:
    """Void the group once the transfer is released and no member pending is in flight."""
    t = d.state
    if t.status not in _RELEASING or t.route != "interbank" or t.void_requested:
        return
    if t.members_in_flight or not t.held:
        return  # in flight: wait for the answers; nothing held: nothing to release
    d.emit(acc.ledger_request("void", acc.transfer_posting_id(t.uetr, "void"),
                              acc.void_group(t.uetr), **_refs(t)))


def _check_refs(t: Transfer, cmd: ev.SettleInterbankLeg | ev.RejectInterbankLeg) -> None:
    if cmd.end_to_end_id != t.instruction.end_to_end_id:
        raise DepositsError(Code.REFERENCE_MISMATCH, "EndToEndId differs from the transfer's",
                            uetr=t.uetr)
    if t.mode != "rtgs":
        raise DepositsError(Code.UNEXPECTED_CONFIRMATION, "not an rtgs interbank transfer",
                            uetr=t.uetr)


def _on_settled_leg(d: _Decision[Transfer], cmd: ev.SettleInterbankLeg, ctx: Context) -> None:
    t = d.state
    _check_refs(t, cmd)
    settled_at = cmd.settled_at or ctx.now
    if t.status is TS.INTERBANK_REQUESTED:
        d.emit(ev.InterbankSettlementSettled(**_refs(t), settlement_mode="rtgs",
                                             settled_at=settled_at,
                                             agent_reference=cmd.agent_reference),
               acc.ledger_request("commit", acc.transfer_posting_id(t.uetr, "commit"),
                                  acc.commit_group(t.uetr), **_refs(t)))
    elif t.agent_settled:
        return  # the same ACSC again
    elif t.status in _RELEASING and t.requested:
        if not t.late_confirmation:
            d.emit(ev.InterbankLegSettledAfterRelease(**_refs(t),
                                                      agent_reference=cmd.agent_reference,
                                                      settled_at=settled_at))
    else:
        raise DepositsError(Code.UNEXPECTED_CONFIRMATION,
                            f"no pacs.009 outstanding (transfer is {t.status})", uetr=t.uetr)


def _on_rejected_leg(d: _Decision[Transfer], cmd: ev.RejectInterbankLeg) -> None:
    t = d.state
    _check_refs(t, cmd)
    if t.status is TS.INTERBANK_REQUESTED:
        d.emit(ev.InterbankSettlementRejected(**_refs(t), agent_reference=cmd.agent_reference,
                                              reason_code=cmd.reason_code,
                                              detail=cmd.detail or ""),
               ev.TransferFailed(**_refs(t), code=Code.INTERBANK_REJECTED,
                                 detail=f"{cmd.reason_code} {cmd.detail or ''}".strip()))
        _release_if_idle(d)
    elif t.status in _RELEASING and t.requested and not t.agent_settled:
        return  # the same RJCT again, or a RJCT after our own timeout: already released
    else:
        raise DepositsError(Code.UNEXPECTED_CONFIRMATION,
                            f"no pacs.009 outstanding (transfer is {t.status})", uetr=t.uetr)


def _on_cancel(d: _Decision[Transfer], cmd: ev.CancelTransfer) -> None:
    t = d.state
    if t.status is TS.CANCELLED:
        return
    if t.status is TS.SETTLED:
        raise DepositsError(Code.ALREADY_SETTLED, "a settled transfer is final", uetr=t.uetr)
    if t.final:
        raise DepositsError(Code.ALREADY_FINAL, f"the transfer is {t.status}", uetr=t.uetr)
    if t.route == "intra_bank" or t.status not in _WAITING:
        raise DepositsError(Code.SETTLEMENT_IN_PROGRESS,
                            f"cannot cancel while {t.status}: the leg is with the "
                            "ledger or the settlement agent", uetr=t.uetr)
    d.emit(ev.TransferCancelled(**_refs(t), reason=cmd.reason, requested_by=cmd.requested_by))
    _release_if_idle(d)


def _on_tick(d: _Decision[Transfer], ctx: Context) -> None:
    t, now = d.state, ctx.now
    if t.route != "interbank":
        return
    if t.status in _WAITING and t.hold_deadline is not None and now >= t.hold_deadline:
        # A queued transfer whose retry is with the ledger (settling) is still in the queue.
        code: ev.ExpiryCode = ("queued_past_cutoff" if t.queued_since is not None
                               else "hold_timeout")
        _expire(d, code, t.hold_deadline)
    elif t.status is TS.INTERBANK_REQUESTED and t.confirm_by is not None and now >= t.confirm_by:
        _expire(d, "confirmation_timeout", t.confirm_by)
    elif t.status is TS.AWAITING_WINDOW:
        rules = _rules(ctx, t.instruction.currency)
        if cal.window_open(rules, now):
            _attempt(d, ctx, rules, respect_queue=True)


def _on_retry(d: _Decision[Transfer], ctx: Context) -> None:
    t = d.state
    if t.status is not TS.QUEUED:
        return  # stale: it left the queue meanwhile
    rules = _rules(ctx, t.instruction.currency)
    if t.hold_deadline is not None and ctx.now >= t.hold_deadline:
        _expire(d, "queued_past_cutoff", t.hold_deadline)
    elif cal.window_open(rules, ctx.now):
        _attempt(d, ctx, rules, respect_queue=False)


def evolve_transfer(state: Transfer | None, event: Payload) -> Transfer:
    match event:
        case ev.TransferRejected():
            return Transfer(instruction=_as(ev.TransferInstruction, event),
                            status=TS.REJECTED, outcome_code=event.code)
        case ev.TransferInstructed():
            return Transfer(instruction=_as(ev.TransferInstruction, event),
                            status=TS.INSTRUCTED, route=event.route,
                            mode=event.settlement_mode, instructed_at=event.instructed_at,
                            hold_deadline=event.hold_deadline,
                            ledger_expiry_at=event.ledger_expiry_at)
    assert state is not None, f"{type(event).__name__} before the transfer exists"
    return state.model_copy(update=_transfer_update(state, event))


def _transfer_update(t: Transfer, event: Payload) -> dict[str, Any]:
    match event:
        case ev.LedgerCommandRequested():
            update: dict[str, Any] = {"outstanding": _track(t.outstanding, event)}
            if event.purpose == "settle":
                update |= {"attempts": t.attempts + 1, "status": TS.SETTLING}
            elif event.purpose == "commit":
                update["status"] = TS.COMMITTING
            elif event.purpose == "void":
                update["void_requested"] = True
            return update
        case ev.LedgerCommandAnswered():
            update = {"outstanding": _track(t.outstanding, event)}
            if event.accepted and event.purpose in _MEMBERS:
                update["held"] = t.held | {event.purpose}
            if event.purpose == "void" and (event.accepted or event.code == "already_voided"):
                update["released"] = True
            return update
        case ev.TransferAwaitingWindow():
            return {"status": TS.AWAITING_WINDOW}
        case ev.InterbankSettlementQueued():
            return {"status": TS.QUEUED, "queued_since": t.queued_since or event.queued_since}
        case ev.InterbankSettlementRequested():
            return {"status": TS.INTERBANK_REQUESTED, "requested": True,
                    "confirm_by": event.confirm_by}
        case ev.InterbankSettlementSettled():
            return {"agent_settled": event.settlement_mode == "rtgs"}
        case ev.TransferSettled():
            return {"status": TS.SETTLED, "settled_at": event.settled_at}
        case ev.TransferFailed():
            return {"status": TS.FAILED, "outcome_code": event.code}
        case ev.TransferCancelled():
            return {"status": TS.CANCELLED, "outcome_code": "cancelled"}
        case ev.TransferExpired():
            return {"status": TS.EXPIRED, "outcome_code": event.code}
        case ev.TransferSettlementBlocked():
            return {"status": TS.BLOCKED, "outcome_code": event.code}
        case ev.EarmarkReleased():
            return {"released": True}
        case ev.InterbankLegSettledAfterRelease():
            return {"late_confirmation": True}
    return {}


# --- read-model helpers for the service ---------------------------------------------------------


class QueueEntry(NamedTuple):
    """One queued transfer, as ops see the queue of a payer bank and currency (TD-5)."""

    queue_key: str
    queued_since: datetime
    uetr: str
    amount: str
    attempts: int
    retrying: bool
    """A retry is with the ledger: the dispatcher waits for its answer before the next one."""


def queue_entry(t: Transfer) -> QueueEntry | None:
    """The transfer's place in its queue, or ``None`` when it is not in one.

    A queued transfer keeps its place while a retry is in flight (``settling``), so that a
    transfer becoming ready meanwhile still sees a non-empty queue and cannot overtake it.
    """
    if t.queued_since is None or t.status not in (TS.QUEUED, TS.SETTLING):
        return None
    i = t.instruction
    return QueueEntry(queue_key(i.payer_participant, i.currency), t.queued_since, t.uetr,
                      i.amount, t.attempts, t.status is TS.SETTLING)


def queue_order(transfers: Iterable[Transfer]) -> list[QueueEntry]:
    """Every queued transfer, grouped by queue and in FIFO order within it; heads first."""
    entries = [e for t in transfers if (e := queue_entry(t)) is not None]
    return sorted(entries, key=lambda e: (e.queue_key, e.queued_since, e.uetr))


def next_wakeup(t: Transfer, config: cal.DepositsConfig, now: datetime) -> datetime | None:
    """When the scheduler must send this transfer a :class:`Tick` (``None``: never)."""
    if t.route != "interbank":
        return None
    if t.status is TS.AWAITING_WINDOW:
        rules = config.rules(t.instruction.currency)
        opens = cal.window_opens_at(rules, now) if rules is not None else None
        return min(d for d in (opens, t.hold_deadline) if d is not None)
    if t.status in _WAITING:
        return t.hold_deadline
    if t.status is TS.INTERBANK_REQUESTED:
        return t.confirm_by
    return None


def stream_of(command: Payload) -> str | None:
    """The event stream a deposits command belongs to; ``None`` for ledger results (route those
    by the ``ledger_key`` the service recorded with each ``LedgerCommandRequested``)."""
    match command:
        case ev.InstructTransfer() | ev.SettleInterbankLeg() | ev.RejectInterbankLeg() \
                | ev.CancelTransfer():
            return f"transfer:{command.uetr}"
        case ev.IssueDepositToken() | ev.RedeemDepositToken():
            return f"conversion:{command.uetr}"
        case ev.OnboardParticipant() | ev.FundSettlementAccount():
            return f"participant:{command.participant_id}"
        case ev.OpenWallet() | ev.FreezeWallet() | ev.UnfreezeWallet():
            return f"wallet:{wallet_key(command.participant_id, command.wallet_id)}"
    return None
