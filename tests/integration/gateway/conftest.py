"""Fixtures of the gateway tests: a fresh database and commands topic per test, seeded
participants and keys, and the app running in-process behind an httpx client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import httpx
import pytest_asyncio

from tests.integration.gateway.helpers import Keys, in_process, record_count, seed


@dataclass
class Gw:
    client: httpx.AsyncClient
    keys: Keys
    topic: str
    bootstrap: str
    db_url: str
    pool: asyncpg.Pool

    async def records(self) -> int:
        return await record_count(self.bootstrap, self.topic)


@pytest_asyncio.fixture
async def commands_topic(new_topic: Callable[..., Awaitable[str]]) -> str:
    return await new_topic("deposits.commands", partitions=4)


@pytest_asyncio.fixture
async def gw(db_url: str, kafka_bootstrap: str, commands_topic: str,
             pool: asyncpg.Pool) -> AsyncIterator[Gw]:
    keys = await seed(pool)
    async with in_process(db_url, kafka_bootstrap, commands_topic) as client:
        yield Gw(client, keys, commands_topic, kafka_bootstrap, db_url, pool)
