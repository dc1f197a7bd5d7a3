"""The tokenized-deposits domain as given-events / when-command / then-events tables.

Reading guide. Each table row is a rule: *given* the history a story has built, *when* one
command arrives, *then* exactly these events (in order). Events print compactly:
``ledger burn td:U:burn`` is a ``LedgerCommandRequested`` (purpose and id, the transfer's UETR
shown as ``U``); ``answered settle insufficient_funds`` a ``LedgerCommandAnswered``;
``TransferRejected(wallet_frozen, payee)`` an event with its code and party.

The world: HSBC (``HSBCHKHH``) and Hang Seng (``HASEHKHH``) issue tokens in HKD, settled in
``rtgs`` mode (CHATS 09:00-17:30 HKT, Mon-Fri, Christmas holidays) and in CNH, settled in
``wcbdc`` mode (24/7). Alice and Frank bank with HSBC (Frank is frozen), Bob with Hang Seng.
``NOW`` is Monday 2025-12-01 11:00 HKT, inside the HKD window.

The last sections run whole stories against the real ledger state machine
(``services.ledger.domain.LedgerState``), first scripted, then as a property over random
interleavings of instructions, fundings, ops, agent answers, the clock and out-of-order ledger
answers: TD-1 and per-asset balance hold after every step, every transfer ends settled or
released, nothing stays held, and the wallets equal the independently computed balances.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as observe
from hypothesis import strategies as st

from services.deposits import accounts as acc
from services.deposits import calendar as cal
from services.deposits import domain as dm
from shared.errors import DomainError, IdempotencyConflictError
from shared.events import deposits as ev
from shared.events.envelope import decode, encode, new_envelope
from shared.events.ledger import (
    CommitGroup,
    FreezeAccount,
    OpenAccount,
    Post,
    PostingAccepted,
    PostingRejected,
    PostPending,
    VoidGroup,
)
from shared.events.registry import Payload

# --- the world ----------------------------------------------------------------------------------

HSBC, HASE, DBS = "HSBCHKHH", "HASEHKHH", "DBSSHKHH"
U = "8a562c67-ca16-48ba-b074-65581be6f011"
U2 = "0f0e7a53-3b5e-4a37-9c55-1b0a0c7d9e21"
U3 = "5d1c2b3a-7e6f-4a8b-8c9d-0e1f2a3b4c5d"
E2E = "E2E-2025-0001"
HOLIDAYS = frozenset({date(2025, 12, 25), date(2025, 12, 26)})
HK_CAL = cal.BusinessCalendar(timezone="Asia/Hong_Kong", holidays=HOLIDAYS)
HKD = cal.CurrencyRules(currency="HKD", scale=2, settlement_mode="rtgs",
                        settlement_asset="RTGS.HKD", calendar=HK_CAL,
                        window=cal.SettlementWindow(opens_at=time(9), closes_at=time(17, 30)))
CNH = cal.CurrencyRules(currency="CNH", scale=2, settlement_mode="wcbdc",
                        settlement_asset="WCBDC.CNH", calendar=HK_CAL, window=None)
CONFIG = cal.DepositsConfig(currencies={"HKD": HKD, "CNH": CNH})


def hkt(y: int, mo: int, d: int, h: int, mi: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, tzinfo=UTC) - timedelta(hours=8)


NOW = hkt(2025, 12, 1, 11)
CUTOFF = hkt(2025, 12, 1, 17, 30)


def participant(bank: str, currencies: Iterable[str] = ("HKD", "CNH"),
                status: dm.ParticipantStatus = dm.ParticipantStatus.ACTIVE) -> dm.Participant:
    req = ev.ParticipantRequest(
        participant_id=bank, name=bank,
        currencies=tuple(ev.CurrencyArrangement(currency=c, settlement_account_ref=f"SA-{bank}")
                         for c in currencies))
    return dm.Participant(request=req, status=status)


def wallet(bank: str, wallet_id: str, *, frozen: bool = False,
           status: dm.WalletStatus = dm.WalletStatus.OPEN,
           currencies: tuple[str, ...] = ("HKD", "CNH")) -> dm.Wallet:
    req = ev.WalletRequest(participant_id=bank, wallet_id=wallet_id, currencies=currencies,
                           customer_ref=f"C-{wallet_id}", kyc_ref=f"KYC-{wallet_id}")
    return dm.Wallet(request=req, status=status, frozen=frozen)


PARTICIPANTS = {
    HSBC: participant(HSBC),
    HASE: participant(HASE),
    DBS: participant(DBS, status=dm.ParticipantStatus.ONBOARDING),
    "BOCHHKHH": participant("BOCHHKHH", currencies=("HKD",)),
}
WALLETS = {dm.wallet_key(w.request.participant_id, w.request.wallet_id): w for w in (
    wallet(HSBC, "alice"), wallet(HSBC, "carol"), wallet(HASE, "bob"),
    wallet(HSBC, "frank", frozen=True), wallet(HASE, "fiona", frozen=True),
    wallet(HSBC, "olga", status=dm.WalletStatus.OPENING),
    wallet(HSBC, "hana", currencies=("HKD",)), wallet("BOCHHKHH", "bea", currencies=("HKD",)),
)}


def ctx(now: datetime = NOW, **queue_depth: int) -> dm.Context:
    return dm.Context(now=now, config=CONFIG, participants=PARTICIPANTS, wallets=WALLETS,
                      queue_depth={k.replace("_", ":"): v for k, v in queue_depth.items()})


def instruct(uetr: str = U, payer: tuple[str, str] = (HSBC, "alice"),
             payee: tuple[str, str] = (HASE, "bob"), currency: str = "HKD",
             amount: str = "100.00", **kw: Any) -> ev.InstructTransfer:
    return ev.InstructTransfer(uetr=uetr, end_to_end_id=kw.pop("e2e", E2E),
                               payer_participant=payer[0], payer_wallet=payer[1],
                               payee_participant=payee[0], payee_wallet=payee[1],
                               currency=currency, amount=amount, **kw)


def ok(key: str) -> PostingAccepted:
    return PostingAccepted(command_id=key.replace("U", U) if key.startswith("td:U") else key,
                           command_type="ledger.X")


def no(key: str, code: str) -> PostingRejected:
    return PostingRejected(command_id=key.replace("U", U) if key.startswith("td:U") else key,
                           command_type="ledger.X", code=code, detail="refused")


# --- compact events -----------------------------------------------------------------------------


def show(event: Payload) -> str:
    """One readable line per event, with the story's UETR shown as ``U``."""
    name = type(event).__name__
    if isinstance(event, ev.LedgerCommandRequested):
        text = f"ledger {event.purpose} {event.command_id}"
    elif isinstance(event, ev.LedgerCommandAnswered):
        text = f"answered {event.purpose} {'ok' if event.accepted else event.code}"
    elif isinstance(event, ev.InterbankSettlementQueued):
        text = f"{name}({event.reason}, attempt {event.attempt})"
    elif isinstance(event, ev.TransferRejected) and event.party:
        text = f"{name}({event.code}, {event.party})"
    elif (code := getattr(event, "code", None)) is not None:
        text = f"{name}({code})"
    else:
        text = name
    return text.replace(U, "U")


def shown(events: Iterable[Payload]) -> list[str]:
    return [show(e) for e in events]


class Story:
    """Builds a stream's history by deciding commands, as the service would."""

    def __init__(self, decide: Callable[..., list[Payload]],
                 evolve: Callable[[Any, Payload], Any], state: Any = None) -> None:
        self.decide, self.evolve, self.state = decide, evolve, state
        self.history: list[Payload] = []

    def given(self, *commands: Any, at: datetime = NOW, **queue: int) -> Story:
        for command in commands:
            self.when(command, at=at, **queue)
        return self

    def when(self, command: Any, at: datetime = NOW, **queue: int) -> list[Payload]:
        events = self.decide(self.state, command, ctx(at, **queue))
        self.state = dm.fold(self.evolve, events, self.state)
        self.history.extend(events)
        return events

    def then(self, command: Any, at: datetime = NOW, **queue: int) -> list[str]:
        return shown(self.when(command, at=at, **queue))


def transfer(*commands: Any, at: datetime = NOW, **queue: int) -> Story:
    return Story(dm.decide_transfer, dm.evolve_transfer).given(*commands, at=at, **queue)


def conversion(*commands: Any) -> Story:
    return Story(dm.decide_conversion, dm.evolve_conversion).given(*commands)


HELD = (ok("td:U:burn"), ok("td:U:mint"))  # both token legs held by the ledger


def rtgs_requested() -> Story:
    return transfer(instruct(), *HELD, ok("td:U:settle:1"))


def queued() -> Story:
    return transfer(instruct(), *HELD, no("td:U:settle:1", "insufficient_funds"))


# === participants ===============================================================================


def onboard(bank: str = HSBC, currencies: tuple[str, ...] = ("HKD",)) -> ev.OnboardParticipant:
    return ev.OnboardParticipant(
        participant_id=bank, name="The Hongkong and Shanghai Banking Corporation",
        currencies=tuple(ev.CurrencyArrangement(currency=c, settlement_account_ref=f"SA-{c}")
                         for c in currencies))


def onboarding_keys(story: Story) -> list[str]:
    return [e.ledger_key for e in story.history if isinstance(e, ev.LedgerCommandRequested)]


