"""Fixtures of the deposits integration tests (see harness.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest_asyncio

from tests.integration.deposits.harness import World, new_world


@pytest_asyncio.fixture
async def world(kafka_bootstrap: str, db_url: str, pool: asyncpg.Pool,
                tmp_path: Path) -> AsyncIterator[World]:
    """Ledger and deposits running in-process on fresh topics, with a ManualClock at Monday 11:00
    Hong Kong time; both banks onboarded with wallets alice, carol (HSBC) and bob (Hang Seng)."""
    w = new_world(kafka_bootstrap, db_url, pool, tmp_path)
    try:
        await w.start()
        await w.onboard()
        yield w
    finally:
        await w.close()
