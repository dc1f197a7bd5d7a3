"""Property tests of the pure ledger: random command sequences, invariants after every step.

A hypothesis state machine drives one :class:`LedgerState` with a mix of well-formed and broken
commands (postings, pendings, partial commits, groups, freezes, closes, retries, id reuse, clock
ticks, expiry). After every step:

- every asset nets to zero across accounts, posted and pending separately;
- each account's pending columns equal the sum of the open pendings that touch it;
- flags, limits and the 10**38-1 ceiling hold; no column is negative;
- the balances equal a projection folded from the accepted results alone (what ``harbour verify``
  does from the journal), and before + the result's deltas = after;
- a rejected command changes nothing (but the expiries it reports), a duplicate nothing at all;
- a group's members are all posted, or none.

At the end the whole sequence is replayed into a fresh state, once on the fast path and once on
the ordered checks only: the results (and so the hash chain) must be identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from services.ledger.domain import (
    GENESIS_HASH,
    MAX_AMOUNT,
    AnyEntry,
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
    Post,
    PostPending,
    Result,
    UnfreezeAccount,
    VoidGroup,
    VoidPending,
    canonical_posting_bytes,
    chain_hash,
    net_deltas,
)

T0 = datetime(2025, 3, 3, 9, 30, tzinfo=UTC)
SCALES = {"AA": 2, "BB": 0}
ACCOUNTS = {"src-a": "AA", "a0": "AA", "a1": "AA", "a2": "AA", "a3": "AA",
            "src-b": "BB", "b0": "BB", "b1": "BB"}
GROUPS = ("g0", "g1", "g2")
Balances = dict[str, tuple[int, int, int, int]]

flag_kinds = st.sampled_from(["none", "dmnec", "dmnec", "cmned"])
limits = st.sampled_from([None, None, None, 0, 1500, 2500, 6000])
amounts = st.integers(1, 400)


def decimal_text(minor: int, scale: int, extra_zero: bool) -> str:
    """``minor`` as the wire writes it; ``extra_zero`` adds one decimal too many."""
    text = str(minor) if scale == 0 else f"{minor // 10**scale}.{minor % 10**scale:0{scale}d}"
    if extra_zero:
        text += "0" if scale else ".0"
    return text


@st.composite
def entry_lists(draw: st.DrawFn) -> tuple[AnyEntry, ...]:
    """Mostly balanced entries over one or two assets, with occasional defects."""
    entries: list[Entry] = []
    for asset in draw(st.sampled_from([("AA",), ("BB",), ("AA", "BB")])):
        pool = [a for a, x in ACCOUNTS.items() if x == asset]
        if draw(st.integers(0, 19)) == 0:  # a stranger: asset mismatch or unknown account
            pool.append(draw(st.sampled_from(["b0", "a1", "ghost"])))
        legs = draw(st.lists(st.sampled_from(pool), min_size=2, max_size=3, unique=True))
        x, y = draw(amounts), draw(amounts)
        if len(legs) == 2:
            sides = [("debit", x), ("credit", x)]
        else:
            sides = [("debit", x + y), ("credit", x), ("credit", y)]
        if draw(st.booleans()):
            sides = [("credit" if d == "debit" else "debit", a) for d, a in sides]
        for account, (direction, amount) in zip(legs, sides, strict=True):
            entries.append(Entry(account, asset, direction, amount))  # type: ignore[arg-type]
    defect = draw(st.integers(0, 24))
    if defect == 0:  # unbalanced
        e = entries[0]
        entries[0] = Entry(e.account_id, e.asset, e.direction, e.amount_minor + 1)
    elif defect == 1:  # zero
        e = entries[-1]
        entries[-1] = Entry(e.account_id, e.asset, e.direction, 0)
    elif defect == 2:  # one entry
        entries = entries[:1]
    elif defect == 3:  # unknown asset
        e = entries[0]
        entries[0] = Entry(e.account_id, "ZZZ", e.direction, e.amount_minor)
    if draw(st.integers(0, 3)) == 0:  # as the wire sends them
        extra = draw(st.integers(0, 9)) == 0
        return tuple(
            DecimalEntry(e.account_id, e.asset, e.direction,
                         decimal_text(e.amount_minor, SCALES.get(e.asset, 2), extra))
            for e in entries
        )
    return tuple(entries)


def snapshot(state: LedgerState) -> Balances:
    return {k: a.balances() for k, a in state.accounts.items()}


def structure(state: LedgerState) -> Any:
    return (
        {k: dataclasses.astuple(a) for k, a in state.accounts.items()},
        dict(state.assets),
        {k: (p.status, p.committed) for k, p in state.pendings.items()},
        {k: (g.status, tuple(g.members)) for k, g in state.groups.items()},
    )


def plus(before: Balances, results: list[Result]) -> Balances:
    out = {k: list(v) for k, v in before.items()}
    for acct, d in net_deltas(results).items():
        row = out.setdefault(acct, [0, 0, 0, 0])
        for i, x in enumerate(d[1:]):
            row[i] += x
    return {k: (v[0], v[1], v[2], v[3]) for k, v in out.items()}


def plain_hash(cmd: Post | PostPending) -> bytes:
    text = json.dumps(cmd._canonical(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).digest()


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = LedgerState()
        self.now = T0
        self.log: list[tuple[str, Command | None, datetime]] = []
        self.results: list[Result] = []
        self.used_ids: list[str] = []
        self.pending_ids: list[str] = []
        self.counter = 0
        # the journal projection: what verify folds from accepted postings alone
        self.projected: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self.held: dict[str, tuple[Entry, ...]] = {}

    # -- plumbing -----------------------------------------------------------------------------

    def fresh_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter}"

    def some_id(self, data: st.DataObject, prefix: str) -> str:
        if self.used_ids and data.draw(st.integers(0, 9)) == 0:
            return data.draw(st.sampled_from(self.used_ids))  # id reuse: conflict or replay
        return self.fresh_id(prefix)

    def run(self, cmd: Command) -> Result:
        state = self.state
        before, shape = snapshot(state), structure(state)
        cid = cmd.command_id
        prior = state.idempotency.get(cid) if isinstance(cid, str) else None
        if isinstance(cmd, Post | PostPending):
            assert cmd.request_hash() == plain_hash(cmd)
        result = state.apply(cmd, self.now)
        after = snapshot(state)

        assert set(before) <= set(after)
        opened = {k: before.get(k, (0, 0, 0, 0)) for k in after}
        assert after == plus(opened, [result]), "before + deltas != after"

        if prior is not None:
            if prior[0] == result.request_hash or result.duplicate:
                assert result.duplicate
                assert result == dataclasses.replace(prior[1], duplicate=True, recorded=False)
            else:
                assert result.code == "id_conflict"
            assert structure(state) == shape and after == before
        elif not result.accepted:
            assert result.deltas == () and result.entries == ()
            if not result.expired:
                assert structure(state) == shape and after == before
            else:
                expired = {r.refs[0] for r in result.expired}
                assert all(state.pendings[p].status == "expired" for p in expired)
        if result.recorded:
            assert state.idempotency[cid] == (result.request_hash, result)
        self.log.append(("apply", cmd, self.now))
        self.results.append(result)
        if isinstance(cid, str) and cid not in self.used_ids:
            self.used_ids.append(cid)
        if not result.duplicate:
            for r in result.effects():
                self.project(r)
        return result

    def project(self, r: Result) -> None:
        """Fold one result into the journal projection, as a verifier would."""
        if not r.is_posting:
            return
        canonical_posting_bytes(r)  # every accepted posting has canonical bytes

        def add(entries: tuple[Entry, ...], posted: bool, sign: int) -> None:
            for e in entries:
                i = (0 if e.direction == "debit" else 1) + (0 if posted else 2)
                self.projected[e.account_id][i] += sign * e.amount_minor

        if r.kind == "post":
            add(r.entries, True, 1)
        elif r.kind == "post_pending":
            add(r.entries, False, 1)
            self.held[r.command_id] = r.entries
        else:
            for ref in r.refs:
                add(self.held[ref], False, -1)
            if r.kind in ("commit_pending", "commit_group"):
                add(r.entries, True, 1)

    # -- rules --------------------------------------------------------------------------------

    @initialize(flags=st.lists(st.tuples(flag_kinds, limits), min_size=6, max_size=6))
    def open_world(self, flags: list[tuple[str, int | None]]) -> None:
        for code, scale in SCALES.items():
            assert self.run(DefineAsset(f"def-{code}", code, scale)).accepted
        customers = [a for a in ACCOUNTS if not a.startswith("src")]
        for account, asset in ACCOUNTS.items():
            kind, limit = ("none", None)
            if account in customers:
                kind, limit = flags[customers.index(account)]
            cmd = OpenAccount(f"open-{account}", account, "p", asset,
                              debits_must_not_exceed_credits=kind == "dmnec",
                              credits_must_not_exceed_debits=kind == "cmned", limit=limit)
            assert self.run(cmd).accepted
        for account, asset in ACCOUNTS.items():  # seed balances (a limit may refuse one)
            src = "src-a" if asset == "AA" else "src-b"
            if account == src:
                continue
            legs = (Entry(src, asset, "debit", 2000), Entry(account, asset, "credit", 2000))
            if self.state.accounts[account].credits_must_not_exceed_debits:
                legs = (Entry(account, asset, "debit", 2000), Entry(src, asset, "credit", 2000))
            self.run(Post(f"seed-{account}", legs))

    @rule(data=st.data(), entries=entry_lists())
    def post(self, data: st.DataObject, entries: tuple[AnyEntry, ...]) -> None:
        meta: dict[str, Any] = data.draw(
            st.sampled_from([{}, {"ref": "x"}, {"uetr": "u", "n": [1, "2"]}]))
        self.run(Post(self.some_id(data, "post"), entries, metadata=meta))

    @rule(data=st.data(), entries=entry_lists(),
          timeout=st.sampled_from([None, 5, 30, 120]),
          group=st.sampled_from([None, None, *GROUPS]))
    def post_pending(self, data: st.DataObject, entries: tuple[AnyEntry, ...],
                     timeout: int | None, group: str | None) -> None:
        pid = self.some_id(data, "pend")
        result = self.run(PostPending(pid, entries, timeout_s=timeout, settlement_group=group))
        if result.accepted and not result.duplicate:
            self.pending_ids.append(pid)

    def target(self, data: st.DataObject) -> str:
        """Mostly a live pending, sometimes any pending id or an unknown one."""
        live = [p for p in self.pending_ids if self.state.pendings[p].status == "pending"]
        if live and data.draw(st.integers(0, 4)) > 0:
            return data.draw(st.sampled_from(live))
        return data.draw(st.sampled_from([*self.pending_ids, "nope"]))

    @precondition(lambda self: len(self.pending_ids) > 0)
    @rule(data=st.data(), quarters=st.integers(0, 5), partial=st.booleans())
    def commit(self, data: st.DataObject, quarters: int, partial: bool) -> None:
        target = self.target(data)
        override = None
        pending = self.state.pendings.get(target)
        if partial and pending is not None:
            override = tuple(
                Entry(e.account_id, e.asset, e.direction, e.amount_minor * quarters // 4)
                for e in pending.entries if e.amount_minor * quarters // 4 > 0
            )
        self.run(CommitPending(self.some_id(data, "commit"), target, override))

    @precondition(lambda self: len(self.pending_ids) > 0)
    @rule(data=st.data())
    def void(self, data: st.DataObject) -> None:
        self.run(VoidPending(self.some_id(data, "void"), self.target(data)))

    @precondition(lambda self: len(self.state.groups) > 0)
    @rule(data=st.data(), commit=st.booleans())
    def settle_group(self, data: st.DataObject, commit: bool) -> None:
        groups = sorted(self.state.groups)
        open_groups = [g for g in groups if self.state.groups[g].status == "open"]
        if open_groups and data.draw(st.integers(0, 3)) > 0:
            group = data.draw(st.sampled_from(open_groups))
        else:
            group = data.draw(st.sampled_from([*groups, "g-none"]))
        kind = CommitGroup if commit else VoidGroup
        self.run(kind(self.some_id(data, "group"), group))

    @rule(data=st.data(), op=st.sampled_from(["status", "status", "open", "asset", "bad"]))
    def admin(self, data: st.DataObject, op: str) -> None:
        """The rarer commands, folded into one rule so that postings get most of the steps."""
        if op == "status":
            kind = data.draw(st.sampled_from(["freeze", "unfreeze", "unfreeze", "close"]))
            account = data.draw(st.sampled_from([*ACCOUNTS, "ghost"]))
            cid = self.some_id(data, "acct")
            self.run(FreezeAccount(cid, account) if kind == "freeze" else
                     UnfreezeAccount(cid, account) if kind == "unfreeze" else
                     CloseAccount(cid, account))
        elif op == "open":
            account = data.draw(st.sampled_from(["a0", "new-a", "new-b"]))
            flag, limit = data.draw(flag_kinds), data.draw(limits)
            self.run(OpenAccount(self.some_id(data, "open"), account, "p",
                                 "BB" if account.endswith("b") else "AA",
                                 flag == "dmnec", flag == "cmned", limit))
        elif op == "asset":
            code = data.draw(st.sampled_from(["AA", "CC", "bad"]))
            self.run(DefineAsset(self.some_id(data, "asset"), code, data.draw(st.integers(0, 20))))
        else:
            self.run(MalformedCommand(self.some_id(data, "bad"), data.draw(st.binary(max_size=8)),
                                      "unreadable"))

    @precondition(lambda self: len(self.log) > 0)
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        _, cmd, _ = data.draw(st.sampled_from([x for x in self.log if x[0] == "apply"]))
        assert cmd is not None
        result = self.run(cmd)
        assert result.duplicate or result.code == "id_conflict" or not result.recorded

    @rule(seconds=st.integers(0, 40))
    def tick(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    @rule()
    def expire(self) -> None:
        before = snapshot(self.state)
        results = self.state.expire(self.now)
        self.log.append(("expire", None, self.now))
        self.results.extend(results)
        for r in results:
            assert r.accepted and r.command_id.startswith("expire:") and r.recorded
            assert self.state.pendings[r.refs[0]].status == "expired"
            self.project(r)
        assert snapshot(self.state) == plus(before, results)

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def assets_net_to_zero(self) -> None:
        totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        for a in self.state.accounts.values():
            for i, x in enumerate(a.balances()):
                totals[a.asset][i] += x
        for asset, (dp, cp, dpend, cpend) in totals.items():
            assert dp == cp, f"{asset}: posted debits {dp} != credits {cp}"
            assert dpend == cpend, f"{asset}: pending debits {dpend} != credits {cpend}"

    @invariant()
    def pending_columns_equal_open_pendings(self) -> None:
        held: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for p in self.state.pendings.values():
            for e in p.remaining:
                held[e.account_id][0 if e.direction == "debit" else 1] += e.amount_minor
        for k, a in self.state.accounts.items():
            assert [a.debits_pending, a.credits_pending] == held.get(k, [0, 0]), k

    @invariant()
    def flags_and_limits_hold(self) -> None:
        for a in self.state.accounts.values():
            dp, cp, dpend, cpend = a.balances()
            assert min(dp, cp, dpend, cpend) >= 0
            assert dp + dpend <= MAX_AMOUNT and cp + cpend <= MAX_AMOUNT
            if a.debits_must_not_exceed_credits:
                assert dp + dpend <= cp, a
            if a.credits_must_not_exceed_debits:
                assert cp + cpend <= dp, a
            if a.limit_minor is not None:
                assert cp + cpend - dp <= a.limit_minor, a
                assert dp + dpend - cp <= a.limit_minor, a

    @invariant()
    def balances_equal_the_journal_projection(self) -> None:
        for k, a in self.state.accounts.items():
            assert list(a.balances()) == self.projected.get(k, [0, 0, 0, 0]), k

    @invariant()
    def groups_settle_as_a_whole(self) -> None:
        allowed = {"open": {"pending", "expired"}, "posted": {"posted"},
                   "voided": {"voided", "expired"}}
        for g in self.state.groups.values():
            statuses = {self.state.pendings[m].status for m in g.members}
            assert g.members and statuses <= allowed[g.status], (g, statuses)

    def teardown(self) -> None:
        chain = self.chain(self.results)
        for fast_path in (True, False):
            replayed = LedgerState(fast_path=fast_path)
            results: list[Result] = []
            for kind, cmd, at in self.log:
                if kind == "apply":
                    assert cmd is not None
                    results.append(replayed.apply(cmd, at))
                else:
                    results.extend(replayed.expire(at))
            assert results == self.results, f"replay differs (fast_path={fast_path})"
            assert self.chain(results) == chain
            assert snapshot(replayed) == snapshot(self.state)

    @staticmethod
    def chain(results: list[Result]) -> bytes:
        head = GENESIS_HASH
        for result in results:
            if result.duplicate:
                continue
            for r in result.effects():
                if r.is_posting:
                    head = chain_hash(head, canonical_posting_bytes(r))
        return head


LedgerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestLedgerMachine = LedgerMachine.TestCase


# --------------------------------------------------------------------------------------------
# Amount parsing: the fast path, the ordered checks and shared.money agree
# --------------------------------------------------------------------------------------------

amount_texts = st.one_of(
    st.text(alphabet="0123456789.-+e \u0661", max_size=12),
    st.from_regex(r"-?[0-9]{1,40}(\.[0-9]{1,20})?", fullmatch=True),
)


@settings(max_examples=400, deadline=None)
@given(text=amount_texts, scale=st.integers(0, 18))
def test_amount_parsing_agrees_everywhere(text: str, scale: int) -> None:
    from services.ledger.domain import _amount, _fast_decimal, _Reject

    try:
        ordered: int | str = _amount(text, scale, what="amount")
    except _Reject as r:
        ordered = r.code
    fast = _fast_decimal(text, scale)
    assert fast is None or fast == ordered
    if isinstance(ordered, int) and len(text) <= 40:
        assert fast == ordered

    money = pytest.importorskip("shared.money")
    errors = pytest.importorskip("shared.errors")
    try:
        shared: int | str = money.parse_amount(text, scale)
    except errors.InvalidAmountError as e:
        too_many = e.details["reason"] == "too_many_decimals"
        shared = "invalid_amount_scale" if too_many else "invalid_amount"
    assert shared == ordered
