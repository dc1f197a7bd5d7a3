"""Forward-only SQL migrations with a ``schema_migrations`` table.

Migrations are ``NNNN_name.sql`` files in ``shared/store/migrations`` (the platform: store
functions, event store, inbox, outbox) and then in ``services/<name>/migrations`` for each service
in ``SERVICE_ORDER``. Each runs in its own transaction together with its ``schema_migrations`` row,
so a failure leaves nothing half-applied; an advisory lock makes concurrent ``harbour migrate``
calls safe. Applied migrations are never edited: a change is a new file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import asyncpg

_ROOT = Path(__file__).resolve().parents[2]
SERVICE_ORDER = ("ledger", "deposits", "reserves", "clearing", "bridge", "gateway")
_LOCK_KEY = 0x4841524230  # "HARB0": one advisory lock id for every migrate run


@dataclass(frozen=True, slots=True)
class Migration:
    id: str  # "<component>/<file stem>", e.g. "shared/0001_platform"
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover() -> list[Migration]:
    """Every migration in apply order: the platform first, then services in SERVICE_ORDER."""
    folders = [("shared", _ROOT / "shared" / "store" / "migrations")]
    folders += [(name, _ROOT / "services" / name / "migrations") for name in SERVICE_ORDER]
    found: list[Migration] = []
    for component, folder in folders:
        if folder.is_dir():
            for path in sorted(folder.glob("[0-9][0-9][0-9][0-9]_*.sql")):
                found.append(Migration(f"{component}/{path.stem}", path.read_text()))
    return found


_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS public.schema_migrations (
    id          text PRIMARY KEY,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


async def migrate(database_url: str) -> list[str]:
    """Apply every pending migration; return the ids applied (empty when up to date).

    Raises:
        RuntimeError: an applied migration's file changed since (forward-only means never edit).
    """
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            return await _apply_pending(conn, discover())
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await conn.close()


async def _apply_pending(conn: asyncpg.Connection, migrations: list[Migration]) -> list[str]:
    await conn.execute(_BOOKKEEPING)
    rows = await conn.fetch("SELECT id, checksum FROM public.schema_migrations")
    applied = {r["id"]: r["checksum"] for r in rows}
    done: list[str] = []
    for migration in migrations:
        if migration.id in applied:
            if applied[migration.id] != migration.checksum:
                raise RuntimeError(f"migration {migration.id} was edited after it was applied")
            continue
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO public.schema_migrations (id, checksum) VALUES ($1, $2)",
                migration.id, migration.checksum,
            )
        done.append(migration.id)
    return done
