"""The pure ledger domain: an in-memory, all-or-nothing state machine over assets, accounts,
balances, pendings and settlement groups.

The Postgres batch writer loads the rows a batch touches into a :class:`LedgerState`, runs
:meth:`LedgerState.apply` for each command in partition order, then writes what the returned
:class:`Result` objects describe with set-based SQL. The property tests use the same class as the
reference model. There is no I/O here: no asyncpg, faststream or os imports; the clock is a
parameter. Amounts are ``int`` minor units everywhere (``Decimal`` nowhere, ``float`` never); a
:class:`DecimalEntry` carries the wire's decimal string until the asset's scale resolves it.

Rejection codes and the order they are checked in
-------------------------------------------------
Every command is checked step by step in the order below and stops at the first failing step;
within a step, entries (or group members) are checked in the order given. A kind checks only the
steps that apply to it (table further down), always in this relative order.

====  ==========================  ==================================================================
step  code                        meaning
====  ==========================  ==================================================================
0     ``invalid_command``         ``command_id`` unusable as a key (not a 1..128 char ``str``, or
                                  uses the ledger's reserved ``expire:`` prefix). Not recorded.
1     ``id_conflict``             the id was seen with a different request hash. Not recorded; the
                                  original outcome stays. (Same hash: the original Result comes back
                                  with ``duplicate=True``, whatever it was.)
2     ``invalid_command``         malformed whatever the state: wrong types, bad ids, < 2 or > 128
                                  entries, an account twice in one posting, bad direction, naive
                                  ``effective_at``, bad timeout, metadata not plain JSON or over 4
                                  KiB, both balance flags set, bad asset code or scale.
3     ``unknown_asset``           an entry's (or the new account's) asset is not defined.
4     ``invalid_amount``          amounts, entry by entry; the first bad one decides. Per amount, as
                                  ``shared.money.parse_amount``: not an ``int``/``str``, or not a
                                  plain decimal -> ``invalid_amount``; more decimals than the
                                  asset's scale (trailing zeros too) -> ``invalid_amount_scale``;
                                  negative, over ``10**38-1`` minor units, zero ->
                                  ``invalid_amount``.
4     ``invalid_amount_scale``    see step 4 above.
5     ``unbalanced``              per asset, sum of debits != sum of credits.
6     ``unknown_account``         an entry's account does not exist.
7     ``asset_mismatch``          an entry's asset differs from its account's asset.
8     ``pending_not_found``       the referenced pending posting does not exist.
9     ``pending_in_group``        the pending belongs to a settlement group: only CommitGroup /
                                  VoidGroup resolve it (a group settles as a whole).
10    ``group_not_found``         no pending was ever accepted into the settlement group.
11    ``already_posted``          the pending (or group) was committed already; for PostPending: its
                                  settlement group is already committed (sealed).
12    ``already_voided``          the pending (or group) was voided already; for PostPending: its
                                  settlement group is already voided (sealed).
13    ``pending_expired``         the pending (for CommitGroup: a member) has expired or is due now
                                  (``now >= timeout_at``): see "Expiry" below.
14    ``amount_exceeds_pending``  a partial commit's entry is larger than the pending's, or names an
                                  (account, direction, asset) the pending does not hold.
15    ``account_frozen``          an account whose balance would move is frozen (both directions).
16    ``account_closed``          an account is closed.
17    ``account_not_empty``       CloseAccount with a non-zero net posted balance or anything
                                  pending.
18    ``insufficient_funds``      a balance flag would be violated (see "Balances").
19    ``limit_exceeded``          the account's limit, or the ledger-wide ``10**38-1`` ceiling of a
                                  balance column (``posted + pending`` per side), would be exceeded.
20    ``account_exists``          OpenAccount for an existing account id.
21    ``asset_exists``            DefineAsset for an existing asset code (whatever the scale).
====  ==========================  ==================================================================

Steps per command kind (after steps 0-2, which every kind runs):

- DefineAsset: asset_exists.
- OpenAccount: unknown_asset, amount (the limit; zero allowed), account_exists.
- FreezeAccount / UnfreezeAccount: unknown_account, account_closed. Freezing a frozen account or
  unfreezing an open one is accepted and changes nothing.
- CloseAccount: unknown_account, account_frozen, account_closed, account_not_empty.
- Post / PostPending: unknown_asset, amount, unbalanced, unknown_account, asset_mismatch,
  (PostPending into a settlement group: already_posted, already_voided), account_frozen,
  account_closed, insufficient_funds, limit_exceeded.
- CommitPending: (override entries: unknown_asset, amount, unbalanced), pending_not_found,
  pending_in_group, already_posted, already_voided, pending_expired, amount_exceeds_pending,
  account_frozen, account_closed (accounts whose posted balances change).
- VoidPending: pending_not_found, pending_in_group, already_posted, already_voided,
  pending_expired. Frozen accounts do not block a void: releasing a hold moves no value.
- CommitGroup: group_not_found, already_posted, already_voided, pending_expired, account_frozen,
  account_closed.
- VoidGroup: group_not_found, already_posted, already_voided.
- MalformedCommand (the edge could read an id but not the rest): invalid_command, or the code
  the edge found (``MalformedCommand.code``).

Idempotency is checked before the shape (steps 1 before 2) on purpose: a retry is answered from
the stored outcome without re-validation, so tightening a rule later never changes the answer to
an old id. Every outcome of a usable id is recorded, rejections included, so a retry cannot later
change history.

Balances (TigerBeetle semantics)
--------------------------------
Each account keeps ``debits_posted``, ``credits_posted``, ``debits_pending``,
``credits_pending``. Flags (at most one per account):

- ``debits_must_not_exceed_credits`` (credit-normal, e.g. a customer deposit): a new debit ``d``
  (posted or pending) is allowed iff ``debits_posted + debits_pending + d <= credits_posted``.
  Pending credits never count as available, so holds can never overdraw.
- ``credits_must_not_exceed_debits`` (debit-normal): symmetric.

``limit_minor`` caps the exposure the account can take, counting pending amounts that increase
it and ignoring pending amounts that would decrease it:

- credit exposure = ``credits_posted + credits_pending - debits_posted`` must stay ``<= limit``
  (checked when a credit is added);
- debit exposure = ``debits_posted + debits_pending - credits_posted`` must stay ``<= limit``
  (checked when a debit is added).

For a credit-normal account the debit exposure is ``<= 0`` by its flag, so the limit is a cap on
its balance; for an account without flags it bounds the absolute net position either way.
Commits, voids and expiries only ever lower both exposures and both flag left-hand sides, so
flags and limits hold after every command without re-checking them there.

Postings
--------
A posting has 2..128 entries; an account appears at most once per posting (in either direction:
debiting and crediting one account in one posting is meaningless, and one entry per account keeps
per-account checks exact). Entries balance per asset, so one posting moves several assets
atomically (DvP, FX through liquidity accounts). The posting id is the command id: one id
namespace for every command.

Two-phase: PostPending holds amounts in the pending columns, with an optional timeout
(``timeout_at = now + timeout_s``; ``None`` means no expiry). CommitPending posts the full
pending, or, with ``entries``, a partial commit: a balanced subset of the pending's entries
(matched by account, direction and asset) with amounts no larger than the pending's; every
unlisted or uncommitted remainder is released. VoidPending releases it all. A pending is resolved
once.

Settlement groups: pendings that name the same ``settlement_group`` form a group (created by its
first accepted member). CommitGroup commits every member in full, atomically; VoidGroup voids
every member still pending (accepted even if expiries left nothing to release). Either seals the
group: later PostPending into it is refused (already_posted / already_voided). Members cannot be
resolved one by one (pending_in_group), but each expires on its own timeout; a group with an
expired member cannot commit any more (pending_expired) and can only be voided.

Expiry: a pending is live while ``now < timeout_at``. :meth:`LedgerState.expire` releases every
loaded pending that is due and returns one accepted Result each (``command_id`` =
``"expire:<pending id>"``, ``effective_at`` = the timeout, recorded under that id). A command that
references a due pending the writer has not expired yet expires it first, in the same step, and
reports that in ``Result.expired``: so the rule "a rejected command changes nothing" reads
"changes nothing but the expiry of the due pendings it references, exactly what ``expire(now)``
would have done first".

Frozen formats
--------------
Both formats below are stored (request hashes in the idempotency table, posting bytes in the hash
chain) and are therefore frozen forever; a change needs a new version tag and both verifiers.

- Request hash v1: ``sha256`` of ``json.dumps(doc, sort_keys=True, separators=(",", ":"),
  ensure_ascii=True)`` where ``doc`` is the command's canonical document (``_canonical`` on each
  command: its ``kind``, every field, entries as ``["e", account, asset, direction, minor_int]``
  or ``["d", account, asset, direction, "decimal"]``, datetimes as UTC ISO with microseconds
  and ``Z``).
- Posting bytes v1 (:func:`canonical_posting_bytes`): see that function.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from json.encoder import encode_basestring_ascii as _esc
from typing import Any, ClassVar, Final, Literal, NamedTuple, TypeAlias

__all__ = [
    "CREDIT",
    "DEBIT",
    "EXPIRE_PREFIX",
    "GENESIS_HASH",
    "MAX_AMOUNT",
    "MAX_ENTRIES",
    "MAX_ID_LEN",
    "MAX_SCALE",
    "MAX_TIMEOUT_S",
    "POSTING_KINDS",
    "AccountState",
    "AssetState",
    "BalanceDelta",
    "CloseAccount",
    "Command",
    "CommitGroup",
    "CommitPending",
    "DecimalEntry",
    "DefineAsset",
    "Entry",
    "FreezeAccount",
    "GroupState",
    "LedgerState",
    "MalformedCommand",
    "OpenAccount",
    "PendingState",
    "Post",
    "PostPending",
    "RejectionCode",
    "Result",
    "StateNotLoadedError",
    "UnfreezeAccount",
    "VoidGroup",
    "VoidPending",
    "accounts_touched",
    "canonical_posting_bytes",
    "chain_hash",
    "groups_referenced",
    "net_deltas",
    "pendings_referenced",
    "request_hash",
]

MAX_AMOUNT: Final = 10**38 - 1
"""Largest amount and largest balance column (``posted + pending`` per side): NUMERIC(38,0)."""
MAX_SCALE: Final = 18
MAX_ID_LEN: Final = 128
MAX_ENTRIES: Final = 128
MAX_TIMEOUT_S: Final = 366 * 86_400
MAX_METADATA_BYTES: Final = 4096
EXPIRE_PREFIX: Final = "expire:"
GENESIS_HASH: Final = bytes(32)
"""``prev`` for the first posting of every partition's chain."""