def test_onboarding_defines_assets_and_opens_the_chart_of_accounts() -> None:
    events = Story(dm.decide_participant, dm.evolve_participant).when(onboard())
    assert shown(events) == [
        "ParticipantOnboardingStarted",
        "ledger define_asset td:onboard:HSBCHKHH:asset:HKD",
        "ledger define_asset td:onboard:HSBCHKHH:asset:RTGS.HKD",
        "ledger define_asset td:onboard:HSBCHKHH:asset:TD.HSBCHKHH.HKD",
        "ledger open_account td:onboard:HSBCHKHH:open:td:agent:HKD:issuance",
        "ledger open_account td:onboard:HSBCHKHH:open:td:HSBCHKHH:HKD:liability",
        "ledger open_account td:onboard:HSBCHKHH:open:td:HSBCHKHH:HKD:conventional",
        "ledger open_account td:onboard:HSBCHKHH:open:td:HSBCHKHH:HKD:conversion",
        "ledger open_account td:onboard:HSBCHKHH:open:td:HSBCHKHH:HKD:settlement",
    ]
    opened = {e.command.account_id: e.command for e in events
              if isinstance(e, ev.LedgerCommandRequested) and isinstance(e.command, OpenAccount)}
    # TD-1: the liability can never go below zero; TD-5: no overdraft on the settlement account.
    assert opened["td:HSBCHKHH:HKD:liability"].credits_must_not_exceed_debits
    assert opened["td:HSBCHKHH:HKD:liability"].asset == "TD.HSBCHKHH.HKD"
    assert opened["td:HSBCHKHH:HKD:settlement"].debits_must_not_exceed_credits
    assert opened["td:HSBCHKHH:HKD:settlement"].asset == "RTGS.HKD"
    assert opened["td:agent:HKD:issuance"].participant == acc.AGENT_PARTICIPANT
    # Non-posting commands are keyed by a deterministic envelope id.
    first = next(e for e in events if isinstance(e, ev.LedgerCommandRequested))
    assert first.ledger_key == str(acc.ledger_event_id(first.command_id))


def test_onboarding_completes_only_when_the_ledger_accepted_every_account() -> None:
    story = Story(dm.decide_participant, dm.evolve_participant).given(onboard())
    keys = onboarding_keys(story)
    for key in keys[:-1]:
        assert "ParticipantOnboarded" not in story.then(ok(key))
    assert story.then(ok(keys[-1])) == ["answered open_account ok", "ParticipantOnboarded"]
    assert story.state.status is dm.ParticipantStatus.ACTIVE


def test_assets_and_accounts_already_on_the_ledger_count_as_opened() -> None:
    story = Story(dm.decide_participant, dm.evolve_participant).given(onboard())
    *first, last = onboarding_keys(story)
    story.given(*(no(k, "asset_exists") if i < 3 else ok(k) for i, k in enumerate(first)))
    assert story.then(no(last, "account_exists")) == [
        "answered open_account account_exists", "ParticipantOnboarded"]


@pytest.mark.parametrize(
    ("when", "then"),
    [
        ("refused", ["answered define_asset id_conflict",
                     "ParticipantOnboardingFailed(ledger_rejected)"]),
        ("duplicate", []),
    ],
)
def test_onboarding_fails_on_any_other_ledger_refusal(when: str, then: list[str]) -> None:
    story = Story(dm.decide_participant, dm.evolve_participant).given(onboard())
    key = onboarding_keys(story)[0]
    if when == "duplicate":
        story.given(ok(key))
        assert story.then(ok(key)) == then  # a redelivered result is a no-op
    else:
        assert story.then(no(key, "id_conflict")) == then
        assert story.state.status is dm.ParticipantStatus.FAILED


def test_onboarding_in_an_unconfigured_currency_is_recorded_as_failed() -> None:
    story = Story(dm.decide_participant, dm.evolve_participant)
    assert story.then(onboard(currencies=("HKD", "EUR"))) == [
        "ParticipantOnboardingFailed(currency_not_configured)"]
    assert story.then(onboard(currencies=("HKD", "EUR"))) == []  # same answer, nothing new


def test_onboarding_again_is_a_no_op_and_with_other_details_a_conflict() -> None:
    story = Story(dm.decide_participant, dm.evolve_participant).given(onboard())
    assert story.then(onboard()) == []
    with pytest.raises(IdempotencyConflictError) as err:
        story.when(onboard(currencies=("HKD", "CNH")))
    assert err.value.code == "id_conflict"


def fund(funding_id: str = "CHATS-IN-1", amount: str = "500.00", bank: str = HSBC,
         currency: str = "HKD") -> ev.FundSettlementAccount:
    return ev.FundSettlementAccount(funding_id=funding_id, participant_id=bank, currency=currency,
                                    amount=amount)


def active(bank: str = HSBC) -> Story:
    return Story(dm.decide_participant, dm.evolve_participant, PARTICIPANTS[bank])


def test_settlement_funding_posts_from_the_agent_to_the_bank_settlement_account() -> None:
    story = active()
    events = story.when(fund())
    assert shown(events) == ["SettlementFundingReceived", "ledger fund td:fund:CHATS-IN-1"]
    post = events[1].command  # type: ignore[attr-defined]
    assert isinstance(post, Post)
    assert [(e.account_id, e.asset, e.direction, e.amount) for e in post.entries] == [
        ("td:agent:HKD:issuance", "RTGS.HKD", "debit", "500.00"),
        ("td:HSBCHKHH:HKD:settlement", "RTGS.HKD", "credit", "500.00"),
    ]
    assert story.then(ok("td:fund:CHATS-IN-1")) == [
        "answered fund ok", "SettlementAccountFunded"]
    assert story.then(fund()) == []  # the same notice again
    with pytest.raises(IdempotencyConflictError):
        story.when(fund(amount="600.00"))


@pytest.mark.parametrize(
    ("state", "command", "code"),
    [
        (None, fund(), "unknown_participant"),
        (PARTICIPANTS[DBS], fund(bank=DBS), "participant_not_active"),
        (PARTICIPANTS["BOCHHKHH"], fund(bank="BOCHHKHH", currency="CNH"), "currency_not_issued"),
        (PARTICIPANTS[HSBC], fund(amount="1.001"), "invalid_amount"),
        (PARTICIPANTS[HSBC], fund(amount="0"), "invalid_amount"),
    ],
)
def test_settlement_funding_refusals(state: dm.Participant | None, command: Any,
                                     code: str) -> None:
    with pytest.raises(DomainError) as err:
        dm.decide_participant(state, command, ctx())
    assert err.value.code == code


# === wallets (TD-8) =============================================================================


def open_wallet(bank: str = HSBC, wallet_id: str = "dora",
                currencies: tuple[str, ...] = ("HKD", "CNH")) -> ev.OpenWallet:
    return ev.OpenWallet(participant_id=bank, wallet_id=wallet_id, currencies=currencies,
                         customer_ref="C-1", kyc_ref="KYC-1")


@pytest.mark.parametrize(
    ("command", "then"),
    [
        (open_wallet(), ["WalletOpenRequested",
                         "ledger open_account td:wallet:open:td:HSBCHKHH:HKD:wallet:dora",
                         "ledger open_account td:wallet:open:td:HSBCHKHH:CNH:wallet:dora"]),
        (open_wallet(bank="CITIHKHX"), ["WalletOpenRejected(unknown_participant)"]),
        (open_wallet(bank=DBS), ["WalletOpenRejected(participant_not_active)"]),
        (open_wallet(bank="BOCHHKHH"), ["WalletOpenRejected(currency_not_issued)"]),
        (open_wallet(currencies=("HKD", "EUR")), ["WalletOpenRejected(currency_not_configured)"]),
    ],
    ids=["opens-one-account-per-currency", "unknown-bank", "bank-onboarding",
         "currency-not-issued", "currency-not-configured"],
)
def test_opening_a_wallet(command: ev.OpenWallet, then: list[str]) -> None:
    assert Story(dm.decide_wallet, dm.evolve_wallet).then(command) == then


def test_a_wallet_opens_when_its_accounts_exist_and_cannot_overdraw() -> None:
    story = Story(dm.decide_wallet, dm.evolve_wallet)
    events = story.when(open_wallet())
    accounts = [e.command for e in events if isinstance(e, ev.LedgerCommandRequested)]
    assert all(isinstance(a, OpenAccount) and a.debits_must_not_exceed_credits for a in accounts)
    assert [a.asset for a in accounts] == ["TD.HSBCHKHH.HKD", "TD.HSBCHKHH.CNH"]  # type: ignore[union-attr]
    keys = [e.ledger_key for e in events if isinstance(e, ev.LedgerCommandRequested)]
    assert story.then(ok(keys[0])) == ["answered open_account ok"]
    assert story.then(ok(keys[1])) == ["answered open_account ok", "WalletOpened"]
    assert story.then(open_wallet()) == []
    with pytest.raises(IdempotencyConflictError):
        story.when(open_wallet(currencies=("HKD",)))


def freeze(wallet_id: str = "alice", bank: str = HSBC) -> ev.FreezeWallet:
    return ev.FreezeWallet(participant_id=bank, wallet_id=wallet_id, reason="sanctions hit",
                           case_ref="AML-77")


