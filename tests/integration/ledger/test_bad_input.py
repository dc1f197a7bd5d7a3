"""Hostile and malformed records on a real ``ledger.commands`` topic, through a real writer.

Every record gets exactly one outcome: an answer on the reply topic it names (accepted, or
rejected with the exact code from the ledger's fixed list) or, when not even an envelope can be
read, a dead letter on the writer group's DLQ topic that keeps the original bytes. So
accepted + rejected + dead-lettered == records sent; the writer's task survives all of it, and a
valid command sent after the garbage is applied.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from services.ledger.consumer import WriterLoop
from services.ledger.verify import verify
from services.ledger.writer import LedgerWriter
from shared.events import ledger as wire
from shared.events.envelope import decode, new_envelope
from shared.events.registry import Payload
from shared.events.topics import TopicSpec, dlq_topic
from shared.messaging.admin import ensure_topics
from shared.store.outbox import OutboxRelay
from tests.support import ledger as L


def envelope_doc(payload: Payload, reply_to: str, event_id: uuid.UUID | None = None) -> dict:
    """A valid envelope as a JSON document, ready to be broken."""
    envelope = new_envelope(payload, producer="tests", participant="BANKA", reply_to=reply_to,
                            event_id=event_id or uuid.uuid4())
    return envelope.model_dump(mode="json")


def raw(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def post_doc(posting_id: str, reply_to: str, amount: str = "1.00",
             debit: str = "treasury", credit: str = "c2", asset: str = "HKD") -> dict:
    return envelope_doc(wire.Post(posting_id=posting_id, entries=[
        L.entry(debit, asset, "debit", amount), L.entry(credit, asset, "credit", amount)]),
        reply_to)


TRACE = [("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]


async def publish(bootstrap: str, topic: str, items: list[tuple[bytes | None, int]],
                  headers: dict[int, list[tuple[str, bytes]]] | None = None) -> None:
    """Send ``items`` (value, partition) in order; ``headers`` by item index, else TRACE."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                                max_request_size=2 * 1024 * 1024)
    await producer.start()
    try:
        for i, (value, partition) in enumerate(items):
            await producer.send_and_wait(topic, value, key=b"bad", partition=partition,
                                         headers=(headers or {}).get(i, TRACE))
    finally:
        await producer.stop()


