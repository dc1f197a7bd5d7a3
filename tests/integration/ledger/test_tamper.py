"""Tamper evidence on real PostgreSQL: the journal refuses edits, and edits that get past the
refusal (a superuser disabling triggers) are named by ``verify`` and by ``harbour verify``.

- UPDATE, DELETE and TRUNCATE on ``ledger.postings`` / ``entries`` / ``results`` fail for
  everybody, the superuser included, because triggers refuse them;
- with ``deploy/postgres-roles.sql`` applied, the service role ``harbour_ledger`` may INSERT and
  SELECT the journal but is denied UPDATE, DELETE, TRUNCATE (and disabling the triggers) by
  privileges, and the writer runs under that role;
- a row altered with the triggers disabled (an entry's amount, a posting's metadata, a posting
  removed, a balance edited) makes ``verify`` fail naming the posting or account, and the CLI
  exits non-zero;
- a superuser who also recomputes every hash after the edit leaves consistent chains, but not the
  anchors kept outside the database (``harbour ledger anchor``, clients' receipts).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sys
from pathlib import Path

import asyncpg
import pytest

from services.ledger import domain as d
from services.ledger.verify import Anchor, _as_result, _postings, chain_heads, verify
from services.ledger.writer import LedgerWriter, Record
from shared.clock import ManualClock
from shared.events import ledger as wire
from tests.support import ledger as L

ROOT = Path(__file__).resolve().parents[3]
ROLES_SQL = ROOT / "deploy" / "postgres-roles.sql"
JOURNAL = ("postings", "entries", "results")
# One harmless "change" per journal table (sets a column to itself).
NOOP_UPDATE = {
    "postings": "UPDATE ledger.postings SET kind = kind",
    "entries": "UPDATE ledger.entries SET amount = amount",
    "results": "UPDATE ledger.results SET detail = detail",
}


def records(values: list[bytes], start: int = 0) -> list[Record]:
    return [Record(0, start + i, b"k", v) for i, v in enumerate(values)]


def commit(posting_id: str, pending_id: str) -> bytes:
    return L.record(wire.CommitPending(posting_id=posting_id, pending_id=pending_id))


def commit_group(posting_id: str, group: str) -> bytes:
    return L.record(wire.CommitGroup(posting_id=posting_id, settlement_group=group))


def referenced_transfer(posting_id: str, debit: str, credit: str, amount: str) -> bytes:
    return L.record(wire.Post(
        posting_id=posting_id,
        entries=[L.entry(debit, "HKD", "debit", amount), L.entry(credit, "HKD", "credit", amount)],
        references=wire.References(uetr="eb6305c9-1f7f-49de-aed0-16487c27b42d",
                                   end_to_end_id="E2E-0001")))


LEDGER = [
    L.asset("HKD", 2),
    L.account("bank:cash", "HKD"),
    L.account("cust:1", "HKD", no_overdraft=True),
    L.account("cust:2", "HKD", no_overdraft=True),
    L.transfer("p1", "bank:cash", "cust:1", "HKD", "1000.00"),
    referenced_transfer("p2", "cust:1", "cust:2", "250.75"),
    L.pending("h1", "cust:1", "cust:2", "HKD", "100.00"),
    commit("c1", "h1"),
    L.pending("g1a", "cust:2", "cust:1", "HKD", "10.00", group="g1"),
    L.pending("g1b", "cust:1", "cust:2", "HKD", "20.00", group="g1"),
    commit_group("cg1", "g1"),
    L.transfer("p3", "cust:2", "cust:1", "HKD", "5.00"),
    L.transfer("too-much", "cust:2", "cust:1", "HKD", "99999.00"),  # rejected: a results row
]


async def seed(pool: asyncpg.Pool) -> None:
    report = await LedgerWriter(pool).apply_batch(records(LEDGER))
    assert (report.accepted, report.rejected) == (len(LEDGER) - 1, 1)
    assert (await verify(pool)).ok


async def counts(conn: asyncpg.Connection) -> dict[str, int]:
    return {t: await conn.fetchval(f"SELECT count(*) FROM ledger.{t}") for t in JOURNAL}


# --------------------------------------------------------------------------------------------
# The triggers: nobody edits the journal, not even a superuser
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("table", JOURNAL)
async def test_the_journal_refuses_edits_even_from_a_superuser(
        pool: asyncpg.Pool, table: str) -> None:
    await seed(pool)
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        before = await counts(conn)
        for sql in (NOOP_UPDATE[table],
                    f"DELETE FROM ledger.{table}",
                    f"TRUNCATE ledger.{table} CASCADE"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                async with conn.transaction():
                    await conn.execute(sql)
        # Plain TRUNCATE of a referenced table fails already on its foreign keys; either way
        # nothing goes.
        with pytest.raises(asyncpg.PostgresError):
            async with conn.transaction():
                await conn.execute(f"TRUNCATE ledger.{table}")
        assert await counts(conn) == before
    assert (await verify(pool)).ok


# --------------------------------------------------------------------------------------------
# The service role: INSERT and SELECT only
# --------------------------------------------------------------------------------------------


async def apply_roles(conn: asyncpg.Connection) -> None:
    """deploy/postgres-roles.sql as written; roles are per cluster, so a concurrent session
    may create them between the script's check and its CREATE: then just run it again."""
    sql = ROLES_SQL.read_text()
    for attempt in range(3):
        try:
            await conn.execute(sql)
            return
        except (asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
            if attempt == 2:
                raise


FAKE_POSTING = """INSERT INTO ledger.postings (id, kind, partition, sequence, effective_at, hash)
                  VALUES ('forged', 'post', 99, 1, now(), '\\x00')"""
FAKE_ENTRY = """INSERT INTO ledger.entries (posting_id, idx, account_id, asset, direction, phase,
                    amount) VALUES ('forged', 0, 'cust:1', 'HKD', 'C', 'posted', 1)"""
FAKE_RESULT = """INSERT INTO ledger.results (command_id, request_hash, command_type, accepted)
                 VALUES ('forged', '\\x00', 'post', true)"""


async def test_the_service_role_may_insert_and_select_the_journal_but_never_change_it(
        pool: asyncpg.Pool) -> None:
    await seed(pool)
    async with pool.acquire() as conn:
        await apply_roles(conn)
        before = await counts(conn)

        async def as_role(role: str, sql: str) -> None:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL ROLE {role}")
                await conn.execute(sql)

        for table in JOURNAL:
            for sql in (NOOP_UPDATE[table], f"DELETE FROM ledger.{table}",
                        f"TRUNCATE ledger.{table} CASCADE"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
                    await as_role("harbour_ledger", sql)
            # Nor may it switch the guard off.
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="must be owner"):
                await as_role("harbour_ledger", f"ALTER TABLE ledger.{table} DISABLE TRIGGER ALL")
            # The read side may not even append.
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
                await as_role("harbour_reader", {"postings": FAKE_POSTING,
                                                 "entries": FAKE_ENTRY,
                                                 "results": FAKE_RESULT}[table])

        # INSERT and SELECT work (rolled back: the forged rows are not part of any chain).
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute("SET LOCAL ROLE harbour_ledger")
            assert await conn.fetchval("SELECT current_user") == "harbour_ledger"
            for sql in (FAKE_POSTING, FAKE_ENTRY, FAKE_RESULT):
                await conn.execute(sql)
            assert await conn.fetchval(
                "SELECT count(*) FROM ledger.entries WHERE posting_id = 'forged'") == 1
            assert await counts(conn) == {t: n + 1 for t, n in before.items()}
        finally:
            await tx.rollback()
        assert await counts(conn) == before
    assert (await verify(pool)).ok


async def test_the_writer_runs_as_the_service_role(db_url: str, pool: asyncpg.Pool) -> None:
    """Least privilege must still be enough privilege: every kind of command, a dead letter and
    an expiry, applied by a writer whose connections are ``harbour_ledger``."""
    async with pool.acquire() as conn:
        await apply_roles(conn)
    service = await asyncpg.create_pool(db_url, min_size=1, max_size=2,
                                        server_settings={"role": "harbour_ledger"})
    assert service is not None
    try:
        assert await service.fetchval("SELECT current_user") == "harbour_ledger"
        writer = LedgerWriter(service)
        values = [*LEDGER, b"{not json",
                  L.pending("h2", "cust:1", "cust:2", "HKD", "1.00", timeout_s=1),
                  L.pending("g2a", "cust:1", "cust:2", "HKD", "1.00", group="g2"),
                  L.record(wire.VoidGroup(posting_id="vg2", settlement_group="g2")),
                  L.record(wire.FreezeAccount(account_id="cust:2")),
                  L.record(wire.UnfreezeAccount(account_id="cust:2"))]
        report = await writer.apply_batch(records(values))
        assert (report.accepted, report.rejected, report.dead_lettered) == (
            len(values) - 2, 1, 1)
        writer.clock = ManualClock(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5))
        assert await writer.expire_due([0]) == 1
    finally:
        await service.close()
    # A fund administrator verifies with the read-only role.
    reader = await asyncpg.create_pool(db_url, min_size=1, max_size=1,
                                       server_settings={"role": "harbour_reader"})
    assert reader is not None
    try:
        report = await verify(reader)
    finally:
        await reader.close()
    assert report.ok, report.mismatches