def unfreeze(wallet_id: str = "alice", bank: str = HSBC) -> ev.UnfreezeWallet:
    return ev.UnfreezeWallet(participant_id=bank, wallet_id=wallet_id, reason="cleared",
                             case_ref="AML-77")


def test_freezing_is_an_event_and_freezes_the_ledger_accounts_too() -> None:
    story = Story(dm.decide_wallet, dm.evolve_wallet, WALLETS["HSBCHKHH:alice"])
    events = story.when(freeze())
    assert shown(events) == [
        "WalletFrozen",
        "ledger freeze_account td:freeze:1:td:HSBCHKHH:HKD:wallet:alice",
        "ledger freeze_account td:freeze:1:td:HSBCHKHH:CNH:wallet:alice",
    ]
    assert isinstance(events[1].command, FreezeAccount)  # type: ignore[attr-defined]
    assert story.then(freeze()) == []                     # frozen already
    assert story.then(unfreeze()) == [
        "WalletUnfrozen",
        "ledger unfreeze_account td:unfreeze:1:td:HSBCHKHH:HKD:wallet:alice",
        "ledger unfreeze_account td:unfreeze:1:td:HSBCHKHH:CNH:wallet:alice",
    ]
    assert story.then(unfreeze()) == []                   # not frozen
    assert shown(story.when(freeze()))[1].startswith("ledger freeze_account td:freeze:2:")


@pytest.mark.parametrize(
    ("state", "command", "code"),
    [
        (None, freeze(), "unknown_wallet"),
        (None, unfreeze(), "unknown_wallet"),
        (WALLETS["HSBCHKHH:olga"], freeze("olga"), "wallet_not_open"),
    ],
)
def test_freeze_refusals(state: dm.Wallet | None, command: Any, code: str) -> None:
    with pytest.raises(DomainError) as err:
        dm.decide_wallet(state, command, ctx())
    assert err.value.code == code


# === conversions: issue and redeem (TD-2) =======================================================


def issue(amount: str = "1000.00", wallet_id: str = "alice", bank: str = HSBC,
          currency: str = "HKD", uetr: str = U) -> ev.IssueDepositToken:
    return ev.IssueDepositToken(uetr=uetr, end_to_end_id=E2E, participant_id=bank,
                                wallet_id=wallet_id, currency=currency, amount=amount)


def redeem(amount: str = "250.00", wallet_id: str = "alice") -> ev.RedeemDepositToken:
    return ev.RedeemDepositToken(uetr=U, end_to_end_id=E2E, participant_id=HSBC,
                                 wallet_id=wallet_id, currency="HKD", amount=amount)


def entries(post: Post | PostPending) -> list[tuple[str, str, str, str]]:
    return [(e.account_id, e.asset, e.direction, e.amount) for e in post.entries]


def test_issue_mints_only_against_a_debit_of_the_conventional_deposit() -> None:
    events = conversion().when(issue(amount="1000"))
    assert shown(events) == ["ConversionInstructed", "ledger issue td:U:issue"]
    post = events[1].command  # type: ignore[attr-defined]
    assert isinstance(post, Post)
    assert entries(post) == [
        ("td:HSBCHKHH:HKD:conventional", "HKD", "debit", "1000.00"),
        ("td:HSBCHKHH:HKD:conversion", "HKD", "credit", "1000.00"),
        ("td:HSBCHKHH:HKD:liability", "TD.HSBCHKHH.HKD", "debit", "1000.00"),
        ("td:HSBCHKHH:HKD:wallet:alice", "TD.HSBCHKHH.HKD", "credit", "1000.00"),
    ]
    assert (post.references.uetr, post.references.end_to_end_id) == (U, E2E)  # TD-7


def test_redeem_burns_with_a_credit_back_to_the_conventional_deposit() -> None:
    post = conversion().when(redeem())[1].command  # type: ignore[attr-defined]
    assert entries(post) == [
        ("td:HSBCHKHH:HKD:wallet:alice", "TD.HSBCHKHH.HKD", "debit", "250.00"),
        ("td:HSBCHKHH:HKD:liability", "TD.HSBCHKHH.HKD", "credit", "250.00"),
        ("td:HSBCHKHH:HKD:conversion", "HKD", "debit", "250.00"),
        ("td:HSBCHKHH:HKD:conventional", "HKD", "credit", "250.00"),
    ]


@pytest.mark.parametrize(
    ("given", "when", "then"),
    [
        (issue(), ok("td:U:issue"), ["answered issue ok", "DepositTokensMinted"]),
        (redeem(), ok("td:U:redeem"), ["answered redeem ok", "DepositTokensBurned"]),
        (redeem(), no("td:U:redeem", "insufficient_funds"),
         ["answered redeem insufficient_funds", "ConversionRejected(insufficient_funds)"]),
        (issue(), no("td:U:issue", "account_frozen"),
         ["answered issue account_frozen", "ConversionRejected(wallet_frozen)"]),
        (issue(), ok("td:U:transfer"), []),  # not this conversion's request
    ],
    ids=["issue-minted", "redeem-burned", "redeem-more-than-held", "frozen-at-the-ledger",
         "foreign-result"],
)
def test_conversion_outcomes_follow_the_ledger(given: Any, when: Any, then: list[str]) -> None:
    story = conversion(given)
    assert story.then(when) == then
    assert story.then(when) == []  # a redelivered result changes nothing


@pytest.mark.parametrize(
    ("command", "code"),
    [
        (issue(currency="EUR"), "currency_not_configured"),
        (issue(amount="10.001"), "invalid_amount"),
        (issue(amount="0.00"), "invalid_amount"),
        (issue(bank="CITIHKHX"), "unknown_participant"),
        (issue(bank=DBS), "participant_not_active"),
        (issue(bank="BOCHHKHH", wallet_id="bea", currency="CNH"), "currency_not_issued"),
        (issue(wallet_id="zed"), "unknown_wallet"),
        (issue(wallet_id="olga"), "wallet_not_open"),
        (issue(wallet_id="hana", currency="CNH"), "wallet_currency_not_open"),
        (issue(wallet_id="frank"), "wallet_frozen"),
    ],
)
def test_conversion_refusals_are_recorded_with_a_code(command: Any, code: str) -> None:
    story = conversion()
    assert story.then(command) == [f"ConversionRejected({code})"]
    assert story.then(command) == []  # same UETR again: the same (recorded) answer


def test_a_conversion_uetr_is_used_once() -> None:
    story = conversion(issue())
    assert story.then(issue()) == []
    with pytest.raises(IdempotencyConflictError):
        story.when(issue(amount="1.00"))
    with pytest.raises(IdempotencyConflictError):
        story.when(redeem(amount="1000.00"))


# === transfers: instruction =====================================================================


@pytest.mark.parametrize(
    ("command", "then"),
    [
        (instruct(currency="EUR"), "TransferRejected(currency_not_configured)"),
        (instruct(amount="1.005"), "TransferRejected(invalid_amount)"),
        (instruct(amount="0"), "TransferRejected(invalid_amount)"),
        (instruct(payer=("CITIHKHX", "x")), "TransferRejected(unknown_participant, payer)"),
        (instruct(payee=("CITIHKHX", "x")), "TransferRejected(unknown_participant, payee)"),
        (instruct(payee=(DBS, "x")), "TransferRejected(participant_not_active, payee)"),
        (instruct(payee=("BOCHHKHH", "bea"), currency="CNH"),
         "TransferRejected(currency_not_issued, payee)"),
        (instruct(payer=(HSBC, "zed")), "TransferRejected(unknown_wallet, payer)"),
        (instruct(payer=(HSBC, "olga")), "TransferRejected(wallet_not_open, payer)"),
        (instruct(payer=(HSBC, "hana"), currency="CNH"),
         "TransferRejected(wallet_currency_not_open, payer)"),
        (instruct(payer=(HSBC, "frank")), "TransferRejected(wallet_frozen, payer)"),
        (instruct(payee=(HASE, "fiona")), "TransferRejected(wallet_frozen, payee)"),
        (instruct(payee=(HSBC, "alice")), "TransferRejected(same_wallet)"),
    ],
    ids=["currency", "decimals", "zero", "payer-bank", "payee-bank", "payee-onboarding",
         "payee-currency", "payer-wallet", "payer-opening", "wallet-currency",
         "TD-8-payer-frozen", "TD-8-payee-frozen", "same-wallet"],
)
def test_instruction_refusals_are_recorded_with_code_and_party(command: ev.InstructTransfer,
                                                               then: str) -> None:
    story = transfer()
    assert story.then(command) == [then]
    assert story.then(command) == []  # the same UETR gets the same (recorded) answer
    assert story.state.status is dm.TransferStatus.REJECTED


def test_the_same_uetr_is_one_instruction_x3() -> None:
    story = transfer(instruct())
    assert story.then(instruct()) == []
    with pytest.raises(IdempotencyConflictError) as err:
        story.when(instruct(amount="100.01"))
    assert err.value.code == "id_conflict"
    with pytest.raises(IdempotencyConflictError):
        story.when(instruct(e2e="OTHER"))


# === transfers: intra-bank (24/7) ===============================================================

SUNDAY_NIGHT = hkt(2025, 12, 7, 23)


