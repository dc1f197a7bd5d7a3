"""The deposits router with FastStream's in-memory ``TestKafkaBroker`` and the real service store.

Message in -> decision recorded (events, outbox rows, read models, inbox) in PostgreSQL; no Kafka
broker. What the in-memory broker cannot show (offsets, redelivery, rebalancing) is covered by
tests/integration/deposits against the real one.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
import pytest_asyncio
from faststream.kafka import KafkaBroker, TestKafkaBroker

from services.deposits import accounts as acc
from services.deposits.router import build_router
from services.deposits.service import DepositsService, Topics
from services.deposits.settings import DepositsSettings
from shared.clock import ManualClock
from shared.config import KafkaSettings
from shared.events import deposits as ev
from shared.events.envelope import decode, encode, new_envelope
from shared.events.ledger import OpenAccount, PostingAccepted
from shared.events.registry import Payload
from shared.messaging import DeadLetterMiddleware, make_broker
from shared.store.pool import create_pool
from tests.integration.deposits.harness import WINDOWED

pytestmark = pytest.mark.postgres

SETTINGS = DepositsSettings(commands_topic="c.deposits", events_topic="e.deposits",
                            ledger_commands_topic="l.commands",
                            ledger_results_topic="dep.ledger-results", group_id="g.deposits")
BANK = "HSBCHKHH"


Harness = tuple[KafkaBroker, DepositsService, asyncpg.Pool, DeadLetterMiddleware]


@pytest_asyncio.fixture
async def harness(db_url: str) -> AsyncIterator[Harness]:
    pool = await create_pool(db_url, min_size=1, max_size=4)
    service = DepositsService(pool, WINDOWED, clock=ManualClock(datetime(2026, 11, 30, 3,
                                                                         tzinfo=UTC)),
                              topics=Topics(SETTINGS.events_topic, SETTINGS.ledger_commands_topic,
                                            SETTINGS.ledger_results_topic))
    dead = DeadLetterMiddleware(max_attempts=2, backoff_s=0)
    broker = make_broker(KafkaSettings(kafka_bootstrap="localhost:1"), dead_letters=dead)
    broker.include_router(build_router(service, SETTINGS))
    try:
        async with TestKafkaBroker(broker) as br:
            yield br, service, pool, dead
    finally:
        await pool.close()


def _record(payload: Payload, participant: str = BANK) -> bytes:
    return encode(new_envelope(payload, producer="tests", participant=participant))


ONBOARD = ev.OnboardParticipant(participant_id=BANK, name="HSBC", currencies=(
    ev.CurrencyArrangement(currency="HKD", settlement_account_ref="SA-1"),))


async def test_a_command_is_decided_and_recorded_with_its_outbox_rows(harness: Harness) -> None:
    br, _, pool, _ = harness
    await br.publish(_record(ONBOARD), SETTINGS.commands_topic, key=BANK.encode())
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
    br, _, pool, _ = harness
    value = _record(ONBOARD)
    await br.publish(value, SETTINGS.commands_topic, key=BANK.encode())
    counts = await pool.fetchrow("SELECT (SELECT count(*) FROM deposits.events) AS e, "
                                 "(SELECT count(*) FROM deposits.outbox) AS o")
    await br.publish(value, SETTINGS.commands_topic, key=BANK.encode())
    assert await pool.fetchrow("SELECT (SELECT count(*) FROM deposits.events) AS e, "
                               "(SELECT count(*) FROM deposits.outbox) AS o") == counts
    assert await pool.fetchval("SELECT count(*) FROM deposits.inbox") == 1


async def test_ledger_answers_route_to_the_stream_that_asked(harness: Harness) -> None:
    br, _, pool, _ = harness
    await br.publish(_record(ONBOARD), SETTINGS.commands_topic, key=BANK.encode())
    keys = [r["ledger_key"] for r in await pool.fetch(
        "SELECT ledger_key FROM deposits.ledger_routes ORDER BY ledger_key")]
    assert len(keys) == 8
    for key in keys:
        answer = _record(PostingAccepted(command_id=key, command_type="open_account"),
                         participant="harbour.ledger")
        await br.publish(answer, SETTINGS.ledger_results_topic, key=key.encode())
    types = [r["type"] for r in await pool.fetch(
        "SELECT type FROM deposits.events ORDER BY stream_version")]
    assert types[-1] == "deposits.ParticipantOnboarded"
    assert await pool.fetchval("SELECT status FROM deposits.participants") == "active"
    # An answer to nothing we asked changes nothing.
    before = await pool.fetchval("SELECT count(*) FROM deposits.events")
    stray = _record(PostingAccepted(command_id="td:nobody:burn", command_type="post_pending"))
    await br.publish(stray, SETTINGS.ledger_results_topic, key=b"x")
    assert await pool.fetchval("SELECT count(*) FROM deposits.events") == before


async def test_refusals_are_recorded_and_malformed_records_dead_lettered(harness: Harness) -> None:
    br, _, pool, dead = harness
    u = str(uuid.uuid4())
    cancel = ev.CancelTransfer(uetr=u, reason="no such transfer", requested_by="ops")
    await br.publish(_record(cancel), SETTINGS.commands_topic, key=u.encode())
    refusal = await pool.fetchrow("SELECT code, stream_id FROM deposits.refusals")
    assert (refusal["code"], refusal["stream_id"]) == ("unknown_transfer", f"transfer:{u}")
    assert dead.dead_lettered == 0
    bad = json.loads(_record(cancel))
    bad["payload"]["uetr"] = "nope"
    for value in (b"{not json", json.dumps(bad).encode()):
        await br.publish(value, SETTINGS.commands_topic, key=b"bad")
    assert dead.dead_lettered == 2
    assert await pool.fetchval("SELECT count(*) FROM deposits.events") == 0
