"""What the gateway tests share: a running gateway (in-process or as a uvicorn subprocess), its
participants and keys, request builders and a Kafka record counter."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from fastapi import FastAPI

from services.gateway import repository as repo
from services.gateway.app import create_app
from services.gateway.auth import Role
from services.gateway.settings import GatewaySettings
from shared.config import KafkaSettings, PostgresSettings
from tests.support.ledger_run import end_offsets

_REPO = Path(__file__).resolve().parents[3]
HSBC, SCB, BOCHK = "HSBCHKHH", "SCBLHKHH", "BKCHHKHH"


def uetr() -> str:
    return str(uuid.uuid4())


def transfer_body(payee: str = SCB, amount: str = "10.00", **overrides: Any) -> dict[str, Any]:
    return {"uetr": uetr(), "end_to_end_id": "E2E-1", "payer_wallet": "alice",
            "payee_participant": payee, "payee_wallet": "bob", "currency": "HKD",
            "amount": amount, **overrides}


def issue_body(amount: str = "100.00", **overrides: Any) -> dict[str, Any]:
    return {"uetr": uetr(), "end_to_end_id": "E2E-ISSUE", "wallet_id": "alice",
            "currency": "HKD", "amount": amount, **overrides}


@dataclass
class Keys:
    """One token per role/participant, plus the revoked one."""

    tokens: dict[str, str] = field(default_factory=dict)
    key_ids: dict[str, str] = field(default_factory=dict)

    def auth(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name]}"}


async def seed(pool: asyncpg.Pool) -> Keys:
    """Banks HSBC and SCB, a fund admin of HSBC, ops; one key each; HKD (scale 2) on the
    ledger; plus a revoked HSBC key."""
    keys = Keys()
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO ledger.assets (code, scale) VALUES ('HKD', 2), "
                           "('JPY', 0) ON CONFLICT DO NOTHING")
        await repo.add_participant(conn, HSBC, "HSBC", Role.BANK)
        await repo.add_participant(conn, SCB, "Standard Chartered", Role.BANK)
        await repo.add_participant(conn, "fa-hsbc", "Fund admin", Role.FUND_ADMIN, [HSBC])
        await repo.add_participant(conn, "ops", "Ops", Role.OPS)
        for name, participant in ((HSBC, HSBC), (SCB, SCB), ("fa", "fa-hsbc"), ("ops", "ops"),
                                  ("revoked", HSBC)):
            key = await repo.issue_key(conn, participant, label=name)
            keys.tokens[name], keys.key_ids[name] = key.token, key.key_id
        await repo.revoke_key(conn, keys.key_ids["revoked"])
    return keys


@contextlib.asynccontextmanager
async def in_process_app(db_url: str, bootstrap: str, topic: str,
                         **settings: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with its lifespan running, and an httpx client talking to it over ASGI."""
    app = create_app(GatewaySettings(commands_topic=topic, **settings),
                     KafkaSettings(kafka_bootstrap=bootstrap),
                     PostgresSettings(database_url=db_url))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield app, client


@contextlib.asynccontextmanager
async def in_process(db_url: str, bootstrap: str, topic: str,
                     **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with in_process_app(db_url, bootstrap, topic, **settings) as (_, client):
        yield client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def subprocess_gateway(db_url: str, bootstrap: str, topic: str, log_dir: Path,
                             **settings: str) -> AsyncIterator[str]:
    """``python -m services.gateway.app`` on a free port; yields its base URL; SIGTERM at the
    end, after which the lifespan must have shut down cleanly."""
    port = free_port()
    env = {**os.environ, "HARBOUR_DATABASE_URL": db_url, "HARBOUR_KAFKA_BOOTSTRAP": bootstrap,
           "HARBOUR_GATEWAY_PORT": str(port), "HARBOUR_GATEWAY_COMMANDS_TOPIC": topic,
           **{f"HARBOUR_GATEWAY_{k.upper()}": v for k, v in settings.items()}}
    log_path = log_dir / f"gateway-{port}.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.gateway.app", cwd=_REPO, env=env, stdout=log,
            stderr=asyncio.subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        await _wait_listening(url, proc, log_path)
        yield url
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise AssertionError("gateway did not stop on SIGTERM") from None
            # uvicorn re-raises the captured SIGTERM after its graceful shutdown.
            log_text = log_path.read_text()
            assert code in (0, -signal.SIGTERM), f"gateway exited with {code}: {log_text[-2000:]}"
            assert "Application shutdown complete" in log_text, log_text[-2000:]


async def _wait_listening(url: str, proc: asyncio.subprocess.Process, log_path: Path) -> None:
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(base_url=url) as client:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise AssertionError(f"gateway died: {_tail(log_path)}")
            with contextlib.suppress(httpx.TransportError):
                if (await client.get("/openapi.json")).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise AssertionError(f"gateway not listening: {_tail(log_path)}")


def _tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-2000:]


async def record_count(bootstrap: str, topic: str) -> int:
    """Records ever written to ``topic`` (sum of end offsets: nothing is deleted in a test)."""
    return sum((await end_offsets(bootstrap, topic)).values())


async def read_records(bootstrap: str, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` from the beginning up to its end now."""
    ends = await end_offsets(bootstrap, topic)
    if not any(ends.values()):
        return []  # (and an assigned consumer that never fetched fails to stop in aiokafka)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    out: list[ConsumerRecord[bytes, bytes]] = []
    try:
        parts = [TopicPartition(topic, p) for p in sorted(ends)]
        consumer.assign(parts)
        for tp in parts:
            consumer.seek(tp, 0)
        position = dict.fromkeys(ends, 0)
        deadline = time.monotonic() + 60
        while any(position[p] < ends[p] for p in ends):
            assert time.monotonic() < deadline, f"read {topic}: at {position}, end {ends}"
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                for r in records:
                    position[tp.partition] = r.offset + 1
                    out.append(r)
    finally:
        await consumer.stop()
    return out
