"""Builders for ledger command records, as a bank or a domain service would publish them."""

from __future__ import annotations

from typing import Any

from shared.events import ledger as wire
from shared.events.envelope import encode, new_envelope
from shared.events.registry import Payload


def record(payload: Payload, *, participant: str = "BANKA", reply_to: str | None = None) -> bytes:
    return encode(new_envelope(payload, producer="tests", participant=participant,
                               reply_to=reply_to))


def asset(code: str, scale: int, **kw: Any) -> bytes:
    return record(wire.DefineAsset(code=code, scale=scale), **kw)


def account(account_id: str, asset_code: str, *, participant: str = "BANKA",
            no_overdraft: bool = False, limit: str | None = None, **kw: Any) -> bytes:
    return record(wire.OpenAccount(account_id=account_id, participant=participant,
                                   asset=asset_code,
                                   debits_must_not_exceed_credits=no_overdraft, limit=limit),
                  participant=participant, **kw)


def entry(account_id: str, asset_code: str, direction: str, amount: str) -> wire.EntryIn:
    return wire.EntryIn(account_id=account_id, asset=asset_code, direction=direction,  # type: ignore[arg-type]
                        amount=amount)


def transfer(posting_id: str, debit: str, credit: str, asset_code: str, amount: str,
             **kw: Any) -> bytes:
    """A two-entry posting moving ``amount`` from ``debit`` to ``credit``."""
    return record(wire.Post(posting_id=posting_id, entries=[
        entry(debit, asset_code, "debit", amount), entry(credit, asset_code, "credit", amount),
    ]), **kw)


def pending(posting_id: str, debit: str, credit: str, asset_code: str, amount: str, *,
            timeout_s: int = 60, group: str | None = None, **kw: Any) -> bytes:
    return record(wire.PostPending(posting_id=posting_id, timeout_s=timeout_s,
                                   settlement_group=group, entries=[
        entry(debit, asset_code, "debit", amount), entry(credit, asset_code, "credit", amount),
    ]), **kw)