DEBIT: Final = "debit"
CREDIT: Final = "credit"
Direction: TypeAlias = Literal["debit", "credit"]

OPEN: Final = "open"
FROZEN: Final = "frozen"
CLOSED: Final = "closed"
AccountStatus: TypeAlias = Literal["open", "frozen", "closed"]

PENDING: Final = "pending"
POSTED: Final = "posted"
VOIDED: Final = "voided"
EXPIRED: Final = "expired"
PendingStatus: TypeAlias = Literal["pending", "posted", "voided", "expired"]
GroupStatus: TypeAlias = Literal["open", "posted", "voided"]

POSTING_KINDS: Final = frozenset(
    {"post", "post_pending", "commit_pending", "void_pending", "commit_group", "void_group",
     "expire"}
)
"""Result kinds that change balances and go into the hash chain when accepted."""

# Same form as shared.money: [0-9], not \d (which also matches non-ASCII digits).
_ASSET_CODE_RE: Final = re.compile(r"[A-Z0-9][A-Z0-9._:-]{1,63}")
_AMOUNT_RE: Final = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?")
_MAX_AMOUNT_TEXT: Final = 100
_BIG_INT: Final = 10**100
_MIN_TIME: Final = datetime(1, 1, 2, tzinfo=UTC)
_MAX_TIME: Final = datetime(9999, 12, 30, tzinfo=UTC)


class RejectionCode(StrEnum):
    """Why a command was refused: one fixed list, in check order (see the module docstring)."""

    INVALID_COMMAND = "invalid_command"
    ID_CONFLICT = "id_conflict"
    UNKNOWN_ASSET = "unknown_asset"
    INVALID_AMOUNT = "invalid_amount"
    INVALID_AMOUNT_SCALE = "invalid_amount_scale"
    UNBALANCED = "unbalanced"
    UNKNOWN_ACCOUNT = "unknown_account"
    ASSET_MISMATCH = "asset_mismatch"
    PENDING_NOT_FOUND = "pending_not_found"
    PENDING_IN_GROUP = "pending_in_group"
    GROUP_NOT_FOUND = "group_not_found"
    ALREADY_POSTED = "already_posted"
    ALREADY_VOIDED = "already_voided"
    PENDING_EXPIRED = "pending_expired"
    AMOUNT_EXCEEDS_PENDING = "amount_exceeds_pending"
    ACCOUNT_FROZEN = "account_frozen"
    ACCOUNT_CLOSED = "account_closed"
    ACCOUNT_NOT_EMPTY = "account_not_empty"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    LIMIT_EXCEEDED = "limit_exceeded"
    ACCOUNT_EXISTS = "account_exists"
    ASSET_EXISTS = "asset_exists"


RC = RejectionCode


class StateNotLoadedError(LookupError):
    """The writer did not load a row the command needs (an account of a loaded pending, a group
    member). A bug in the caller, never a rejection: rejections are stored forever."""


# --------------------------------------------------------------------------------------------
# Entries and commands
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One leg of a posting, amount in minor units (``125075`` is HKD 1,250.75)."""

    account_id: str
    asset: str
    direction: Direction
    amount_minor: int


@dataclass(frozen=True, slots=True)
class DecimalEntry:
    """An entry as it comes off the wire: the amount is a decimal string in the asset's units,
    resolved to an :class:`Entry` with the asset's scale when the command is applied (the asset
    may be defined earlier in the same batch)."""

    account_id: str
    asset: str
    direction: Direction
    amount: str


AnyEntry: TypeAlias = Entry | DecimalEntry


@dataclass(frozen=True, slots=True)
class DefineAsset:
    """Define an asset: a code (``HKD``, ``USDC.ETH``, ``FUND.HKMMF.A``) and its scale."""

    kind: ClassVar[str] = "define_asset"
    command_id: str
    code: str
    scale: int

    def _canonical(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": self.command_id, "code": self.code, "scale": self.scale}

    def request_hash(self) -> bytes:
        return _hash_doc(self._canonical())


@dataclass(frozen=True, slots=True)
class OpenAccount:
    """Open an account holding one asset. ``limit``: ``int`` minor units, or a decimal string in
    the asset's units (the wire form); ``None`` for no limit."""

    kind: ClassVar[str] = "open_account"
    command_id: str
    account_id: str
    participant: str
    asset: str
    debits_must_not_exceed_credits: bool = False
    credits_must_not_exceed_debits: bool = False
    limit: int | str | None = None

    def _canonical(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "id": self.command_id, "account_id": self.account_id,
            "participant": self.participant, "asset": self.asset,
            "dmnec": self.debits_must_not_exceed_credits,
            "cmned": self.credits_must_not_exceed_debits,
            "limit": self.limit,
        }

    def request_hash(self) -> bytes:
        return _hash_doc(self._canonical())


