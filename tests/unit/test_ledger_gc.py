"""The writer's per-record work leaves no reference cycles behind.

The ledger writer runs with the cyclic collector as a safety net only (``services/ledger/app.py``,
``WRITER_YOUNG_GC_THRESHOLD``): that is safe only while decoding, deciding, hashing and answering a
command leaves nothing that reference counting cannot free. A change that makes each record leave a
cycle (an exception kept with its traceback, a closure over itself) would make the writer's memory
grow until a collection walks a million objects at once; this test fails first.
"""

from __future__ import annotations

import gc
from datetime import UTC, datetime

from services.ledger import domain as d
from services.ledger.codec import Incoming, read_record, result_message
from services.ledger.writer import ChainPlace, LedgerWriter, Record
from tests.support import ledger as L


def _records() -> list[bytes]:
    accepted = [L.transfer(f"t{i}", "payer", "payee", "HKD", "1.00") for i in range(50)]
    rejected = [
        L.transfer("broke", "payer", "payee", "HKD", "1000000.00"),  # insufficient_funds
        L.transfer("nobody", "ghost", "payee", "HKD", "1.00"),  # unknown_account
        L.transfer("fraction", "payer", "payee", "HKD", "1.001"),  # invalid_amount_scale
        L.transfer("minus", "payer", "payee", "HKD", "-1.00"),  # invalid_amount
        L.transfer("t0", "payer", "payee", "HKD", "2.00"),  # id_conflict
    ]
    dead = [b'{"not json', b'{"type": "ledger.Post"}', b"\x00\xff", b""]
    return accepted + rejected + dead


def _decide_and_answer(values: list[bytes]) -> int:
    """What the writer does with each record, short of the database and Kafka; returns how many
    answers and dead letters it built."""
    state = d.LedgerState()
    state.load_asset(d.AssetState("HKD", 2))
    state.load_account(d.AccountState("payer", "BANKA", "HKD", debits_must_not_exceed_credits=True,
                                      credits_posted=10_000))
    state.load_account(d.AccountState("payee", "BANKA", "HKD"))
    writer = LedgerWriter(None)  # type: ignore[arg-type]  # no I/O below
    now = datetime.now(UTC)
    head = d.GENESIS_HASH
    built = 0
    for offset, value in enumerate(values):
        decoded = read_record(value, b"k")
        if not isinstance(decoded, Incoming):
            writer._dead_letter(Record(0, offset, b"k", value), decoded)
            built += 1
            continue
        result = state.apply(decoded.command, now)
        place = None
        if result.accepted and result.is_posting:
            head = d.chain_hash(head, d.canonical_posting_bytes(result))
            place = ChainPlace(0, offset, head)
        result_message(result, decoded, place, now, f"answer-{offset}")
        built += 1
    return built


def test_deciding_and_answering_records_leaves_no_cycles_for_the_collector() -> None:
    values = _records()
    assert _decide_and_answer(values) == len(values)  # warm: caches and lazy schemas built once
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()  # nothing may be collected behind the measurement's back
    try:
        for _ in range(3):
            _decide_and_answer(values)
        left_behind = gc.collect()
    finally:
        if was_enabled:
            gc.enable()
    assert left_behind == 0
