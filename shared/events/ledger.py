"""The ledger's public contracts: commands on ``ledger.commands`` and results on the reply topic.

Amounts are decimal strings in the asset's units (``"1250.75"``); the writer converts them to
integer minor units with the asset's scale; excess decimals are rejected (invalid_amount_scale).

Idempotency key (``command_id`` in results): the ``posting_id`` for the commands that move value
(Post, PostPending, CommitPending, VoidPending, CommitGroup, VoidGroup), the envelope's ``event_id``
for the others. A client keeps that id when it retries, as in TigerBeetle's reliable submission.
The record key is the first debited account (or the settlement group) so one account's postings keep
their order on one partition.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from shared.events.registry import Payload, register
from shared.money import AmountStr

_ID = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/-]*$")
Direction = Literal["debit", "credit"]


class EntryIn(Payload):
    account_id: str = _ID
    asset: str = Field(min_length=2, max_length=64)
    direction: Direction
    amount: AmountStr


class References(Payload):
    """ISO 20022 and business references that travel unchanged into the posting's metadata."""

    uetr: str | None = Field(None, max_length=64)
    end_to_end_id: str | None = Field(None, max_length=64)
    instruction_id: str | None = Field(None, max_length=64)
    order_ref: str | None = Field(None, max_length=64)
    description: str | None = Field(None, max_length=280)


@register("ledger.DefineAsset")
class DefineAsset(Payload):
    code: str = Field(min_length=2, max_length=64, pattern=r"^[A-Z0-9][A-Z0-9._:-]{1,63}$")
    scale: int = Field(ge=0, le=18)


@register("ledger.OpenAccount")
class OpenAccount(Payload):
    account_id: str = _ID
    participant: str = Field(min_length=1, max_length=64)
    asset: str = Field(min_length=2, max_length=64)
    debits_must_not_exceed_credits: bool = False
    credits_must_not_exceed_debits: bool = False
    limit: AmountStr | None = None


@register("ledger.FreezeAccount")
class FreezeAccount(Payload):
    account_id: str = _ID


@register("ledger.UnfreezeAccount")
class UnfreezeAccount(Payload):
    account_id: str = _ID


@register("ledger.CloseAccount")
class CloseAccount(Payload):
    account_id: str = _ID


@register("ledger.Post")
class Post(Payload):
    posting_id: str = _ID
    entries: list[EntryIn] = Field(min_length=2, max_length=64)
    effective_at: datetime | None = None
    references: References = References()


@register("ledger.PostPending")
class PostPending(Payload):
    posting_id: str = _ID
    entries: list[EntryIn] = Field(min_length=2, max_length=64)
    timeout_s: int = Field(ge=1, le=30 * 24 * 3600)
    settlement_group: str | None = Field(None, min_length=1, max_length=128)
    effective_at: datetime | None = None
    references: References = References()


@register("ledger.CommitPending")
class CommitPending(Payload):
    """Post a pending in full, or partially with ``entries`` (amounts no larger than the hold's)."""

    posting_id: str = _ID
    pending_id: str = _ID
    entries: list[EntryIn] | None = None


@register("ledger.VoidPending")
class VoidPending(Payload):
    posting_id: str = _ID
    pending_id: str = _ID


@register("ledger.CommitGroup")
class CommitGroup(Payload):
    posting_id: str = _ID
    settlement_group: str = Field(min_length=1, max_length=128)


@register("ledger.VoidGroup")
class VoidGroup(Payload):
    posting_id: str = _ID
    settlement_group: str = Field(min_length=1, max_length=128)


LedgerCommand = (
    DefineAsset
    | OpenAccount
    | FreezeAccount
    | UnfreezeAccount
    | CloseAccount
    | Post
    | PostPending
    | CommitPending
    | VoidPending
    | CommitGroup
    | VoidGroup
)


@register("ledger.PostingAccepted")
class PostingAccepted(Payload):
    """A command was applied; partition, sequence and hash place a posting in its chain."""

    command_id: str
    command_type: str
    posting_id: str | None = None
    partition: int | None = None
    sequence: int | None = None
    hash: str | None = None  # hex sha256 chain hash after this posting
    duplicate: bool = False


@register("ledger.PostingRejected")
class PostingRejected(Payload):
    """A command was refused; nothing changed. ``code`` comes from one fixed list."""

    command_id: str
    command_type: str
    code: str
    detail: str = ""
    duplicate: bool = False
