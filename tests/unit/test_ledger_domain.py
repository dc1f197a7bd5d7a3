"""The pure ledger domain as given-commands / when-command / then-outcome tables.

Every rejection code has at least one row in ``REJECTIONS``; every happy path has a test below it.
The world every row starts from is built by :func:`world` (assets HKD/2, USD/2, FUND.HKMMF.A/4
and a handful of accounts, Alice funded with HKD 1,000.00 and Bob with 50 fund units).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.ledger.domain import (
    EXPIRE_PREFIX,
    GENESIS_HASH,
    MAX_AMOUNT,
    AccountState,
    BalanceDelta,
    CloseAccount,
    Command,
    CommitGroup,
    CommitPending,
    DecimalEntry,
    DefineAsset,
    Entry,
    FreezeAccount,
    LedgerState,
    MalformedCommand,
    OpenAccount,
    PendingState,
    Post,
    PostPending,
    RejectionCode,
    Result,
    StateNotLoadedError,
    UnfreezeAccount,
    VoidGroup,
    VoidPending,
    accounts_touched,
    canonical_posting_bytes,
    chain_hash,
    groups_referenced,
    net_deltas,
    pendings_referenced,
)

RC = RejectionCode
T0 = datetime(2025, 3, 3, 9, 30, tzinfo=UTC)
HKD, USD, FUND = "HKD", "USD", "FUND.HKMMF.A"


def dr(account: str, amount: int, asset: str = HKD) -> Entry:
    return Entry(account, asset, "debit", amount)


def cr(account: str, amount: int, asset: str = HKD) -> Entry:
    return Entry(account, asset, "credit", amount)


def pay(pid: str, src: str, dst: str, amount: int, asset: str = HKD) -> Post:
    return Post(pid, (dr(src, amount, asset), cr(dst, amount, asset)))


def hold(pid: str, src: str, dst: str, amount: int, *, timeout_s: int | None = None,
         group: str | None = None, asset: str = HKD) -> PostPending:
    return PostPending(pid, (dr(src, amount, asset), cr(dst, amount, asset)),
                       timeout_s=timeout_s, settlement_group=group)


WORLD: tuple[Command, ...] = (
    DefineAsset("def-hkd", HKD, 2),
    DefineAsset("def-usd", USD, 2),
    DefineAsset("def-fund", FUND, 4),
    OpenAccount("open-1", "bank:hkd", "bank", HKD),
    OpenAccount("open-2", "alice:hkd", "alice", HKD, debits_must_not_exceed_credits=True),
    OpenAccount("open-3", "bob:hkd", "bob", HKD, debits_must_not_exceed_credits=True),
    OpenAccount("open-4", "bank:usd", "bank", USD),
    OpenAccount("open-5", "alice:usd", "alice", USD, debits_must_not_exceed_credits=True),
    OpenAccount("open-6", "fund:units", "fund", FUND),
    OpenAccount("open-7", "alice:fund", "alice", FUND, debits_must_not_exceed_credits=True),
    OpenAccount("open-8", "bob:fund", "bob", FUND, debits_must_not_exceed_credits=True),
    OpenAccount("open-9", "capped:hkd", "carol", HKD, debits_must_not_exceed_credits=True,
                limit=100_00),
    OpenAccount("open-10", "loan:hkd", "bank", HKD, credits_must_not_exceed_debits=True),
    OpenAccount("open-11", "empty:hkd", "dave", HKD, debits_must_not_exceed_credits=True),
    pay("fund-alice", "bank:hkd", "alice:hkd", 1000_00),
    pay("fund-bob-units", "fund:units", "bob:fund", 50_0000, FUND),
)


def world(*given: Command, now: datetime = T0, fast_path: bool = True,
          strict: bool = True) -> LedgerState:
    """The base world plus ``given``; every command must be accepted unless not ``strict``."""
    state = LedgerState(fast_path=fast_path)
    for cmd in WORLD:
        assert state.apply(cmd, now).accepted
    for cmd in given:
        result = state.apply(cmd, now)
        assert result.accepted or not strict, (cmd, result)
    return state


def balances(state: LedgerState) -> dict[str, tuple[int, int, int, int]]:
    return {k: a.balances() for k, a in sorted(state.accounts.items())}


def bal(state: LedgerState, account: str) -> tuple[int, int, int, int]:
    """(debits_posted, credits_posted, debits_pending, credits_pending)."""
    return state.accounts[account].balances()


# --------------------------------------------------------------------------------------------
# Rejections: given / when / then
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    when: Command
    code: RejectionCode
    given: Sequence[Command] = ()
    at: timedelta = timedelta(0)
    detail: str = ""  # a substring the detail must contain
    recorded: bool = True
    tags: tuple[str, ...] = field(default=())


REJECTIONS = [
    # invalid_command: malformed whatever the state
    Row("empty command id", pay("", "alice:hkd", "bob:hkd", 1), RC.INVALID_COMMAND,
        recorded=False),
    Row("reserved expire: prefix", pay("expire:p", "alice:hkd", "bob:hkd", 1),
        RC.INVALID_COMMAND, recorded=False),
    Row("id longer than 128", pay("x" * 129, "alice:hkd", "bob:hkd", 1), RC.INVALID_COMMAND,
        recorded=False),
    Row("one entry", Post("p", (dr("alice:hkd", 1),)), RC.INVALID_COMMAND, detail="2..128"),
    Row("entries not a list", Post("p", "alice:hkd"), RC.INVALID_COMMAND),  # type: ignore[arg-type]
    Row("account twice", Post("p", (dr("alice:hkd", 1), cr("alice:hkd", 1))),
        RC.INVALID_COMMAND, detail="only once"),
    Row("bad direction", Post("p", (dr("alice:hkd", 1), Entry("bob:hkd", HKD, "in", 1))),  # type: ignore[arg-type]
        RC.INVALID_COMMAND, detail="direction"),
    Row("not an entry", Post("p", (dr("alice:hkd", 1), ("bob:hkd", HKD, "credit", 1))),  # type: ignore[arg-type]
        RC.INVALID_COMMAND),
    Row("naive effective_at", Post("p", (dr("alice:hkd", 1), cr("bob:hkd", 1)),
                                   effective_at=datetime(2025, 1, 1)), RC.INVALID_COMMAND),
    Row("non-JSON metadata", Post("p", (dr("alice:hkd", 1), cr("bob:hkd", 1)),
                                  metadata={"rate": object()}), RC.INVALID_COMMAND),
    Row("float in metadata", Post("p", (dr("alice:hkd", 1), cr("bob:hkd", 1)),
                                  metadata={"rate": 7.8}), RC.INVALID_COMMAND),
    Row("metadata over 4 KiB", Post("p", (dr("alice:hkd", 1), cr("bob:hkd", 1)),
                                    metadata={"x": "y" * 5000}), RC.INVALID_COMMAND),
    Row("timeout zero", hold("p", "alice:hkd", "bob:hkd", 1, timeout_s=0), RC.INVALID_COMMAND),
    Row("timeout over a year", hold("p", "alice:hkd", "bob:hkd", 1, timeout_s=400 * 86400),
        RC.INVALID_COMMAND),
    Row("both balance flags", OpenAccount("o", "x", "p", HKD, True, True), RC.INVALID_COMMAND,
        detail="mutually exclusive"),
    Row("flag not bool", OpenAccount("o", "x", "p", HKD, 1), RC.INVALID_COMMAND),  # type: ignore[arg-type]
    Row("lower-case asset code", DefineAsset("d", "hkd", 2), RC.INVALID_COMMAND),
    Row("scale 19", DefineAsset("d", "BTC", 19), RC.INVALID_COMMAND),
    Row("commit override of one entry",
        CommitPending("c", "h", (dr("alice:hkd", 1),)), RC.INVALID_COMMAND,
        given=[hold("h", "alice:hkd", "bob:hkd", 10)]),
    Row("malformed record", MalformedCommand("m", b"{not json", "bad JSON"), RC.INVALID_COMMAND,
        detail="bad JSON"),
    Row("malformed record, edge found the code",
        MalformedCommand("m", b'{"amount": 12.5}', "amount must be a string", RC.INVALID_AMOUNT),
        RC.INVALID_AMOUNT),
    # id_conflict
    Row("same id, different body", pay("p1", "alice:hkd", "bob:hkd", 2), RC.ID_CONFLICT,
        given=[pay("p1", "alice:hkd", "bob:hkd", 1)], recorded=False),
    Row("same id, other command kind", VoidPending("p1", "p1"), RC.ID_CONFLICT,
        given=[pay("p1", "alice:hkd", "bob:hkd", 1)], recorded=False),
    # unknown_asset
    Row("entry asset undefined", Post("p", (dr("alice:hkd", 1, "XAU"), cr("bob:hkd", 1, "XAU"))),
        RC.UNKNOWN_ASSET),
    Row("account asset undefined", OpenAccount("o", "x", "p", "XAU"), RC.UNKNOWN_ASSET),
    Row("unknown asset before bad amount",
        Post("p", (dr("alice:hkd", 0), cr("bob:hkd", 1, "XAU"))), RC.UNKNOWN_ASSET),
    # invalid_amount
    Row("zero", pay("p", "alice:hkd", "bob:hkd", 0), RC.INVALID_AMOUNT),
    Row("negative", pay("p", "alice:hkd", "bob:hkd", -5), RC.INVALID_AMOUNT),
    Row("over 10**38-1", pay("p", "alice:hkd", "bob:hkd", MAX_AMOUNT + 1), RC.INVALID_AMOUNT),
    Row("bool amount", pay("p", "alice:hkd", "bob:hkd", True), RC.INVALID_AMOUNT),
    Row("JSON number on the wire",
        Post("p", (DecimalEntry("alice:hkd", HKD, "debit", 12.5),  # type: ignore[arg-type]
                   DecimalEntry("bob:hkd", HKD, "credit", 12.5))),  # type: ignore[arg-type]
        RC.INVALID_AMOUNT, detail="decimal string"),
    Row("decimal negative",
        Post("p", (DecimalEntry("alice:hkd", HKD, "debit", "-1.00"),
                   DecimalEntry("bob:hkd", HKD, "credit", "-1.00"))), RC.INVALID_AMOUNT),
    Row("decimal exponent",
        Post("p", (DecimalEntry("alice:hkd", HKD, "debit", "1e3"),
                   DecimalEntry("bob:hkd", HKD, "credit", "1e3"))), RC.INVALID_AMOUNT),
    Row("decimal zero",
        Post("p", (DecimalEntry("alice:hkd", HKD, "debit", "0.00"),
                   DecimalEntry("bob:hkd", HKD, "credit", "0.00"))), RC.INVALID_AMOUNT),
    Row("decimal absurdly large",
        Post("p", (DecimalEntry("alice:hkd", HKD, "debit", "9" * 37),
                   DecimalEntry("bob:hkd", HKD, "credit", "9" * 37))), RC.INVALID_AMOUNT),
    Row("decimal unicode digits",
        Post("p", (DecimalEntry("alice:hkd", HKD, "debit", "\u0661\u0662"),
                   DecimalEntry("bob:hkd", HKD, "credit", "\u0661\u0662"))), RC.INVALID_AMOUNT),
    Row("negative limit", OpenAccount("o", "x", "p", HKD, limit=-1), RC.INVALID_AMOUNT),
    Row("first bad amount decides (zero before scale)",
        Post("p", (dr("alice:hkd", 0), DecimalEntry("bob:hkd", HKD, "credit", "0.001"))),
        RC.INVALID_AMOUNT),
    # invalid_amount_scale
    Row("three decimals on HKD",
        Post("p", (DecimalEntry("alice:hkd", HKD, "debit", "1.001"),
                   DecimalEntry("bob:hkd", HKD, "credit", "1.001"))), RC.INVALID_AMOUNT_SCALE),
    Row("trailing zeros count",
        Post("p", (DecimalEntry("alice:hkd", HKD, "debit", "1.500"),
                   DecimalEntry("bob:hkd", HKD, "credit", "1.500"))), RC.INVALID_AMOUNT_SCALE),
    Row("limit with too many decimals", OpenAccount("o", "x", "p", HKD, limit="1.001"),
        RC.INVALID_AMOUNT_SCALE),
    # unbalanced
    Row("debits exceed credits", Post("p", (dr("alice:hkd", 100), cr("bob:hkd", 99))),
        RC.UNBALANCED, detail="debits exceed credits by 1"),
    Row("per asset, not in total",
        Post("p", (dr("alice:hkd", 100), cr("bob:hkd", 100, USD))), RC.UNBALANCED),
    Row("DvP with one leg short",
        Post("p", (dr("alice:hkd", 100), cr("bob:hkd", 100),
                   dr("bob:fund", 10, FUND), cr("alice:fund", 9, FUND))), RC.UNBALANCED),
    Row("unbalanced before unknown account",
        Post("p", (dr("nobody", 100), cr("bob:hkd", 99))), RC.UNBALANCED),
    # unknown_account
    Row("debit account missing", pay("p", "nobody", "bob:hkd", 1), RC.UNKNOWN_ACCOUNT),
    Row("freeze missing account", FreezeAccount("f", "nobody"), RC.UNKNOWN_ACCOUNT),
    Row("close missing account", CloseAccount("f", "nobody"), RC.UNKNOWN_ACCOUNT),
    # asset_mismatch
    Row("USD entry on a HKD account",
        Post("p", (dr("bank:usd", 100, USD), cr("alice:hkd", 100, USD))), RC.ASSET_MISMATCH),
    # pending_not_found
    Row("commit unknown pending", CommitPending("c", "nope"), RC.PENDING_NOT_FOUND),
    Row("void unknown pending", VoidPending("v", "nope"), RC.PENDING_NOT_FOUND),
    Row("commit an immediate posting", CommitPending("c", "fund-alice"), RC.PENDING_NOT_FOUND),
    Row("commit a rejected pending", CommitPending("c", "h"), RC.PENDING_NOT_FOUND,
        given=[PostPending("h", (dr("alice:hkd", 1), cr("bob:hkd", 2)))],
        tags=("given-rejected",)),
    # pending_in_group
    Row("commit a group member alone", CommitPending("c", "h1"), RC.PENDING_IN_GROUP,
        given=[hold("h1", "alice:hkd", "bob:hkd", 10, group="g")]),
    Row("void a group member alone", VoidPending("v", "h1"), RC.PENDING_IN_GROUP,
        given=[hold("h1", "alice:hkd", "bob:hkd", 10, group="g")]),
    # group_not_found
    Row("commit unknown group", CommitGroup("cg", "g"), RC.GROUP_NOT_FOUND),
    Row("void unknown group", VoidGroup("vg", "g"), RC.GROUP_NOT_FOUND),
    # already_posted
    Row("commit twice", CommitPending("c2", "h"), RC.ALREADY_POSTED,
        given=[hold("h", "alice:hkd", "bob:hkd", 10), CommitPending("c1", "h")]),
    Row("void after commit", VoidPending("v", "h"), RC.ALREADY_POSTED,
        given=[hold("h", "alice:hkd", "bob:hkd", 10), CommitPending("c1", "h")]),
    Row("commit group twice", CommitGroup("cg2", "g"), RC.ALREADY_POSTED,
        given=[hold("h", "alice:hkd", "bob:hkd", 10, group="g"), CommitGroup("cg1", "g")]),
    Row("void a committed group", VoidGroup("vg", "g"), RC.ALREADY_POSTED,
        given=[hold("h", "alice:hkd", "bob:hkd", 10, group="g"), CommitGroup("cg1", "g")]),
    Row("join a committed group", hold("h2", "alice:hkd", "bob:hkd", 1, group="g"),
        RC.ALREADY_POSTED,
        given=[hold("h", "alice:hkd", "bob:hkd", 10, group="g"), CommitGroup("cg1", "g")]),
    # already_voided
    Row("commit after void", CommitPending("c", "h"), RC.ALREADY_VOIDED,
        given=[hold("h", "alice:hkd", "bob:hkd", 10), VoidPending("v", "h")]),
    Row("void twice", VoidPending("v2", "h"), RC.ALREADY_VOIDED,
        given=[hold("h", "alice:hkd", "bob:hkd", 10), VoidPending("v", "h")]),
    Row("commit a voided group", CommitGroup("cg", "g"), RC.ALREADY_VOIDED,
        given=[hold("h", "alice:hkd", "bob:hkd", 10, group="g"), VoidGroup("vg", "g")]),
    Row("join a voided group", hold("h2", "alice:hkd", "bob:hkd", 1, group="g"),
        RC.ALREADY_VOIDED,
        given=[hold("h", "alice:hkd", "bob:hkd", 10, group="g"), VoidGroup("vg", "g")]),
    # pending_expired (the due-but-not-yet-expired case is in its own tests below)
    Row("commit an expired pending", CommitPending("c", "h"), RC.PENDING_EXPIRED,
        given=[hold("h", "alice:hkd", "bob:hkd", 10, timeout_s=1)], at=timedelta(seconds=5),
        tags=("expired-in-step",)),
    # amount_exceeds_pending
    Row("partial larger than held",
        CommitPending("c", "h", (dr("alice:hkd", 11), cr("bob:hkd", 11))),
        RC.AMOUNT_EXCEEDS_PENDING, given=[hold("h", "alice:hkd", "bob:hkd", 10)]),
    Row("partial names another account",
        CommitPending("c", "h", (dr("alice:hkd", 5), cr("capped:hkd", 5))),
        RC.AMOUNT_EXCEEDS_PENDING, given=[hold("h", "alice:hkd", "bob:hkd", 10)],
        detail="holds no credit"),
    Row("partial flips a direction",
        CommitPending("c", "h", (cr("alice:hkd", 5), dr("bob:hkd", 5))),
        RC.AMOUNT_EXCEEDS_PENDING, given=[hold("h", "alice:hkd", "bob:hkd", 10)]),
    # account_frozen
    Row("debit a frozen account", pay("p", "alice:hkd", "bob:hkd", 1), RC.ACCOUNT_FROZEN,
        given=[FreezeAccount("f", "alice:hkd")]),
    Row("credit a frozen account", pay("p", "alice:hkd", "bob:hkd", 1), RC.ACCOUNT_FROZEN,
        given=[FreezeAccount("f", "bob:hkd")]),
    Row("hold on a frozen account", hold("p", "alice:hkd", "bob:hkd", 1), RC.ACCOUNT_FROZEN,
        given=[FreezeAccount("f", "bob:hkd")]),
    Row("commit into a frozen account", CommitPending("c", "h"), RC.ACCOUNT_FROZEN,
        given=[hold("h", "alice:hkd", "bob:hkd", 10), FreezeAccount("f", "bob:hkd")]),
    Row("commit a group with a frozen account", CommitGroup("cg", "g"), RC.ACCOUNT_FROZEN,
        given=[hold("h1", "alice:hkd", "bob:hkd", 10, group="g"),
               hold("h2", "bob:fund", "alice:fund", 1, group="g", asset=FUND),
               FreezeAccount("f", "alice:fund")]),
    Row("close a frozen account", CloseAccount("c", "empty:hkd"), RC.ACCOUNT_FROZEN,
        given=[FreezeAccount("f", "empty:hkd")]),
    Row("frozen before closed", pay("p", "alice:hkd", "empty:hkd", 1), RC.ACCOUNT_FROZEN,
        given=[CloseAccount("c", "empty:hkd"), FreezeAccount("f", "alice:hkd")]),
    # account_closed
    Row("post to a closed account", pay("p", "alice:hkd", "empty:hkd", 1), RC.ACCOUNT_CLOSED,
        given=[CloseAccount("c", "empty:hkd")]),
    Row("freeze a closed account", FreezeAccount("f", "empty:hkd"), RC.ACCOUNT_CLOSED,
        given=[CloseAccount("c", "empty:hkd")]),
    Row("unfreeze a closed account", UnfreezeAccount("f", "empty:hkd"), RC.ACCOUNT_CLOSED,
        given=[CloseAccount("c", "empty:hkd")]),
    Row("close twice", CloseAccount("c2", "empty:hkd"), RC.ACCOUNT_CLOSED,
        given=[CloseAccount("c", "empty:hkd")]),
    # account_not_empty
    Row("close with a balance", CloseAccount("c", "alice:hkd"), RC.ACCOUNT_NOT_EMPTY),
    Row("close with a pending credit", CloseAccount("c", "empty:hkd"), RC.ACCOUNT_NOT_EMPTY,
        given=[hold("h", "alice:hkd", "empty:hkd", 1)]),
    # insufficient_funds
    Row("debit beyond credits", pay("p", "alice:hkd", "bob:hkd", 1000_01),
        RC.INSUFFICIENT_FUNDS, detail="available 100000"),
    Row("pending debits count", pay("p", "alice:hkd", "bob:hkd", 600_00),
        RC.INSUFFICIENT_FUNDS, given=[hold("h", "alice:hkd", "bob:hkd", 500_00)]),
    Row("pending credits do not count", pay("p", "bob:hkd", "alice:hkd", 1),
        RC.INSUFFICIENT_FUNDS, given=[hold("h", "alice:hkd", "bob:hkd", 500_00)]),
    Row("hold beyond credits", hold("h", "empty:hkd", "bob:hkd", 1), RC.INSUFFICIENT_FUNDS),
    Row("credits_must_not_exceed_debits", pay("p", "bank:hkd", "loan:hkd", 1),
        RC.INSUFFICIENT_FUNDS),
    Row("insufficient before limit", pay("p", "empty:hkd", "capped:hkd", 100_01),
        RC.INSUFFICIENT_FUNDS),
    # limit_exceeded
    Row("credit over the cap", pay("p", "alice:hkd", "capped:hkd", 100_01),
        RC.LIMIT_EXCEEDED, detail="limit 10000"),
    Row("pending credits count toward the cap", pay("p", "alice:hkd", "capped:hkd", 60_00),
        RC.LIMIT_EXCEEDED, given=[hold("h", "alice:hkd", "capped:hkd", 50_00)]),
    Row("ledger-wide ceiling", pay("p", "w1", "w2", 2), RC.LIMIT_EXCEEDED,
        given=[OpenAccount("o-w1", "w1", "whale", HKD), OpenAccount("o-w2", "w2", "whale", HKD),
               pay("big", "w1", "w2", MAX_AMOUNT - 1)],
        detail="10**38-1"),
    # account_exists / asset_exists
    Row("open twice", OpenAccount("o", "alice:hkd", "alice", HKD), RC.ACCOUNT_EXISTS),
    Row("define twice, same scale", DefineAsset("d", HKD, 2), RC.ASSET_EXISTS),
    Row("define twice, other scale", DefineAsset("d", HKD, 3), RC.ASSET_EXISTS),
]


def test_every_rejection_code_has_a_row() -> None:
    assert {row.code for row in REJECTIONS} == set(RejectionCode)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "ordered"])
@pytest.mark.parametrize("row", REJECTIONS, ids=[f"{r.code}:{r.name}" for r in REJECTIONS])
def test_rejection(row: Row, fast_path: bool) -> None:
    # Given
    state = world(*row.given, fast_path=fast_path, strict="given-rejected" not in row.tags)
    now = T0 + row.at
    before = balances(state)
    stored_before = dict(state.idempotency)
    # When
    result = state.apply(row.when, now)
    # Then
    assert not result.accepted
    assert result.code == row.code, result.detail
    assert row.detail in result.detail
    assert result.recorded is row.recorded
    assert result.deltas == () and result.entries == ()
    if "expired-in-step" not in row.tags:
        assert result.expired == ()
        assert balances(state) == before
    if row.recorded:
        assert state.idempotency[result.command_id] == (result.request_hash, result)
        again = state.apply(row.when, now + timedelta(hours=1))
        assert again.duplicate and not again.recorded
        assert again.code == row.code and again.recorded_at == result.recorded_at
    else:
        assert {k: v for k, v in state.idempotency.items()} == stored_before


# --------------------------------------------------------------------------------------------
# Happy paths
# --------------------------------------------------------------------------------------------


def test_post_moves_posted_balances_and_reports_deltas() -> None:
    state = world()
    result = state.apply(pay("p1", "alice:hkd", "bob:hkd", 250_75), T0)
    assert result.accepted and result.code is None and result.recorded
    assert result.kind == "post" and result.is_posting
    assert result.entries == (dr("alice:hkd", 250_75), cr("bob:hkd", 250_75))
    assert result.deltas == (
        BalanceDelta("alice:hkd", debits_posted=250_75),
        BalanceDelta("bob:hkd", credits_posted=250_75),
    )
    assert result.touched_accounts == ("alice:hkd", "bob:hkd")
    assert result.effective_at == T0 and result.recorded_at == T0
    assert bal(state, "alice:hkd") == (250_75, 1000_00, 0, 0)
    assert bal(state, "bob:hkd") == (0, 250_75, 0, 0)
    assert state.accounts["alice:hkd"].available() == 749_25


def test_post_exactly_the_available_balance() -> None:
    state = world()
    assert state.apply(pay("p1", "alice:hkd", "bob:hkd", 1000_00), T0).accepted
    assert state.accounts["alice:hkd"].available() == 0


def test_decimal_entries_resolve_with_the_asset_scale() -> None:
    state = world()
    cmd = Post("p1", (DecimalEntry("alice:hkd", HKD, "debit", "1250.7"),
                      DecimalEntry("bank:hkd", HKD, "credit", "1250.70")),
               metadata={"uetr": "eb6305c9-1f7f-49de-aed0-16487c27b42d"})
    result = state.apply(pay("top-up", "bank:hkd", "alice:hkd", 1000_00), T0)
    result = state.apply(cmd, T0)
    assert result.accepted, result.detail
    assert result.entries == (dr("alice:hkd", 1250_70), cr("bank:hkd", 1250_70))
    assert dict(result.metadata or {}) == {"uetr": "eb6305c9-1f7f-49de-aed0-16487c27b42d"}


def test_asset_defined_earlier_in_the_same_batch_resolves_decimals() -> None:
    state = LedgerState()
    for cmd in (
        DefineAsset("d", "USDC.ETH", 6),
        OpenAccount("o1", "treasury", "issuer", "USDC.ETH"),
        OpenAccount("o2", "holder", "h", "USDC.ETH", debits_must_not_exceed_credits=True),
        Post("p", (DecimalEntry("treasury", "USDC.ETH", "debit", "0.000001"),
                   DecimalEntry("holder", "USDC.ETH", "credit", "0.000001"))),
    ):
        assert state.apply(cmd, T0).accepted
    assert bal(state, "holder") == (0, 1, 0, 0)


def test_dvp_moves_cash_against_units_in_one_posting() -> None:
    state = world()
    dvp = Post("dvp-1", (
        dr("alice:hkd", 101_25), cr("bob:hkd", 101_25),          # cash leg
        dr("bob:fund", 10_0000, FUND), cr("alice:fund", 10_0000, FUND),  # units leg
    ), metadata={"order_ref": "ORD-1", "nav": "10.1250"})
    result = state.apply(dvp, T0)
    assert result.accepted
    assert bal(state, "alice:hkd") == (101_25, 1000_00, 0, 0)
    assert bal(state, "bob:hkd") == (0, 101_25, 0, 0)
    assert bal(state, "bob:fund") == (10_0000, 50_0000, 0, 0)
    assert bal(state, "alice:fund") == (0, 10_0000, 0, 0)
    assert [d.account_id for d in result.deltas] == sorted(
        ["alice:hkd", "bob:hkd", "bob:fund", "alice:fund"])


def test_dvp_with_one_leg_short_of_funds_changes_nothing() -> None:
    state = world()
    before = balances(state)
    dvp = Post("dvp-1", (dr("alice:hkd", 100_00), cr("bob:hkd", 100_00),
                         dr("bob:fund", 51_0000, FUND), cr("alice:fund", 51_0000, FUND)))
    result = state.apply(dvp, T0)
    assert result.code == RC.INSUFFICIENT_FUNDS and "bob:fund" in result.detail
    assert balances(state) == before


def test_fx_swap_through_liquidity_accounts() -> None:
    state = world(pay("usd-in", "bank:usd", "alice:usd", 100_00, USD))
    fx = Post("fx-1", (
        dr("alice:hkd", 781_00), cr("bank:hkd", 781_00),
        dr("bank:usd", 100_00, USD), cr("alice:usd", 100_00, USD),
    ), metadata={"rate": "7.8100", "pair": "USD/HKD"})
    assert state.apply(fx, T0).accepted
    assert state.accounts["alice:usd"].available() == 200_00


def test_pending_then_full_commit() -> None:
    state = world()
    held = state.apply(hold("h1", "alice:hkd", "bob:hkd", 300_00, timeout_s=60), T0)
    assert held.accepted and held.timeout_at == T0 + timedelta(seconds=60)
    assert held.deltas == (BalanceDelta("alice:hkd", debits_pending=300_00),
                           BalanceDelta("bob:hkd", credits_pending=300_00))
    assert bal(state, "alice:hkd") == (0, 1000_00, 300_00, 0)
    assert state.accounts["alice:hkd"].available() == 700_00
    assert state.pendings["h1"].remaining == held.entries

    committed = state.apply(CommitPending("c1", "h1"), T0 + timedelta(seconds=59))
    assert committed.accepted and committed.refs == ("h1",)
    assert committed.entries == held.entries
    assert committed.deltas == (
        BalanceDelta("alice:hkd", debits_posted=300_00, debits_pending=-300_00),
        BalanceDelta("bob:hkd", credits_posted=300_00, credits_pending=-300_00),
    )
    assert bal(state, "alice:hkd") == (300_00, 1000_00, 0, 0)
    assert bal(state, "bob:hkd") == (0, 300_00, 0, 0)
    pending = state.pendings["h1"]
    assert pending.status == "posted" and pending.resolved_by == "c1"
    assert pending.remaining == ()
    # The pending no longer expires.
    assert state.expire(T0 + timedelta(hours=1)) == []


def test_partial_commit_posts_part_and_releases_the_remainder() -> None:
    state = world()
    state.apply(PostPending("h1", (dr("alice:hkd", 300_00), cr("bob:hkd", 200_00),
                                   cr("bank:hkd", 100_00))), T0)
    result = state.apply(
        CommitPending("c1", "h1", (dr("alice:hkd", 120_00), cr("bob:hkd", 120_00))), T0)
    assert result.accepted, result.detail
    assert result.entries == (dr("alice:hkd", 120_00), cr("bob:hkd", 120_00))
    assert bal(state, "alice:hkd") == (120_00, 1000_00, 0, 0)
    assert bal(state, "bob:hkd") == (0, 120_00, 0, 0)
    assert bal(state, "bank:hkd") == (1000_00, 0, 0, 0)  # its 100.00 hold released
    assert dict((d.account_id, d) for d in result.deltas)["bank:hkd"] == BalanceDelta(
        "bank:hkd", credits_pending=-100_00)
    assert state.pendings["h1"].committed == result.entries


def test_partial_commit_with_decimal_entries() -> None:
    state = world(hold("h1", "alice:hkd", "bob:hkd", 300_00))
    result = state.apply(CommitPending("c1", "h1", (
        DecimalEntry("alice:hkd", HKD, "debit", "0.01"),
        DecimalEntry("bob:hkd", HKD, "credit", "0.01"))), T0)
    assert result.accepted
    assert bal(state, "alice:hkd") == (1, 1000_00, 0, 0)


def test_void_releases_every_hold() -> None:
    state = world(hold("h1", "alice:hkd", "bob:hkd", 300_00))
    result = state.apply(VoidPending("v1", "h1"), T0)
    assert result.accepted and result.kind == "void_pending" and result.refs == ("h1",)
    assert result.entries == state.pendings["h1"].entries
    assert bal(state, "alice:hkd") == (0, 1000_00, 0, 0)
    assert bal(state, "bob:hkd") == (0, 0, 0, 0)
    assert state.pendings["h1"].status == "voided"


def test_void_is_allowed_on_a_frozen_account() -> None:
    state = world(hold("h1", "alice:hkd", "bob:hkd", 300_00), FreezeAccount("f", "alice:hkd"))
    assert state.apply(VoidPending("v1", "h1"), T0).accepted
    assert bal(state, "alice:hkd") == (0, 1000_00, 0, 0)


def test_expire_releases_due_pendings_in_timeout_order() -> None:
    state = world(hold("h-late", "alice:hkd", "bob:hkd", 2_00, timeout_s=20),
                  hold("h-early", "alice:hkd", "bob:hkd", 1_00, timeout_s=10),
                  hold("h-never", "alice:hkd", "bob:hkd", 3_00))
    assert state.expire(T0 + timedelta(seconds=9, microseconds=999_999)) == []
    results = state.expire(T0 + timedelta(seconds=20))  # the boundary is inclusive
    assert [r.command_id for r in results] == ["expire:h-early", "expire:h-late"]
    first = results[0]
    assert first.accepted and first.kind == "expire" and first.is_posting
    assert first.effective_at == T0 + timedelta(seconds=10)
    assert first.recorded_at == T0 + timedelta(seconds=20)
    assert first.entries == state.pendings["h-early"].entries
    assert first.deltas == (BalanceDelta("alice:hkd", debits_pending=-1_00),
                            BalanceDelta("bob:hkd", credits_pending=-1_00))
    assert state.idempotency["expire:h-early"][1] == first
    assert bal(state, "alice:hkd") == (0, 1000_00, 3_00, 0)
    assert state.pendings["h-early"].status == "expired"
    assert state.expire(T0 + timedelta(days=400)) == []


def test_commit_of_a_due_pending_expires_it_in_the_same_step() -> None:
    state = world(hold("h1", "alice:hkd", "bob:hkd", 300_00, timeout_s=30))
    result = state.apply(CommitPending("c1", "h1"), T0 + timedelta(seconds=30))
    assert result.code == RC.PENDING_EXPIRED and result.recorded
    (expired,) = result.expired
    assert expired.command_id == "expire:h1" and expired.accepted
    assert bal(state, "alice:hkd") == (0, 1000_00, 0, 0)
    assert state.pendings["h1"].status == "expired"
    assert result.touched_accounts == ("alice:hkd", "bob:hkd")
    assert [r.command_id for r in result.effects()] == ["expire:h1", "c1"]
    # expire() has nothing left to do, and a retry replays without expiring again.
    assert state.expire(T0 + timedelta(hours=1)) == []
    again = state.apply(CommitPending("c1", "h1"), T0 + timedelta(hours=1))
    assert again.duplicate and again.expired == result.expired
    assert net_deltas([again]) == {}


def test_void_of_a_due_pending_is_pending_expired() -> None:
    state = world(hold("h1", "alice:hkd", "bob:hkd", 300_00, timeout_s=30))
    result = state.apply(VoidPending("v1", "h1"), T0 + timedelta(minutes=5))
    assert result.code == RC.PENDING_EXPIRED and len(result.expired) == 1


def dvp_group() -> tuple[Command, ...]:
    return (
        hold("cash", "alice:hkd", "bob:hkd", 101_25, group="dvp-7", timeout_s=120),
        hold("units", "bob:fund", "alice:fund", 10_0000, group="dvp-7", timeout_s=60,
             asset=FUND),
    )


def test_group_commit_posts_every_member_atomically() -> None:
    state = world(*dvp_group())
    assert state.groups["dvp-7"].members == ["cash", "units"]
    result = state.apply(CommitGroup("settle-7", "dvp-7"), T0 + timedelta(seconds=30))
    assert result.accepted and result.refs == ("cash", "units")
    assert result.settlement_group == "dvp-7"
    assert len(result.entries) == 4
    assert bal(state, "alice:hkd") == (101_25, 1000_00, 0, 0)
    assert bal(state, "alice:fund") == (0, 10_0000, 0, 0)
    assert bal(state, "bob:fund") == (10_0000, 50_0000, 0, 0)
    assert {state.pendings[p].status for p in ("cash", "units")} == {"posted"}
    assert state.groups["dvp-7"].status == "posted"


def test_group_commit_with_an_expired_member_commits_nothing() -> None:
    state = world(*dvp_group())
    before = balances(state)
    result = state.apply(CommitGroup("settle-7", "dvp-7"), T0 + timedelta(seconds=90))
    assert result.code == RC.PENDING_EXPIRED and "units" in result.detail
    assert [r.command_id for r in result.expired] == ["expire:units"]
    assert state.pendings["cash"].status == "pending"
    after_expiry = {k: v for k, v in before.items()}
    after_expiry["bob:fund"] = (0, 50_0000, 0, 0)
    after_expiry["alice:fund"] = (0, 0, 0, 0)
    assert balances(state) == after_expiry
    # The group can still be voided, which releases the cash leg.
    voided = state.apply(VoidGroup("unwind-7", "dvp-7"), T0 + timedelta(seconds=91))
    assert voided.accepted and voided.refs == ("cash",)
    assert bal(state, "alice:hkd") == (0, 1000_00, 0, 0)


def test_group_void_releases_every_member() -> None:
    state = world(*dvp_group())
    result = state.apply(VoidGroup("unwind-7", "dvp-7"), T0)
    assert result.accepted and result.refs == ("cash", "units")
    assert bal(state, "alice:hkd") == (0, 1000_00, 0, 0)
    assert bal(state, "bob:fund") == (0, 50_0000, 0, 0)
    assert state.groups["dvp-7"].status == "voided"


def test_freeze_blocks_both_directions_and_unfreeze_restores() -> None:
    state = world(FreezeAccount("f1", "alice:hkd"))
    assert state.apply(pay("out", "alice:hkd", "bob:hkd", 1), T0).code == RC.ACCOUNT_FROZEN
    assert state.apply(pay("in", "bank:hkd", "alice:hkd", 1), T0).code == RC.ACCOUNT_FROZEN
    assert state.apply(FreezeAccount("f2", "alice:hkd"), T0).accepted  # already frozen: no-op
    assert state.apply(UnfreezeAccount("u1", "alice:hkd"), T0).accepted
    assert state.apply(pay("out-2", "alice:hkd", "bob:hkd", 1), T0).accepted
    assert state.apply(UnfreezeAccount("u2", "alice:hkd"), T0).accepted  # open: no-op


def test_close_requires_a_zero_balance() -> None:
    state = world()
    assert state.apply(CloseAccount("c1", "alice:hkd"), T0).code == RC.ACCOUNT_NOT_EMPTY
    assert state.apply(pay("drain", "alice:hkd", "bank:hkd", 1000_00), T0).accepted
    assert state.apply(CloseAccount("c2", "alice:hkd"), T0).accepted
    assert state.accounts["alice:hkd"].status == "closed"
    assert state.apply(pay("late", "bank:hkd", "alice:hkd", 1), T0).code == RC.ACCOUNT_CLOSED


def test_limit_caps_the_credit_exposure() -> None:
    state = world(pay("p1", "alice:hkd", "capped:hkd", 100_00))
    assert state.apply(pay("p2", "alice:hkd", "capped:hkd", 1), T0).code == RC.LIMIT_EXCEEDED
    assert state.apply(pay("p3", "capped:hkd", "bob:hkd", 40_00), T0).accepted
    assert state.apply(pay("p4", "alice:hkd", "capped:hkd", 40_00), T0).accepted


def test_limit_on_a_flagless_account_bounds_both_directions() -> None:
    state = world(OpenAccount("o", "nostro", "bank", HKD, limit=10_00))
    assert state.apply(pay("p1", "nostro", "bob:hkd", 10_01), T0).code == RC.LIMIT_EXCEEDED
    assert state.apply(pay("p2", "nostro", "bob:hkd", 10_00), T0).accepted
    assert state.apply(pay("p3", "bank:hkd", "nostro", 20_00), T0).accepted
    assert state.apply(pay("p4", "bank:hkd", "nostro", 1), T0).code == RC.LIMIT_EXCEEDED


def test_available_balance_of_a_debit_normal_account() -> None:
    state = world(pay("lend", "loan:hkd", "bank:hkd", 500_00),
                  hold("h", "bank:hkd", "loan:hkd", 100_00))
    assert state.accounts["loan:hkd"].available() == 400_00


# --------------------------------------------------------------------------------------------
# Idempotency
# --------------------------------------------------------------------------------------------


def test_replay_returns_the_original_acceptance() -> None:
    state = world()
    first = state.apply(pay("p1", "alice:hkd", "bob:hkd", 10_00), T0)
    again = state.apply(pay("p1", "alice:hkd", "bob:hkd", 10_00), T0 + timedelta(days=1))
    assert again.duplicate and not again.recorded
    assert again.deltas == first.deltas and again.recorded_at == T0
    assert bal(state, "alice:hkd") == (10_00, 1000_00, 0, 0)  # applied once
    assert net_deltas([first, again]) == {
        "alice:hkd": BalanceDelta("alice:hkd", debits_posted=10_00),
        "bob:hkd": BalanceDelta("bob:hkd", credits_posted=10_00),
    }


def test_replay_of_a_rejection_stays_rejected_even_once_it_would_pass() -> None:
    state = world()
    first = state.apply(pay("p1", "bob:hkd", "alice:hkd", 10_00), T0)
    assert first.code == RC.INSUFFICIENT_FUNDS
    assert state.apply(pay("fund-bob", "bank:hkd", "bob:hkd", 50_00), T0).accepted
    again = state.apply(pay("p1", "bob:hkd", "alice:hkd", 10_00), T0)
    assert again.duplicate and again.code == RC.INSUFFICIENT_FUNDS
    assert bal(state, "bob:hkd") == (0, 50_00, 0, 0)


def test_id_conflict_does_not_replace_the_original() -> None:
    state = world()
    first = state.apply(pay("p1", "alice:hkd", "bob:hkd", 10_00), T0)
    conflict = state.apply(pay("p1", "alice:hkd", "bob:hkd", 99_00), T0)
    assert conflict.code == RC.ID_CONFLICT and not conflict.recorded
    assert state.idempotency["p1"] == (first.request_hash, first)
    assert state.apply(pay("p1", "alice:hkd", "bob:hkd", 10_00), T0).duplicate


def test_remembered_outcomes_replay_like_live_ones() -> None:
    original = world().apply(pay("p1", "alice:hkd", "bob:hkd", 10_00), T0)
    fresh = world()
    fresh.remember("p1", original.request_hash, original)
    again = fresh.apply(pay("p1", "alice:hkd", "bob:hkd", 10_00), T0)
    assert again.duplicate and again.deltas == original.deltas
    assert bal(fresh, "alice:hkd") == (0, 1000_00, 0, 0)


def test_request_hash_is_canonical() -> None:
    base = Post("p1", (dr("a", 1), cr("b", 1)), effective_at=T0,
                metadata={"uetr": "u", "ref": {"y": 1, "x": [1, "2"]}})
    reordered = Post("p1", [dr("a", 1), cr("b", 1)],
                     effective_at=T0.astimezone(timezone(timedelta(hours=8))),
                     metadata={"ref": {"x": [1, "2"], "y": 1}, "uetr": "u"})
    assert base.request_hash() == reordered.request_hash()
    assert base.request_hash() == hashlib.sha256(json.dumps(
        base._canonical(), sort_keys=True, separators=(",", ":")).encode()).digest()
    different = [
        Post("p1", (dr("a", 2), cr("b", 2)), effective_at=T0, metadata=base.metadata),
        Post("p1", (cr("b", 1), dr("a", 1)), effective_at=T0, metadata=base.metadata),
        Post("p1", (dr("a", 1), cr("b", 1)), metadata=base.metadata),
        Post("p1", (dr("a", 1), cr("b", 1)), effective_at=T0),
        Post("p1", (DecimalEntry("a", HKD, "debit", "1"), DecimalEntry("b", HKD, "credit", "1")),
             effective_at=T0, metadata=base.metadata),
    ]
    hashes = {c.request_hash() for c in different} | {base.request_hash()}
    assert len(hashes) == len(different) + 1


def test_request_hash_golden_value() -> None:
    """Frozen forever: stored hashes are compared with new ones after every upgrade."""
    cmd = PostPending("p-1", (dr("alice:hkd", 125075), cr("bob:hkd", 125075)), timeout_s=60,
                      settlement_group="g", effective_at=T0, metadata={"ref": "X"})
    text = ('{"effective_at":"2025-03-03T09:30:00.000000Z","entries":[["e","alice:hkd","HKD",'
            '"debit",125075],["e","bob:hkd","HKD","credit",125075]],"id":"p-1",'
            '"kind":"post_pending","metadata":{"ref":"X"},"settlement_group":"g",'
            '"timeout_s":60}')
    assert cmd.request_hash() == hashlib.sha256(text.encode()).digest()


def test_malformed_commands_hash_without_crashing() -> None:
    state = world()
    weird: list[Command] = [
        Post("w1", (dr("alice:hkd", 10**5000), cr("bob:hkd", 10**5000))),
        Post("w2", (dr("alice:hkd", 1), cr("bob:hkd", 1)), metadata={1: "a", "b": 2}),  # type: ignore[dict-item]
        Post("w3", (dr("alice:hkd", 1), cr("bob:hkd", 1)), metadata={"n": 10**5000}),
        PostPending("w4", (dr("alice:hkd", 1), cr("bob:hkd", 1)), timeout_s=10**5000),
        Post("w5", None),  # type: ignore[arg-type]
        MalformedCommand("w6", "not bytes"),  # type: ignore[arg-type]
    ]
    for cmd in weird:
        result = state.apply(cmd, T0)
        assert not result.accepted and result.recorded
        assert state.apply(cmd, T0).duplicate


# --------------------------------------------------------------------------------------------
# Writer helpers: canonical bytes, chain, touched accounts, deltas
# --------------------------------------------------------------------------------------------


def test_canonical_posting_bytes_golden_value() -> None:
    """Frozen forever: the hash chain of every partition depends on these bytes."""
    state = world()
    result = state.apply(Post("p-1", (dr("alice:hkd", 50075), cr("bob:hkd", 50075)),
                              effective_at=datetime(2025, 3, 3, 17, 30,
                                                    tzinfo=timezone(timedelta(hours=8))),
                              metadata={"uetr": "u-1", "end_to_end_id": "E2E"}), T0)
    assert canonical_posting_bytes(result) == (
        b'{"effective_at":"2025-03-03T09:30:00.000000Z","entries":[{"account_id":"alice:hkd",'
        b'"amount":"50075","asset":"HKD","direction":"debit"},{"account_id":"bob:hkd",'
        b'"amount":"50075","asset":"HKD","direction":"credit"}],"kind":"post",'
        b'"metadata":{"end_to_end_id":"E2E","uetr":"u-1"},"posting_id":"p-1","refs":[],'
        b'"settlement_group":null,"timeout_at":null,"v":1}'
    )
    h1 = chain_hash(GENESIS_HASH, canonical_posting_bytes(result))
    assert h1 == hashlib.sha256(bytes(32) + canonical_posting_bytes(result)).digest()
    assert h1.hex() == hashlib.sha256(GENESIS_HASH + canonical_posting_bytes(result)).hexdigest()


def test_canonical_bytes_cover_every_posting_kind_and_refuse_the_rest() -> None:
    state = world(*dvp_group(), hold("h1", "alice:hkd", "bob:hkd", 5, timeout_s=5),
                  hold("h2", "alice:hkd", "bob:hkd", 5))
    results = [
        state.apply(CommitGroup("cg", "dvp-7"), T0),
        state.apply(VoidPending("v", "h2"), T0),
        *state.expire(T0 + timedelta(seconds=5)),
    ]
    docs = [json.loads(canonical_posting_bytes(r)) for r in results]
    assert [d["kind"] for d in docs] == ["commit_group", "void_pending", "expire"]
    assert docs[0]["refs"] == ["cash", "units"] and docs[0]["settlement_group"] == "dvp-7"
    assert docs[2]["posting_id"] == EXPIRE_PREFIX + "h1"
    rejected = state.apply(pay("p", "nobody", "bob:hkd", 1), T0)
    for not_a_posting in (rejected, state.apply(FreezeAccount("f", "bob:hkd"), T0)):
        with pytest.raises(ValueError):
            canonical_posting_bytes(not_a_posting)


def test_accounts_touched_includes_the_pendings_accounts() -> None:
    state = world(*dvp_group(), hold("h1", "alice:hkd", "capped:hkd", 5))
    assert accounts_touched(pay("p", "alice:hkd", "bob:hkd", 1), state) == {"alice:hkd",
                                                                           "bob:hkd"}
    assert accounts_touched(CommitPending("c", "h1"), state) == {"alice:hkd", "capped:hkd"}
    assert accounts_touched(VoidPending("c", "h1"), state) == {"alice:hkd", "capped:hkd"}
    assert accounts_touched(CommitGroup("c", "dvp-7"), state) == {
        "alice:hkd", "bob:hkd", "bob:fund", "alice:fund"}
    assert accounts_touched(FreezeAccount("f", "bob:hkd"), state) == {"bob:hkd"}
    assert accounts_touched(DefineAsset("d", "X", 1), state) == set()
    assert accounts_touched(CommitPending("c", "unknown"), state) == set()
    assert accounts_touched(Post("p", None), state) == set()  # type: ignore[arg-type]
    assert pendings_referenced(CommitPending("c", "h1")) == {"h1"}
    assert pendings_referenced(pay("p", "a", "b", 1)) == set()
    assert groups_referenced(VoidGroup("v", "dvp-7")) == {"dvp-7"}
    assert groups_referenced(hold("h", "a", "b", 1, group="g")) == {"g"}
    assert groups_referenced(hold("h", "a", "b", 1)) == set()


def test_net_deltas_sums_a_batch() -> None:
    state = world(hold("h1", "alice:hkd", "bob:hkd", 100, timeout_s=1))
    batch = [
        state.apply(pay("p1", "alice:hkd", "bob:hkd", 10), T0),
        state.apply(pay("p2", "bob:hkd", "alice:hkd", 3), T0),
        state.apply(pay("p1", "alice:hkd", "bob:hkd", 10), T0),  # duplicate: skipped
        state.apply(CommitPending("c1", "h1"), T0 + timedelta(seconds=2)),  # expires h1
    ]
    assert net_deltas(batch) == {
        "alice:hkd": BalanceDelta("alice:hkd", 10, 3, -100, 0),
        "bob:hkd": BalanceDelta("bob:hkd", 3, 10, 0, -100),
    }


def test_state_not_loaded_is_an_error_not_a_rejection() -> None:
    state = LedgerState()
    state.load_pending(PendingState("h1", (dr("a", 1), cr("b", 1))))
    state.load_account(AccountState("a", "p", HKD, debits_pending=1))
    with pytest.raises(StateNotLoadedError):
        state.apply(VoidPending("v", "h1"), T0)
    assert state.accounts["a"].debits_pending == 1 and "v" not in state.idempotency


def test_loaded_pendings_expire() -> None:
    state = LedgerState()
    state.load_account(AccountState("a", "p", HKD, debits_pending=1))
    state.load_account(AccountState("b", "p", HKD, credits_pending=1))
    state.load_pending(PendingState("h1", (dr("a", 1), cr("b", 1)), timeout_at=T0))
    (result,) = state.expire(T0)
    assert result.command_id == "expire:h1"
    assert state.accounts["a"].balances() == (0, 0, 0, 0)


def test_apply_refuses_a_naive_clock_and_foreign_objects() -> None:
    state = world()
    with pytest.raises(ValueError):
        state.apply(pay("p", "alice:hkd", "bob:hkd", 1), datetime(2025, 1, 1))
    with pytest.raises(TypeError):
        state.apply(object(), T0)  # type: ignore[arg-type]


def test_results_are_immutable() -> None:
    result = world().apply(pay("p1", "alice:hkd", "bob:hkd", 1), T0)
    with pytest.raises(AttributeError):
        result.accepted = False  # type: ignore[misc]
    assert isinstance(result, Result)