@dataclass(frozen=True, slots=True)
class _AccountCommand:
    command_id: str
    account_id: str

    kind: ClassVar[str] = "account"

    def _canonical(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": self.command_id, "account_id": self.account_id}

    def request_hash(self) -> bytes:
        return _hash_doc(self._canonical())


@dataclass(frozen=True, slots=True)
class FreezeAccount(_AccountCommand):
    """Block every movement of value on the account, both directions (voids still release)."""

    kind: ClassVar[str] = "freeze_account"


@dataclass(frozen=True, slots=True)
class UnfreezeAccount(_AccountCommand):
    """Lift a freeze."""

    kind: ClassVar[str] = "unfreeze_account"


@dataclass(frozen=True, slots=True)
class CloseAccount(_AccountCommand):
    """Close an empty account for good (net posted zero, nothing pending)."""

    kind: ClassVar[str] = "close_account"


@dataclass(frozen=True, slots=True)
class Post:
    """An immediate posting. ``effective_at`` (value date) defaults to the apply time."""

    kind: ClassVar[str] = "post"
    posting_id: str
    entries: Sequence[AnyEntry]
    effective_at: datetime | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def command_id(self) -> str:
        return self.posting_id

    def _canonical(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "id": self.posting_id, "entries": _entries_doc(self.entries),
            "effective_at": _dt_doc(self.effective_at), "metadata": self.metadata,
        }

    def request_hash(self) -> bytes:
        return _posting_hash(self, "")


@dataclass(frozen=True, slots=True)
class PostPending:
    """A pending (two-phase) posting: holds the amounts until committed, voided or expired."""

    kind: ClassVar[str] = "post_pending"
    posting_id: str
    entries: Sequence[AnyEntry]
    timeout_s: int | None = None
    settlement_group: str | None = None
    effective_at: datetime | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def command_id(self) -> str:
        return self.posting_id

    def _canonical(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "id": self.posting_id, "entries": _entries_doc(self.entries),
            "timeout_s": self.timeout_s, "settlement_group": self.settlement_group,
            "effective_at": _dt_doc(self.effective_at), "metadata": self.metadata,
        }

    def request_hash(self) -> bytes:
        group, timeout = self.settlement_group, self.timeout_s
        if group is None:
            tail = ',"settlement_group":null'
        elif type(group) is str:
            tail = ',"settlement_group":' + _esc(group)
        else:
            return _hash_doc(self._canonical())
        if timeout is None:
            tail += ',"timeout_s":null'
        elif type(timeout) is int and -_BIG_INT < timeout < _BIG_INT:
            tail += ',"timeout_s":' + str(timeout)
        else:
            return _hash_doc(self._canonical())
        return _posting_hash(self, tail)


@dataclass(frozen=True, slots=True)
class CommitPending:
    """Post a pending in full, or partially with ``entries`` (see the module docstring)."""

    kind: ClassVar[str] = "commit_pending"
    posting_id: str
    pending_id: str
    entries: Sequence[AnyEntry] | None = None
    effective_at: datetime | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def command_id(self) -> str:
        return self.posting_id

    def _canonical(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "id": self.posting_id, "pending_id": self.pending_id,
            "entries": None if self.entries is None else _entries_doc(self.entries),
            "effective_at": _dt_doc(self.effective_at), "metadata": self.metadata,
        }

    def request_hash(self) -> bytes:
        return _hash_doc(self._canonical())


@dataclass(frozen=True, slots=True)
class VoidPending:
    """Release a pending's holds."""

    kind: ClassVar[str] = "void_pending"
    posting_id: str
    pending_id: str
    effective_at: datetime | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def command_id(self) -> str:
        return self.posting_id

    def _canonical(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "id": self.posting_id, "pending_id": self.pending_id,
            "effective_at": _dt_doc(self.effective_at), "metadata": self.metadata,
        }

    def request_hash(self) -> bytes:
        return _hash_doc(self._canonical())


@dataclass(frozen=True, slots=True)
class CommitGroup:
    """Commit every member of a settlement group in full, atomically."""

    kind: ClassVar[str] = "commit_group"
    posting_id: str
    group: str
    effective_at: datetime | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def command_id(self) -> str:
        return self.posting_id

    def _canonical(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "id": self.posting_id, "group": self.group,
            "effective_at": _dt_doc(self.effective_at), "metadata": self.metadata,
        }

    def request_hash(self) -> bytes:
        return _hash_doc(self._canonical())


@dataclass(frozen=True, slots=True)
class VoidGroup:
    """Void every still-pending member of a settlement group, atomically."""

    kind: ClassVar[str] = "void_group"
    posting_id: str
    group: str
    effective_at: datetime | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def command_id(self) -> str:
        return self.posting_id

    def _canonical(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "id": self.posting_id, "group": self.group,
            "effective_at": _dt_doc(self.effective_at), "metadata": self.metadata,
        }

    def request_hash(self) -> bytes:
        return _hash_doc(self._canonical())


@dataclass(frozen=True, slots=True)
class MalformedCommand:
    """A record the edge could read an id from but not parse: rejected ``invalid_command`` (or
    the more precise ``code`` the edge found, e.g. ``invalid_amount`` for a JSON-number amount)
    and recorded under that id like any other outcome. ``body`` is the record value as received;
    the request hash covers only the body."""

    kind: ClassVar[str] = "malformed"
    command_id: str
    body: bytes
    detail: str = ""
    code: RejectionCode | None = None  # a more precise code the edge found (invalid_amount)

    def request_hash(self) -> bytes:
        body = self.body if isinstance(self.body, bytes) else repr(self.body).encode()
        return hashlib.sha256(b"malformed\x00" + body).digest()


Command: TypeAlias = (
    DefineAsset | OpenAccount | FreezeAccount | UnfreezeAccount | CloseAccount | Post
    | PostPending | CommitPending | VoidPending | CommitGroup | VoidGroup | MalformedCommand
)


def request_hash(cmd: Command) -> bytes:
    """Return the v1 request hash of a command (see "Frozen formats")."""
    return cmd.request_hash()


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AssetState:
    code: str
    scale: int


@dataclass(slots=True)
class AccountState:
    """An account and its four balance numbers (mutated in place by :class:`LedgerState`)."""

    id: str
    participant: str
    asset: str
    debits_must_not_exceed_credits: bool = False
    credits_must_not_exceed_debits: bool = False
    limit_minor: int | None = None
    status: AccountStatus = "open"
    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0

    def available(self) -> int:
        """What can still be moved out, counting pending debits but not pending credits.

        Credit-normal (and flagless) accounts: ``credits_posted - debits_posted -
        debits_pending`` (the most a debit can be, given ``debits_must_not_exceed_credits``).
        Debit-normal accounts (``credits_must_not_exceed_debits``): ``debits_posted -
        credits_posted - credits_pending``.
        """
        if self.credits_must_not_exceed_debits:
            return self.debits_posted - self.credits_posted - self.credits_pending
        return self.credits_posted - self.debits_posted - self.debits_pending

    def balances(self) -> tuple[int, int, int, int]:
        """``(debits_posted, credits_posted, debits_pending, credits_pending)``."""
        return (self.debits_posted, self.credits_posted, self.debits_pending,
                self.credits_pending)


@dataclass(slots=True)
class PendingState:
    """A pending posting and what became of it. ``entries`` are the held amounts."""

    posting_id: str
    entries: tuple[Entry, ...]
    timeout_at: datetime | None = None
    settlement_group: str | None = None
    status: PendingStatus = "pending"
    effective_at: datetime | None = None
    resolved_by: str | None = None
    committed: tuple[Entry, ...] = ()

    @property
    def remaining(self) -> tuple[Entry, ...]:
        """The amounts still held: all of them while pending, none once resolved."""
        return self.entries if self.status == PENDING else ()


@dataclass(slots=True)
class GroupState:
    """A settlement group: its members in the order they were accepted."""

    group_id: str
    members: list[str] = field(default_factory=list)
    status: GroupStatus = "open"


class BalanceDelta(NamedTuple):
    """Signed change of one account's four balance numbers."""

    account_id: str
    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one command (or one expiry).

    Attributes:
        recorded: ``True`` when this call stored the outcome under ``command_id`` (the writer
            persists exactly those, plus the ``expired`` sub-results, which are recorded too).
            ``False`` for a duplicate replay, ``id_conflict`` and an unusable id.
        duplicate: the original outcome replayed for a retry; it changed nothing now.
        entries: for accepted postings: what was posted (post, commit: the committed amounts),
            held (post_pending) or released (void, expire); group kinds concatenate members.
        deltas: the balance changes of this result alone, one per account, sorted by id (the
            ``expired`` sub-results carry their own).
        refs: the pending ids a commit/void/expire resolved, in order.
        expired: pendings this command found due and expired first (see "Expiry").
    """

    command_id: str
    kind: str
    accepted: bool
    code: RejectionCode | None = None
    detail: str = ""
    request_hash: bytes = b""
    recorded_at: datetime | None = None
    entries: tuple[Entry, ...] = ()
    deltas: tuple[BalanceDelta, ...] = ()
    effective_at: datetime | None = None
    metadata: Mapping[str, Any] | None = None
    refs: tuple[str, ...] = ()
    settlement_group: str | None = None
    timeout_at: datetime | None = None
    expired: tuple[Result, ...] = ()
    recorded: bool = True
    duplicate: bool = False

    @property
    def touched_accounts(self) -> tuple[str, ...]:
        """Accounts whose balances this result (and its expired sub-results) changed, sorted."""
        if not self.expired:
            return tuple(d.account_id for d in self.deltas)
        return tuple(sorted({d.account_id for r in self.effects() for d in r.deltas}))

    @property
    def is_posting(self) -> bool:
        """Accepted and balance-changing: goes into the journal and the hash chain."""
        return self.accepted and self.kind in POSTING_KINDS

    def effects(self) -> Iterator[Result]:
        """The results to journal, in chain order: expired sub-results first, then this one."""
        yield from self.expired
        yield self


class _Reject(Exception):
    __slots__ = ("code", "detail", "expired")

    def __init__(self, code: RejectionCode, detail: str, expired: tuple[Result, ...] = ()):
        super().__init__(code, detail)
        self.code = code
        self.detail = detail
        self.expired = expired


class LedgerState:
    """Assets, accounts, pendings, groups and the idempotency map, in memory.

    The writer fills it with the rows a batch needs (``load_*``/``remember``), applies the batch,
    and writes the results. Use the ``load_*`` methods rather than the dicts: they keep the
    expiry index and group membership straight.
    """

    __slots__ = ("_expiry", "accounts", "assets", "fast_path", "groups", "idempotency", "pendings")

    def __init__(self, *, fast_path: bool = True) -> None:
        """Create an empty state.

        Args:
            fast_path: Validate new postings with the one-pass check first (the ordered checks
                still decide every rejection). ``False`` runs only the ordered checks; the
                property tests compare both.
        """
        self.fast_path = fast_path
        self.assets: dict[str, AssetState] = {}
        self.accounts: dict[str, AccountState] = {}
        self.pendings: dict[str, PendingState] = {}
        self.groups: dict[str, GroupState] = {}
        self.idempotency: dict[str, tuple[bytes, Result]] = {}
        self._expiry: list[tuple[datetime, str]] = []

    # -- loading ------------------------------------------------------------------------------

    def load_asset(self, asset: AssetState) -> None:
        self.assets[asset.code] = asset

    def load_account(self, account: AccountState) -> None:
        self.accounts[account.id] = account

    def load_pending(self, pending: PendingState) -> None:
        self.pendings[pending.posting_id] = pending
        if pending.status == PENDING and pending.timeout_at is not None:
            heapq.heappush(self._expiry, (pending.timeout_at, pending.posting_id))

    def load_group(self, group: GroupState) -> None:
        self.groups[group.group_id] = group

    def remember(self, command_id: str, request_hash: bytes, result: Result) -> None:
        """Load a stored outcome so that a retry of ``command_id`` replays it."""
        self.idempotency[command_id] = (request_hash, result)

    # -- commands -----------------------------------------------------------------------------

    def apply(self, cmd: Command, now: datetime) -> Result:
        """Apply one command, all or nothing, and record its outcome under its id.

        Args:
            cmd: Any command of this module; its fields may be malformed (that is a rejection).
            now: The ledger's clock for this command, timezone-aware.

        Returns:
            The outcome. A rejection changes no balance, except the expiry of due pendings the
            command references (reported in ``Result.expired``).

        Raises:
            TypeError: ``cmd`` is not a command of this module.
            ValueError: ``now`` is naive.
            StateNotLoadedError: the caller did not load a row the command needs.
        """
        handler = _HANDLERS.get(type(cmd))
        if handler is None:
            raise TypeError(f"not a ledger command: {type(cmd).__name__}")
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        cid = cmd.command_id
        if not _is_id(cid) or cid.startswith(EXPIRE_PREFIX):
            return Result(
                command_id=cid if type(cid) is str else f"<{type(cid).__name__}>", kind=cmd.kind,
                accepted=False, code=RC.INVALID_COMMAND,
                detail=f"command id must be a 1..{MAX_ID_LEN} character string not starting "
                f"with {EXPIRE_PREFIX!r}",
                recorded_at=now, recorded=False,
            )
        h = cmd.request_hash()
        prior = self.idempotency.get(cid)
        if prior is not None:
            if prior[0] == h:
                return replace(prior[1], duplicate=True, recorded=False)
            return Result(
                command_id=cid, kind=cmd.kind, accepted=False, code=RC.ID_CONFLICT,
                detail=f"id {cid!r} was used for a different request", request_hash=h,
                recorded_at=now, recorded=False,
            )
        try:
            result = handler(self, cmd, h, now)
        except _Reject as r:
            result = Result(
                command_id=cid, kind=cmd.kind, accepted=False, code=r.code, detail=r.detail,
                request_hash=h, recorded_at=now, expired=r.expired,
            )
        self.idempotency[cid] = (h, result)
        return result

    def expire(self, now: datetime) -> list[Result]:
        """Expire every loaded pending that is due (``timeout_at <= now``), oldest first.

        Returns:
            One accepted ``expire`` Result per expired pending, in (timeout_at, id) order.
        """
        out: list[Result] = []
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, pid = heapq.heappop(heap)
            p = self.pendings.get(pid)
            if p is not None and p.status == PENDING and p.timeout_at is not None \
                    and p.timeout_at <= now:
                out.append(self._expire_one(p, now))
        return out

    # -- handlers -----------------------------------------------------------------------------

    def _define_asset(self, cmd: DefineAsset, h: bytes, now: datetime) -> Result:
        if type(cmd.code) is not str or not _ASSET_CODE_RE.fullmatch(cmd.code):
            raise _Reject(RC.INVALID_COMMAND,
                          "asset code must match [A-Z0-9][A-Z0-9._:-]{1,63}")
        if type(cmd.scale) is not int or not 0 <= cmd.scale <= MAX_SCALE:
            raise _Reject(RC.INVALID_COMMAND, f"scale must be an int in 0..{MAX_SCALE}")
        if cmd.code in self.assets:
            raise _Reject(RC.ASSET_EXISTS, f"asset {cmd.code} is already defined")
        self.assets[cmd.code] = AssetState(cmd.code, cmd.scale)
        return Result(command_id=cmd.command_id, kind=cmd.kind, accepted=True, request_hash=h,
                      recorded_at=now)

    def _open_account(self, cmd: OpenAccount, h: bytes, now: datetime) -> Result:
        _need_id(cmd.account_id, "account_id")
        _need_id(cmd.participant, "participant")
        if type(cmd.asset) is not str:
            raise _Reject(RC.INVALID_COMMAND, "asset must be a string")
        dmnec, cmned = cmd.debits_must_not_exceed_credits, cmd.credits_must_not_exceed_debits
        if type(dmnec) is not bool or type(cmned) is not bool:
            raise _Reject(RC.INVALID_COMMAND, "balance flags must be booleans")
        if dmnec and cmned:
            raise _Reject(RC.INVALID_COMMAND,
                          "debits_must_not_exceed_credits and credits_must_not_exceed_debits "
                          "are mutually exclusive")
        asset = self.assets.get(cmd.asset)
        if asset is None:
            raise _Reject(RC.UNKNOWN_ASSET, f"asset {cmd.asset!r} is not defined")
        limit = None if cmd.limit is None else _amount(cmd.limit, asset.scale, allow_zero=True,
                                                       what="limit")
        if cmd.account_id in self.accounts:
            raise _Reject(RC.ACCOUNT_EXISTS, f"account {cmd.account_id} already exists")
        self.accounts[cmd.account_id] = AccountState(
            cmd.account_id, cmd.participant, cmd.asset, dmnec, cmned, limit)
        return Result(command_id=cmd.command_id, kind=cmd.kind, accepted=True, request_hash=h,
                      recorded_at=now)

    def _account_for(self, account_id: object) -> AccountState:
        account_id = _need_id(account_id, "account_id")
        acct = self.accounts.get(account_id)
        if acct is None:
            raise _Reject(RC.UNKNOWN_ACCOUNT, f"account {account_id} does not exist")
        return acct

    def _freeze(self, cmd: FreezeAccount | UnfreezeAccount, h: bytes, now: datetime) -> Result:
        acct = self._account_for(cmd.account_id)
        if acct.status == CLOSED:
            raise _Reject(RC.ACCOUNT_CLOSED, f"account {acct.id} is closed")
        acct.status = FROZEN if type(cmd) is FreezeAccount else OPEN
        return Result(command_id=cmd.command_id, kind=cmd.kind, accepted=True, request_hash=h,
                      recorded_at=now)

    def _close(self, cmd: CloseAccount, h: bytes, now: datetime) -> Result:
        acct = self._account_for(cmd.account_id)
        if acct.status == FROZEN:
            raise _Reject(RC.ACCOUNT_FROZEN, f"account {acct.id} is frozen")
        if acct.status == CLOSED:
            raise _Reject(RC.ACCOUNT_CLOSED, f"account {acct.id} is closed")
        if acct.debits_posted != acct.credits_posted or acct.debits_pending \
                or acct.credits_pending:
            raise _Reject(RC.ACCOUNT_NOT_EMPTY,
                          f"account {acct.id} has a non-zero balance or pending amounts")
        acct.status = CLOSED
        return Result(command_id=cmd.command_id, kind=cmd.kind, accepted=True, request_hash=h,
                      recorded_at=now)

    def _post(self, cmd: Post | PostPending, h: bytes, now: datetime) -> Result:
        is_pending = type(cmd) is PostPending
        effective_at = _effective_at(cmd.effective_at, now)
        metadata = _metadata(cmd.metadata)
        timeout_at: datetime | None = None
        group_id: str | None = None
        if is_pending:
            assert isinstance(cmd, PostPending)
            timeout_s = cmd.timeout_s
            if timeout_s is not None:
                if type(timeout_s) is not int or not 0 < timeout_s <= MAX_TIMEOUT_S:
                    raise _Reject(RC.INVALID_COMMAND,
                                  f"timeout_s must be None or an int in 1..{MAX_TIMEOUT_S}")
                timeout_at = now + timedelta(seconds=timeout_s)
            if cmd.settlement_group is not None:
                group_id = _need_id(cmd.settlement_group, "settlement_group")
        fast = self._fast_posting(cmd.entries) if self.fast_path else None
        if fast is None:
            # The checks in documented order; they raise the first failure.
            entries = self._resolve(_entries_shape(cmd.entries))
            _balanced(entries)
            accounts = self._accounts(entries)
        else:
            entries, accounts = fast
        group = None
        if group_id is not None:
            group = self.groups.get(group_id)
            if group is not None and group.status != OPEN:
                code = RC.ALREADY_POSTED if group.status == POSTED else RC.ALREADY_VOIDED
                raise _Reject(code, f"settlement group {group_id} is already {group.status}")
        if fast is None:
            _open_accounts(accounts)
            _funds(entries, accounts)

        deltas: list[BalanceDelta] = []
        for e, a in zip(entries, accounts, strict=True):
            amt = e.amount_minor
            if e.direction == DEBIT:
                if is_pending:
                    a.debits_pending += amt
                    deltas.append(BalanceDelta(a.id, 0, 0, amt, 0))
                else:
                    a.debits_posted += amt
                    deltas.append(BalanceDelta(a.id, amt, 0, 0, 0))
            elif is_pending:
                a.credits_pending += amt
                deltas.append(BalanceDelta(a.id, 0, 0, 0, amt))
            else:
                a.credits_posted += amt
                deltas.append(BalanceDelta(a.id, 0, amt, 0, 0))
        if len(deltas) == 2:
            if deltas[1].account_id < deltas[0].account_id:
                deltas.reverse()
        else:
            deltas.sort(key=_delta_key)
        pid = cmd.posting_id
        if is_pending:
            self.pendings[pid] = PendingState(pid, entries, timeout_at, group_id, PENDING,
                                              effective_at)
            if timeout_at is not None:
                heapq.heappush(self._expiry, (timeout_at, pid))
            if group_id is not None:
                if group is None:
                    group = self.groups[group_id] = GroupState(group_id)
                group.members.append(pid)
        return Result(
            command_id=pid, kind=cmd.kind, accepted=True, request_hash=h, recorded_at=now,
            entries=entries, deltas=tuple(deltas), effective_at=effective_at,
            metadata=metadata, settlement_group=group_id, timeout_at=timeout_at,
        )

    def _commit_pending(self, cmd: CommitPending, h: bytes, now: datetime) -> Result:
        _need_id(cmd.pending_id, "pending_id")
        raw = None if cmd.entries is None else _entries_shape(cmd.entries)
        effective_at = _effective_at(cmd.effective_at, now)
        metadata = _metadata(cmd.metadata)
        override = None
        if raw is not None:
            override = self._resolve(raw)
            _balanced(override)
        p = self._live_pending(cmd.pending_id, now)
        if override is None:
            committed = p.entries
        else:
            held = {e.account_id: e for e in p.entries}
            for e in override:
                o = held.get(e.account_id)
                if o is None or o.direction != e.direction or o.asset != e.asset:
                    raise _Reject(RC.AMOUNT_EXCEEDS_PENDING,
                                  f"pending {p.posting_id} holds no {e.direction} of {e.asset} "
                                  f"on account {e.account_id}")
                if e.amount_minor > o.amount_minor:
                    raise _Reject(RC.AMOUNT_EXCEEDS_PENDING,
                                  f"{e.amount_minor} exceeds the {o.amount_minor} held on "
                                  f"account {e.account_id}")
            committed = override
        _open_accounts([self._loaded(e.account_id) for e in committed])
        deltas = self._resolve_pendings(((p, committed),), POSTED, cmd.posting_id)
        return Result(
            command_id=cmd.posting_id, kind=cmd.kind, accepted=True, request_hash=h,
            recorded_at=now, entries=committed, deltas=deltas, effective_at=effective_at,
            metadata=metadata, refs=(p.posting_id,),
        )

    def _void_pending(self, cmd: VoidPending, h: bytes, now: datetime) -> Result:
        _need_id(cmd.pending_id, "pending_id")
        effective_at = _effective_at(cmd.effective_at, now)
        metadata = _metadata(cmd.metadata)
        p = self._live_pending(cmd.pending_id, now)
        deltas = self._resolve_pendings(((p, ()),), VOIDED, cmd.posting_id)
        return Result(
            command_id=cmd.posting_id, kind=cmd.kind, accepted=True, request_hash=h,
            recorded_at=now, entries=p.entries, deltas=deltas, effective_at=effective_at,
            metadata=metadata, refs=(p.posting_id,),
        )

    def _group_cmd(self, cmd: CommitGroup | VoidGroup, h: bytes, now: datetime) -> Result:
        _need_id(cmd.group, "group")
        effective_at = _effective_at(cmd.effective_at, now)
        metadata = _metadata(cmd.metadata)
        group = self.groups.get(cmd.group)
        if group is None:
            raise _Reject(RC.GROUP_NOT_FOUND, f"settlement group {cmd.group} does not exist")
        if group.status == POSTED:
            raise _Reject(RC.ALREADY_POSTED, f"settlement group {cmd.group} is already posted")
        if group.status == VOIDED:
            raise _Reject(RC.ALREADY_VOIDED, f"settlement group {cmd.group} is already voided")
        members = []
        for pid in group.members:
            p = self.pendings.get(pid)
            if p is None:
                raise StateNotLoadedError(f"group member {pid} of {group.group_id} not loaded")
            members.append(p)
        for p in members:
            for e in p.entries:
                self._loaded(e.account_id)
        expired = tuple(self._expire_one(p, now) for p in members if _due(p, now))
        live = [p for p in members if p.status == PENDING]
        committing = type(cmd) is CommitGroup
        if committing:
            for p in members:
                if p.status == EXPIRED:
                    raise _Reject(RC.PENDING_EXPIRED,
                                  f"member {p.posting_id} of group {cmd.group} has expired",
                                  expired)
                if p.status != PENDING:  # members are never resolved one by one; defensive
                    code = RC.ALREADY_POSTED if p.status == POSTED else RC.ALREADY_VOIDED
                    raise _Reject(code, f"member {p.posting_id} is already {p.status}", expired)
        entries = tuple(e for p in live for e in p.entries)
        if committing:
            try:
                _open_accounts([self._loaded(e.account_id) for e in entries])
            except _Reject as r:
                raise _Reject(r.code, r.detail, expired) from None
        deltas = self._resolve_pendings(
            [(p, p.entries if committing else ()) for p in live],
            POSTED if committing else VOIDED, cmd.posting_id)
        group.status = POSTED if committing else VOIDED
        return Result(
            command_id=cmd.posting_id, kind=cmd.kind, accepted=True, request_hash=h,
            recorded_at=now, entries=entries, deltas=deltas, effective_at=effective_at,
            metadata=metadata, refs=tuple(p.posting_id for p in live),
            settlement_group=group.group_id, expired=expired,
        )

    def _malformed(self, cmd: MalformedCommand, h: bytes, now: datetime) -> Result:
        detail = cmd.detail if type(cmd.detail) is str and cmd.detail else "malformed command"
        raise _Reject(cmd.code if isinstance(cmd.code, RejectionCode) else RC.INVALID_COMMAND,
                      detail)

    # -- helpers ------------------------------------------------------------------------------

    def _fast_posting(self, entries: object) -> tuple[tuple[Entry, ...], list[AccountState]] | None:
        """Every entry check of a new posting (steps 2-7, 15-19) in one pass.

        Returns ``None`` as soon as anything is off, without saying what: the ordered checks then
        run and find the documented first failure. So this only has to be exact about "all
        pass"; the differential property test runs both paths (``fast_path=False``).
        """
        if type(entries) is not tuple and type(entries) is not list:
            return None
        n = len(entries)
        if n < 2 or n > MAX_ENTRIES:
            return None
        assets, accts = self.assets, self.accounts
        accounts: list[AccountState] = []
        resolved: list[Entry] | None = None
        for e in entries:
            t = type(e)
            if t is not Entry and t is not DecimalEntry:
                return None
            acct_id = e.account_id
            if type(acct_id) is not str or type(e.asset) is not str or len(acct_id) > MAX_ID_LEN:
                return None
            a = accts.get(acct_id)
            if a is None or a.asset != e.asset or a.status != OPEN:
                return None
            if t is Entry:
                amt = e.amount_minor
                if type(amt) is not int or amt <= 0 or amt > MAX_AMOUNT or e.asset not in assets:
                    return None
                if resolved is not None:
                    resolved.append(e)
            else:
                asset = assets.get(e.asset)
                if asset is None:
                    return None
                amt = _fast_decimal(e.amount, asset.scale)
                if amt is None:
                    return None
                if resolved is None:
                    resolved = list(entries[:len(accounts)])
                resolved.append(Entry(acct_id, e.asset, e.direction, amt))
            direction = e.direction
            if direction == DEBIT:
                total = a.debits_posted + a.debits_pending + amt
                other = a.credits_posted
                if a.debits_must_not_exceed_credits and total > other:
                    return None
            elif direction == CREDIT:
                total = a.credits_posted + a.credits_pending + amt
                other = a.debits_posted
                if a.credits_must_not_exceed_debits and total > other:
                    return None
            else:
                return None
            if total > MAX_AMOUNT or (a.limit_minor is not None and total - other > a.limit_minor):
                return None
            accounts.append(a)
        out = tuple(resolved) if resolved is not None else tuple(entries)
        if n == 2:
            x, y = out
            if accounts[0] is accounts[1]:
                return None
            if x.asset == y.asset and x.direction != y.direction \
                    and x.amount_minor == y.amount_minor:
                return out, accounts
        elif len({a.id for a in accounts}) != n:
            return None
        try:
            _balanced(out)
        except _Reject:
            return None
        return out, accounts

    def _resolve(self, entries: tuple[AnyEntry, ...]) -> tuple[Entry, ...]:
        """Steps 3 and 4: assets exist, amounts valid; decimal entries become Entry."""
        assets = self.assets
        for e in entries:
            if e.asset not in assets:
                raise _Reject(RC.UNKNOWN_ASSET, f"asset {e.asset!r} is not defined")
        out: list[Entry] | None = None
        for i, e in enumerate(entries):
            if type(e) is Entry:
                a = e.amount_minor
                if type(a) is not int or not 0 < a <= MAX_AMOUNT:
                    raise _Reject(RC.INVALID_AMOUNT,
                                  f"entry {i}: amount_minor must be an int in 1..10**38-1")
                if out is not None:
                    out.append(e)
            else:
                assert type(e) is DecimalEntry
                if out is None:
                    out = list(entries[:i])  # type: ignore[arg-type]
                minor = _amount(e.amount, assets[e.asset].scale, what=f"entry {i}: amount")
                out.append(Entry(e.account_id, e.asset, e.direction, minor))
        return entries if out is None else tuple(out)  # type: ignore[return-value]

    def _accounts(self, entries: tuple[Entry, ...]) -> list[AccountState]:
        """Steps 6 and 7."""
        accts = self.accounts
        out = []
        for e in entries:
            a = accts.get(e.account_id)
            if a is None:
                raise _Reject(RC.UNKNOWN_ACCOUNT, f"account {e.account_id} does not exist")
            out.append(a)
        for e, a in zip(entries, out, strict=True):
            if a.asset != e.asset:
                raise _Reject(RC.ASSET_MISMATCH,
                              f"account {a.id} holds {a.asset}, the entry is in {e.asset}")
        return out

    def _loaded(self, account_id: str) -> AccountState:
        a = self.accounts.get(account_id)
        if a is None:
            raise StateNotLoadedError(f"account {account_id} not loaded")
        return a

    def _live_pending(self, pending_id: str, now: datetime) -> PendingState:
        """Steps 8, 9, 11-13 for CommitPending / VoidPending."""
        p = self.pendings.get(pending_id)
        if p is None:
            raise _Reject(RC.PENDING_NOT_FOUND, f"pending {pending_id} does not exist")
        if p.settlement_group is not None:
            raise _Reject(RC.PENDING_IN_GROUP,
                          f"pending {pending_id} belongs to settlement group "
                          f"{p.settlement_group}: commit or void the group")
        if p.status == POSTED:
            raise _Reject(RC.ALREADY_POSTED, f"pending {pending_id} is already posted")
        if p.status == VOIDED:
            raise _Reject(RC.ALREADY_VOIDED, f"pending {pending_id} is already voided")
        if p.status == EXPIRED:
            raise _Reject(RC.PENDING_EXPIRED, f"pending {pending_id} has expired")
        if _due(p, now):
            expired = (self._expire_one(p, now),)
            raise _Reject(RC.PENDING_EXPIRED, f"pending {pending_id} has expired", expired)
        return p

    def _resolve_pendings(self, items: Iterable[tuple[PendingState, tuple[Entry, ...]]],
                          status: PendingStatus, by: str) -> tuple[BalanceDelta, ...]:
        """Release each pending's holds and post its committed entries; return the deltas."""
        items = list(items)
        for p, _ in items:  # all or nothing, even for a caller that forgot to load a row
            for e in p.entries:
                self._loaded(e.account_id)
        acc: dict[str, list[int]] = {}
        for p, committed in items:
            for e in p.entries:
                a = self._loaded(e.account_id)
                d = acc.get(a.id)
                if d is None:
                    d = acc[a.id] = [0, 0, 0, 0]
                if e.direction == DEBIT:
                    a.debits_pending -= e.amount_minor
                    d[2] -= e.amount_minor
                else:
                    a.credits_pending -= e.amount_minor
                    d[3] -= e.amount_minor
            for e in committed:
                a = self._loaded(e.account_id)
                d = acc.get(a.id)
                if d is None:
                    d = acc[a.id] = [0, 0, 0, 0]
                if e.direction == DEBIT:
                    a.debits_posted += e.amount_minor
                    d[0] += e.amount_minor
                else:
                    a.credits_posted += e.amount_minor
                    d[1] += e.amount_minor
            p.status = status
            p.resolved_by = by
            p.committed = committed
        return tuple(BalanceDelta(k, *v) for k, v in sorted(acc.items()))

    def _expire_one(self, p: PendingState, now: datetime) -> Result:
        eid = EXPIRE_PREFIX + p.posting_id
        deltas = self._resolve_pendings(((p, ()),), EXPIRED, eid)
        h = hashlib.sha256(b"expire\x00" + p.posting_id.encode()).digest()
        result = Result(
            command_id=eid, kind="expire", accepted=True, request_hash=h, recorded_at=now,
            entries=p.entries, deltas=deltas, effective_at=p.timeout_at,
            refs=(p.posting_id,), settlement_group=p.settlement_group,
        )
        self.idempotency[eid] = (h, result)
        return result


_HANDLERS: Final[dict[type, Any]] = {
    DefineAsset: LedgerState._define_asset,
    OpenAccount: LedgerState._open_account,
    FreezeAccount: LedgerState._freeze,
    UnfreezeAccount: LedgerState._freeze,
    CloseAccount: LedgerState._close,
    Post: LedgerState._post,
    PostPending: LedgerState._post,
    CommitPending: LedgerState._commit_pending,
    VoidPending: LedgerState._void_pending,
    CommitGroup: LedgerState._group_cmd,
    VoidGroup: LedgerState._group_cmd,
    MalformedCommand: LedgerState._malformed,
}


# --------------------------------------------------------------------------------------------
# Rule helpers (pure functions; raise _Reject)
# --------------------------------------------------------------------------------------------


def _is_id(value: object) -> bool:
    return type(value) is str and 0 < len(value) <= MAX_ID_LEN


def _need_id(value: object, name: str) -> str:
    if not _is_id(value):
        raise _Reject(RC.INVALID_COMMAND, f"{name} must be a 1..{MAX_ID_LEN} character string")
    return value  # type: ignore[return-value]


def _due(p: PendingState, now: datetime) -> bool:
    return p.status == PENDING and p.timeout_at is not None and now >= p.timeout_at


def _delta_key(d: BalanceDelta) -> str:
    return d.account_id


def _entries_shape(entries: object) -> tuple[AnyEntry, ...]:
    """Step 2 for entries: types, ids, directions, count, one entry per account."""
    if type(entries) is not tuple and type(entries) is not list:
        raise _Reject(RC.INVALID_COMMAND, "entries must be a list")
    n = len(entries)
    if not 2 <= n <= MAX_ENTRIES:
        raise _Reject(RC.INVALID_COMMAND, f"a posting needs 2..{MAX_ENTRIES} entries, got {n}")
    seen = set()
    for i, e in enumerate(entries):
        t = type(e)
        if t is not Entry and t is not DecimalEntry:
            raise _Reject(RC.INVALID_COMMAND, f"entry {i} is not an entry")
        acct = e.account_id
        if type(acct) is not str or not 0 < len(acct) <= MAX_ID_LEN:
            raise _Reject(RC.INVALID_COMMAND,
                          f"entry {i}: account_id must be a 1..{MAX_ID_LEN} character string")
        if type(e.asset) is not str:
            raise _Reject(RC.INVALID_COMMAND, f"entry {i}: asset must be a string")
        d = e.direction
        if d != DEBIT and d != CREDIT:
            raise _Reject(RC.INVALID_COMMAND, f"entry {i}: direction must be debit or credit")
        seen.add(acct)
    if len(seen) != n:
        raise _Reject(RC.INVALID_COMMAND, "an account may appear only once per posting")
    return entries if type(entries) is tuple else tuple(entries)


def _amount(value: object, scale: int, *, what: str, allow_zero: bool = False) -> int:
    """Step 4 for one amount: ``int`` minor units or a decimal string in the asset's units."""
    if type(value) is int:
        if value < 0 or value > MAX_AMOUNT or (value == 0 and not allow_zero):
            raise _Reject(RC.INVALID_AMOUNT, f"{what} must be in 1..10**38-1 minor units")
        return value
    if type(value) is not str:
        raise _Reject(RC.INVALID_AMOUNT,
                      f"{what} must be a decimal string, not {type(value).__name__}")
    m = _AMOUNT_RE.fullmatch(value) if len(value) <= _MAX_AMOUNT_TEXT else None
    if m is None:
        raise _Reject(RC.INVALID_AMOUNT, f"{what} must be a plain decimal string like 1250.75")
    sign, whole, frac = m.group(1), m.group(2), m.group(3) or ""
    if len(frac) > scale:
        raise _Reject(RC.INVALID_AMOUNT_SCALE,
                      f"{what} has {len(frac)} decimals, the asset allows {scale}")
    if sign:
        raise _Reject(RC.INVALID_AMOUNT, f"{what} must not be negative")
    significant = whole.lstrip("0")
    if significant and len(significant) + scale > 38:
        raise _Reject(RC.INVALID_AMOUNT, f"{what} exceeds 10**38-1 minor units")
    minor = int((significant or "0") + frac.ljust(scale, "0"))
    if minor == 0 and not allow_zero:
        raise _Reject(RC.INVALID_AMOUNT, f"{what} must not be zero")
    return minor


def _fast_decimal(text: object, scale: int) -> int | None:
    """A valid positive decimal string in minor units, or ``None`` (then ``_amount`` says why).
    ``isascii() and isdigit()`` is ``[0-9]+``: the same language as ``_AMOUNT_RE`` unsigned."""
    if type(text) is not str or len(text) > 40:
        return None
    whole, dot, frac = text.partition(".")
    if not (whole.isascii() and whole.isdigit()):
        return None
    if dot and not (len(frac) <= scale and frac.isascii() and frac.isdigit()):
        return None
    minor = int(whole + frac.ljust(scale, "0")) if scale else int(whole)
    return minor if 0 < minor <= MAX_AMOUNT else None


def _balanced(entries: tuple[Entry, ...]) -> None:
    """Step 5: per asset, debits == credits."""
    if len(entries) == 2:
        a, b = entries
        if a.asset == b.asset and a.direction != b.direction \
                and a.amount_minor == b.amount_minor:
            return
    net: dict[str, int] = {}
    for e in entries:
        amt = e.amount_minor if e.direction == DEBIT else -e.amount_minor
        net[e.asset] = net.get(e.asset, 0) + amt
    for asset, diff in net.items():
        if diff:
            raise _Reject(RC.UNBALANCED,
                          f"{asset}: debits exceed credits by {diff}" if diff > 0 else
                          f"{asset}: credits exceed debits by {-diff}")


def _open_accounts(accounts: Sequence[AccountState]) -> None:
    """Steps 15 and 16."""
    for a in accounts:
        if a.status != OPEN:
            break
    else:
        return
    for a in accounts:
        if a.status == FROZEN:
            raise _Reject(RC.ACCOUNT_FROZEN, f"account {a.id} is frozen")
    for a in accounts:
        if a.status == CLOSED:
            raise _Reject(RC.ACCOUNT_CLOSED, f"account {a.id} is closed")


def _funds(entries: tuple[Entry, ...], accounts: list[AccountState]) -> None:
    """Steps 18 and 19 for new amounts (posted or pending)."""
    limited = False
    for e, a in zip(entries, accounts, strict=True):
        if a.limit_minor is not None:
            limited = True
        if e.direction == DEBIT:
            if a.debits_must_not_exceed_credits and \
                    a.debits_posted + a.debits_pending + e.amount_minor > a.credits_posted:
                raise _Reject(RC.INSUFFICIENT_FUNDS,
                              f"account {a.id}: available {a.available()}, "
                              f"debit {e.amount_minor}")
        elif a.credits_must_not_exceed_debits and \
                a.credits_posted + a.credits_pending + e.amount_minor > a.debits_posted:
            raise _Reject(RC.INSUFFICIENT_FUNDS,
                          f"account {a.id}: available {a.available()}, credit {e.amount_minor}")
    for e, a in zip(entries, accounts, strict=True):
        if e.direction == DEBIT:
            total, other = a.debits_posted + a.debits_pending + e.amount_minor, a.credits_posted
        else:
            total, other = a.credits_posted + a.credits_pending + e.amount_minor, a.debits_posted
        if total > MAX_AMOUNT:
            raise _Reject(RC.LIMIT_EXCEEDED,
                          f"account {a.id}: {e.direction}s would exceed 10**38-1")
        if limited and a.limit_minor is not None and total - other > a.limit_minor:
            raise _Reject(RC.LIMIT_EXCEEDED,
                          f"account {a.id}: {e.direction} exposure {total - other} "
                          f"would exceed the limit {a.limit_minor}")


def _effective_at(value: object, now: datetime) -> datetime:
    if value is None:
        return now
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise _Reject(RC.INVALID_COMMAND, "effective_at must be a timezone-aware datetime")
    if not _MIN_TIME < value < _MAX_TIME:  # so that converting it to UTC cannot overflow
        raise _Reject(RC.INVALID_COMMAND, "effective_at is out of range")
    return value


def _metadata(value: object) -> Mapping[str, Any]:
    if type(value) is dict:
        # Fast path for the usual flat string map (references such as UETR, EndToEndId):
        # plain JSON for sure, and 12 bytes per character bounds its escaped size.
        size = 0
        for k, v in value.items():
            if type(k) is not str or type(v) is not str:
                break
            size += len(k) + len(v) + 6
        else:
            if size * 12 <= MAX_METADATA_BYTES:
                return value
    if not isinstance(value, Mapping):
        raise _Reject(RC.INVALID_COMMAND, "metadata must be an object")
    if not value:
        return value
    if not _plain_json(value, 0):
        raise _Reject(RC.INVALID_COMMAND,
                      "metadata must be plain JSON: string keys; string, int, bool, null, "
                      "list or object values (amounts and rates as strings); depth <= 8")
    size = len(json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True))
    if size > MAX_METADATA_BYTES:
        raise _Reject(RC.INVALID_COMMAND, f"metadata is {size} bytes, at most "
                      f"{MAX_METADATA_BYTES} allowed")
    return value


