"""``harbour ledger ...`` and ``harbour verify``: read the ledger, check its integrity."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import datetime
from pathlib import Path

import asyncpg
import typer
from rich.console import Console
from rich.table import Table

from shared.config import PostgresSettings
from shared.money import format_amount

from . import repository as repo
from .verify import Anchor, chain_heads, read_anchors, verify

ledger_app = typer.Typer(help="Read the ledger: balances and statements.", no_args_is_help=True)
console = Console()


async def _pool() -> asyncpg.Pool:
    pool = await asyncpg.create_pool(PostgresSettings().database_url, min_size=1, max_size=2)
    assert pool is not None
    return pool


def verify_command(
    anchors: Path | None = typer.Option(
        None, help="JSON lines of chain positions kept outside the database (from `harbour "
                   "ledger anchor` or clients' PostingAccepted): each must still match"),
) -> None:
    """Recompute every hash chain and balance from the journal; exit 1 at the first mismatch."""
    try:
        kept = read_anchors(anchors.read_text().splitlines()) if anchors else []
    except (OSError, ValueError) as bad:
        console.print(f"[red]cannot read anchors[/] {anchors}: {bad}")
        raise typer.Exit(2) from None

    async def run() -> int:
        pool = await _pool()
        try:
            report = await verify(pool, anchors=kept)
        finally:
            await pool.close()
        console.print(f"checked {report.postings} postings in {report.partitions} chains, "
                      f"{report.accounts} accounts and {report.anchors} anchors")
        if report.ok:
            console.print("[green]ledger verified: chains and balances match the journal[/]")
            return 0
        for line in report.mismatches:
            console.print(f"[red]MISMATCH[/] {line}")
        return 1

    raise typer.Exit(asyncio.run(run()))


@ledger_app.command("anchor")
def anchor() -> None:
    """Print every chain head as a JSON line: file it outside the database (write-once storage,
    an auditor) and pass it to `harbour verify --anchors` later."""

    async def run() -> list[Anchor]:
        pool = await _pool()
        try:
            async with pool.acquire() as conn:
                return await chain_heads(conn)
        finally:
            await pool.close()

    for head in asyncio.run(run()):
        typer.echo(json.dumps(head.to_json()))


@ledger_app.command("progress")
def progress(as_json: bool = typer.Option(False, "--json", help="one JSON object per partition"),
             ) -> None:
    """Per partition of the commands topic: the next record to apply, how far answers are
    acknowledged by Kafka, the chain length; and the outbox rows waiting for the relay."""

    async def run() -> tuple[list[repo.PartitionProgress], int]:
        pool = await _pool()
        try:
            async with pool.acquire() as conn:
                return await repo.progress_report(conn)
        finally:
            await pool.close()

    partitions, waiting = asyncio.run(run())
    if as_json:
        for p in partitions:
            typer.echo(json.dumps({**dataclasses.asdict(p), "unanswered": p.unanswered}))
        typer.echo(json.dumps({"outbox_waiting": waiting}))
        return
    table = Table("topic", "partition", "next offset", "answered to", "unanswered", "chain")
    for p in partitions:
        table.add_row(p.topic, str(p.partition), str(p.next_offset), str(p.answered_offset),
                      str(p.unanswered), str(p.chain_sequence or 0))
    console.print(table)
    console.print(f"outbox rows waiting for the relay: {waiting}")


_BALANCES = """
SELECT a.id, a.participant, a.asset, s.scale, a.status, b.debits_posted, b.credits_posted,
       b.debits_pending, b.credits_pending, a.credits_must_not_exceed_debits AS debit_normal
FROM ledger.accounts a JOIN ledger.balances b ON b.account_id = a.id JOIN ledger.assets s
  ON s.code = a.asset
WHERE ($1::text IS NULL OR a.id = $1) AND ($2::text IS NULL OR a.participant = $2)
ORDER BY a.id
"""


@ledger_app.command("balances")
def balances(account: str | None = typer.Option(None, help="one account id"),
             participant: str | None = typer.Option(None, help="one participant's accounts"),
             ) -> None:
    """Posted, pending and available balance per account, in the asset's units."""

    async def run() -> None:
        pool = await _pool()
        try:
            rows = await pool.fetch(_BALANCES, account, participant)
        finally:
            await pool.close()
        table = Table("account", "participant", "asset", "status", "posted", "pending debits",
                      "pending credits", "available")
        for r in rows:
            sign = 1 if r["debit_normal"] else -1
            posted = sign * int(r["debits_posted"] - r["credits_posted"])
            pending_out = int(r["credits_pending"] if r["debit_normal"] else r["debits_pending"])
            scale = r["scale"]
            table.add_row(
                r["id"], r["participant"], r["asset"], r["status"], format_amount(posted, scale),
                format_amount(int(r["debits_pending"]), scale),
                format_amount(int(r["credits_pending"]), scale),
                format_amount(posted - pending_out, scale),
            )
        console.print(table)

    asyncio.run(run())


_STATEMENT = """
SELECT p.id, p.kind, p.effective_at, p.recorded_at, e.direction, e.phase, e.amount,
       p.metadata
FROM ledger.entries e JOIN ledger.postings p ON p.id = e.posting_id
WHERE e.account_id = $1 AND e.phase = 'posted'
  AND p.effective_at >= $2 AND p.effective_at < $3
ORDER BY p.effective_at, p.partition, p.sequence
"""


@ledger_app.command("statement")
def statement(account: str = typer.Option(..., help="account id"),
              from_: datetime = typer.Option(datetime(1970, 1, 1), "--from", help="effective from"),
              to: datetime = typer.Option(datetime(9999, 1, 1), help="effective before"),
              ) -> None:
    """Posted entries of one account by value date, with the running balance."""

    async def run() -> None:
        pool = await _pool()
        try:
            meta = await pool.fetchrow(
                "SELECT a.credits_must_not_exceed_debits AS debit_normal, s.scale FROM "
                "ledger.accounts a JOIN ledger.assets s ON s.code = a.asset WHERE a.id = $1",
                account)
            if meta is None:
                console.print(f"[red]unknown account {account}[/]")
                raise typer.Exit(2)
            rows = await pool.fetch(_STATEMENT, account, _aware(from_), _aware(to))
        finally:
            await pool.close()
        table = Table("effective", "posting", "kind", "debit", "credit", "balance")
        running, scale = 0, meta["scale"]
        for r in rows:
            amount = int(r["amount"])
            running += amount if (r["direction"] == "D") == meta["debit_normal"] else -amount
            debit = format_amount(amount, scale) if r["direction"] == "D" else ""
            credit = format_amount(amount, scale) if r["direction"] == "C" else ""
            table.add_row(r["effective_at"].isoformat(), r["id"], r["kind"], debit, credit,
                          format_amount(running, scale))
        console.print(table)

    asyncio.run(run())


def _aware(value: datetime) -> datetime:
    from datetime import UTC

    return value if value.tzinfo else value.replace(tzinfo=UTC)
