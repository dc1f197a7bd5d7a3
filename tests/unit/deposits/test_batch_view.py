"""The batch's in-memory view of settlement queues (services/deposits/batch.py): a transfer that
joins or leaves a queue within a batch changes the depth the batch's later decisions see (TD-5)."""

from __future__ import annotations

from datetime import UTC, datetime

from services.deposits import domain as dm
from services.deposits.batch import BatchView
from shared.events import deposits as ev

BANK, OTHER = "HSBCHKHH", "BOCHHKHH"
SINCE = datetime(2026, 11, 30, 3, tzinfo=UTC)


def _transfer(uetr: str, status: dm.TransferStatus, *, queued: bool) -> dm.Transfer:
    instruction = ev.TransferInstruction(
        uetr=uetr, end_to_end_id="E2E", payer_participant=BANK, payer_wallet="w1",
        payee_participant=OTHER, payee_wallet="w2", currency="HKD", amount="10.00")
    return dm.Transfer(instruction=instruction, status=status,
                       queued_since=SINCE if queued else None)


U1, U2, U3 = ("00000000-0000-4000-8000-00000000000" + n for n in "123")
KEY = dm.queue_key(BANK, "HKD")


def test_depth_counts_the_queue_without_the_transfer_deciding() -> None:
    view = BatchView(queue_sizes={KEY: 2}, queued={U1: KEY})
    assert view.depth(_transfer(U1, dm.TransferStatus.QUEUED, queued=True).instruction) == {
        KEY: 1}
    assert view.depth(_transfer(U2, dm.TransferStatus.INSTRUCTED, queued=False).instruction
                      ) == {KEY: 2}
    assert BatchView().depth(_transfer(U2, dm.TransferStatus.INSTRUCTED,
                                       queued=False).instruction) == {}


def test_joining_and_leaving_within_the_batch_moves_the_depth_later_decisions_see() -> None:
    view = BatchView(queue_sizes={KEY: 1}, queued={U1: KEY})
    later = _transfer(U3, dm.TransferStatus.INSTRUCTED, queued=False).instruction
    view.decided("transfer:" + U2, 3, _transfer(U2, dm.TransferStatus.QUEUED, queued=True))
    assert view.depth(later) == {KEY: 2}
    # A retry in flight keeps its place (settling), so nothing overtakes it.
    view.decided("transfer:" + U1, 5, _transfer(U1, dm.TransferStatus.SETTLING, queued=True))
    assert view.depth(later) == {KEY: 2}
    view.decided("transfer:" + U1, 6, _transfer(U1, dm.TransferStatus.SETTLED, queued=False))
    view.decided("transfer:" + U2, 4, _transfer(U2, dm.TransferStatus.CANCELLED, queued=False))
    assert view.depth(later) == {}
    assert view.states["transfer:" + U1][0] == 6