def test_intra_bank_transfers_move_tokens_in_one_posting_at_any_hour() -> None:
    story = transfer()
    events = story.when(instruct(payee=(HSBC, "carol")), at=SUNDAY_NIGHT)
    assert shown(events) == ["TransferInstructed", "ledger transfer td:U:transfer"]
    assert entries(events[1].command) == [  # type: ignore[attr-defined]
        ("td:HSBCHKHH:HKD:wallet:alice", "TD.HSBCHKHH.HKD", "debit", "100.00"),
        ("td:HSBCHKHH:HKD:wallet:carol", "TD.HSBCHKHH.HKD", "credit", "100.00"),
    ]
    assert story.then(ok("td:U:transfer"), at=SUNDAY_NIGHT) == [
        "answered transfer ok", "TransferSettled"]
    assert story.state.status is dm.TransferStatus.SETTLED


@pytest.mark.parametrize(
    ("code", "then"),
    [("insufficient_funds", "TransferFailed(insufficient_funds)"),
     ("account_frozen", "TransferFailed(wallet_frozen)"),
     ("account_closed", "TransferFailed(ledger_rejected)")],
)
def test_intra_bank_transfer_fails_when_the_ledger_refuses(code: str, then: str) -> None:
    story = transfer(instruct(payee=(HSBC, "carol")))
    assert story.then(no("td:U:transfer", code)) == [f"answered transfer {code}", then]


# === transfers: interbank legs (TD-3, TD-7) =====================================================


def test_interbank_instruction_earmarks_and_prepares_the_mint_in_one_settlement_group() -> None:
    events = transfer().when(instruct())
    assert shown(events) == ["TransferInstructed", "ledger burn td:U:burn",
                             "ledger mint td:U:mint"]
    burn, mint = (e.command for e in events[1:])  # type: ignore[attr-defined]
    assert isinstance(burn, PostPending) and isinstance(mint, PostPending)
    assert entries(burn) == [
        ("td:HSBCHKHH:HKD:wallet:alice", "TD.HSBCHKHH.HKD", "debit", "100.00"),
        ("td:HSBCHKHH:HKD:liability", "TD.HSBCHKHH.HKD", "credit", "100.00")]
    assert entries(mint) == [
        ("td:HASEHKHH:HKD:liability", "TD.HASEHKHH.HKD", "debit", "100.00"),
        ("td:HASEHKHH:HKD:wallet:bob", "TD.HASEHKHH.HKD", "credit", "100.00")]
    assert burn.settlement_group == mint.settlement_group == f"td:{U}"
    instructed = events[0]
    assert isinstance(instructed, ev.TransferInstructed)
    assert instructed.hold_deadline == CUTOFF
    # The ledger's own expiry is a backstop beyond every saga deadline (cut-off + 30 + 60 min).
    assert instructed.ledger_expiry_at == CUTOFF + timedelta(minutes=90)
    assert burn.timeout_s == int((CUTOFF + timedelta(minutes=90) - NOW).total_seconds()) + 1
    for e in events[1:]:  # TD-7: every ledger command carries UETR and EndToEndId
        assert (e.uetr, e.end_to_end_id) == (U, E2E)  # type: ignore[attr-defined]
        assert (e.command.references.uetr, e.command.references.end_to_end_id) == (U, E2E)  # type: ignore[attr-defined]




@pytest.mark.parametrize(
    ("given", "when", "then"),
    [
        ([instruct()], ok("td:U:burn"), ["answered burn ok", "FundsEarmarked"]),
        ([instruct(), ok("td:U:burn")], ok("td:U:mint"),
         ["answered mint ok", "ledger settle td:U:settle:1"]),
        ([instruct(), ok("td:U:mint")], ok("td:U:burn"),
         ["answered burn ok", "FundsEarmarked", "ledger settle td:U:settle:1"]),
        ([instruct(currency="CNH"), *HELD], ok("td:U:settle:1"),
         ["answered settle ok", "ledger commit td:U:commit"]),
        ([instruct(currency="CNH"), *HELD, ok("td:U:settle:1")], ok("td:U:commit"),
         ["answered commit ok", "InterbankSettlementSettled", "DepositTokensBurned",
          "DepositTokensMinted", "TransferSettled"]),
    ],
    ids=["burn-held-is-the-earmark", "both-legs-held-then-interbank-leg", "legs-in-any-order",
         "wcbdc-leg-held-then-commit", "wcbdc-commit-is-final-settlement-TD-4"],
)
def test_wcbdc_interbank_settles_atomically_on_the_ledger(given: list[Any], when: Any,
                                                         then: list[str]) -> None:
    assert transfer(*given).then(when) == then


def test_rtgs_interbank_requests_the_pacs009_once_every_leg_is_held() -> None:
    story = transfer(instruct(), *HELD)
    events = story.when(ok("td:U:settle:1"))
    assert shown(events) == ["answered settle ok", "InterbankSettlementRequested"]
    request = events[1]
    assert isinstance(request, ev.InterbankSettlementRequested)
    assert (request.instructing_agent, request.instructed_agent) == (HSBC, HASE)
    assert (request.debtor_settlement_account, request.creditor_settlement_account) == (
        "SA-HSBCHKHH", "SA-HASEHKHH")
    assert (request.amount, request.currency) == ("100.00", "HKD")
    assert request.interbank_settlement_date == date(2025, 12, 1)
    assert request.confirm_by == NOW + timedelta(minutes=30)
    assert (request.uetr, request.end_to_end_id) == (U, E2E)


def acsc(e2e: str = E2E) -> ev.SettleInterbankLeg:
    return ev.SettleInterbankLeg(uetr=U, end_to_end_id=e2e, agent_reference="CHATS-ACSC-1")


def rjct(code: str = "AC04") -> ev.RejectInterbankLeg:
    return ev.RejectInterbankLeg(uetr=U, end_to_end_id=E2E, agent_reference="CHATS-RJCT-1",
                                 reason_code=code, detail="closed account")


def cancel() -> ev.CancelTransfer:
    return ev.CancelTransfer(uetr=U, reason="customer recall", requested_by="ops-1")


@pytest.mark.parametrize(
    ("given", "when", "then"),
    [
        ([], acsc(), ["InterbankSettlementSettled", "ledger commit td:U:commit"]),
        ([acsc()], ok("td:U:commit"),
         ["answered commit ok", "DepositTokensBurned", "DepositTokensMinted",
          "TransferSettled"]),
        ([acsc()], acsc(), []),
        ([acsc(), ok("td:U:commit")], acsc(), []),
        ([], rjct(), ["InterbankSettlementRejected", "TransferFailed(interbank_rejected)",
                      "ledger void td:U:void"]),
        ([rjct()], ok("td:U:void"), ["answered void ok", "EarmarkReleased"]),
        ([rjct()], rjct(), []),
        ([acsc()], no("td:U:commit", "account_frozen"),
         ["answered commit account_frozen", "TransferSettlementBlocked(ledger_rejected)"]),
    ],
    ids=["ACSC-commits-the-group", "commit-burns-and-mints-TD-4", "ACSC-again",
         "ACSC-after-settled", "RJCT-fails-and-voids", "void-releases-the-earmark",
         "RJCT-again", "commit-refused-after-final-RTGS-is-blocked-not-voided"],
)
def test_rtgs_lock_settle_burn_mint_td3(given: list[Any], when: Any, then: list[str]) -> None:
    story = rtgs_requested().given(*given)
    assert story.then(when) == then


@pytest.mark.parametrize(
    ("story", "when", "code"),
    [
        (rtgs_requested, acsc(e2e="SOMETHING-ELSE"), "reference_mismatch"),
        (queued, acsc(), "unexpected_confirmation"),
        (queued, rjct(), "unexpected_confirmation"),
        (lambda: transfer(instruct(currency="CNH"), *HELD), acsc(), "unexpected_confirmation"),
        (lambda: transfer(), acsc(), "unknown_transfer"),
    ],
    ids=["TD-7-e2e-must-match", "no-pacs009-sent", "rjct-without-pacs009", "wcbdc-has-no-agent",
         "unknown-uetr"],
)
def test_settlement_agent_messages_that_do_not_fit_are_refused(story: Callable[[], Story],
                                                              when: Any, code: str) -> None:
    with pytest.raises(DomainError) as err:
        story().when(when)
    assert err.value.code == code


# === failures release the earmark (TD-3) ========================================================


@pytest.mark.parametrize(
    ("given", "when", "then"),
    [
        ([instruct(), ok("td:U:mint")], no("td:U:burn", "insufficient_funds"),
         ["answered burn insufficient_funds", "TransferFailed(insufficient_funds)",
          "ledger void td:U:void"]),
        ([instruct()], no("td:U:burn", "insufficient_funds"),
         ["answered burn insufficient_funds", "TransferFailed(insufficient_funds)"]),
        ([instruct(), no("td:U:burn", "insufficient_funds")], ok("td:U:mint"),
         ["answered mint ok", "ledger void td:U:void"]),
        ([instruct(), ok("td:U:burn")], no("td:U:mint", "account_frozen"),
         ["answered mint account_frozen", "TransferFailed(wallet_frozen)",
          "ledger void td:U:void"]),
        ([instruct(), *HELD], no("td:U:settle:1", "account_frozen"),
         ["answered settle account_frozen", "TransferFailed(ledger_rejected)",
          "ledger void td:U:void"]),
        ([instruct(currency="CNH"), *HELD, ok("td:U:settle:1")],
         no("td:U:commit", "pending_expired"),
         ["answered commit pending_expired", "TransferExpired(ledger_expired)",
          "ledger void td:U:void"]),
        ([instruct(), ok("td:U:mint"), no("td:U:burn", "insufficient_funds")], ok("td:U:void"),
         ["answered void ok"]),
        ([instruct(), ok("td:U:burn"), no("td:U:mint", "account_frozen")],
         no("td:U:void", "already_voided"), ["answered void already_voided", "EarmarkReleased"]),
    ],
    ids=["payer-short-of-tokens", "nothing-held-nothing-to-void", "void-waits-for-legs-in-flight",
         "payee-frozen-at-ledger", "settlement-account-frozen", "ledger-expired-the-group",
         "no-earmark-no-release-event", "already-voided-counts-as-released"],
)
def test_any_refused_leg_fails_the_transfer_and_voids_the_group(given: list[Any], when: Any,
                                                               then: list[str]) -> None:
    assert transfer(*given).then(when) == then