class Reader:
    """Reads a topic from the beginning, keeping everything seen so far."""

    def __init__(self, bootstrap: str, topic: str, writer: asyncio.Task[None]) -> None:
        self.writer = writer  # stop waiting when the writer has died
        self.consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
            group_id=f"reader-{topic}", enable_auto_commit=False,
            max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_bytes=8 * 1024 * 1024)
        self.records: list[Any] = []

    async def until(self, count: int, timeout_s: float = 60) -> list[Any]:
        """At least ``count`` distinct records. A record sent again (the writer answers records
        past its acknowledged watermark again after a rebalance) is the same record: an answer
        keeps its event id, a dead letter its original partition and offset."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        seen = {_identity(r) for r in self.records}
        while len(self.records) < count and loop.time() < deadline and not self.writer.done():
            for batch in (await self.consumer.getmany(timeout_ms=300)).values():
                for r in batch:
                    if _identity(r) not in seen:
                        seen.add(_identity(r))
                        self.records.append(r)
        return self.records


def _identity(record: Any) -> str:
    headers = dict(record.headers or ())
    if "x-harbour-original-offset" in headers:
        return (f"dead:{headers['x-harbour-original-partition'].decode()}:"
                f"{headers['x-harbour-original-offset'].decode()}")
    envelope, _ = decode(record.value)
    return f"answer:{envelope.event_id}"


def reply(record: Any) -> dict:
    envelope, _ = decode(record.value)
    return {"type": envelope.type.removeprefix("ledger."), **envelope.payload}


async def test_every_bad_record_gets_a_code_or_a_dead_letter(
        kafka_bootstrap: str, new_topic, pool: asyncpg.Pool) -> None:
    commands = await new_topic("ledger.commands", partitions=2)
    results = await new_topic("ledger.results", partitions=2)
    group = f"writer-{commands}"
    dlq = dlq_topic(group)
    await ensure_topics(kafka_bootstrap, [TopicSpec(dlq, 1)])

    writer = WriterLoop(pool, LedgerWriter(pool, topic=commands, group_id=group),
                        kafka_bootstrap, topic=commands, group_id=group)
    relay = OutboxRelay(pool, "ledger", kafka_bootstrap, poll_interval_s=0.2,
                        producer_options={"max_request_size": 2 * 1024 * 1024})
    writer_task = asyncio.create_task(writer.run())
    tasks = [writer_task, asyncio.create_task(relay.run())]
    replies = Reader(kafka_bootstrap, results, writer_task)
    letters_in = Reader(kafka_bootstrap, dlq, writer_task)
    await replies.consumer.start()
    await letters_in.consumer.start()
    sent = 0
    try:
        setup = [L.asset("HKD", 2, reply_to=results),
                 L.account("treasury", "HKD", reply_to=results),
                 L.account("c1", "HKD", no_overdraft=True, reply_to=results),
                 L.account("c2", "HKD", no_overdraft=True, reply_to=results),
                 L.transfer("fund", "treasury", "c1", "HKD", "100.00", reply_to=results)]
        await publish(kafka_bootstrap, commands, [(v, 0) for v in setup])
        sent += len(setup)
        got = await replies.until(len(setup))
        assert [reply(r)["type"] for r in got] == ["PostingAccepted"] * len(setup)
        before = await balances(pool)

        # -- the garbage: (value, expected) with expected ("rejected", command_id, code) or
        #    ("dead", error code of the dead letter)
        cases: list[tuple[str, bytes | None, tuple[str, ...]]] = []

        def rejected(name: str, value: bytes, command_id: str, code: str) -> None:
            cases.append((name, value, ("rejected", command_id, code)))

        def dead(name: str, value: bytes | None, code: str) -> None:
            cases.append((name, value, ("dead", code)))

        dead("malformed json", b'{"event_id": "x", "type": ', "malformed_json")
        dead("not utf-8", b"\xff\xfe\x00garbage", "malformed_json")
        dead("json, not an envelope", b'{"hello": "world"}', "invalid_envelope")
        dead("json array", b"[1, 2, 3]", "malformed_json")
        dead("json null", b"null", "malformed_json")
        dead("empty value", b"", "malformed_json")
        dead("null value (tombstone)", None, "malformed_json")
        dead("huge garbage", b"x" * 900_000, "malformed_json")

        doc = envelope_doc(wire.FreezeAccount(account_id="c1"), results)
        doc["type"] = "ledger.Teleport"
        rejected("unknown type", raw(doc), doc["event_id"], "invalid_command")

        doc = post_doc("bad-missing", results)
        del doc["payload"]["entries"]
        rejected("missing field", raw(doc), "bad-missing", "invalid_command")

        doc = post_doc("bad-extra", results)
        doc["payload"]["colour"] = "red"
        rejected("unknown payload field", raw(doc), "bad-extra", "invalid_command")

        doc = post_doc("bad-extra-env", results)
        doc["priority"] = "urgent"
        rejected("unknown envelope field", raw(doc), "bad-extra-env", "invalid_command")

        doc = post_doc("bad-env-missing", results)
        del doc["producer"]
        rejected("missing envelope field", raw(doc), "bad-env-missing", "invalid_command")

        doc = post_doc("bad-dupkey", results)
        text = raw(doc).decode().replace('"posting_id": "bad-dupkey"',
                                         '"posting_id": "bad-dupkey", "posting_id": "other"')
        rejected("duplicate keys", text.encode(), "other", "invalid_command")

        doc = post_doc("bad-unbalanced", results)
        doc["payload"]["entries"][1]["amount"] = "2.00"
        rejected("unbalanced", raw(doc), "bad-unbalanced", "unbalanced")

        rejected("unknown account", raw(post_doc("bad-acct", results, credit="nobody")),
                 "bad-acct", "unknown_account")
        rejected("unknown asset", raw(post_doc("bad-asset", results, asset="XAU")),
                 "bad-asset", "unknown_asset")
        rejected("wrong scale", raw(post_doc("bad-scale", results, amount="1.234")),
                 "bad-scale", "invalid_amount_scale")

        doc = post_doc("bad-number", results)
        for e in doc["payload"]["entries"]:
            e["amount"] = 100
        rejected("JSON-number amount", raw(doc), "bad-number", "invalid_amount")

        doc = post_doc("bad-float", results)
        doc["payload"]["entries"][0]["amount"] = 1.5
        doc["payload"]["entries"][1]["amount"] = 1.5
        rejected("JSON float amount", raw(doc), "bad-float", "invalid_amount")

        rejected("negative", raw(post_doc("bad-neg", results, amount="-5.00")),
                 "bad-neg", "invalid_amount")
        rejected("zero", raw(post_doc("bad-zero", results, amount="0.00")),
                 "bad-zero", "invalid_amount")
        rejected("absurdly large", raw(post_doc("bad-large", results, amount="1" + "0" * 60)),
                 "bad-large", "invalid_amount")
        rejected("just over 10**38-1 minor units",
                 raw(post_doc("bad-over", results, amount="1" + "0" * 36)),
                 "bad-over", "invalid_amount")
        doc = post_doc("bad-exp", results)  # the builder refuses it: break it afterwards
        for e in doc["payload"]["entries"]:
            e["amount"] = "1e5"
        rejected("exponent", raw(doc), "bad-exp", "invalid_amount")

        doc = post_doc("bad-huge", results)
        doc["payload"]["references"] = {"description": "y" * 900_000}
        rejected("huge envelope", raw(doc), "bad-huge", "invalid_command")

        doc = post_doc("bad-nan", results)
        text = raw(doc).decode().replace('"effective_at": null', '"effective_at": NaN')
        rejected("NaN in payload", text.encode(), "bad-nan", "invalid_command")

        rejected("overdraft", raw(post_doc("bad-overdraft", results, amount="500.00",
                                           debit="c1", credit="c2")),
                 "bad-overdraft", "insufficient_funds")

        doc = envelope_doc(wire.OpenAccount(account_id="c8", participant="BANKA", asset="HKD"),
                           results)
        text = raw(doc).decode().replace('"participant": "BANKA"', '"participant": "\\ud800"', 1)
        rejected("lone surrogate in the envelope", text.encode(), doc["event_id"],
                 "invalid_command")

        # NUL can be neither stored in PostgreSQL text nor in jsonb: wherever it hides, the
        # record must still get an outcome (and the writer must not choke on it).
        dead("NUL in a header", b"{nope", "malformed_json")
        nul_header = {len(cases) - 1: [*TRACE, ("note", b"a\x00b")]}
        dead("NUL in a JSON key", b'{"\\u0000": 1}', "malformed_json")
        doc = envelope_doc(wire.OpenAccount(account_id="c9", participant="BANKA", asset="HKD"),
                           results)
        doc["payload"]["participant"] = "BANK\u0000A"
        dead("NUL in a participant", raw(doc), "malformed_json")
        doc = post_doc("bad-nul-id", results)
        doc["payload"]["posting_id"] = "bad\u0000id"
        dead("NUL in a posting id", raw(doc), "malformed_json")
        doc = envelope_doc(wire.CommitGroup(posting_id="bad-nul-group", settlement_group="g"),
                           results)
        doc["payload"]["settlement_group"] = "g\u0000"
        dead("NUL in a settlement group", raw(doc), "malformed_json")
        doc = post_doc("bad-nul-ref", results)
        doc["payload"]["references"] = {"uetr": "\u0000"}
        dead("NUL in a reference", raw(doc), "malformed_json")

        # Spread over both partitions, in order within each.
        await publish(kafka_bootstrap, commands,
                      [(value, i % 2) for i, (_, value, _) in enumerate(cases)], nul_header)
        sent += len(cases)
        want_replies = len(setup) + sum(1 for *_, e in cases if e[0] == "rejected")
        want_dead = sum(1 for *_, e in cases if e[0] == "dead")
        got = await replies.until(want_replies)
        dead_letters = await letters_in.until(want_dead)

        # ... then one good command: applied, the writer is still on its feet.
        await publish(kafka_bootstrap, commands,
                      [(L.transfer("after", "c1", "c2", "HKD", "12.34", reply_to=results), 1)])
        sent += 1
        got = await replies.until(want_replies + 1)
        await asyncio.sleep(1.0)  # nothing more may arrive: one outcome per record
        got = await replies.until(want_replies + 2, timeout_s=0.5)
        dead_letters = await letters_in.until(want_dead + 1, timeout_s=0.5)
        assert not writer_task.done(), writer_task.exception()
    finally:
        writer.stop()
        relay.stop()
        await replies.consumer.stop()
        await letters_in.consumer.stop()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert not any(isinstance(o, BaseException) for o in outcomes), outcomes
    assert writer.applied == sent  # each record applied once, none retried or skipped

    answers = [reply(r) for r in got]
    accepted = [a for a in answers if a["type"] == "PostingAccepted"]
    refused = [a for a in answers if a["type"] == "PostingRejected"]
    assert len(accepted) + len(refused) + len(dead_letters) == sent
    assert len(accepted) == len(setup) + 1 and "after" in {a["command_id"] for a in accepted}
    # The operator's view says the same: what /metrics would serve, per outcome.
    counted = {outcome: writer.metrics.registry.get_sample_value(
                   "harbour_ledger_commands_total", {"outcome": outcome})
               for outcome in ("accepted", "rejected", "dead_lettered", "replayed", "skipped")}
    assert counted == {"accepted": len(accepted), "rejected": len(refused),
                       "dead_lettered": len(dead_letters), "replayed": 0, "skipped": 0}

    by_id = {a["command_id"]: a for a in refused}
    expected_rejections = {e[1]: e[2] for _, _, e in cases if e[0] == "rejected"}
    assert {cid: a["code"] for cid, a in by_id.items()} == expected_rejections
    assert len(refused) == len(expected_rejections)

    # Dead letters keep the original bytes (a null value becomes empty), say why, and where from.
    offsets = _offsets_by_case(cases)
    letters = []
    for r in dead_letters:
        headers = {k: v.decode() for k, v in r.headers}
        assert headers["x-harbour-original-topic"] == commands
        assert headers["traceparent"] == TRACE[0][1].decode()  # the original headers travel on
        assert r.key == b"bad"
        letters.append(((int(headers["x-harbour-original-partition"]),
                         int(headers["x-harbour-original-offset"])),
                        r.value or b"", headers["x-harbour-error-code"]))
    assert sorted(letters) == sorted(
        (offsets[name], value or b"", e[1]) for name, value, e in cases if e[0] == "dead")

    # Nothing the garbage said moved value; the good command did.
    after = await balances(pool)
    dp, cp, dq, cq = before["c1"]
    assert after["c1"] == (dp + 1234, cp, dq, cq)
    dp, cp, dq, cq = before["c2"]
    assert after["c2"] == (dp, cp + 1234, dq, cq)
    assert after["treasury"] == before["treasury"]
    assert (await verify(pool)).ok


def _offsets_by_case(cases: list[tuple[str, bytes | None, tuple[str, ...]]]) -> dict:
    """(partition, offset) of each garbage record: setup took offsets 0..4 of partition 0."""
    next_offset = {0: 5, 1: 0}
    out = {}
    for i, (name, _, _) in enumerate(cases):
        partition = i % 2
        out[name] = (partition, next_offset[partition])
        next_offset[partition] += 1
    return out


async def balances(pool: asyncpg.Pool) -> dict[str, tuple[int, int, int, int]]:
    rows = await pool.fetch("SELECT * FROM ledger.balances")
    return {r["account_id"]: (int(r["debits_posted"]), int(r["credits_posted"]),
                              int(r["debits_pending"]), int(r["credits_pending"])) for r in rows}
