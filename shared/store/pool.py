"""The asyncpg pool every service uses, and the naming rule for service schemas.

Nothing connects at import time: ``create_pool`` / ``pool_lifespan`` are called by a composition
root (a service's ``app.py`` lifespan, the CLI, a test fixture).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from shared.config import PostgresSettings

log = logging.getLogger(__name__)

DEFAULT_COMMAND_TIMEOUT_S = 30
CLOSE_TIMEOUT_S = 10  # in-flight transactions get this long to finish on shutdown
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,46}$")  # same rule as harbour.create_service_store


async def init_connection(conn: asyncpg.Connection) -> None:
    """Decode ``json``/``jsonb`` to Python values and encode Python values to them."""
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def create_pool(
    url: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    command_timeout: int = DEFAULT_COMMAND_TIMEOUT_S,
    application_name: str = "harbour",
    **kwargs: Any,
) -> asyncpg.Pool:
    """Open an asyncpg pool with the JSON codecs installed on every connection.

    Args:
        url: a ``postgresql://`` URL.
        min_size: connections opened up front.
        max_size: upper bound of open connections.
        command_timeout: default per-statement timeout in seconds (a hung query fails instead
            of stalling a consumer forever).
        application_name: shown in ``pg_stat_activity``.
        **kwargs: passed to ``asyncpg.create_pool``; an ``init`` given here runs after ours.
    """
    extra_init: Callable[[asyncpg.Connection], Awaitable[None]] | None = kwargs.pop("init", None)

    async def init(conn: asyncpg.Connection) -> None:
        await init_connection(conn)
        if extra_init is not None:
            await extra_init(conn)

    server_settings = {"application_name": application_name, **kwargs.pop("server_settings", {})}
    pool = await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        command_timeout=command_timeout,
        init=init,
        server_settings=server_settings,
        **kwargs,
    )
    assert pool is not None  # asyncpg types it Optional; create_pool never returns None
    return pool


@asynccontextmanager
async def pool_lifespan(
    settings: PostgresSettings, *, application_name: str = "harbour"
) -> AsyncIterator[asyncpg.Pool]:
    """Yield a pool for the life of an app; close it on exit (terminate if closing hangs)."""
    pool = await create_pool(
        settings.database_url,
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        application_name=application_name,
    )
    try:
        yield pool
    finally:
        try:
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.warning("pool did not close within %s s; terminating connections", CLOSE_TIMEOUT_S)
            pool.terminate()


def qualified(schema: str, table: str) -> str:
    """``schema.table`` for SQL text, after checking ``schema`` is a valid service schema name.

    Raises:
        ValueError: the name could not have been created by ``harbour.create_service_store``.
    """
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"invalid service schema name: {schema!r}")
    return f'"{schema}".{table}'