# === TD-5: queue, never reject or partially settle =============================================


@pytest.mark.parametrize(
    ("given", "when", "then", "queue"),
    [
        ([instruct(), *HELD], no("td:U:settle:1", "insufficient_funds"),
         ["answered settle insufficient_funds",
          "InterbankSettlementQueued(insufficient_settlement_funds, attempt 1)"], {}),
        ([instruct(), ok("td:U:burn")], ok("td:U:mint"),
         ["answered mint ok", "InterbankSettlementQueued(queue_not_empty, attempt 0)"],
         {"HSBCHKHH_HKD": 2}),
        ([instruct(), ok("td:U:burn")], ok("td:U:mint"),
         ["answered mint ok", "ledger settle td:U:settle:1"], {"HASEHKHH_HKD": 2}),
    ],
    ids=["short-position-queues", "FIFO-never-overtakes-the-queue",
         "only-the-payer-bank-queue-counts"],
)
def test_underfunded_interbank_transfers_queue(given: list[Any], when: Any, then: list[str],
                                               queue: dict[str, int]) -> None:
    story = transfer(*given)
    assert story.then(when, NOW, **queue) == then


@pytest.mark.parametrize(
    ("when", "at", "then"),
    [
        (dm.RetrySettlement(), NOW, ["ledger settle td:U:settle:2"]),
        (dm.Tick(), NOW, []),
        (cancel(), NOW, ["TransferCancelled", "ledger void td:U:void"]),
        (dm.Tick(), CUTOFF, ["TransferExpired(queued_past_cutoff)", "ledger void td:U:void"]),
        (dm.RetrySettlement(), CUTOFF,
         ["TransferExpired(queued_past_cutoff)", "ledger void td:U:void"]),
    ],
    ids=["head-of-queue-retries-with-a-new-attempt-id", "a-tick-alone-does-not-jump-the-queue",
         "ops-cancel", "cut-off-releases", "retry-after-cut-off-releases"],
)
def test_a_queued_transfer(when: Any, at: datetime, then: list[str]) -> None:
    assert queued().then(when, at=at) == then


def test_retries_stay_in_the_queue_until_funded_keeping_their_place() -> None:
    story = queued()
    first_queued = story.state.queued_since
    story.given(dm.RetrySettlement(), at=NOW + timedelta(minutes=5))
    assert story.then(no("td:U:settle:2", "insufficient_funds")) == [
        "answered settle insufficient_funds",
        "InterbankSettlementQueued(insufficient_settlement_funds, attempt 2)"]
    assert story.state.queued_since == first_queued
    story.given(dm.RetrySettlement())
    assert story.then(ok("td:U:settle:3")) == ["answered settle ok",
                                               "InterbankSettlementRequested"]
    assert story.then(dm.RetrySettlement()) == []  # stale: it left the queue


def test_queue_order_is_fifo_per_payer_bank_and_currency() -> None:
    def queued_at(uetr: str, at: datetime, payer: str = HSBC) -> dm.Transfer:
        ok_u = [PostingAccepted(command_id=f"td:{uetr}:{leg}", command_type="x")
                for leg in ("burn", "mint")]
        return transfer(instruct(uetr=uetr, payer=(payer, "alice" if payer == HSBC else "bob"),
                                 payee=(HASE, "bob") if payer == HSBC else (HSBC, "alice")),
                        *ok_u, PostingRejected(command_id=f"td:{uetr}:settle:1",
                                               command_type="x", code="insufficient_funds"),
                        at=at).state

    late, early, other = (queued_at(U, NOW + timedelta(minutes=2)), queued_at(U2, NOW),
                          queued_at(U3, NOW, payer=HASE))
    settled = transfer(instruct(uetr=U, payee=(HSBC, "carol")), ok("td:U:transfer")).state
    order = dm.queue_order([late, settled, other, early])
    assert [(e.queue_key, e.uetr) for e in order] == [
        ("HASEHKHH:HKD", U3), ("HSBCHKHH:HKD", U2), ("HSBCHKHH:HKD", U)]
    assert dm.queue_entry(settled) is None
    # The head keeps its place while its retry is with the ledger: nobody overtakes it.
    retrying = dm.fold(dm.evolve_transfer, dm.decide_transfer(early, dm.RetrySettlement(),
                                                               ctx()), early)
    assert retrying is not None
    head = dm.queue_entry(retrying)
    assert head is not None and head.retrying and head.queued_since == NOW


# === cancellation ===============================================================================


@pytest.mark.parametrize(
    ("story", "code"),
    [
        (lambda: transfer(instruct(payee=(HSBC, "carol")), ok("td:U:transfer")),
         "already_settled"),
        (lambda: transfer(instruct(payee=(HSBC, "frank"))), "already_final"),
        (lambda: transfer(instruct(), no("td:U:burn", "insufficient_funds")), "already_final"),
        (lambda: transfer(instruct(payee=(HSBC, "carol"))), "settlement_in_progress"),
        (rtgs_requested, "settlement_in_progress"),
        (lambda: rtgs_requested().given(acsc()), "settlement_in_progress"),
    ],
    ids=["settled-is-final", "rejected-is-final", "failed-is-final", "intra-bank-in-flight",
         "pacs009-sent", "committing"],
)
def test_cancel_refusals(story: Callable[[], Story], code: str) -> None:
    with pytest.raises(DomainError) as err:
        story().when(cancel())
    assert err.value.code == code


def test_cancel_while_legs_are_in_flight_voids_only_once_they_are_answered() -> None:
    story = transfer(instruct())
    assert story.then(cancel()) == ["TransferCancelled"]
    assert story.then(cancel()) == []  # cancelling twice is the same cancel
    assert story.then(ok("td:U:burn")) == ["answered burn ok", "FundsEarmarked"]
    assert story.then(ok("td:U:mint")) == ["answered mint ok", "ledger void td:U:void"]
    assert story.then(ok("td:U:void")) == ["answered void ok", "EarmarkReleased"]
    assert story.state.released


def test_a_leg_accepted_after_expiry_is_voided_not_sent_to_the_agent() -> None:
    story = transfer(instruct(), *HELD)  # settle:1 in flight
    assert story.then(dm.Tick(), at=CUTOFF) == ["TransferExpired(hold_timeout)"]
    assert story.then(ok("td:U:settle:1")) == ["answered settle ok", "ledger void td:U:void"]


def test_an_rtgs_leg_held_after_the_cutoff_expires_instead_of_sending_pacs009() -> None:
    story = transfer(instruct(), *HELD)
    assert story.then(ok("td:U:settle:1"), at=CUTOFF) == [
        "answered settle ok", "TransferExpired(hold_timeout)", "ledger void td:U:void"]


# === clock: windows and timeouts (TD-6, X-5) ====================================================

SATURDAY = hkt(2025, 12, 6, 10)
MONDAY_OPEN = hkt(2025, 12, 8, 9)
CHRISTMAS_EVE_LATE = hkt(2025, 12, 24, 18)


@pytest.mark.parametrize(
    ("instructed_at", "when_at", "then"),
    [
        (SATURDAY, SATURDAY, ["answered mint ok", "TransferAwaitingWindow"]),
        (CHRISTMAS_EVE_LATE, CHRISTMAS_EVE_LATE, ["answered mint ok", "TransferAwaitingWindow"]),
        (hkt(2025, 12, 1, 8, 59), hkt(2025, 12, 1, 9), ["answered mint ok",
                                                          "ledger settle td:U:settle:1"]),
    ],
    ids=["saturday-waits", "holiday-waits", "opens-while-legs-in-flight"],
)
def test_rtgs_legs_wait_for_the_window(instructed_at: datetime, when_at: datetime,
                                       then: list[str]) -> None:
    story = transfer(instruct(), ok("td:U:burn"), at=instructed_at)
    assert story.then(ok("td:U:mint"), at=when_at) == then


def test_awaiting_window_wakes_when_the_window_opens_and_times_out_at_its_cutoff() -> None:
    story = transfer(instruct(), *HELD, at=CHRISTMAS_EVE_LATE)
    waiting = next(e for e in story.history if isinstance(e, ev.TransferAwaitingWindow))
    assert waiting.window_opens_at == hkt(2025, 12, 29, 9)      # after the holidays + weekend
    assert story.state.hold_deadline == hkt(2025, 12, 29, 17, 30)
    assert dm.next_wakeup(story.state, CONFIG, CHRISTMAS_EVE_LATE) == hkt(2025, 12, 29, 9)
    assert story.then(dm.Tick(), at=hkt(2025, 12, 26, 12)) == []   # holiday: still closed
    assert story.then(dm.Tick(), at=hkt(2025, 12, 29, 9)) == ["ledger settle td:U:settle:1"]


