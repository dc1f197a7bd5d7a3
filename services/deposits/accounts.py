"""The tokenized-deposit chart of accounts, the ledger ids, and the postings of every flow.

Pure: names and ledger command payloads only, no I/O. Every builder is deterministic in its
arguments, so a retried decision produces byte-identical ledger commands with the same ids, and
the ledger answers a retry with the stored result (TD-7, X-3).

Assets
------
Per currency ``C`` (configured in ``calendar.CurrencyRules``), for every onboarded bank ``X``:

=================  ===============================================================================
asset              meaning
=================  ===============================================================================
``C``              the currency as commercial-bank money: the conventional side (e.g. ``HKD``)
``TD.X.C``         bank X's tokenized deposits in C (e.g. ``TD.HSBCHKHH.HKD``): one asset per
                   issuer, because a tokenized deposit is a liability of *its* bank; the ledger
                   refuses to mix issuers' tokens (``asset_mismatch``)
``S``              the settlement asset of C (``settlement_asset``): central-bank money, i.e. the
                   mirror of the CHATS position (``rtgs``) or the wholesale CBDC (``wcbdc``)
=================  ===============================================================================

Accounts (balances read from the ledger operator's side, as in TigerBeetle: holders' claims are
credits, an issuer's outstanding amount is a debit)
---------------------------------------------------------------------------------------------

=================================  =======  =========================================  ===========
account                            asset    meaning                                    flag
=================================  =======  =========================================  ===========
``td:X:C:liability``               TD.X.C   X's tokenized-deposit liability: its debit  credits <=
                                            balance is the tokens outstanding           debits
``td:X:C:wallet:W``                TD.X.C   a KYC'd customer's token wallet            debits <=
                                                                                        credits
``td:X:C:conventional``            C        customers' conventional deposits (mirror   none
                                            of the core-banking debit/credit)
``td:X:C:conversion``              C        conventional deposits converted to tokens  none
``td:X:C:settlement``              S        X's settlement account with the agent      debits <=
                                                                                        credits
``td:agent:C:issuance``            S        the settlement agent (HKMA/CHATS): its     none
                                            debit balance is the S on the platform
=================================  =======  =========================================  ===========

TD-1 holds by construction: asset ``TD.X.C`` has no accounts but ``td:X:C:liability`` and X's
wallets, and the ledger balances every posting per asset (X-4), so at every instant
``liability debits - credits == sum(wallet credits - debits)``, posted and pending alike, whoever
posts. :func:`supply_report` checks it from ledger balances alone. The liability's flag stops a
burn of more than was issued; the wallets' flag stops an overdraft; the settlement accounts' flag
is TD-5 (no overdraft: a short position makes the interbank leg's pending fail with
``insufficient_funds``, which the domain turns into a queue entry, never a partial settlement).

Why the liability is debit-normal: within one asset, holders and issuer cannot both be
credit-normal and still net to zero; giving each issuer's token its own asset, with the issuer on
the debit side, is what turns TD-1 into the ledger's own balancing rule instead of a promise kept
by the code. Read ``liability`` as "tokens outstanding", a liability of X in X's books.

Why the conventional side has no flags: Harbour is not the core-banking system. ``conventional``
records the core-banking debit (issue) or credit (redeem) with the UETR, so TD-2 is visible on
the ledger and reconcilable against the bank's camt.053; the bank's core system checks the
customer's conventional balance before it sends ``IssueDepositToken``. ``conversion`` is its
counter in asset C: issue and redeem are 1:1 conversions between two assets through a pair of
accounts, the FX-swap pattern of DESIGN.md.

Postings per flow (``a`` = amount, ``U`` = UETR; every posting carries UETR and EndToEndId)
------------------------------------------------------------------------------------------

- Issue (mint against the conventional deposit, TD-2), ``Post td:U:issue``::

      C       Dr td:X:C:conventional a   Cr td:X:C:conversion a
      TD.X.C  Dr td:X:C:liability    a   Cr td:X:C:wallet:W   a

- Redeem (burn with a credit back to the conventional deposit), ``Post td:U:redeem``: the
  mirror image (``TD.X.C Dr wallet Cr liability``, ``C Dr conversion Cr conventional``).
- Intra-bank transfer (24/7), ``Post td:U:transfer``: ``TD.X.C Dr wallet:P Cr wallet:Q``.
- Interbank transfer, both settlement modes: three pendings in settlement group ``td:U``, then
  one ``CommitGroup td:U:commit`` (all legs post atomically, TD-3) or ``VoidGroup td:U:void``::

      td:U:burn      TD.A.C  Dr td:A:C:wallet:P    Cr td:A:C:liability     (the earmark)
      td:U:mint      TD.B.C  Dr td:B:C:liability   Cr td:B:C:wallet:Q
      td:U:settle:n  S       Dr td:A:C:settlement  Cr td:B:C:settlement    (attempt n = 1, 2 ...)

  ``wcbdc``: the settlement asset is on Harbour, so the commit *is* the final interbank
  settlement (TD-4) and follows as soon as the three legs are held. ``rtgs``: the legs are held,
  the pacs.009 goes to CHATS, and the agent's ACSC commits the group (RJCT or a timeout voids it).
  The issue asks for one atomic posting in ``wcbdc`` mode; the group is as atomic (one ledger
  transaction commits every member) and it is needed to tell *who* is short: a single posting
  rejected with ``insufficient_funds`` cannot say whether the payer's wallet (fail) or the payer
  bank's settlement account (queue, TD-5) lacks funds. A rejected attempt is stored by the ledger
  under its id forever, so each retry of the interbank leg is a new attempt id.
- Settlement funding (the agent credits X, camt.054), ``Post td:fund:F``:
  ``S Dr td:agent:C:issuance Cr td:X:C:settlement``.

Ids and keys
------------
Posting ids are readable and derived from the UETR (``td:U:burn``), so results route back to
their transfer without a lookup (:func:`parse_posting_id`). Non-posting commands (DefineAsset,
OpenAccount, Freeze/UnfreezeAccount) are keyed by the ledger on the envelope's ``event_id``: the
service must send them with ``event_id = ledger_event_id(command_id)``; results then carry
``str(ledger_event_id(command_id))``, the request's ``ledger_key``. Record keys for
``ledger.commands`` follow the ledger's convention (:func:`record_key`).
"""