def _plain_json(value: object, depth: int) -> bool:
    if depth > 8:
        return False
    t = type(value)
    if t is str or t is bool or value is None:
        return True
    if t is int:
        return -(2**63) <= value < 2**63  # type: ignore[operator]
    if t is list or t is tuple:
        return all(_plain_json(v, depth + 1) for v in value)  # type: ignore[attr-defined]
    if isinstance(value, Mapping):
        return all(type(k) is str and _plain_json(v, depth + 1) for k, v in value.items())
    return False


# --------------------------------------------------------------------------------------------
# Canonical forms, hashes, batch helpers
# --------------------------------------------------------------------------------------------


def _iso(dt: datetime) -> str:
    if dt.tzinfo is not UTC:
        dt = dt.astimezone(UTC)
    return dt.isoformat(timespec="microseconds")[:-6] + "Z"  # drop "+00:00"


def _dt_doc(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime) and value.tzinfo is not None \
            and value.utcoffset() is not None:
        try:
            return _iso(value)
        except OverflowError:
            pass
    return "?" + _safe_repr(value)


def _entries_doc(entries: object) -> object:
    if type(entries) is not tuple and type(entries) is not list:
        return "?" + _safe_repr(entries)
    out: list[tuple[object, ...]] = []
    for e in entries:
        t = type(e)
        if t is Entry:
            amt = e.amount_minor
            if type(amt) is int and not -_BIG_INT < amt < _BIG_INT:
                amt = "?int:" + hex(amt)  # str() of a huge int raises; hex() does not
            out.append(("e", e.account_id, e.asset, e.direction, amt))
        elif t is DecimalEntry:
            out.append(("d", e.account_id, e.asset, e.direction, e.amount))
        else:
            out.append(("?", _safe_repr(e)))
    return out