def test_a_waiting_transfer_joins_the_queue_when_the_window_opens_behind_others() -> None:
    story = transfer(instruct(), *HELD, at=SATURDAY)
    assert story.then(dm.Tick(), at=MONDAY_OPEN, HSBCHKHH_HKD=1) == [
        "InterbankSettlementQueued(queue_not_empty, attempt 0)"]


def test_wcbdc_settles_around_the_clock_and_intra_bank_ignores_windows() -> None:
    story = transfer(at=SATURDAY)
    assert story.then(instruct(currency="CNH"), at=SATURDAY)[-1] == "ledger settle td:U:settle:1"
    story.given(ok("td:U:burn"), ok("td:U:settle:1"), at=SATURDAY)
    assert story.then(ok("td:U:mint"), at=SATURDAY) == ["answered mint ok",
                                                        "ledger commit td:U:commit"]
    assert story.state.hold_deadline == SATURDAY + timedelta(seconds=CNH.max_hold_s)


@pytest.mark.parametrize(
    ("given", "when", "then"),
    [
        ([], instruct(currency="CNH"),
         ["TransferInstructed", "ledger burn td:U:burn",
          "ledger mint td:U:mint", "ledger settle td:U:settle:1"]),
        ([instruct(currency="CNH"), ok("td:U:settle:1"), ok("td:U:burn")], ok("td:U:mint"),
         ["answered mint ok", "ledger commit td:U:commit"]),
        ([instruct(currency="CNH"), ok("td:U:mint"), ok("td:U:settle:1")], ok("td:U:burn"),
         ["answered burn ok", "FundsEarmarked", "ledger commit td:U:commit"]),
        ([instruct(currency="CNH"), ok("td:U:burn")], ok("td:U:settle:1"),
         ["answered settle ok"]),
        ([instruct(currency="CNH"), ok("td:U:settle:1"), ok("td:U:mint")],
         no("td:U:burn", "insufficient_funds"),
         ["answered burn insufficient_funds", "TransferFailed(insufficient_funds)",
          "ledger void td:U:void"]),
        ([instruct(currency="CNH"), ok("td:U:settle:1")], no("td:U:mint", "account_frozen"),
         ["answered mint account_frozen", "TransferFailed(wallet_frozen)"]),
    ],
    ids=["all-three-members-asked-at-once", "commit-when-the-last-token-leg-is-held",
         "any-order", "interbank-leg-held-first-waits", "payer-short-voids-the-held-legs",
         "void-waits-for-the-burn-in-flight"],
)
def test_wcbdc_asks_for_the_interbank_leg_with_the_token_legs(given: list[Any], when: Any,
                                                             then: list[str]) -> None:
    assert transfer(*given).then(when) == then


def test_wcbdc_behind_a_queue_holds_the_token_legs_first_and_queues_TD_5() -> None:
    story = transfer(instruct(currency="CNH"), HSBCHKHH_CNH=1)
    assert "ledger settle td:U:settle:1" not in shown(story.history)
    assert story.then(ok("td:U:burn"), HSBCHKHH_CNH=1) == ["answered burn ok", "FundsEarmarked"]
    assert story.then(ok("td:U:mint"), HSBCHKHH_CNH=1) == [
        "answered mint ok", "InterbankSettlementQueued(queue_not_empty, attempt 0)"]


def test_a_wcbdc_leg_refused_for_funds_queues_while_the_token_legs_are_still_out() -> None:
    story = transfer(instruct(currency="CNH"))
    assert story.then(no("td:U:settle:1", "insufficient_funds")) == [
        "answered settle insufficient_funds",
        "InterbankSettlementQueued(insufficient_settlement_funds, attempt 1)"]
    assert story.then(ok("td:U:burn")) == ["answered burn ok", "FundsEarmarked"]
    assert story.then(ok("td:U:mint")) == ["answered mint ok"]  # it waits in the queue
    assert story.then(dm.RetrySettlement()) == ["ledger settle td:U:settle:2"]
    assert story.then(ok("td:U:settle:2")) == ["answered settle ok", "ledger commit td:U:commit"]


@pytest.mark.parametrize(
    ("story", "at", "then"),
    [
        (rtgs_requested, NOW + timedelta(minutes=30),
         ["TransferExpired(confirmation_timeout)", "ledger void td:U:void"]),
        (rtgs_requested, NOW + timedelta(minutes=29), []),
        (lambda: transfer(instruct(), *HELD, at=SATURDAY), hkt(2025, 12, 8, 17, 30),
         ["TransferExpired(hold_timeout)", "ledger void td:U:void"]),
        (lambda: transfer(instruct()), CUTOFF, ["TransferExpired(hold_timeout)"]),
        (lambda: transfer(instruct(payee=(HSBC, "carol"))), CUTOFF + timedelta(days=9), []),
        (lambda: transfer(instruct(payer=(HSBC, "frank"))), CUTOFF, []),
    ],
    ids=["no-pacs002-in-time-releases", "before-confirm-by", "window-never-reached",
         "legs-in-flight-at-cutoff", "intra-bank-never-times-out", "rejected-ignores-clock"],
)
def test_timeouts_release_earmarks(story: Callable[[], Story], at: datetime,
                                   then: list[str]) -> None:
    assert story().then(dm.Tick(), at=at) == then


def test_a_late_acsc_after_release_is_reported_once_for_a_return() -> None:
    story = rtgs_requested().given(dm.Tick(), at=NOW + timedelta(hours=1))
    assert story.then(acsc()) == ["InterbankLegSettledAfterRelease"]
    assert story.then(acsc()) == []
    assert story.then(rjct()) == []


@pytest.mark.parametrize(
    ("story", "expected"),
    [
        (queued, CUTOFF),
        (rtgs_requested, NOW + timedelta(minutes=30)),
        (lambda: transfer(instruct(payee=(HSBC, "carol"))), None),
        (lambda: rtgs_requested().given(acsc()), None),
    ],
    ids=["queued-wakes-at-cutoff", "requested-wakes-at-confirm-by", "intra-never",
         "committing-never"],
)
def test_next_wakeup_tells_the_scheduler_when_to_tick(story: Callable[[], Story],
                                                      expected: datetime | None) -> None:
    assert dm.next_wakeup(story().state, CONFIG, NOW) == expected


# === idempotency and determinism (X-3, TD-7) ====================================================


@pytest.mark.parametrize(
    ("decide", "command"),
    [
        (dm.decide_transfer, issue()),
        (dm.decide_conversion, instruct()),
        (dm.decide_participant, freeze()),
        (dm.decide_wallet, fund()),
    ],
)
def test_a_command_sent_to_the_wrong_aggregate_is_a_programming_error(
        decide: Callable[..., list[Payload]], command: Payload) -> None:
    with pytest.raises(TypeError):
        decide(None, command, ctx())


def test_ledger_results_for_unknown_or_answered_commands_are_no_ops() -> None:
    story = transfer(instruct(), ok("td:U:burn"))
    assert story.then(ok("td:U:burn")) == []
    assert story.then(ok("td:U:settle:7")) == []
    assert story.then(ok("something-else")) == []


def test_a_replayed_decision_asks_the_ledger_for_the_same_ids() -> None:
    history = transfer(instruct(), *HELD).history
    replayed = transfer(instruct(), *HELD).history
    assert history == replayed
    state = dm.fold(dm.evolve_transfer, history)
    assert state is not None and state.status is dm.TransferStatus.SETTLING


def test_every_transfer_event_carries_uetr_and_end_to_end_id_unchanged() -> None:
    story = rtgs_requested().given(acsc(), ok("td:U:commit"))
    for event in story.history:
        if isinstance(event, ev.LedgerCommandAnswered):
            continue
        assert (event.uetr, event.end_to_end_id) == (U, E2E), type(event).__name__  # type: ignore[attr-defined]


def test_events_survive_the_wire_and_only_domain_facts_are_published() -> None:
    story = rtgs_requested().given(acsc(), ok("td:U:commit"))
    for event in story.history:
        envelope = new_envelope(event, producer="deposits", participant=HSBC)
        _, decoded = decode(encode(envelope))
        assert decoded == event
    assert ev.LedgerCommandRequested not in ev.PUBLISHED_EVENTS
    assert ev.LedgerCommandAnswered not in ev.PUBLISHED_EVENTS
    assert ev.TransferSettled in ev.PUBLISHED_EVENTS


def test_a_ledger_request_round_trips_with_its_exact_command_class() -> None:
    void = acc.ledger_request("void", "td:x:void", acc.void_group(U))
    again = ev.LedgerCommandRequested.model_validate_json(void.model_dump_json())
    assert isinstance(again.command, VoidGroup) and not isinstance(again.command, CommitGroup)
    with pytest.raises(ValueError, match="does not match"):
        ev.LedgerCommandRequested(**{**dict(void), "command_type": "ledger.CommitGroup"})
    with pytest.raises(ValueError, match="command_type must be one of"):
        ev.LedgerCommandRequested.model_validate_json(
            void.model_dump_json().replace("ledger.VoidGroup", "ledger.Bogus"))


