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

    handler = BatchHandler(service, commands_topic=SETTINGS.commands_topic,
                           results_topic=SETTINGS.ledger_results_topic, dead_letter=park,
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