def _hash_default(o: object) -> object:
    if isinstance(o, Mapping):
        return dict(o)
    if isinstance(o, datetime):
        return _dt_doc(o)
    if isinstance(o, bytes):
        return "bytes:" + o.hex()
    return f"?{type(o).__qualname__}:{o!r}"


_HASH_ENCODER: Final = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_hash_default)


def _safe_repr(o: object) -> str:
    try:
        return repr(o)
    except Exception:  # e.g. str() of a 5,000-digit int; only malformed input gets here
        return "?" + type(o).__qualname__


def _hash_doc(doc: dict[str, Any]) -> bytes:
    try:
        text = _HASH_ENCODER.encode(doc)
    except (TypeError, ValueError, RecursionError):
        # Only a malformed command gets here (e.g. mixed-type metadata keys); it will be
        # rejected, and the repr is stable for the same input.
        text = "repr:" + _safe_repr(doc)
    return hashlib.sha256(text.encode()).digest()


def _posting_hash(cmd: Post | PostPending, tail: str) -> bytes:
    """The v1 request hash of a Post / PostPending, built by hand for the common well-typed
    case: byte for byte what ``_hash_doc(cmd._canonical())`` produces (a property test checks
    it), in about a third of the time. ``tail`` holds the PostPending keys after "metadata"."""
    pid, eff, meta, entries = cmd.posting_id, cmd.effective_at, cmd.metadata, cmd.entries
    if type(pid) is not str or (type(entries) is not tuple and type(entries) is not list):
        return _hash_doc(cmd._canonical())
    parts = []
    for e in entries:
        t = type(e)
        if t is not Entry and t is not DecimalEntry:
            return _hash_doc(cmd._canonical())
        a, s, d = e.account_id, e.asset, e.direction
        if type(a) is not str or type(s) is not str or type(d) is not str:
            return _hash_doc(cmd._canonical())
        if t is Entry:
            amt = e.amount_minor
            if type(amt) is not int or not -_BIG_INT < amt < _BIG_INT:
                return _hash_doc(cmd._canonical())
            parts.append(f'["e",{_esc(a)},{_esc(s)},{_esc(d)},{amt}]')
        elif type(e.amount) is str:
            parts.append(f'["d",{_esc(a)},{_esc(s)},{_esc(d)},{_esc(e.amount)}]')
        else:
            return _hash_doc(cmd._canonical())
    if eff is None:
        eff_text = "null"
    elif type(eff) is datetime:
        eff_text = _esc(_dt_doc(eff) or "")
    else:
        return _hash_doc(cmd._canonical())
    if type(meta) is not dict:
        return _hash_doc(cmd._canonical())
    if not meta:
        meta_text = "{}"
    elif all(type(k) is str and type(v) is str for k, v in meta.items()):
        meta_text = "{" + ",".join([f"{_esc(k)}:{_esc(meta[k])}" for k in sorted(meta)]) + "}"
    else:
        try:
            meta_text = _HASH_ENCODER.encode(meta)
        except (TypeError, ValueError, RecursionError):
            return _hash_doc(cmd._canonical())
    text = (f'{{"effective_at":{eff_text},"entries":[{",".join(parts)}],"id":{_esc(pid)},'
            f'"kind":"{cmd.kind}","metadata":{meta_text}{tail}}}')
    return hashlib.sha256(text.encode()).digest()


