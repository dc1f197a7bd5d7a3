"""The deposits consumer's batch handler against the real service store, without Kafka.

Records in (as aiokafka hands them over) -> decisions recorded (events, outbox rows, read models,
inbox) in PostgreSQL, malformed ones dead-lettered with their reason. What needs a broker (offsets,
redelivery, rebalancing) is covered by tests/integration/deposits against the real one.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from aiokafka import ConsumerRecord

from services.deposits import accounts as acc
from services.deposits.consumer import BatchHandler
from services.deposits.metrics import DepositsMetrics
from services.deposits.service import DepositsService, Topics
from services.deposits.settings import DepositsSettings
from shared.clock import ManualClock
from shared.events import deposits as ev
from shared.events.envelope import decode, encode, new_envelope
from shared.events.ledger import OpenAccount, PostingAccepted
from shared.events.registry import Payload
from shared.messaging import DeadLetterMiddleware
from shared.messaging.dlq import Failure
from shared.store.pool import create_pool
from tests.integration.deposits.harness import WINDOWED

pytestmark = pytest.mark.postgres

SETTINGS = DepositsSettings(commands_topic="c.deposits", events_topic="e.deposits",
                            ledger_commands_topic="l.commands",
                            ledger_results_topic="dep.ledger-results", group_id="g.deposits")
BANK = "HSBCHKHH"


@dataclass
class Harness:
    handler: BatchHandler
    service: DepositsService
    pool: asyncpg.Pool
    parked: list[tuple[bytes | None, str]] = field(default_factory=list)
    offset: int = 0

    async def send(self, *values: bytes, topic: str = SETTINGS.commands_topic) -> list[Any]:
        """One batch of records on ``topic``; the outcomes of those decided."""
        records = []
        for value in values:
            self.offset += 1
            records.append(ConsumerRecord(topic, 0, self.offset, 0, 0, b"k", value, None,
                                          len(b"k"), len(value), []))
        return await self.handler.handle(records)


@pytest_asyncio.fixture
async def harness(db_url: str) -> AsyncIterator[Harness]:
    pool = await create_pool(db_url, min_size=1, max_size=4)
    service = DepositsService(pool, WINDOWED, clock=ManualClock(datetime(2026, 11, 30, 3,
                                                                         tzinfo=UTC)),
                              topics=Topics(SETTINGS.events_topic, SETTINGS.ledger_commands_topic,
                                            SETTINGS.ledger_results_topic))
    parked: list[tuple[bytes | None, str]] = []

    async def park(record: ConsumerRecord[bytes, bytes], _: BaseException, failure: Failure,
                   __: int) -> None:
        parked.append((record.value, failure.code))

    handler = BatchHandler(service, results_topic=SETTINGS.ledger_results_topic,
                           dead_letter=park,
                           policy=DeadLetterMiddleware(max_attempts=2, backoff_s=0),
                           metrics=DepositsMetrics())
    try:
        yield Harness(handler, service, pool, parked)
    finally:
        await pool.close()


def _record(payload: Payload, participant: str = BANK) -> bytes:
    return encode(new_envelope(payload, producer="tests", participant=participant))


ONBOARD = ev.OnboardParticipant(participant_id=BANK, name="HSBC", currencies=(
    ev.CurrencyArrangement(currency="HKD", settlement_account_ref="SA-1"),))


async def test_a_command_is_decided_and_recorded_with_its_outbox_rows(harness: Harness) -> None:
    pool = harness.pool
    await harness.send(_record(ONBOARD))
    events = await pool.fetch("SELECT stream_id, stream_version, type FROM deposits.events "
                              "ORDER BY stream_version")
    assert {e["stream_id"] for e in events} == {f"participant:{BANK}"}
    assert [e["stream_version"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "deposits.ParticipantOnboardingStarted"
    outbox = await pool.fetch("SELECT topic, key, value FROM deposits.outbox ORDER BY id")
    published = [r for r in outbox if r["topic"] == SETTINGS.events_topic]
    assert [decode(r["value"])[0].type for r in published] == [
        "deposits.ParticipantOnboardingStarted"]
    assert published[0]["key"] == BANK.encode()
    ledger = [r for r in outbox if r["topic"] == SETTINGS.ledger_commands_topic]
    asked = [e for e in events if e["type"] == "deposits.LedgerCommandRequested"]
    assert len(ledger) == len(asked) == 8  # 3 assets + 5 accounts for one currency
    for row in ledger:
        envelope, command = decode(row["value"])
        assert envelope.reply_to == SETTINGS.ledger_results_topic
        assert row["key"] == BANK.encode()  # set-up commands stay in order on one partition
        if isinstance(command, OpenAccount):
            cid = f"td:onboard:{BANK}:open:{command.account_id}"
            assert envelope.event_id == acc.ledger_event_id(cid)
    status = await pool.fetchval("SELECT status FROM deposits.participants")
    assert status == "onboarding"


async def test_the_same_record_twice_is_one_decision(harness: Harness) -> None:
    pool = harness.pool
    value = _record(ONBOARD)
    await harness.send(value, value)  # twice in one batch
    counts = await pool.fetchrow("SELECT (SELECT count(*) FROM deposits.events) AS e, "
                                 "(SELECT count(*) FROM deposits.outbox) AS o")
    assert counts["e"] > 0
    await harness.send(value)  # and redelivered in a later one
    assert await pool.fetchrow("SELECT (SELECT count(*) FROM deposits.events) AS e, "
                               "(SELECT count(*) FROM deposits.outbox) AS o") == counts
    assert await pool.fetchval("SELECT count(*) FROM deposits.inbox") == 1


async def test_ledger_answers_route_to_the_stream_that_asked(harness: Harness) -> None:
    pool = harness.pool
    await harness.send(_record(ONBOARD))
    keys = [r["ledger_key"] for r in await pool.fetch(
        "SELECT ledger_key FROM deposits.ledger_routes ORDER BY ledger_key")]
    assert len(keys) == 8
    answers = [_record(PostingAccepted(command_id=key, command_type="open_account"),
                       participant="harbour.ledger") for key in keys]
    await harness.send(*answers[:3], topic=SETTINGS.ledger_results_topic)
    await harness.send(*answers[3:], topic=SETTINGS.ledger_results_topic)
    types = [r["type"] for r in await pool.fetch(
        "SELECT type FROM deposits.events ORDER BY stream_version")]
    assert types[-1] == "deposits.ParticipantOnboarded"
    assert await pool.fetchval("SELECT status FROM deposits.participants") == "active"
    # An answer to nothing we asked changes nothing.
    before = await pool.fetchval("SELECT count(*) FROM deposits.events")
    stray = _record(PostingAccepted(command_id="td:nobody:burn", command_type="post_pending"))
    assert [o.stream for o in await harness.send(stray, topic=SETTINGS.ledger_results_topic)
            ] == [None]
    assert await pool.fetchval("SELECT count(*) FROM deposits.events") == before


async def test_refusals_are_recorded_and_malformed_records_dead_lettered(harness: Harness) -> None:
    pool = harness.pool
    u = str(uuid.uuid4())
    cancel = ev.CancelTransfer(uetr=u, reason="no such transfer", requested_by="ops")
    bad = json.loads(_record(cancel))
    bad["payload"]["uetr"] = "nope"
    answer = _record(PostingAccepted(command_id="x", command_type="post"))
    # One batch: a refusal, two malformed records and a ledger answer on the commands topic.
    await harness.send(b"{not json", _record(cancel), json.dumps(bad).encode(), answer)
    refusal = await pool.fetchrow("SELECT code, stream_id FROM deposits.refusals")
    assert (refusal["code"], refusal["stream_id"]) == ("unknown_transfer", f"transfer:{u}")
    assert harness.parked == [(b"{not json", "malformed_json"),
                              (json.dumps(bad).encode(), "invalid_payload"),
                              (answer, "unknown_type")]
    assert await pool.fetchval("SELECT count(*) FROM deposits.events") == 0
    assert await pool.fetchval("SELECT count(*) FROM deposits.inbox") == 1


# --- a batch decides as the same messages one at a time would ---------------------------------


async def _answer_all(h: Harness, answered: set[str]) -> None:
    """Accept every ledger command asked so far (the ledger's part, without a ledger)."""
    rows = await h.pool.fetch("SELECT ledger_key, purpose FROM deposits.ledger_routes")
    fresh = [r for r in rows if r["ledger_key"] not in answered]
    answered.update(r["ledger_key"] for r in fresh)
    if fresh:
        await h.send(*(_record(PostingAccepted(command_id=r["ledger_key"],
                                               command_type=r["purpose"]),
                               participant="harbour.ledger") for r in fresh),
                     topic=SETTINGS.ledger_results_topic)


async def _bank_with_tokens(h: Harness, bank: str, answered: set[str]) -> None:
    """A bank onboarded in HKD with wallets w1 and w2, HKD 100.00 issued to w1."""
    await h.send(_record(ev.OnboardParticipant(participant_id=bank, name=bank, currencies=(
        ev.CurrencyArrangement(currency="HKD", settlement_account_ref=f"SA-{bank}"),)), bank))
    await _answer_all(h, answered)
    await h.send(*(_record(ev.OpenWallet(participant_id=bank, wallet_id=w, currencies=("HKD",),
                                         customer_ref=f"C-{w}", kyc_ref=f"K-{w}"),
                           bank) for w in ("w1", "w2")))
    await _answer_all(h, answered)
    await h.send(_record(ev.IssueDepositToken(uetr=str(uuid.uuid4()), end_to_end_id="E2E-ISSUE",
                                              participant_id=bank, wallet_id="w1",
                                              currency="HKD", amount="100.00"), bank))
    await _answer_all(h, answered)


def _scenario(bank: str) -> list[bytes]:
    """Messages whose decisions depend on the ones before them in the same batch."""
    hold = {"participant_id": bank, "wallet_id": "w1", "reason": "AML review",
            "case_ref": "CASE-1"}
    t1, t2 = str(uuid.uuid4()), str(uuid.uuid4())

    def pay(u: str, amount: str) -> ev.InstructTransfer:
        return ev.InstructTransfer(uetr=u, end_to_end_id=f"E2E-{u[:8]}",
                                   payer_participant=bank, payer_wallet="w1",
                                   payee_participant=bank, payee_wallet="w2", currency="HKD",
                                   amount=amount)

    paid = _record(pay(t2, "10.00"), bank)
    return [_record(ev.FreezeWallet(**hold), bank),
            _record(pay(t1, "10.00"), bank),  # rejected: the wallet was frozen just before
            _record(ev.UnfreezeWallet(**hold), bank),
            paid,  # accepted: unfrozen just before
            paid,  # the same message again: a duplicate
            _record(pay(t2, "12.00"), bank),  # same uetr, other body: id_conflict
            _record(ev.FreezeWallet(**hold), bank)]  # the same wallet again, one version on


async def _what_happened(h: Harness, bank: str) -> tuple[Any, ...]:
    """Per stream kind, the event types in order; the refusal codes; outbox rows by topic."""
    events = await h.pool.fetch(
        "SELECT stream_id, type FROM deposits.events WHERE metadata->>'participant' = $1 "
        "ORDER BY global_position", bank)
    streams: dict[str, list[str]] = {}
    for e in events:
        kind = e["stream_id"].split(":", 1)[0]
        streams.setdefault(kind + (":w1" if e["stream_id"].endswith("w1") else ""),
                           []).append(e["type"])
    refusals = [r["code"] for r in await h.pool.fetch(
        "SELECT code FROM deposits.refusals WHERE participant = $1 ORDER BY recorded_at, code",
        bank)]
    wallet = await h.pool.fetchrow("SELECT frozen, stream_version FROM deposits.wallets "
                                   "WHERE participant_id = $1 AND wallet_id = 'w1'", bank)
    return streams, refusals, dict(wallet)


async def test_a_batch_decides_as_one_message_at_a_time_would(harness: Harness) -> None:
    answered: set[str] = set()
    one, many = "ONEBYONE", "INABATCH"
    for bank in (one, many):
        await _bank_with_tokens(harness, bank, answered)
    for value in _scenario(one):
        await harness.send(value)
    outcomes = await harness.send(*_scenario(many))
    assert [[type(e).__name__ for e in o.events] or (o.refusal.code if o.refusal else "dup")
            for o in outcomes] == [
        ["WalletFrozen", "LedgerCommandRequested"], ["TransferRejected"],
        ["WalletUnfrozen", "LedgerCommandRequested"],
        ["TransferInstructed", "LedgerCommandRequested"], "dup", "id_conflict",
        ["WalletFrozen", "LedgerCommandRequested"]]
    assert outcomes[1].events[0].code == "wallet_frozen"  # type: ignore[attr-defined]
    alone, batched = await _what_happened(harness, one), await _what_happened(harness, many)
    assert batched == alone
    assert batched[1] == ["id_conflict"]
    assert batched[2]["frozen"] is True


# --- failures ------------------------------------------------------------------------------------


async def test_a_poison_record_costs_one_slow_batch_not_the_others(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.deposits import service as svc

    decide, evolve = svc._AGGREGATES["participant"]

    def flaky(state: Any, command: Any, ctx: Any) -> Any:
        if getattr(command, "participant_id", None) == "POISONHK":
            raise RuntimeError("a bug this record trips")
        return decide(state, command, ctx)

    monkeypatch.setitem(svc._AGGREGATES, "participant", (flaky, evolve))
    good = _record(ONBOARD)
    poison = _record(ev.OnboardParticipant(participant_id="POISONHK", name="P", currencies=(
        ev.CurrencyArrangement(currency="HKD", settlement_account_ref="SA-P"),)))
    outcomes = await harness.send(poison, good)
    assert [o.stream for o in outcomes] == [f"participant:{BANK}"]
    assert harness.parked == [(poison, "unhandled_error")]
    assert await harness.pool.fetchval("SELECT status FROM deposits.participants") == "onboarding"
    retried = harness.handler._metrics.registry.get_sample_value(
        "harbour_deposits_batch_retries_total", {"reason": "one_at_a_time"})
    assert retried == 1


async def test_a_database_outage_reads_the_batch_again_and_parks_nothing(
        harness: Harness) -> None:
    from services.deposits.consumer import RetryBatch

    await harness.pool.close()
    with pytest.raises(RetryBatch):  # and the malformed record waits for the batch to go through
        await harness.send(b"{not json", _record(ONBOARD))
    assert harness.parked == []


async def test_a_database_that_refuses_every_write_is_waited_out_not_dead_lettered(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.deposits.consumer import RetryBatch
    from shared.errors import InfrastructureError

    async def disk_full(_: Any) -> Any:
        raise InfrastructureError("could not extend file", retryable=False, sqlstate="53100")

    monkeypatch.setattr(harness.service, "handle_batch", disk_full)
    monkeypatch.setattr(harness.service, "handle", disk_full)
    with pytest.raises(RetryBatch):
        await harness.send(_record(ONBOARD))
    assert harness.parked == []
