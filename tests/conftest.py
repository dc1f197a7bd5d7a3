"""Shared fixtures: a real Kafka broker and a real PostgreSQL for every integration test.

See tests/support/stack.py for how they are found or started. Each test that needs a database gets
a fresh one cloned from a migrated template (fast, and no test sees another's rows); Kafka tests
create uniquely named topics.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio

from shared.events.topics import TopicSpec
from shared.messaging.admin import ensure_topics
from shared.store.migrate import migrate
from tests.support.stack import start_backends


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def backends(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")

    def log(line: str) -> None:
        if reporter is not None:
            reporter.write_line(f"[harbour] {line}")

    with ExitStack() as stack:
        yield start_backends(stack, log)


@pytest.fixture(scope="session")
def kafka_bootstrap(backends: tuple[str, str]) -> str:
    return backends[0]


@pytest.fixture(scope="session")
def server_url(backends: tuple[str, str]) -> str:
    return backends[1]


@pytest_asyncio.fixture(scope="session")
async def template_db(server_url: str) -> AsyncIterator[str]:
    """A database with every migration applied, cloned by ``db_url``.

    Named per session so that two test sessions against one server never trip over each other.
    """
    name = f"tpl_{uuid.uuid4().hex[:16]}"
    await _admin(server_url, f'CREATE DATABASE "{name}"')
    await migrate(with_database(server_url, name))
    yield name
    await _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _admin(server_url: str, sql: str) -> None:
    admin = await asyncpg.connect(with_database(server_url, "postgres"))
    try:
        await admin.execute(sql)
    finally:
        await admin.close()


@pytest_asyncio.fixture
async def db_url(server_url: str, template_db: str) -> AsyncIterator[str]:
    """A fresh, fully migrated database for one test; dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    await _admin(server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield with_database(server_url, name)
    await _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest_asyncio.fixture
async def pool(db_url: str) -> AsyncIterator[asyncpg.Pool]:
    created = await asyncpg.create_pool(db_url, min_size=1, max_size=20)
    assert created is not None
    yield created
    await created.close()


@pytest_asyncio.fixture
async def new_topic(kafka_bootstrap: str) -> Callable[..., Awaitable[str]]:
    """Factory: create a uniquely named topic (``partitions`` default 1) and return its name."""

    async def create(prefix: str = "test", partitions: int = 1) -> str:
        name = f"{prefix}.{uuid.uuid4().hex[:12]}"
        await ensure_topics(kafka_bootstrap, [TopicSpec(name, partitions)])
        return name

    return create


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration so the tier is visible in reports and -m filters."""
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """An integration test may never skip: a skip there becomes a failure that says why."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("integration") is not None:
        report.outcome = "failed"
        report.longrepr = (
            f"integration tests must not skip (real Kafka/PostgreSQL needed): {report.longrepr}"
        )