from __future__ import annotations

import re
import uuid
from collections import defaultdict
from collections.abc import Iterable
from typing import Final, NamedTuple

from shared.events.deposits import LedgerCommand, LedgerCommandRequested, LedgerPurpose
from shared.events.ledger import (
    CommitGroup,
    DefineAsset,
    EntryIn,
    FreezeAccount,
    OpenAccount,
    Post,
    PostPending,
    References,
    UnfreezeAccount,
    VoidGroup,
)
from shared.events.registry import type_of
from shared.ids import deterministic_id
from shared.money import format_amount

from .calendar import CurrencyRules

__all__ = [
    "AGENT_PARTICIPANT",
    "AccountBalance",
    "PostingRef",
    "SupplyReport",
    "agent_account",
    "burn_pending",
    "commit_group",
    "conventional_account",
    "conversion_account",
    "funding_post",
    "funding_posting_id",
    "intra_transfer_post",
    "issue_post",
    "ledger_event_id",
    "ledger_request",
    "liability_account",
    "mint_pending",
    "net_by_asset",
    "onboarding_requests",
    "parse_posting_id",
    "record_key",
    "redeem_post",
    "settle_pending",
    "settlement_account",
    "settlement_group",
    "supply_report",
    "token_asset",
    "transfer_posting_id",
    "void_group",
    "wallet_account",
    "wallet_freeze_requests",
    "wallet_open_requests",
]

AGENT_PARTICIPANT: Final = "settlement-agent"
"""The ledger participant owning the settlement agent's account (not a BIC: cannot collide)."""
_LEDGER_NAMESPACE: Final = "deposits.ledger-command"
_POSTING_RE: Final = re.compile(
    r"td:(?P<uetr>[0-9a-f-]{36}):(?P<leg>issue|redeem|transfer|burn|mint|settle|commit|void)"
    r"(?::(?P<attempt>[1-9][0-9]*))?"
)


# --- names -------------------------------------------------------------------------------------


def token_asset(bank: str, currency: str) -> str:
    """``TD.HSBCHKHH.HKD``: bank X's tokenized deposits in currency C."""
    return f"TD.{bank}.{currency}"


def liability_account(bank: str, currency: str) -> str:
    return f"td:{bank}:{currency}:liability"


def wallet_account(bank: str, currency: str, wallet_id: str) -> str:
    return f"td:{bank}:{currency}:wallet:{wallet_id}"


def conventional_account(bank: str, currency: str) -> str:
    return f"td:{bank}:{currency}:conventional"


def conversion_account(bank: str, currency: str) -> str:
    return f"td:{bank}:{currency}:conversion"


def settlement_account(bank: str, currency: str) -> str:
    return f"td:{bank}:{currency}:settlement"


def agent_account(currency: str) -> str:
    return f"td:agent:{currency}:issuance"