# --------------------------------------------------------------------------------------------
# Edits behind the triggers' back are named by verify and by `harbour verify`
# --------------------------------------------------------------------------------------------


async def tamper(pool: asyncpg.Pool, table: str, sql: str) -> None:
    """What a superuser with bad intent can do: switch the guard off, edit, switch it on."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(f"ALTER TABLE ledger.{table} DISABLE TRIGGER ALL")
        status = await conn.execute(sql)
        assert status.split()[-1] != "0", f"{sql!r} changed nothing"
        await conn.execute(f"ALTER TABLE ledger.{table} ENABLE TRIGGER ALL")


async def harbour_verify(db_url: str, *args: str) -> tuple[int, str]:
    return await harbour(db_url, "verify", *args)


async def harbour(db_url: str, *args: str) -> tuple[int, str]:
    env = {**os.environ, "HARBOUR_DATABASE_URL": db_url, "COLUMNS": "400"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def test_the_cli_passes_an_untouched_ledger(db_url: str, pool: asyncpg.Pool) -> None:
    await seed(pool)
    code, out = await harbour_verify(db_url)
    assert code == 0, out
    assert "verified" in out


TAMPERING = {
    # name: (table, sql, what the first mismatch must name, what some mismatch must name)
    "entry amount": (
        "entries",
        "UPDATE ledger.entries SET amount = amount + 1 WHERE posting_id = 'p2' AND idx = 0",
        "posting p2", "account cust:1"),
    "entry account": (
        "entries",
        "UPDATE ledger.entries SET account_id = 'bank:cash' WHERE posting_id = 'p2' AND idx = 1",
        "posting p2", "account bank:cash"),
    "posting metadata": (
        "postings",
        """UPDATE ledger.postings SET metadata = '{"uetr": "00000000-forged"}' WHERE id = 'p2'""",
        "posting p2", "posting p2"),
    "posting value date": (
        "postings",
        "UPDATE ledger.postings SET effective_at = effective_at - interval '1 day'"
        " WHERE id = 'c1'",
        "posting c1", "posting c1"),
    # No foreign keys on the journal's hot path (migration 0002): verify checks the references.
    "entry moved to an account that does not exist": (
        "entries",
        "UPDATE ledger.entries SET account_id = 'ghost:9' WHERE posting_id = 'p2' AND idx = 1",
        "entry p2#1: account ghost:9 does not exist", "posting p2"),
    "entry added without a posting": (
        "entries",
        "INSERT INTO ledger.entries VALUES ('forged', 0, 'cust:1', 'HKD', 'C', 'posted', 500)",
        "entry forged#0: posting forged does not exist", "account cust:1"),
    "posting removed, its entries left": (
        "postings",
        "DELETE FROM ledger.postings WHERE id = 'p2'",
        "posting p2 does not exist", "posting h1"),
    "posting removed": (  # the hole is named at the posting after it
        "postings",
        "DELETE FROM ledger.postings WHERE id = 'p2'",
        "posting h1", "account cust:2"),
}


@pytest.mark.parametrize("name", list(TAMPERING))
async def test_verify_names_what_was_altered(db_url: str, pool: asyncpg.Pool, name: str) -> None:
    table, sql, first, some = TAMPERING[name]
    await seed(pool)
    if name == "posting removed":  # its entries first (they reference it)
        await tamper(pool, "entries", "DELETE FROM ledger.entries WHERE posting_id = 'p2'")
    await tamper(pool, table, sql)

    report = await verify(pool)
    assert not report.ok
    assert first in (report.first_mismatch or ""), report.mismatches
    assert any(some in m for m in report.mismatches), report.mismatches
    code, out = await harbour_verify(db_url)
    assert code != 0, out
    assert "MISMATCH" in out and first in out, out


async def test_verify_names_an_edited_balance(db_url: str, pool: asyncpg.Pool) -> None:
    """Balances are a projection (no trigger): an edit there is caught by recomputation."""
    await seed(pool)
    await pool.execute(
        "UPDATE ledger.balances SET credits_posted = credits_posted + 100 "
        "WHERE account_id = 'cust:2'")
    report = await verify(pool)
    assert not report.ok
    assert "account cust:2" in (report.first_mismatch or ""), report.mismatches
    code, out = await harbour_verify(db_url)
    assert code != 0 and "cust:2" in out, out


# --------------------------------------------------------------------------------------------
# Anchors: a rewrite that recomputes the chain is consistent, but not with what was kept outside
# --------------------------------------------------------------------------------------------


async def rewrite_history(pool: asyncpg.Pool, sql: str) -> None:
    """The worst insider: edits the journal, then recomputes every hash (postings, results,
    chain heads) so that the chains are consistent again."""
    async with pool.acquire() as conn, conn.transaction():
        for table in JOURNAL:
            await conn.execute(f"ALTER TABLE ledger.{table} DISABLE TRIGGER ALL")
        await conn.execute(sql)
        chains = [(p, e) async for p, e in _postings(conn)]
        prev: dict[int, bytes] = {}
        for posting, entries in chains:
            partition = posting["partition"]
            digest = d.chain_hash(prev.get(partition, d.GENESIS_HASH),
                                  d.canonical_posting_bytes(_as_result(posting, entries)))
            prev[partition] = digest
            await conn.execute("UPDATE ledger.postings SET hash = $2 WHERE id = $1",
                               posting["id"], digest)
            await conn.execute("UPDATE ledger.results SET hash = $2 WHERE posting_id = $1",
                               posting["id"], digest)
        for partition, digest in prev.items():
            await conn.execute("UPDATE ledger.chain_heads SET hash = $2 WHERE partition = $1",
                               partition, digest)
        for table in JOURNAL:
            await conn.execute(f"ALTER TABLE ledger.{table} ENABLE TRIGGER ALL")


async def test_anchors_catch_a_rewrite_that_recomputed_the_chain(
        db_url: str, pool: asyncpg.Pool, tmp_path: Path) -> None:
    await seed(pool)
    code, out = await harbour(db_url, "ledger", "anchor")
    assert code == 0, out
    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text(out)
    async with pool.acquire() as conn:
        assert [a.to_json() for a in await chain_heads(conn)] == [
            Anchor.from_json(json.loads(line)).to_json()
            for line in out.splitlines() if line.strip()]
    code, out = await harbour_verify(db_url, "--anchors", str(anchors))
    assert code == 0 and "1 anchors" in out, out

    # A transfer's beneficiary swapped, balances adjusted to match, every hash recomputed.
    await rewrite_history(pool, """
        UPDATE ledger.entries SET account_id = 'bank:cash' WHERE posting_id = 'p3' AND idx = 1;
        UPDATE ledger.balances SET credits_posted = credits_posted - 500
            WHERE account_id = 'cust:1';
        UPDATE ledger.balances SET credits_posted = credits_posted + 500
            WHERE account_id = 'bank:cash';""")

    assert (await verify(pool)).ok, "without anchors the rewrite is consistent (the known gap)"
    kept = [Anchor.from_json(json.loads(line))
            for line in anchors.read_text().splitlines() if line.strip()]
    report = await verify(pool, anchors=kept)
    assert not report.ok
    assert "anchor partition 0" in (report.first_mismatch or ""), report.mismatches
    assert "rewritten" in (report.first_mismatch or "")
    code, out = await harbour_verify(db_url, "--anchors", str(anchors))
    assert code == 1 and "MISMATCH" in out and "anchor partition 0" in out, out


async def test_an_anchor_past_the_end_of_a_chain_names_the_cut(pool: asyncpg.Pool) -> None:
    await seed(pool)
    async with pool.acquire() as conn:
        (head,) = await chain_heads(conn)
    later = Anchor(head.partition, head.sequence + 1, b"\x01" * 32)
    report = await verify(pool, anchors=[head, later])
    assert report.mismatches == [
        f"anchor partition {head.partition} sequence {head.sequence + 1}: "
        "no such posting (the chain was cut short)"]
