"""Tokenized deposits end to end: real Kafka, real PostgreSQL, the ledger running (issue 4).

Each test drives the service as banks, the settlement agent (CHATS) and ops would, through the
deposits commands topic, reads what it publishes on its events topic, and ends by checking the
ledger's own balances: every bank's token supply equals its tokenized-deposit liability (TD-1),
every asset nets to zero, and (at rest) nothing is left pending.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

from services.deposits import accounts as acc
from shared.clock import ManualClock
from shared.events import deposits as ev
from shared.events.topics import TopicSpec, dlq_topic
from shared.messaging.admin import ensure_topics
from tests.integration.deposits.harness import HASE, HSBC, World, hkt, read_all
from tests.support.ledger_run import wait_for

ALICE_HKD = acc.wallet_account(HSBC, "HKD", "alice")
BOB_HKD = acc.wallet_account(HASE, "HKD", "bob")
ALICE_CNH = acc.wallet_account(HSBC, "CNH", "alice")
BOB_CNH = acc.wallet_account(HASE, "CNH", "bob")


async def _pendings(world: World, u: str) -> dict[str, tuple[str, str | None]]:
    rows = await world.pool.fetch(
        "SELECT posting_id, status, resolved_by FROM ledger.pendings WHERE settlement_group = $1",
        acc.settlement_group(u))
    return {r["posting_id"]: (r["status"], r["resolved_by"]) for r in rows}


async def _status(world: World, u: str) -> str:
    return str(await world.pool.fetchval("SELECT status FROM deposits.transfers WHERE uetr = $1",
                                         u))


async def test_intra_bank_transfer_settles_at_once(world: World) -> None:
    await world.issue(HSBC, "alice", "HKD", "1000.00")
    u = await world.transfer("250.00", payee=(HSBC, "carol"))
    settled = await world.final(u)
    assert isinstance(settled, ev.TransferSettled) and settled.route == "intra_bank"
    assert settled.posting_id == f"td:{u}:transfer"
    assert await world.balance(ALICE_HKD) == 75000
    assert await world.balance(acc.wallet_account(HSBC, "HKD", "carol")) == 25000
    assert await _status(world, u) == "settled"
    await world.assert_books()


async def test_interbank_settles_atomically_in_wcbdc_mode(world: World) -> None:
    await world.issue(HSBC, "alice", "CNH", "1000.00")
    await world.fund(HSBC, "CNH", "500.00")
    u = await world.transfer("120.00", "CNH")
    settled = await world.final(u)
    assert isinstance(settled, ev.TransferSettled), settled
    # Burn at HSBC, the wCBDC leg between the settlement accounts and the mint at Hang Seng
    # are posted by one ledger command: the commit of the transfer's settlement group (TD-3).
    assert settled.posting_id == f"td:{u}:commit"
    legs = await _pendings(world, u)
    assert legs == {f"td:{u}:burn": ("posted", f"td:{u}:commit"),
                    f"td:{u}:mint": ("posted", f"td:{u}:commit"),
                    f"td:{u}:settle:1": ("posted", f"td:{u}:commit")}
    (interbank,) = world.log.of(ev.InterbankSettlementSettled, uetr=u)
    assert interbank.settlement_mode == "wcbdc"
    assert [e.posting_id for e in world.log.of(ev.DepositTokensBurned, uetr=u)] == [
        f"td:{u}:burn"]
    assert [e.posting_id for e in world.log.of(ev.DepositTokensMinted, uetr=u)] == [
        f"td:{u}:mint"]
    assert await world.balance(ALICE_CNH) == 88000
    assert await world.balance(BOB_CNH) == 12000
    assert await world.balance(acc.settlement_account(HSBC, "CNH")) == 38000
    assert await world.balance(acc.settlement_account(HASE, "CNH")) == 12000
    await world.assert_books()


async def test_interbank_settles_atomically_in_rtgs_mode_on_the_agents_acsc(world: World) -> None:
    await world.issue(HSBC, "alice", "HKD", "1000.00")
    await world.fund(HSBC, "HKD", "500.00")
    u = str(uuid.uuid4())
    world.agent_policy[u] = "hold"  # the pacs.009 waits at CHATS until the test answers
    await world.transfer("100.00", u=u)
    requested = await world.log.one(ev.InterbankSettlementRequested, uetr=u)
    assert (requested.instructing_agent, requested.instructed_agent) == (HSBC, HASE)
    assert requested.debtor_settlement_account == f"SA-{HSBC}-HKD"
    # Every leg is held, nothing is posted: the earmark, the mint and the interbank leg.
    balances = await world.assert_books(settled=False)
    assert balances[ALICE_HKD].debits_pending == 10000
    assert balances[BOB_HKD].credits_pending == 10000
    assert await world.balance(BOB_HKD) == 0
    assert await _status(world, u) == "interbank_requested"
    await world.send(ev.SettleInterbankLeg(uetr=u, end_to_end_id=requested.end_to_end_id,
                                           agent_reference="CHATS-0001"), participant="HKMA")
    settled = await world.final(u)
    assert isinstance(settled, ev.TransferSettled)
    legs = await _pendings(world, u)
    assert {status for status, _ in legs.values()} == {"posted"}
    assert {by for _, by in legs.values()} == {f"td:{u}:commit"}
    (interbank,) = world.log.of(ev.InterbankSettlementSettled, uetr=u)
    assert (interbank.settlement_mode, interbank.agent_reference) == ("rtgs", "CHATS-0001")
    assert await world.balance(ALICE_HKD) == 90000
    assert await world.balance(BOB_HKD) == 10000
    assert await world.balance(acc.settlement_account(HSBC, "HKD")) == 40000
    await world.assert_books()


async def test_a_rejected_interbank_leg_releases_the_earmark_and_changes_no_balance(
        world: World) -> None:
    await world.issue(HSBC, "alice", "HKD", "1000.00")
    await world.fund(HSBC, "HKD", "500.00")
    before = await world.assert_books()
    u = str(uuid.uuid4())
    world.agent_policy[u] = "rjct"
    await world.transfer("200.00", u=u)
    failed = await world.final(u)
    assert isinstance(failed, ev.TransferFailed) and failed.code == "interbank_rejected"
    released = await world.log.one(ev.EarmarkReleased, uetr=u)
    assert released.posting_id == f"td:{u}:void"
    assert len(world.log.of(ev.EarmarkReleased, uetr=u)) == 1
    assert not world.log.of(ev.DepositTokensMinted, uetr=u)
    assert {status for status, _ in (await _pendings(world, u)).values()} == {"voided"}
    assert await world.assert_books() == before  # all four columns of every account


async def test_an_underfunded_transfer_queues_and_settles_once_funded(world: World) -> None:
    await world.issue(HSBC, "alice", "HKD", "1000.00")
    await world.fund(HSBC, "HKD", "60.00")
    first = await world.transfer("100.00")
    queued = await world.log.one(ev.InterbankSettlementQueued, uetr=first)
    assert queued.reason == "insufficient_settlement_funds"
    # Neither rejected nor partially settled: the earmark and the mint stay held.
    balances = await world.assert_books(settled=False)
    assert balances[ALICE_HKD].debits_pending == 10000
    assert await world.balance(BOB_HKD) == 0
    # A smaller one that the position could pay still waits behind it (strict FIFO, TD-5).
    assert isinstance(world.clock, ManualClock)
    world.clock.advance(timedelta(seconds=1))  # queue order is by time queued, then UETR
    second = await world.transfer("10.00")
    behind = await world.log.one(ev.InterbankSettlementQueued, uetr=second)
    assert behind.reason == "queue_not_empty"
    rows = await world.pool.fetch("SELECT uetr FROM deposits.transfers WHERE queue_key = $1 "
                                  "ORDER BY queued_since, uetr", f"{HSBC}:HKD")
    assert [r["uetr"] for r in rows] == [first, second]
    # What ops see on /metrics: two waiting, the head for a second by the service's clock.
    queue = {"queue": f"{HSBC}:HKD"}
    def gauge(name: str) -> float | None:
        return world.metrics.registry.get_sample_value(name, queue)

    async def depth_is(n: int) -> bool:
        return gauge("harbour_deposits_queue_depth") == n

    await wait_for("the queue gauge to show both", lambda: depth_is(2), timeout_s=10)
    assert gauge("harbour_deposits_queue_oldest_seconds") == 1.0
    assert {await _status(world, first), await _status(world, second)} <= {"queued", "settling"}
    await world.fund(HSBC, "HKD", "50.00")
    assert isinstance(await world.final(first), ev.TransferSettled)
    assert isinstance(await world.final(second), ev.TransferSettled)
    settled = [e.uetr for e in world.log.of(ev.TransferSettled)]
    assert settled.index(first) < settled.index(second)
    assert await world.balance(BOB_HKD) == 11000
    assert await world.balance(acc.settlement_account(HSBC, "HKD")) == 0
    await world.assert_books()
    await wait_for("the queue gauge to drain", lambda: depth_is(0), timeout_s=10)
    handled = world.metrics.registry.get_sample_value  # the consumer's, same registry
    assert (handled("harbour_deposits_messages_total", {"outcome": "decided"}) or 0) > 0
    assert (handled("harbour_deposits_batch_records_count") or 0) > 0


async def test_a_transfer_instructed_outside_its_window_settles_when_it_opens(
        world: World) -> None:
    clock = world.clock
    assert isinstance(clock, ManualClock)
    await world.issue(HSBC, "alice", "HKD", "1000.00")
    await world.issue(HSBC, "alice", "CNH", "1000.00")
    await world.fund(HSBC, "HKD", "500.00")
    await world.fund(HSBC, "CNH", "500.00")
    saturday = hkt(2026, 12, 5, 10)
    monday_open = hkt(2026, 12, 7, 9)
    clock.set(saturday)
    hkd = await world.transfer("100.00")
    waiting = await world.log.one(ev.TransferAwaitingWindow, uetr=hkd)
    assert waiting.window_opens_at == monday_open
    # 24/7 legs do not wait: intra-bank and wCBDC settle on a Saturday (TD-6).
    intra = await world.transfer("5.00", payee=(HSBC, "carol"))
    cnh = await world.transfer("7.00", "CNH")
    assert isinstance(await world.final(intra), ev.TransferSettled)
    assert isinstance(await world.final(cnh), ev.TransferSettled)
    wake = await world.pool.fetchval(
        "SELECT next_wakeup_at FROM deposits.transfers WHERE uetr = $1", hkd)
    assert wake == monday_open
    clock.set(monday_open - timedelta(seconds=1))
    await asyncio.sleep(0.5)  # the scheduler runs: nothing is due yet
    assert await _status(world, hkd) == "awaiting_window"
    assert not world.log.of(ev.InterbankSettlementRequested, uetr=hkd)
    clock.set(monday_open + timedelta(seconds=1))
    settled = await world.final(hkd)
    assert isinstance(settled, ev.TransferSettled)
    (requested,) = world.log.of(ev.InterbankSettlementRequested, uetr=hkd)
    assert requested.interbank_settlement_date.isoformat() == "2026-12-07"
    assert await world.balance(BOB_HKD) == 10000
    await world.assert_books()


async def test_timeouts_release_earmarks_and_change_no_balance(world: World) -> None:
    clock = world.clock
    assert isinstance(clock, ManualClock)
    await world.issue(HSBC, "alice", "HKD", "1000.00")
    await world.fund(HSBC, "HKD", "100.00")
    before = await world.assert_books()
    # The agent never answers this pacs.009: released once the confirmation deadline passes.
    silent = str(uuid.uuid4())
    world.agent_policy[silent] = "hold"
    await world.transfer("80.00", u=silent)
    requested = await world.log.one(ev.InterbankSettlementRequested, uetr=silent)
    # This one is short (more than the whole position, even once the first is released):
    # it stays queued until the cut-off.
    clock.advance(timedelta(seconds=1))
    short = await world.transfer("150.00")
    await world.log.one(ev.InterbankSettlementQueued, uetr=short)
    clock.set(requested.confirm_by + timedelta(seconds=1))
    expired = await world.final(silent)
    assert isinstance(expired, ev.TransferExpired) and expired.code == "confirmation_timeout"
    await world.log.one(ev.EarmarkReleased, uetr=silent)
    assert await _status(world, short) in ("queued", "settling")
    clock.set(hkt(2026, 11, 30, 17, 30))  # today's CHATS cut-off
    cut = await world.final(short)
    assert isinstance(cut, ev.TransferExpired) and cut.code == "queued_past_cutoff", cut
    await world.log.one(ev.EarmarkReleased, uetr=short)
    # A late ACSC for the timed-out pacs.009 is reported for a return, and moves nothing.
    await world.send(ev.SettleInterbankLeg(uetr=silent, end_to_end_id=requested.end_to_end_id,
                                           agent_reference="CHATS-LATE"), participant="HKMA")
    await world.log.one(ev.InterbankLegSettledAfterRelease, uetr=silent)
    await world.quiet()
    assert await world.assert_books() == before


async def test_redelivering_every_record_changes_nothing(world: World) -> None:
    await world.issue(HSBC, "alice", "HKD", "1000.00")
    await world.issue(HSBC, "alice", "CNH", "1000.00")
    await world.fund(HSBC, "HKD", "500.00")
    await world.fund(HSBC, "CNH", "500.00")
    rejected = str(uuid.uuid4())
    world.agent_policy[rejected] = "rjct"
    done = [await world.transfer("10.00", payee=(HSBC, "carol")),
            await world.transfer("20.00", "CNH"), await world.transfer("30.00"),
            await world.transfer("40.00", u=rejected)]
    for u in done:
        await world.final(u)
    await world.quiet()
    before = await _snapshot(world)
    books = await world.assert_books()

    # 1. Every record the service and the ledger consumed, published again byte for byte.
    for topic in (world.commands, world.reply_topic, world.ledger_commands):
        for partition, key, value, headers in await read_all(world.bootstrap, topic):
            assert world._producer is not None and value is not None
            await world._producer.send_and_wait(topic, value, key=key, partition=partition,
                                                headers=headers)
    await world.quiet()
    # 2. A new consumer group: the service reads both topics again from offset 0.
    await world.stop_deposits()
    world.group = f"{world.group}.again"
    await ensure_topics(world.bootstrap, [TopicSpec(dlq_topic(world.group), 1)])
    await world.start_deposits()
    await world.quiet()
    await asyncio.sleep(0.5)
    await world.quiet()

    assert await _snapshot(world) == before
    assert await world.assert_books() == books
    for u in done:  # one outcome each, as before
        kinds = (ev.TransferSettled, ev.TransferFailed)
        assert len(world.log.of(kinds, uetr=u)) == 1


async def _snapshot(world: World) -> dict[str, object]:
    """What redelivery must not change: the deposits store, its outbox and the ledger's journal."""
    q = world.pool.fetchval
    return {
        "events": await q("SELECT count(*) FROM deposits.events"),
        "outbox": await q("SELECT count(*) FROM deposits.outbox"),
        "refusals": await q("SELECT count(*) FROM deposits.refusals"),
        "routes": await q("SELECT count(*) FROM deposits.ledger_routes"),
        "transfers": [tuple(r) for r in await world.pool.fetch(
            "SELECT uetr, status, reason, attempts, stream_version FROM deposits.transfers "
            "ORDER BY uetr")],
        "postings": await q("SELECT count(*) FROM ledger.postings"),
        "entries": await q("SELECT count(*) FROM ledger.entries"),
        "results": await q("SELECT count(*) FROM ledger.results"),
    }