def settlement_group(uetr: str) -> str:
    return f"td:{uetr}"


def transfer_posting_id(uetr: str, leg: str, attempt: int | None = None) -> str:
    """``td:U:burn``, ``td:U:settle:2``: the posting id of one leg of a transfer or conversion."""
    if (leg == "settle") != (attempt is not None):
        raise ValueError("the settle leg, and only it, carries an attempt number")
    return f"td:{uetr}:{leg}" if attempt is None else f"td:{uetr}:{leg}:{attempt}"


class PostingRef(NamedTuple):
    uetr: str
    leg: str
    attempt: int | None


def parse_posting_id(posting_id: str) -> PostingRef | None:
    """Route a ledger result back to its transfer/conversion; ``None`` if not one of ours."""
    match = _POSTING_RE.fullmatch(posting_id)
    if match is None:
        return None
    attempt = match.group("attempt")
    if (match.group("leg") == "settle") != (attempt is not None):
        return None
    return PostingRef(match.group("uetr"), match.group("leg"), int(attempt) if attempt else None)


def funding_posting_id(funding_id: str) -> str:
    """``td:fund:F``: the posting of one settlement funding notice."""
    return f"td:fund:{funding_id}"


def ledger_event_id(command_id: str) -> uuid.UUID:
    """The envelope ``event_id`` for a ledger command: deterministic, so a resend is a duplicate."""
    return deterministic_id(_LEDGER_NAMESPACE, command_id)


def record_key(command: LedgerCommand) -> str:
    """The Kafka record key on ``ledger.commands``: the first debited account, the settlement
    group, or the account/asset a non-posting command names (shared/events/ledger.py)."""
    match command:
        case Post() | PostPending():
            return next(e.account_id for e in command.entries if e.direction == "debit")
        case CommitGroup() | VoidGroup():
            return command.settlement_group
        case DefineAsset():
            return command.code
        case _:
            return command.account_id


def ledger_request(
    purpose: LedgerPurpose,
    command_id: str,
    command: LedgerCommand,
    *,
    uetr: str | None = None,
    end_to_end_id: str | None = None,
) -> LedgerCommandRequested:
    """Wrap a ledger command in the internal event that asks the service to send it."""
    posting_id = getattr(command, "posting_id", None)
    key = posting_id if isinstance(posting_id, str) else str(ledger_event_id(command_id))
    return LedgerCommandRequested(
        purpose=purpose,
        command_id=command_id,
        ledger_key=key,
        command_type=type_of(command).type,
        command=command,
        uetr=uetr,
        end_to_end_id=end_to_end_id,
    )


# --- postings ----------------------------------------------------------------------------------


def _dr(account: str, asset: str, amount: str) -> EntryIn:
    return EntryIn(account_id=account, asset=asset, direction="debit", amount=amount)


def _cr(account: str, asset: str, amount: str) -> EntryIn:
    return EntryIn(account_id=account, asset=asset, direction="credit", amount=amount)


def _refs(uetr: str, end_to_end_id: str, description: str) -> References:
    return References(uetr=uetr, end_to_end_id=end_to_end_id, description=description)


def issue_post(
    uetr: str, end_to_end_id: str, bank: str, wallet_id: str, currency: str, amount_minor: int,
    scale: int,
) -> Post:
    """Mint against a debit of the conventional deposit (TD-2), one atomic posting."""
    a, tok = format_amount(amount_minor, scale), token_asset(bank, currency)
    return Post(
        posting_id=transfer_posting_id(uetr, "issue"),
        entries=[
            _dr(conventional_account(bank, currency), currency, a),
            _cr(conversion_account(bank, currency), currency, a),
            _dr(liability_account(bank, currency), tok, a),
            _cr(wallet_account(bank, currency, wallet_id), tok, a),
        ],
        references=_refs(uetr, end_to_end_id, "deposit token issue"),
    )


def redeem_post(
    uetr: str, end_to_end_id: str, bank: str, wallet_id: str, currency: str, amount_minor: int,
    scale: int,
) -> Post:
    """Burn with a credit back to the conventional deposit (TD-2), one atomic posting."""
    a, tok = format_amount(amount_minor, scale), token_asset(bank, currency)
    return Post(
        posting_id=transfer_posting_id(uetr, "redeem"),
        entries=[
            _dr(wallet_account(bank, currency, wallet_id), tok, a),
            _cr(liability_account(bank, currency), tok, a),
            _dr(conversion_account(bank, currency), currency, a),
            _cr(conventional_account(bank, currency), currency, a),
        ],
        references=_refs(uetr, end_to_end_id, "deposit token redemption"),
    )