@pytest.mark.parametrize(
    ("command", "stream"),
    [
        (instruct(), f"transfer:{U}"),
        (acsc(), f"transfer:{U}"),
        (cancel(), f"transfer:{U}"),
        (issue(), f"conversion:{U}"),
        (onboard(), "participant:HSBCHKHH"),
        (fund(), "participant:HSBCHKHH"),
        (freeze(), "wallet:HSBCHKHH:alice"),
        (ok("td:U:burn"), None),
    ],
)
def test_commands_route_to_their_stream(command: Payload, stream: str | None) -> None:
    assert dm.stream_of(command) == stream


@pytest.mark.parametrize(
    ("posting_id", "ref"),
    [
        (f"td:{U}:burn", acc.PostingRef(U, "burn", None)),
        (f"td:{U}:settle:12", acc.PostingRef(U, "settle", 12)),
        (f"td:{U}:settle", None),
        (f"td:{U}:burn:1", None),
        ("td:fund:F1", None),
        (f"td:{U}:mint:0", None),
    ],
)
def test_posting_ids_parse_back_to_their_transfer(posting_id: str,
                                                  ref: acc.PostingRef | None) -> None:
    assert acc.parse_posting_id(posting_id) == ref


def test_record_keys_follow_the_ledger_convention() -> None:
    assert acc.record_key(acc.void_group(U)) == f"td:{U}"
    assert acc.record_key(acc.intra_transfer_post(U, E2E, HSBC, "a", "b", "HKD", 1, 2)) \
        == "td:HSBCHKHH:HKD:wallet:a"
    assert acc.record_key(FreezeAccount(account_id="td:x")) == "td:x"


# === whole stories against the real ledger rules (TD-1, TD-3, TD-5) ============================


class Harbour:
    """The deposits domain wired to the pure ledger state machine, as the service would be."""

    def __init__(self) -> None:
        from services.ledger.domain import LedgerState

        self.ledger = LedgerState()
        self.streams: dict[str, Any] = {}
        self.routes: dict[str, str] = {}
        self.participants: dict[str, dm.Participant] = {}
        self.wallets: dict[str, dm.Wallet] = {}
        self.now = NOW
        self.queue_depth: dict[str, int] | None = {}
        """Fixed queue depths, or ``None``: count the queued transfers like the service would."""
        self.published: list[Payload] = []
        self.asynchronous = False
        self.inflight: list[ev.LedgerCommandRequested] = []

    def context(self, stream: str) -> dm.Context:
        depth = self.queue_depth
        if depth is None:
            depth = {}
            for name, state in self.streams.items():
                entry = dm.queue_entry(state) if isinstance(state, dm.Transfer) else None
                if entry is not None and name != stream:
                    depth[entry.queue_key] = depth.get(entry.queue_key, 0) + 1
        return dm.Context(now=self.now, config=CONFIG, participants=self.participants,
                          wallets=self.wallets, queue_depth=depth)

    def send(self, command: Any, stream: str | None = None) -> list[Payload]:
        stream = stream or dm.stream_of(command)
        assert stream is not None
        kind = stream.split(":")[0]
        decide, evolve = _AGGREGATES[kind]
        events = decide(self.streams.get(stream), command, self.context(stream))
        state = dm.fold(evolve, events, self.streams.get(stream))
        self.streams[stream] = state
        if isinstance(state, dm.Participant):
            self.participants[state.participant_id] = state
        if isinstance(state, dm.Wallet):
            self.wallets[dm.wallet_key(state.request.participant_id,
                                       state.request.wallet_id)] = state
        self.published.extend(events)
        for event in events:
            if isinstance(event, ev.LedgerCommandRequested):
                self.routes[event.ledger_key] = stream
                self.inflight.append(event)
                if not self.asynchronous:
                    self.deliver(len(self.inflight) - 1)
        return events

    def deliver(self, index: int) -> None:
        """The ledger processes one outstanding command; its answer goes back to the stream."""
        from services.ledger.codec import to_domain

        event = self.inflight.pop(index)
        envelope = new_envelope(event.command, producer="deposits", participant=HSBC,
                                event_id=acc.ledger_event_id(event.command_id))
        result = self.ledger.apply(to_domain(event.command, envelope), self.now)
        answer: Payload = (
            PostingAccepted(command_id=result.command_id, command_type=event.command_type)
            if result.accepted else
            PostingRejected(command_id=result.command_id, command_type=event.command_type,
                            code=str(result.code), detail=result.detail))
        self.send(answer, self.routes[result.command_id])

    def balances(self) -> list[acc.AccountBalance]:
        return [acc.AccountBalance(a.id, a.asset, a.debits_posted, a.credits_posted,
                                   a.debits_pending, a.credits_pending)
                for a in self.ledger.accounts.values()]

    def balance(self, account: str) -> int:
        a = self.ledger.accounts[account]
        return a.credits_posted - a.debits_posted

    def assert_invariants(self) -> None:
        balances = self.balances()
        for bank in (HSBC, HASE):
            for ccy in ("HKD", "CNH"):
                report = acc.supply_report(bank, ccy, balances)
                assert report.ok, report  # TD-1
        assert all(v == (0, 0) for v in acc.net_by_asset(balances).values())


_AGGREGATES: dict[str, tuple[Callable[..., list[Payload]], Callable[[Any, Payload], Any]]] = {
    "transfer": (dm.decide_transfer, dm.evolve_transfer),
    "conversion": (dm.decide_conversion, dm.evolve_conversion),
    "participant": (dm.decide_participant, dm.evolve_participant),
    "wallet": (dm.decide_wallet, dm.evolve_wallet),
}


@pytest.fixture
def harbour() -> Harbour:
    h = Harbour()
    for bank in (HSBC, HASE):
        h.send(ev.OnboardParticipant(
            participant_id=bank, name=bank,
            currencies=(ev.CurrencyArrangement(currency="HKD", settlement_account_ref="SA1"),
                        ev.CurrencyArrangement(currency="CNH", settlement_account_ref="SA2"))))
        for w in ("alice", "bob"):
            h.send(ev.OpenWallet(participant_id=bank, wallet_id=w, currencies=("HKD", "CNH"),
                                 customer_ref="C", kyc_ref="K"))
    assert all(p.status is dm.ParticipantStatus.ACTIVE for p in h.participants.values())
    assert all(w.status is dm.WalletStatus.OPEN for w in h.wallets.values())
    for ccy in ("HKD", "CNH"):
        h.send(issue(uetr=str(_uuid(f"issue-{ccy}")), currency=ccy, amount="1000.00"))
    h.assert_invariants()
    return h


def _uuid(seed: str) -> str:
    import uuid

    return str(uuid.UUID(int=uuid.uuid5(uuid.NAMESPACE_URL, seed).int & ~(0xF << 76)
                         | (4 << 76)))


ALICE_HKD, BOB_HKD = "td:HSBCHKHH:HKD:wallet:alice", "td:HASEHKHH:HKD:wallet:bob"


def test_story_wcbdc_interbank_is_atomic_and_keeps_supply_equal_to_liability(
        harbour: Harbour) -> None:
    harbour.send(fund(currency="CNH", amount="300.00"))
    harbour.send(instruct(currency="CNH", amount="120.00"))
    assert harbour.streams[f"transfer:{U}"].status is dm.TransferStatus.SETTLED
    assert harbour.balance("td:HSBCHKHH:CNH:wallet:alice") == 88000
    assert harbour.balance("td:HASEHKHH:CNH:wallet:bob") == 12000
    assert harbour.balance("td:HSBCHKHH:CNH:settlement") == 18000
    assert harbour.balance("td:HASEHKHH:CNH:settlement") == 12000
    harbour.assert_invariants()


def test_story_rtgs_underfunded_transfer_queues_and_settles_once_funded(
        harbour: Harbour) -> None:
    harbour.send(instruct(amount="100.00"))
    t = harbour.streams[f"transfer:{U}"]
    assert t.status is dm.TransferStatus.QUEUED              # neither rejected nor partial
    assert harbour.balance(BOB_HKD) == 0
    assert harbour.ledger.accounts[ALICE_HKD].debits_pending == 10000   # earmarked
    harbour.assert_invariants()
    harbour.send(fund(amount="60.00"))
    harbour.send(dm.RetrySettlement(), f"transfer:{U}")
    assert harbour.streams[f"transfer:{U}"].status is dm.TransferStatus.QUEUED  # still short
    harbour.send(fund(funding_id="CHATS-IN-2", amount="40.00"))
    harbour.send(dm.RetrySettlement(), f"transfer:{U}")
    assert harbour.streams[f"transfer:{U}"].status is dm.TransferStatus.INTERBANK_REQUESTED
    harbour.send(acsc())
    assert harbour.streams[f"transfer:{U}"].status is dm.TransferStatus.SETTLED
    assert (harbour.balance(ALICE_HKD), harbour.balance(BOB_HKD)) == (90000, 10000)
    assert harbour.balance("td:HSBCHKHH:HKD:settlement") == 0
    harbour.assert_invariants()


