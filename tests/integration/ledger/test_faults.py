"""The ledger process under faults: kill -9, two writers with a rebalance, duplicates, replay.

Each test runs ``python -m services.ledger.app`` as child processes against its own topic, group
and database, and checks what an operator would: balances equal those computed independently
from the generated commands (tests/support/ledger_run.py), no posting applied twice (the set of
posting ids and the count and sum of entries), ``verify`` passes, one stored result per command,
and every command answered on the reply topic (relay crashes may repeat an answer byte for byte,
never produce a second, different one).

A failure prints its seed; ``HARBOUR_FAULT_SEED=<seed>`` replays the same commands and kill plan.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from services.ledger.verify import verify
from tests.support import ledger_run as R

ACCEPTED, REJECTED = "ledger.PostingAccepted", "ledger.PostingRejected"
_ASSIGNED = re.compile(r"Setting newly assigned partitions (\{.*\}|set\(\)) for group")

NewTopic = Callable[..., Awaitable[str]]


# -- what an operator checks ------------------------------------------------------------------


async def assert_ledger_outcome(pool: asyncpg.Pool, s: R.Scenario, note: str) -> R.Snapshot:
    """Balances, postings, entries, stored results and the verifier, against expectations."""
    snap = await R.ledger_snapshot(pool)
    expected = s.expected_balances()
    wrong = {a: (snap.balances.get(a), want) for a, want in expected.items()
             if snap.balances.get(a) != want}
    assert not wrong, f"{note}: {len(wrong)} balances differ, e.g. {list(wrong.items())[:5]}"
    assert set(snap.balances) == set(expected), note
    want_postings = s.accepted_postings()
    assert snap.postings == len(want_postings), note
    assert snap.posting_ids == want_postings, (
        f"{note}: missing {sorted(want_postings - snap.posting_ids)[:5]}, "
        f"unexpected {sorted(snap.posting_ids - want_postings)[:5]}")
    assert (snap.entries, snap.entries_sum) == s.expected_entries(), note
    # Exactly one stored outcome per command, each the expected one.
    assert set(snap.results) == s.command_ids(), (
        f"{note}: results for {len(snap.results)} of {len(s.command_ids())} commands")
    rejections = {cid: code for cid, (ok, code) in snap.results.items() if not ok}
    assert rejections == s.expected_rejections(), note
    report = await verify(pool)
    assert report.ok, f"{note}: verify: {report.mismatches[:5]}"
    assert report.postings == len(want_postings), note
    return snap


def assert_replies_once(s: R.Scenario, replies: list[R.Reply], note: str) -> None:
    """Every command answered; copies are re-sends of one answer (same event id: an answer's id
    is derived from the record it answers, and each command here was published once)."""
    by_id = R.dedupe_replies(replies)
    assert set(by_id) == s.command_ids(), (
        f"{note}: {len(by_id)} of {len(s.command_ids())} commands answered; missing "
        f"{sorted(s.command_ids() - set(by_id))[:5]}")
    rejections = s.expected_rejections()
    for cid, copies in by_id.items():
        first = copies[0]
        assert {c.event_id for c in copies} == {first.event_id}, (
            f"{note}: {cid} answered {len(copies)} times with different envelopes: a command "
            f"was applied more than once: {[c.payload for c in copies]}")
        assert first.payload["duplicate"] is False, (note, first.payload)
        if cid in rejections:
            assert (first.type, first.payload["code"]) == (REJECTED, rejections[cid]), (note, cid)
        else:
            assert first.type == ACCEPTED, (note, cid, first.payload)


def assigned_partitions(log: Path) -> list[int]:
    """How many partitions each assignment in a ledger process log gave it."""
    out = []
    for m in _ASSIGNED.finditer(log.read_text(errors="replace")):
        out.append(0 if m.group(1) == "set()" else m.group(1).count("TopicPartition("))
    return out


async def run_setup(kafka_bootstrap: str, commands: str, pool: asyncpg.Pool, s: R.Scenario,
                    procs: R.Processes) -> None:
    """Asset, accounts and funding on one partition, applied before any transfer is sent."""
    await R.publish(kafka_bootstrap, commands, s.setup_items(), partition=0)
    await R.wait_applied_and_relayed(pool, commands, len(s.setup), timeout_s=60, procs=procs)


# -- 1. kill -9 during a 20,000-command run ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_kill_9_during_20k_command_run_changes_nothing_but_time(
        kafka_bootstrap: str, new_topic: NewTopic, db_url: str, pool: asyncpg.Pool,
        tmp_path: Path) -> None:
    seed = R.fault_seed()
    rng = random.Random(seed)
    note = f"seed {seed}"
    commands = await new_topic("ledger.commands", partitions=8)
    results = await new_topic("ledger.results", partitions=4)
    s = R.make_scenario(rng, accounts=200, transfers=20_000, reply_to=results)
    total = len(s.setup) + len(s.transfers)
    group = f"writer-{commands}"
    kills: list[tuple[str, int, bool]] = []  # (mode, records applied at the kill, in a write tx)
    began = time.monotonic()
    async with R.Processes(db_url=db_url, bootstrap=kafka_bootstrap, topic=commands,
                           log_dir=tmp_path) as procs:
        # Every restart is the same static group member (as under `make up` and compose): it
        # gets its partitions back at once. (Dynamic membership is killed -9 in test 2.)
        proc = await procs.start(group, "writer-0", instance_id="writer")
        await run_setup(kafka_bootstrap, commands, pool, s, procs)
        # A steady client; the last 2,000 transfers wait for the fifth kill, so every kill lands
        # mid-run.
        feed = R.Feed(kafka_bootstrap, commands, s.transfer_items(), rate_per_s=400, held=2_000)
        try:
            while len(kills) < 6:
                before = await R.consumed(pool, commands)
                mode = rng.choice(["backlog", "steady", "in_tx", "in_tx", "startup"])
                if mode == "startup":  # during import, group join or the seek to stored offsets
                    await asyncio.sleep(rng.uniform(0.2, 4.0))
                    await proc.kill()
                    in_tx = False
                else:
                    await R.wait_for(
                        f"{proc.name} to apply records",
                        lambda b=before: _reached(pool, commands, b + 1),
                        timeout_s=60, interval_s=0.02, detail=procs.logs)
                    if mode == "backlog":  # while it catches up on what piled up while down
                        await asyncio.sleep(rng.uniform(0.0, 0.4))
                        await proc.kill()
                        in_tx = False
                    else:
                        await asyncio.sleep(rng.uniform(0.0, 1.5))
                        in_tx = await proc.kill_in_transaction(pool) if mode == "in_tx" else (
                            await proc.kill() or False)
                kills.append((mode, await R.consumed(pool, commands), in_tx))
                assert not procs.crashed(), procs.logs()
                if len(kills) == 5:
                    feed.release()
                proc = await procs.start(group, f"writer-{len(kills)}", instance_id="writer")
            await feed.finish(timeout_s=120)
            await R.wait_applied_and_relayed(pool, commands, total, timeout_s=120, procs=procs)
            assert await proc.stop() == 0, procs.logs()
        finally:
            feed.cancel()
    took = time.monotonic() - began
    mid_run = [k for k in kills if k[1] < total]
    replies = await R.read_topic(kafka_bootstrap, results)
    print(f"\n{note}: {len(kills)} kills (mode, applied, in write tx) {kills}; "
          f"{len(replies) - len(s.command_ids())} answers re-sent by the relay; run {took:.1f}s")
    assert len(mid_run) >= 5, f"{note}: only {len(mid_run)} kills landed mid-run: {kills}"
    await assert_ledger_outcome(pool, s, note)
    assert_replies_once(s, replies, note)


async def _reached(pool: asyncpg.Pool, topic: str, n: int) -> bool:
    return await R.consumed(pool, topic) >= n


# -- 2. two writers in one group, rebalances mid-run -------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_two_writers_in_one_group_with_rebalances_mid_run(
        kafka_bootstrap: str, new_topic: NewTopic, db_url: str, pool: asyncpg.Pool,
        tmp_path: Path) -> None:
    """A alone; B joins (both own partitions, every partition progresses); A is killed -9 in a
    write transaction and B takes everything; A comes back and they share again; B leaves with
    SIGTERM mid-run and A finishes. Same outcome as one writer."""
    seed = R.fault_seed()
    rng = random.Random(seed)
    note = f"seed {seed}"
    commands = await new_topic("ledger.commands", partitions=8)
    results = await new_topic("ledger.results", partitions=4)
    s = R.make_scenario(rng, accounts=200, transfers=12_000, reply_to=results)
    total = len(s.setup) + len(s.transfers)
    group = f"writer-{commands}"
    began = time.monotonic()
    events: list[tuple[str, int]] = []
    async with R.Processes(db_url=db_url, bootstrap=kafka_bootstrap, topic=commands,
                           log_dir=tmp_path) as procs:
        a = await procs.start(group, "writer-a")
        await run_setup(kafka_bootstrap, commands, pool, s, procs)
        feed = R.Feed(kafka_bootstrap, commands, s.transfer_items(), rate_per_s=400, held=2_000)
        try:
            await R.wait_for("a quarter of the transfers",
                             lambda: _reached(pool, commands, len(s.setup) + 2_500),
                             timeout_s=60, detail=procs.logs)
            b = await procs.start(group, "writer-b")
            await _both_share(pool, commands, a, b, procs)
            events.append(("b joined, both progressed", await R.consumed(pool, commands)))
            in_tx = await a.kill_in_transaction(pool)
            events.append((f"a killed -9 (in write tx: {in_tx})",
                           await R.consumed(pool, commands)))
            await R.wait_for("writer-b to own all partitions", lambda: _owns_all(b.log_path),
                             timeout_s=60, detail=procs.logs)
            a2 = await procs.start(group, "writer-a2")
            await _both_share(pool, commands, a2, b, procs)
            events.append(("a2 joined, both progressed", await R.consumed(pool, commands)))
            assert await b.stop() == 0, procs.logs()
            events.append(("b stopped (SIGTERM)", await R.consumed(pool, commands)))
            await R.wait_for("writer-a2 to own all partitions", lambda: _owns_all(a2.log_path),
                             timeout_s=60, detail=procs.logs)
            await feed.finish(timeout_s=120)
            await R.wait_applied_and_relayed(pool, commands, total, timeout_s=120, procs=procs)
            assert await a2.stop() == 0, procs.logs()
        finally:
            feed.cancel()
    print(f"\n{note}: {events} of {total}; run {time.monotonic() - began:.1f}s")
    assert all(n < total for _, n in events), f"{note}: a rebalance came after the run: {events}"
    await assert_ledger_outcome(pool, s, note)
    assert_replies_once(s, await R.read_topic(kafka_bootstrap, results), note)


async def _both_share(pool: asyncpg.Pool, topic: str, x: R.LedgerProcess, y: R.LedgerProcess,
                      procs: R.Processes) -> None:
    """Wait until x and y each own partitions (8 between them) and every partition moved."""
    async def shared() -> bool:
        px, py = assigned_partitions(x.log_path), assigned_partitions(y.log_path)
        return bool(px) and bool(py) and px[-1] > 0 and py[-1] > 0 and px[-1] + py[-1] == 8
    await R.wait_for(f"{x.name} and {y.name} to share the partitions", shared, timeout_s=60,
                     detail=procs.logs)
    async with pool.acquire() as conn:
        at_join = await _offsets(conn, topic)
    await R.wait_for("every partition to progress under two writers",
                     lambda: _all_advanced(pool, topic, at_join), timeout_s=60,
                     detail=procs.logs)


async def _offsets(conn: asyncpg.Connection, topic: str) -> dict[int, int]:
    rows = await conn.fetch("SELECT partition, next_offset FROM ledger.consumed_offsets "
                            "WHERE topic = $1", topic)
    return {r["partition"]: r["next_offset"] for r in rows}


async def _all_advanced(pool: asyncpg.Pool, topic: str, before: dict[int, int]) -> bool:
    async with pool.acquire() as conn:
        now = await _offsets(conn, topic)
    return len(now) == 8 and all(now[p] > before.get(p, 0) for p in range(8))


async def _owns_all(log: Path) -> bool:
    parts = assigned_partitions(log)
    return bool(parts) and parts[-1] == 8


# -- 3. duplicates and replay ------------------------------------------------------------------


def doubled(items: list[R.Item]) -> list[R.Item]:
    """Every record twice, same bytes: even ones right after themselves (same batch, most
    likely), odd ones again after everything (a later batch)."""
    out: list[R.Item] = []
    for i, item in enumerate(items):
        out += [item, item] if i % 2 == 0 else [item]
    return out + [item for i, item in enumerate(items) if i % 2 == 1]


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_every_command_published_twice_is_applied_once_and_answered_as_duplicate(
        kafka_bootstrap: str, new_topic: NewTopic, db_url: str, pool: asyncpg.Pool,
        tmp_path: Path) -> None:
    seed = R.fault_seed()
    note = f"seed {seed}"
    commands = await new_topic("ledger.commands", partitions=4)
    results = await new_topic("ledger.results", partitions=4)
    s = R.make_scenario(random.Random(seed), accounts=100, transfers=5_000, reply_to=results)
    setup, transfers = doubled(s.setup_items()), doubled(s.transfer_items())
    async with R.Processes(db_url=db_url, bootstrap=kafka_bootstrap, topic=commands,
                           log_dir=tmp_path) as procs:
        proc = await procs.start(f"writer-{commands}", "writer")
        await R.publish(kafka_bootstrap, commands, setup, partition=0)
        await R.wait_applied_and_relayed(pool, commands, len(setup), timeout_s=60, procs=procs)
        await R.publish(kafka_bootstrap, commands, transfers)
        await R.wait_applied_and_relayed(pool, commands, len(setup) + len(transfers),
                                         timeout_s=120, procs=procs)
        assert await proc.stop() == 0, procs.logs()
    await assert_ledger_outcome(pool, s, note)
    by_id = R.dedupe_replies(await R.read_topic(kafka_bootstrap, results))
    assert set(by_id) == s.command_ids(), note
    assert_resends_identical(by_id, note)
    wrong = [(cid, [(c.type, c.payload) for c in copies]) for cid, copies in by_id.items()
             if not _original_then_duplicate(_per_record(copies))]
    assert not wrong, (f"{note}: {len(wrong)} of {len(by_id)} commands not answered "
                       f"original-then-identical-duplicate ({_diagnose(wrong)}), "
                       f"e.g. {wrong[:2]}")


def _diagnose(wrong: list[tuple[str, list[tuple[str, dict]]]]) -> str:
    """Name the ways duplicate answers differ from the originals, with counts."""
    kinds: dict[str, int] = {}
    for _, copies in wrong:
        if [p["duplicate"] for _, p in copies] != [False, True]:
            k = f"flags {[p['duplicate'] for _, p in copies]}"
        else:
            (t0, p0), (t1, p1) = copies
            diff = sorted(f for f in set(p0) | set(p1)
                          if f != "duplicate" and p0.get(f) != p1.get(f))
            none = all(p1.get(f) is None for f in diff)
            k = f"{t0 if t0 == t1 else t0 + '->' + t1} differs in {diff}" + (
                " (None in the duplicate)" if none else "")
        kinds[k] = kinds.get(k, 0) + 1
    return "; ".join(f"{n} x {k}" for k, n in sorted(kinds.items()))


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_copies_on_other_partitions_under_two_writers_are_applied_once(
        kafka_bootstrap: str, new_topic: NewTopic, db_url: str, pool: asyncpg.Pool,
        tmp_path: Path) -> None:
    """A client retry that lands on another partition (another key): the original and its copy
    are in flight at once on partitions owned by different writers. One applies it, the other
    must answer it as a duplicate (a race on the journal's keys is retried, never doubled)."""
    seed = R.fault_seed()
    note = f"seed {seed}"
    commands = await new_topic("ledger.commands", partitions=8)
    results = await new_topic("ledger.results", partitions=4)
    s = R.make_scenario(random.Random(seed), accounts=100, transfers=5_000, reply_to=results,
                        order_free=True)
    items = [x for value, key in s.transfer_items()
             for x in ((value, key), (value, b"retry:" + (key or b"")))]
    group = f"writer-{commands}"
    async with R.Processes(db_url=db_url, bootstrap=kafka_bootstrap, topic=commands,
                           log_dir=tmp_path) as procs:
        a = await procs.start(group, "writer-a")
        await run_setup(kafka_bootstrap, commands, pool, s, procs)
        b = await procs.start(group, "writer-b")
        await R.wait_for("writer-a and writer-b to share the partitions",
                         lambda: _shared(a.log_path, b.log_path), timeout_s=60,
                         detail=procs.logs)
        await R.publish(kafka_bootstrap, commands, items)
        await R.wait_applied_and_relayed(pool, commands, len(s.setup) + len(items),
                                         timeout_s=120, procs=procs)
        assert await a.stop() == 0, procs.logs()
        assert await b.stop() == 0, procs.logs()
    races = sum(p.log_path.read_text().count("batch raced another writer") for p in procs.started)
    print(f"\n{note}: {races} batches raced the other writer and were retried")
    await assert_ledger_outcome(pool, s, note)
    by_id = R.dedupe_replies(await R.read_topic(kafka_bootstrap, results))
    assert set(by_id) == s.command_ids(), note
    assert_resends_identical(by_id, note)
    transfers = {t.posting_id for t in s.transfers}
    # The two records sit on partitions owned by different writers, and each writer answers after
    # its own commit: the duplicate's answer may reach the reply topic before the original's.
    # What must hold is one original and one duplicate, saying the same thing, in any order.
    answers = {cid: _original_first(copies) for cid, copies in by_id.items() if cid in transfers}
    wrong = [(cid, [(c.type, c.payload) for c in once]) for cid, once in answers.items()
             if not _original_then_duplicate(once)]
    assert not wrong, (f"{note}: {len(wrong)} transfers not answered once as original and once "
                       f"as duplicate ({_diagnose(wrong)}), e.g. {wrong[:2]}")


async def _shared(x: Path, y: Path) -> bool:
    px, py = assigned_partitions(x), assigned_partitions(y)
    return bool(px) and bool(py) and px[-1] > 0 and py[-1] > 0 and px[-1] + py[-1] == 8


def _per_record(copies: list[R.Reply]) -> list[R.Reply]:
    """One answer per command record: re-sends of an answer share its event id."""
    seen: dict[str, R.Reply] = {}
    for c in copies:
        seen.setdefault(c.event_id, c)
    return list(seen.values())


def _original_first(copies: list[R.Reply]) -> list[R.Reply]:
    """One answer per record, the deciding record's first (for answers with no order between)."""
    return sorted(_per_record(copies), key=lambda c: bool(c.payload["duplicate"]))


def assert_resends_identical(by_id: dict[str, list[R.Reply]], note: str) -> None:
    """An answer sent again (after a crash, a re-seek or a rebalance) says what it said first."""
    for cid, copies in by_id.items():
        first: dict[str, R.Reply] = {}
        for c in copies:
            original = first.setdefault(c.event_id, c)
            assert (c.type, c.payload) == (original.type, original.payload), (
                f"{note}: {cid}: answer {c.event_id} sent again with a different body: "
                f"{original.payload} then {c.payload}")


def _original_then_duplicate(copies: list[R.Reply]) -> bool:
    if [c.payload["duplicate"] for c in copies] != [False, True]:
        return False
    original, again = copies
    return again.type == original.type and {**again.payload, "duplicate": False} == \
        original.payload


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_replaying_the_topic_from_offset_zero_in_a_fresh_group_changes_nothing(
        kafka_bootstrap: str, new_topic: NewTopic, db_url: str, pool: asyncpg.Pool,
        tmp_path: Path) -> None:
    seed = R.fault_seed()
    note = f"seed {seed}"
    commands = await new_topic("ledger.commands", partitions=4)
    results = await new_topic("ledger.results", partitions=4)
    s = R.make_scenario(random.Random(seed), accounts=100, transfers=5_000, reply_to=results)
    total = len(s.setup) + len(s.transfers)
    async with R.Processes(db_url=db_url, bootstrap=kafka_bootstrap, topic=commands,
                           log_dir=tmp_path) as procs:
        first = await procs.start(f"writer-{commands}", "writer")
        await run_setup(kafka_bootstrap, commands, pool, s, procs)
        await R.publish(kafka_bootstrap, commands, s.transfer_items())
        await R.wait_applied_and_relayed(pool, commands, total, timeout_s=120, procs=procs)
        assert await first.stop() == 0, procs.logs()
        before = await assert_ledger_outcome(pool, s, note)
        replies_end = await R.end_offsets(kafka_bootstrap, results)
        # Forget the progress (not the journal) and read everything again in a new group.
        await pool.execute("DELETE FROM ledger.consumed_offsets")
        replay = await procs.start(f"replay-{commands}", "replay")
        await R.wait_applied_and_relayed(pool, commands, total, timeout_s=120, procs=procs)
        assert await replay.stop() == 0, procs.logs()
    after = await assert_ledger_outcome(pool, s, note + " after replay")
    assert after == before, f"{note}: the replay changed the ledger"
    replies = await R.read_topic(kafka_bootstrap, results)
    first = R.dedupe_replies(r for r in replies if r.offset < replies_end[r.partition])
    again = R.dedupe_replies(r for r in replies if r.offset >= replies_end[r.partition])
    assert set(first) == set(again) == s.command_ids(), note
    # The same records read again get the same answers again: same event id (consumers' inboxes
    # drop them) and the same body, chain place included. Nothing was decided anew.
    wrong = [(cid, [(c.event_id, c.type, c.payload) for c in (first[cid][0], *copies)])
             for cid, copies in again.items()
             if any((c.event_id, c.type, c.payload) != (first[cid][0].event_id,
                    first[cid][0].type, first[cid][0].payload) for c in copies)]
    assert not wrong, (f"{note}: {len(wrong)} replayed commands answered differently from the "
                       f"first time, e.g. {wrong[:2]}")