def intra_transfer_post(
    uetr: str, end_to_end_id: str, bank: str, payer_wallet: str, payee_wallet: str,
    currency: str, amount_minor: int, scale: int,
) -> Post:
    """Move tokens between two wallets of one bank: settles at once, 24/7 (TD-6)."""
    a, tok = format_amount(amount_minor, scale), token_asset(bank, currency)
    return Post(
        posting_id=transfer_posting_id(uetr, "transfer"),
        entries=[
            _dr(wallet_account(bank, currency, payer_wallet), tok, a),
            _cr(wallet_account(bank, currency, payee_wallet), tok, a),
        ],
        references=_refs(uetr, end_to_end_id, "intra-bank token transfer"),
    )


def burn_pending(
    uetr: str, end_to_end_id: str, bank: str, wallet_id: str, currency: str, amount_minor: int,
    scale: int, timeout_s: int,
) -> PostPending:
    """The payer's earmark: a pending burn in the transfer's settlement group."""
    a, tok = format_amount(amount_minor, scale), token_asset(bank, currency)
    return PostPending(
        posting_id=transfer_posting_id(uetr, "burn"),
        entries=[
            _dr(wallet_account(bank, currency, wallet_id), tok, a),
            _cr(liability_account(bank, currency), tok, a),
        ],
        timeout_s=timeout_s,
        settlement_group=settlement_group(uetr),
        references=_refs(uetr, end_to_end_id, "interbank burn (earmark)"),
    )


def mint_pending(
    uetr: str, end_to_end_id: str, bank: str, wallet_id: str, currency: str, amount_minor: int,
    scale: int, timeout_s: int,
) -> PostPending:
    """The payee bank's mint, pending in the transfer's settlement group."""
    a, tok = format_amount(amount_minor, scale), token_asset(bank, currency)
    return PostPending(
        posting_id=transfer_posting_id(uetr, "mint"),
        entries=[
            _dr(liability_account(bank, currency), tok, a),
            _cr(wallet_account(bank, currency, wallet_id), tok, a),
        ],
        timeout_s=timeout_s,
        settlement_group=settlement_group(uetr),
        references=_refs(uetr, end_to_end_id, "interbank mint"),
    )


def settle_pending(
    uetr: str, end_to_end_id: str, payer_bank: str, payee_bank: str, rules: CurrencyRules,
    amount_minor: int, attempt: int, timeout_s: int,
) -> PostPending:
    """Attempt ``attempt`` of the interbank leg between the banks' settlement accounts."""
    a, ccy = format_amount(amount_minor, rules.scale), rules.currency
    return PostPending(
        posting_id=transfer_posting_id(uetr, "settle", attempt),
        entries=[
            _dr(settlement_account(payer_bank, ccy), rules.settlement_asset, a),
            _cr(settlement_account(payee_bank, ccy), rules.settlement_asset, a),
        ],
        timeout_s=timeout_s,
        settlement_group=settlement_group(uetr),
        references=_refs(uetr, end_to_end_id, f"interbank leg ({rules.settlement_mode})"),
    )


def commit_group(uetr: str) -> CommitGroup:
    return CommitGroup(
        posting_id=transfer_posting_id(uetr, "commit"), settlement_group=settlement_group(uetr)
    )


def void_group(uetr: str) -> VoidGroup:
    return VoidGroup(
        posting_id=transfer_posting_id(uetr, "void"), settlement_group=settlement_group(uetr)
    )


def funding_post(funding_id: str, bank: str, rules: CurrencyRules, amount_minor: int) -> Post:
    """The agent credits bank X's settlement account (camt.054 CRDT / wCBDC issued to X)."""
    a, ccy = format_amount(amount_minor, rules.scale), rules.currency
    return Post(
        posting_id=funding_posting_id(funding_id),
        entries=[
            _dr(agent_account(ccy), rules.settlement_asset, a),
            _cr(settlement_account(bank, ccy), rules.settlement_asset, a),
        ],
        references=References(instruction_id=funding_id[:64], description="settlement funding"),
    )


# --- account opening ---------------------------------------------------------------------------


def _open(
    command_prefix: str, account: str, participant: str, asset: str, *,
    dmnec: bool = False, cmned: bool = False,
) -> LedgerCommandRequested:
    return ledger_request(
        "open_account",
        f"{command_prefix}:open:{account}",
        OpenAccount(
            account_id=account, participant=participant, asset=asset,
            debits_must_not_exceed_credits=dmnec, credits_must_not_exceed_debits=cmned,
        ),
    )


