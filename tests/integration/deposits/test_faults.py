"""The deposits service under faults: SIGKILL mid-saga and bad input (issue 4).

The kill test runs ``python -m services.deposits.app`` as a child process and kills it (``kill
-9``: no shutdown code runs) twice while transfers of every kind are between their legs, restarts
it each time, and then checks what an operator would: every transfer ended (settled, or failed
with its earmark released), none twice; the wallets hold exactly what the generated plan says,
computed independently by dict arithmetic; nothing is left pending on the ledger; TD-1 holds and
every asset nets to zero.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg

from services.deposits import accounts as acc
from shared.clock import SystemClock
from shared.events import deposits as ev
from shared.events.envelope import encode, new_envelope
from shared.events.ledger import PostingAccepted
from shared.events.topics import dlq_topic
from tests.integration.deposits.harness import (
    ALWAYS_OPEN,
    HASE,
    HSBC,
    World,
    minor,
    new_world,
    read_all,
)

TERMINAL = (ev.TransferSettled, ev.TransferFailed, ev.TransferCancelled, ev.TransferExpired,
            ev.TransferRejected)
FINAL = {"settled", "failed", "cancelled", "expired", "rejected"}


async def test_killing_the_service_mid_saga_completes_or_releases_every_transfer(
        kafka_bootstrap: str, db_url: str, pool: asyncpg.Pool, tmp_path: Path) -> None:
    world = new_world(kafka_bootstrap, db_url, pool, tmp_path, config=ALWAYS_OPEN,
                      clock=SystemClock())
    try:
        await world.start(deposits="process")
        await _kill_scenario(world)
    except BaseException:
        if world.process is not None:
            print(world.process.log_tail(80))
        raise
    finally:
        await world.close()


async def _kill_scenario(world: World) -> None:
    await world.onboard()
    for bank, wallet, ccy in ((HSBC, "alice", "HKD"), (HSBC, "alice", "CNH"),
                              (HASE, "bob", "HKD")):
        await world.issue(bank, wallet, ccy, "1000.00")
    for bank, ccy in ((HSBC, "HKD"), (HSBC, "CNH"), (HASE, "HKD")):
        await world.fund(bank, ccy, "1000.00")
    start = await world.balances()

    # (uetr, currency, payer, payee, amount, expected outcome)
    plan: list[tuple[str, str, tuple[str, str], tuple[str, str], str, str]] = []
    kinds = [
        ("HKD", (HSBC, "alice"), (HSBC, "carol"), "settled"),    # intra-bank
        ("CNH", (HSBC, "alice"), (HASE, "bob"), "settled"),      # wcbdc
        ("HKD", (HSBC, "alice"), (HASE, "bob"), "settled"),      # rtgs, ACSC
        ("HKD", (HSBC, "alice"), (HASE, "bob"), "failed"),       # rtgs, RJCT
        ("HKD", (HASE, "bob"), (HSBC, "alice"), "settled"),      # rtgs the other way
    ]
    for i in range(40):
        ccy, payer, payee, outcome = kinds[i % len(kinds)]
        u = str(uuid.uuid4())
        if outcome == "failed":
            world.agent_policy[u] = "rjct"
        plan.append((u, ccy, payer, payee, f"{1 + i % 7}.{i:02d}", outcome))

    for u, ccy, payer, payee, amount, _ in plan[:24]:
        await world.transfer(amount, ccy, payer=payer, payee=payee, u=u)
    await world.log.wait("sagas in flight", lambda: len(world.log.of(ev.FundsEarmarked)) >= 6)
    assert world.process is not None
    await world.process.kill()  # 1st kill: mid-saga, events and ledger answers in flight
    await world.start_deposits_process()
    for u, ccy, payer, payee, amount, _ in plan[24:]:
        await world.transfer(amount, ccy, payer=payer, payee=payee, u=u)
    await world.log.wait("more settled", lambda: len(world.log.of(TERMINAL)) >= 25, 60)
    await world.process.kill()  # 2nd kill
    await world.start_deposits_process()
    for u, *_ in plan:
        await world.final(u, timeout_s=90)
    await world.quiet(60)

    # Every transfer ended once, as planned: none stuck, none doubled.
    outcomes = {u: [type(e).__name__ for e in world.log.of(TERMINAL, uetr=u)] for u, *_ in plan}
    want = {u: ["TransferSettled" if o == "settled" else "TransferFailed"]
            for u, *_, o in plan}
    assert outcomes == want
    rows = await world.pool.fetch("SELECT uetr, status, next_wakeup_at, queue_key "
                                  "FROM deposits.transfers")
    assert {r["uetr"] for r in rows} == {u for u, *_ in plan}
    assert all(r["status"] in FINAL and r["next_wakeup_at"] is None and r["queue_key"] is None
               for r in rows), [tuple(r) for r in rows if r["status"] not in FINAL]
    failed = {u for u, *_, o in plan if o == "failed"}
    released = Counter(e.uetr for e in world.log.of(ev.EarmarkReleased))
    assert released == dict.fromkeys(failed, 1)
    commits = {r["id"] for r in await world.pool.fetch(
        "SELECT id FROM ledger.postings WHERE id LIKE '%:commit' OR id LIKE '%:transfer'")}
    assert commits == {f"td:{u}:{'transfer' if p[0] == q[0] else 'commit'}"
                       for u, _, p, q, _, o in plan if o == "settled"}

    # The wallets and settlement accounts hold exactly what the plan says.
    expected = {k: b.credits_posted - b.debits_posted for k, b in start.items()}
    for _, ccy, payer, payee, amount, outcome in plan:
        if outcome != "settled":
            continue
        m = minor(amount)
        expected[acc.wallet_account(payer[0], ccy, payer[1])] -= m
        expected[acc.wallet_account(payee[0], ccy, payee[1])] += m
        if payer[0] != payee[0]:  # burn at the payer's bank, mint at the payee's
            expected[acc.settlement_account(payer[0], ccy)] -= m
            expected[acc.settlement_account(payee[0], ccy)] += m
            expected[acc.liability_account(payer[0], ccy)] += m
            expected[acc.liability_account(payee[0], ccy)] -= m
    end = await world.assert_books()
    assert {k: b.credits_posted - b.debits_posted for k, b in end.items()} == expected


async def test_bad_input_gets_a_reason_code_or_a_dead_letter_and_blocks_nothing(
        world: World) -> None:
    await world.issue(HSBC, "alice", "HKD", "1000.00")
    await world.fund(HSBC, "HKD", "500.00")
    settled = await world.transfer("10.00")
    await world.final(settled)
    good = new_envelope(ev.InstructTransfer(
        uetr=str(uuid.uuid4()), end_to_end_id="E2E-BAD", payer_participant=HSBC,
        payer_wallet="alice", payee_participant=HASE, payee_wallet="bob", currency="HKD",
        amount="1.00"), producer="tests", participant=HSBC)
    raw = json.loads(encode(good))
    bad_uetr = {**raw, "payload": {**raw["payload"], "uetr": "not-a-uetr"}}
    unknown = {**raw, "type": "deposits.PayEveryone"}
    extra = {**raw, "payload": {**raw["payload"], "memo": "unknown field"}}
    an_event = new_envelope(ev.WalletFrozen(participant_id=HSBC, wallet_id="alice", reason="x",
                                            case_ref="C1"), producer="tests", participant=HSBC)
    dead = [b"not json at all", json.dumps(bad_uetr).encode(), json.dumps(unknown).encode(),
            json.dumps(extra).encode(), encode(an_event),
            encode(good).replace(b'"producer":"tests"', b'"producer":"tests","producer":"x"')]
    for value in dead:
        await world.publish_raw(world.commands, value, b"bad")
    await world.publish_raw(world.reply_topic, b"\xff\xfe garbage", b"bad")
    # A ledger answer nobody asked for is not ours: a no-op, not a dead letter.
    stray = new_envelope(PostingAccepted(command_id="td:nobody:burn", command_type="post_pending"),
                         producer="harbour.ledger", participant=HSBC)
    await world.publish_raw(world.reply_topic, encode(stray), b"stray")

    # Business refusals are answered with a code: recorded, not dead-lettered.
    await world.send(ev.CancelTransfer(uetr=settled, reason="customer asked", requested_by="ops"),
                     participant=HSBC)
    twice = await world.transfer("11.00", u=settled)  # same UETR, other details: id_conflict
    assert twice == settled
    scaled = await world.transfer("1.001")  # one decimal too many for HKD
    rejected = await world.final(scaled)
    assert isinstance(rejected, ev.TransferRejected) and rejected.code == "invalid_amount"
    after = await world.transfer("12.00")  # the partitions moved on
    assert isinstance(await world.final(after), ev.TransferSettled)
    await world.quiet()

    letters = await read_all(world.bootstrap, dlq_topic(world.group))
    codes = sorted(dict(h)["x-harbour-error-code"].decode() for *_, h in letters)
    assert codes == sorted(["malformed_json", "invalid_payload", "unknown_type",
                            "invalid_payload", "unknown_type", "malformed_json",
                            "malformed_json"]), codes
    assert {v for _, _, v, _ in letters} == {*dead, b"\xff\xfe garbage"}
    refusals = {r["code"] for r in await world.pool.fetch(
        "SELECT code FROM deposits.refusals WHERE stream_id = $1", f"transfer:{settled}")}
    assert refusals == {"already_settled", "id_conflict"}
    assert len(world.log.of(ev.TransferSettled, uetr=settled)) == 1
    assert await world.balance(acc.wallet_account(HASE, "HKD", "bob")) == 2200
    await world.assert_books()


async def test_batches_the_database_cannot_take_are_read_again_not_lost(world: World) -> None:
    """The database fails the next batches (as an outage would, after the service's own
    retries): the subscriber reads them again from Kafka until it answers; the transfer settles
    once and nothing is dead-lettered."""
    from shared.errors import InfrastructureError

    assert world.service is not None
    service = world.service
    real = service.handle_batch
    failures = 2

    async def outage(messages: Any) -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            raise InfrastructureError("database unavailable", retryable=True)
        return await real(messages)

    await world.issue(HSBC, "alice", "HKD", "100.00")
    await world.fund(HSBC, "HKD", "100.00")
    service.handle_batch = outage  # type: ignore[method-assign]
    u = await world.transfer("10.00")
    assert isinstance(await world.final(u), ev.TransferSettled)
    retried = world.metrics.registry.get_sample_value(
        "harbour_deposits_batch_retries_total", {"reason": "database_unavailable"})
    assert retried == 2
    assert len(world.log.of(ev.TransferSettled, uetr=u)) == 1
    assert await world.balance(acc.wallet_account(HASE, "HKD", "bob")) == 1000
    await world.quiet()
    assert not world.metrics.registry.get_sample_value(
        "harbour_deposits_messages_total", {"outcome": "dead_lettered"})
    await world.assert_books()


async def test_records_with_headers_that_are_not_text_are_still_handled(world: World) -> None:
    """A null or non-UTF-8 header value (a tracing system's, say) must not make the batch it is
    in disappear: FastStream's batch parser decodes every header as text."""
    await world.issue(HSBC, "alice", "HKD", "100.00")
    await world.fund(HSBC, "HKD", "100.00")
    u = str(uuid.uuid4())
    command = new_envelope(ev.InstructTransfer(
        uetr=u, end_to_end_id="E2E-HDR", payer_participant=HSBC, payer_wallet="alice",
        payee_participant=HASE, payee_wallet="bob", currency="HKD", amount="10.00"),
        producer="tests", participant=HSBC)
    await world.publish_raw(world.commands, encode(command), u,
                            headers=[("trace", b"\xff\xfe\x00"), ("baggage", None)])
    assert isinstance(await world.final(u), ev.TransferSettled)
    assert await world.balance(acc.wallet_account(HASE, "HKD", "bob")) == 1000


async def test_two_instances_in_one_group_settle_every_transfer_once(world: World) -> None:
    """A second deposits instance joins the group while transfers are between their legs: the
    partitions are rebalanced mid-run, a transfer's ledger answers may land on either instance
    (they are keyed by ledger account, not by transfer), and both decide batches of the same
    streams. Every transfer still settles exactly once and the books balance."""
    from services.deposits.app import run_deposits
    from services.deposits.metrics import DepositsMetrics
    from shared.config import KafkaSettings, PostgresSettings

    for ccy in ("CNH", "HKD"):
        await world.issue(HSBC, "alice", ccy, "1000.00")
        await world.fund(HSBC, ccy, "1000.00")
    kinds = [("CNH", (HASE, "bob")), ("HKD", (HASE, "bob")), ("CNH", (HSBC, "carol"))]
    sent: list[tuple[str, tuple[str, str], str]] = []

    async def pay() -> None:
        ccy, payee = kinds[len(sent) % len(kinds)]
        sent.append((ccy, payee, await world.transfer("1.00", ccy, payee=payee)))

    def decided(metrics: DepositsMetrics) -> float:
        return metrics.registry.get_sample_value(
            "harbour_deposits_messages_total", {"outcome": "decided"}) or 0

    for _ in range(9):
        await pay()
    stop = asyncio.Event()
    metrics = DepositsMetrics()
    second = asyncio.create_task(run_deposits(
        KafkaSettings(kafka_bootstrap=world.bootstrap, client_id="test-deposits-2"),
        PostgresSettings(database_url=world.db_url), world.settings(), stop, clock=world.clock,
        metrics=metrics))
    try:
        for _ in range(300):  # keep transfers in flight until the rebalance has happened
            if decided(metrics) > 0:
                break
            await pay()
            await asyncio.sleep(0.05)
        assert decided(metrics) > 0, "the second instance never got a partition"
        for _ in range(9):
            await pay()
        finals = [await world.final(u, timeout_s=60) for _, _, u in sent]
        assert all(isinstance(f, ev.TransferSettled) for f in finals), finals
        await world.quiet()
        for _, _, u in sent:
            assert len(world.log.of(ev.TransferSettled, uetr=u)) == 1
        paid = Counter((ccy, payee) for ccy, payee, _ in sent)
        for (ccy, payee), n in paid.items():
            assert await world.balance(acc.wallet_account(payee[0], ccy, payee[1])) == 100 * n
        for ccy in ("CNH", "HKD"):
            out = sum(n for (c, _), n in paid.items() if c == ccy)
            assert await world.balance(acc.wallet_account(HSBC, ccy, "alice")) == 100000 - 100 * out
        await world.assert_books()
        assert decided(world.metrics) > 0
    finally:
        stop.set()
        await asyncio.wait_for(second, 30)