@pytest.mark.parametrize("unhappy", ["rjct", "cancel-queued", "cutoff", "payee-frozen"])
def test_story_every_unhappy_interbank_end_leaves_balances_exactly_as_before(
        harbour: Harbour, unhappy: str) -> None:
    harbour.send(fund(amount="500.00"))
    before = {b.account_id: b for b in harbour.balances()}
    if unhappy == "payee-frozen":
        # The freeze reaches the ledger while the payer's bank still sees Bob open (a race):
        # the ledger's frozen account refuses the mint leg, so TD-8 holds anyway.
        harbour.send(freeze("bob", bank=HASE))
        harbour.wallets["HASEHKHH:bob"] = WALLETS["HASEHKHH:bob"]
        before = {b.account_id: b for b in harbour.balances()}
    if unhappy == "cancel-queued":
        harbour.queue_depth = {"HSBCHKHH:HKD": 1}  # earlier transfers are queued: FIFO
    harbour.send(instruct(amount="200.00"))
    if unhappy == "rjct":
        harbour.send(rjct())
    elif unhappy == "cancel-queued":
        harbour.send(cancel())
    elif unhappy == "cutoff":
        harbour.now = CUTOFF
        harbour.send(dm.Tick(), f"transfer:{U}")
    t = harbour.streams[f"transfer:{U}"]
    assert t.final and t.status is not dm.TransferStatus.SETTLED
    assert {b.account_id: b for b in harbour.balances()} == before
    released = [e for e in harbour.published if isinstance(e, ev.EarmarkReleased)]
    assert len(released) == 1
    harbour.assert_invariants()


def test_story_intra_bank_issue_transfer_redeem(harbour: Harbour) -> None:
    harbour.now = SUNDAY_NIGHT
    harbour.send(instruct(payee=(HSBC, "bob"), amount="250.00"))
    assert harbour.streams[f"transfer:{U}"].status is dm.TransferStatus.SETTLED
    harbour.send(ev.RedeemDepositToken(uetr=U2, end_to_end_id=E2E, participant_id=HSBC,
                                       wallet_id="bob", currency="HKD", amount="250.00"))
    harbour.send(ev.RedeemDepositToken(uetr=U3, end_to_end_id=E2E, participant_id=HSBC,
                                       wallet_id="bob", currency="HKD", amount="0.01"))
    rejected = [e for e in harbour.published if isinstance(e, ev.ConversionRejected)]
    assert [(e.uetr, e.code) for e in rejected] == [(U3, "insufficient_funds")]
    assert harbour.balance("td:HSBCHKHH:HKD:wallet:bob") == 0
    report = acc.supply_report(HSBC, "HKD", harbour.balances())
    assert (report.supply_minor, report.liability_minor) == (75000, 75000)
    # TD-2: the conventional side moved by exactly the net conversions.
    assert harbour.balance("td:HSBCHKHH:HKD:conventional") == -75000
    harbour.assert_invariants()


def test_supply_report_flags_accounts_outside_the_chart() -> None:
    balances = [acc.AccountBalance("td:HSBCHKHH:HKD:liability", "TD.HSBCHKHH.HKD", 500, 0),
                acc.AccountBalance("td:HSBCHKHH:HKD:wallet:a", "TD.HSBCHKHH.HKD", 0, 400),
                acc.AccountBalance("rogue", "TD.HSBCHKHH.HKD", 0, 100)]
    report = acc.supply_report(HSBC, "HKD", balances)
    assert not report.ok and report.stray_accounts == ("rogue",)
    assert report.supply_minor == 400 and report.liability_minor == 500


# === property: any interleaving of ledger answers, clock and ops keeps the books right ==========

_PARTIES = [(HSBC, "alice"), (HSBC, "bob"), (HASE, "alice"), (HASE, "bob")]
_FINAL_STATUSES = {dm.TransferStatus.SETTLED, dm.TransferStatus.FAILED,
                   dm.TransferStatus.CANCELLED, dm.TransferStatus.EXPIRED,
                   dm.TransferStatus.REJECTED}


def _transfers(h: Harbour) -> dict[str, dm.Transfer]:
    return {k: v for k, v in h.streams.items() if isinstance(v, dm.Transfer)}


def _try(h: Harbour, command: Any, stream: str | None = None) -> None:
    # Ops and agents may send commands that do not fit: refused, nothing recorded.
    with contextlib.suppress(DomainError):
        h.send(command, stream)


def _drain(h: Harbour, data: Any) -> None:
    """Let every conversation finish: answers in random order, agents answer, the clock runs."""
    for round_ in range(20):
        while h.inflight:
            h.deliver(data.draw(st.integers(0, len(h.inflight) - 1), label="deliver"))
        pending = [(k, t) for k, t in _transfers(h).items() if t.status not in _FINAL_STATUSES]
        if not pending:
            return
        for stream, t in pending:
            if t.status is dm.TransferStatus.INTERBANK_REQUESTED:
                _try(h, data.draw(st.sampled_from([
                    ev.SettleInterbankLeg(uetr=t.uetr, end_to_end_id=E2E, agent_reference="A"),
                    ev.RejectInterbankLeg(uetr=t.uetr, end_to_end_id=E2E, agent_reference="R",
                                          reason_code="AC04")]), label="agent"), stream)
            elif round_ > 0:
                h.now += timedelta(days=10)
                _try(h, dm.Tick(), stream)
    raise AssertionError("transfers still open after draining")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_books_balance_and_every_transfer_ends_settled_or_released(data: Any) -> None:
    h = Harbour()
    for bank in (HSBC, HASE):
        h.send(ev.OnboardParticipant(
            participant_id=bank, name=bank,
            currencies=(ev.CurrencyArrangement(currency="HKD", settlement_account_ref="SA1"),
                        ev.CurrencyArrangement(currency="CNH", settlement_account_ref="SA2"))))
        for w in ("alice", "bob"):
            h.send(ev.OpenWallet(participant_id=bank, wallet_id=w, currencies=("HKD", "CNH"),
                                 customer_ref="C", kyc_ref="K"))
    for i, (bank, w) in enumerate(_PARTIES):
        for ccy in ("HKD", "CNH"):
            h.send(issue(uetr=_uuid(f"seed-{i}-{ccy}"), bank=bank, wallet_id=w, currency=ccy,
                         amount="500.00"))
    h.asynchronous, h.queue_depth = True, None
    uetrs: list[str] = []
    for step in range(data.draw(st.integers(5, 40), label="steps")):
        action = data.draw(st.sampled_from(
            ["instruct", "instruct", "fund", "deliver", "deliver", "deliver", "cancel", "retry",
             "agent", "tick"]), label="action")
        if action == "instruct":
            payer, payee = data.draw(st.permutations(_PARTIES).map(lambda p: p[:2]))
            uetr = _uuid(f"t-{step}")
            uetrs.append(uetr)
            h.send(instruct(uetr=uetr, payer=payer, payee=payee,
                            currency=data.draw(st.sampled_from(["HKD", "CNH"])),
                            amount=f"{data.draw(st.integers(1, 700))}.00"))
        elif action == "fund":
            h.send(fund(funding_id=f"F{step}", bank=data.draw(st.sampled_from([HSBC, HASE])),
                        currency=data.draw(st.sampled_from(["HKD", "CNH"])),
                        amount=f"{data.draw(st.integers(1, 400))}.00"))
        elif action == "deliver" and h.inflight:
            h.deliver(data.draw(st.integers(0, len(h.inflight) - 1)))
        elif action in ("cancel", "retry", "agent") and uetrs:
            uetr = data.draw(st.sampled_from(uetrs))
            command = {"cancel": ev.CancelTransfer(uetr=uetr, reason="ops", requested_by="ops"),
                       "retry": dm.RetrySettlement(),
                       "agent": data.draw(st.sampled_from([
                           ev.SettleInterbankLeg(uetr=uetr, end_to_end_id=E2E,
                                                 agent_reference="A"),
                           ev.RejectInterbankLeg(uetr=uetr, end_to_end_id=E2E,
                                                 agent_reference="R", reason_code="AM04")]))
                       }[action]
            _try(h, command, f"transfer:{uetr}")
        elif action == "tick":
            h.now += timedelta(minutes=data.draw(st.integers(1, 240)))
            for stream in list(_transfers(h)):
                _try(h, dm.Tick(), stream)
        h.assert_invariants()  # TD-1 and per-asset balance after every step
    _drain(h, data)
    h.assert_invariants()
    # Nothing is left held: every earmark was either consumed by a commit or released.
    assert all(a.debits_pending == a.credits_pending == 0 for a in h.ledger.accounts.values())
    # The wallets hold exactly what the settled transfers say they should.
    expected = {acc.wallet_account(b, c, w): 50000 for b, w in _PARTIES for c in ("HKD", "CNH")}
    for t in _transfers(h).values():
        if t.status is dm.TransferStatus.SETTLED:
            x, minor = t.instruction, int(t.instruction.amount.replace(".", ""))
            expected[acc.wallet_account(x.payer_participant, x.currency, x.payer_wallet)] -= minor
            expected[acc.wallet_account(x.payee_participant, x.currency, x.payee_wallet)] += minor
    assert {k: h.balance(k) for k in expected} == expected
    for t in _transfers(h).values():
        observe(f"{t.mode or t.route}: {t.status} ({t.outcome_code})")
        released = [e for e in h.published
                    if isinstance(e, ev.EarmarkReleased) and e.uetr == t.uetr]
        settled_or_nothing_held = t.status is dm.TransferStatus.SETTLED or "burn" not in t.held
        assert len(released) == (0 if settled_or_nothing_held else 1), t