def onboarding_requests(bank: str, rules: CurrencyRules) -> list[LedgerCommandRequested]:
    """Every ledger command that onboards ``bank`` for one currency, in a safe order.

    Shared assets and the agent's account are requested by every bank's onboarding under its own
    ids: ``asset_exists``/``account_exists`` answers count as done (domain.py).
    """
    ccy, tok, s = rules.currency, token_asset(bank, rules.currency), rules.settlement_asset
    prefix = f"td:onboard:{bank}"
    assets = [
        ledger_request("define_asset", f"{prefix}:asset:{code}",
                       DefineAsset(code=code, scale=rules.scale))
        for code in (ccy, s, tok)
    ]
    return [
        *assets,
        _open(prefix, agent_account(ccy), AGENT_PARTICIPANT, s),
        _open(prefix, liability_account(bank, ccy), bank, tok, cmned=True),
        _open(prefix, conventional_account(bank, ccy), bank, ccy),
        _open(prefix, conversion_account(bank, ccy), bank, ccy),
        _open(prefix, settlement_account(bank, ccy), bank, s, dmnec=True),
    ]


def wallet_open_requests(
    bank: str, wallet_id: str, currencies: Iterable[str]
) -> list[LedgerCommandRequested]:
    """One credit-normal, no-overdraft token account per currency of the wallet."""
    return [
        _open("td:wallet", wallet_account(bank, ccy, wallet_id), bank, token_asset(bank, ccy),
              dmnec=True)
        for ccy in currencies
    ]


def wallet_freeze_requests(
    bank: str, wallet_id: str, currencies: Iterable[str], *, freeze: bool, generation: int
) -> list[LedgerCommandRequested]:
    """Freeze (or unfreeze) the wallet's ledger accounts, so the ledger itself refuses any
    movement (TD-8). ``generation`` numbers the freezes of a wallet: each is a new command."""
    out = []
    for ccy in currencies:
        account = wallet_account(bank, ccy, wallet_id)
        if freeze:
            out.append(ledger_request("freeze_account", f"td:freeze:{generation}:{account}",
                                      FreezeAccount(account_id=account)))
        else:
            out.append(ledger_request("unfreeze_account", f"td:unfreeze:{generation}:{account}",
                                      UnfreezeAccount(account_id=account)))
    return out


# --- checks from ledger balances alone ---------------------------------------------------------


class AccountBalance(NamedTuple):
    """One account's four balance columns, as the ledger reports them (minor units)."""

    account_id: str
    asset: str
    debits_posted: int
    credits_posted: int
    debits_pending: int = 0
    credits_pending: int = 0


class SupplyReport(NamedTuple):
    """TD-1 for one bank and currency: token supply vs tokenized-deposit liability."""

    participant_id: str
    currency: str
    supply_minor: int
    liability_minor: int
    projected_supply_minor: int
    projected_liability_minor: int
    stray_accounts: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return (
            self.supply_minor == self.liability_minor
            and self.projected_supply_minor == self.projected_liability_minor
            and not self.stray_accounts
        )


def supply_report(bank: str, currency: str, balances: Iterable[AccountBalance]) -> SupplyReport:
    """Check TD-1 from ledger balances alone.

    ``supply`` is what the wallets hold (credits - debits); ``liability`` is the liability
    account's debit balance. ``projected`` adds pending amounts (pending credits in, pending
    debits out), the view while interbank transfers are in flight (X-6). Any other account in the
    token asset is reported as stray: it would hold tokens outside the chart.
    """
    asset, liability = token_asset(bank, currency), liability_account(bank, currency)
    wallet_prefix = wallet_account(bank, currency, "")
    supply = projected_supply = owed = projected_owed = 0
    stray: list[str] = []
    for b in balances:
        if b.asset != asset:
            continue
        if b.account_id == liability:
            owed = b.debits_posted - b.credits_posted
            projected_owed = owed + b.debits_pending - b.credits_pending
        elif b.account_id.startswith(wallet_prefix):
            supply += b.credits_posted - b.debits_posted
            projected_supply += (
                b.credits_posted + b.credits_pending - b.debits_posted - b.debits_pending
            )
        else:
            stray.append(b.account_id)
    return SupplyReport(bank, currency, supply, owed, projected_supply, projected_owed,
                        tuple(sorted(stray)))


def net_by_asset(balances: Iterable[AccountBalance]) -> dict[str, tuple[int, int]]:
    """Per asset, (posted, pending) net of debits minus credits: both must be 0 (X-4)."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for b in balances:
        out[b.asset][0] += b.debits_posted - b.credits_posted
        out[b.asset][1] += b.debits_pending - b.credits_pending
    return {asset: (v[0], v[1]) for asset, v in out.items()}