def canonical_posting_bytes(result: Result) -> bytes:
    """The bytes of an accepted posting that the hash chain covers, v1, frozen forever.

    ``json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)`` encoded as
    ASCII, where ``doc`` has exactly these keys:

    - ``v``: ``1``
    - ``kind``: ``post``, ``post_pending``, ``commit_pending``, ``void_pending``,
      ``commit_group``, ``void_group`` or ``expire``
    - ``posting_id``: the command id (``expire:<pending id>`` for expiries)
    - ``effective_at``: UTC, ``YYYY-MM-DDTHH:MM:SS.ffffffZ``
    - ``entries``: in result order, each ``{"account_id", "asset", "direction", "amount"}``
      with ``amount`` the minor units as a decimal integer string
    - ``metadata``: the object as given (``{}`` if none)
    - ``refs``: the resolved pending ids (``[]`` for post / post_pending)
    - ``settlement_group``: string or ``null``
    - ``timeout_at``: like ``effective_at``, or ``null``

    Raises:
        ValueError: ``result`` is not an accepted posting.
    """
    if not result.is_posting or result.effective_at is None:
        raise ValueError(f"{result.command_id}: not an accepted posting")
    # Hand-assembled (the writer builds one per posting): byte for byte what
    # _canonical_posting_doc gives through json.dumps(sort_keys=True); a property test holds
    # the two together.
    entries = ",".join(
        '{"account_id":' + _esc(e.account_id) + ',"amount":"' + str(e.amount_minor)
        + '","asset":' + _esc(e.asset) + ',"direction":' + _esc(e.direction) + "}"
        for e in result.entries
    )
    metadata = (
        json.dumps(dict(result.metadata), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        if result.metadata else "{}"
    )
    group = result.settlement_group
    timeout = result.timeout_at
    text = (
        '{"effective_at":"' + _iso(result.effective_at) + '","entries":[' + entries
        + '],"kind":' + _esc(result.kind) + ',"metadata":' + metadata
        + ',"posting_id":' + _esc(result.command_id)
        + ',"refs":[' + ",".join(_esc(r) for r in result.refs)
        + '],"settlement_group":' + ("null" if group is None else _esc(group))
        + ',"timeout_at":' + ("null" if timeout is None else '"' + _iso(timeout) + '"')
        + ',"v":1}'
    )
    return text.encode("ascii")


def _canonical_posting_doc(result: Result) -> dict[str, Any]:
    """The document :func:`canonical_posting_bytes` serialises (the reference form)."""
    assert result.effective_at is not None
    return {
        "v": 1,
        "kind": result.kind,
        "posting_id": result.command_id,
        "effective_at": _iso(result.effective_at),
        "entries": [
            {"account_id": e.account_id, "asset": e.asset, "direction": e.direction,
             "amount": str(e.amount_minor)}
            for e in result.entries
        ],
        "metadata": dict(result.metadata) if result.metadata else {},
        "refs": list(result.refs),
        "settlement_group": result.settlement_group,
        "timeout_at": None if result.timeout_at is None else _iso(result.timeout_at),
    }


def chain_hash(prev: bytes, canonical: bytes) -> bytes:
    """``sha256(prev || canonical)``; ``prev`` is :data:`GENESIS_HASH` for the first posting."""
    return hashlib.sha256(prev + canonical).digest()


def net_deltas(results: Iterable[Result]) -> dict[str, BalanceDelta]:
    """Sum the balance changes of a batch's results per account (duplicates skipped, expired
    sub-results included): what the writer adds to the balance rows."""
    acc: dict[str, list[int]] = {}
    for r in results:
        if r.duplicate:
            continue
        for x in r.effects():
            for d in x.deltas:
                v = acc.get(d.account_id)
                if v is None:
                    v = acc[d.account_id] = [0, 0, 0, 0]
                v[0] += d.debits_posted
                v[1] += d.credits_posted
                v[2] += d.debits_pending
                v[3] += d.credits_pending
    return {k: BalanceDelta(k, *v) for k, v in sorted(acc.items())}


def pendings_referenced(cmd: Command) -> set[str]:
    """Pending ids the writer must load before applying ``cmd``."""
    if type(cmd) is CommitPending or type(cmd) is VoidPending:
        return {cmd.pending_id} if _is_id(cmd.pending_id) else set()
    return set()


def groups_referenced(cmd: Command) -> set[str]:
    """Settlement groups the writer must load (with all their member pendings) first."""
    if type(cmd) is CommitGroup or type(cmd) is VoidGroup:
        g: object = cmd.group
    elif type(cmd) is PostPending:
        g = cmd.settlement_group
    else:
        return set()
    return {g} if type(g) is str and _is_id(g) else set()


def accounts_touched(cmd: Command, state: LedgerState) -> set[str]:
    """Account ids whose balance rows ``cmd`` may change, to lock in sorted order.

    For CommitPending / VoidPending / group commands these are the accounts of the referenced
    pendings, so load those (:func:`pendings_referenced`, :func:`groups_referenced`) first.
    """
    t = type(cmd)
    if t is Post or t is PostPending:
        entries = cmd.entries  # type: ignore[union-attr]
        if type(entries) is not tuple and type(entries) is not list:
            return set()
        return {e.account_id for e in entries
                if type(e) in (Entry, DecimalEntry) and type(e.account_id) is str}
    pendings: list[PendingState] = []
    if t is CommitPending or t is VoidPending:
        p = state.pendings.get(cmd.pending_id)  # type: ignore[union-attr]
        if p is not None:
            pendings.append(p)
    elif t is CommitGroup or t is VoidGroup:
        g = state.groups.get(cmd.group)  # type: ignore[union-attr]
        if g is not None:
            pendings.extend(p for m in g.members if (p := state.pendings.get(m)) is not None)
    elif t in (OpenAccount, FreezeAccount, UnfreezeAccount, CloseAccount):
        a = cmd.account_id  # type: ignore[union-attr]
        return {a} if type(a) is str else set()
    return {e.account_id for p in pendings for e in p.entries}
