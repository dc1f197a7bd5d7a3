"""Where the tests find a real Kafka broker and a real PostgreSQL.

Order (issue 2, STYLE.md section 5):
1. ``HARBOUR_KAFKA_BOOTSTRAP`` / ``HARBOUR_DATABASE_URL`` set: use them, start nothing.
2. A Docker engine answers: pinned ``apache/kafka`` (KRaft) and ``postgres`` containers.
3. Otherwise: the same local stack as ``make up`` (Maven-fetched Apache Kafka, embedded PostgreSQL),
   started once per test session under ``.harbour/test/run-<pid>`` on ports of its own.
Integration tests never skip: if none of the three works, the session fails saying what is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from shared.config import StackSettings

KAFKA_IMAGE = "apache/kafka:4.1.1"
POSTGRES_IMAGE = "postgres:18.1-alpine"
_REPO = Path(__file__).resolve().parents[2]


def docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:  # no engine, no socket, no permission: all mean "use the local stack"
        return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _kafka_container(stack: ExitStack) -> str:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    port = _free_port()
    env = {
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_LISTENERS": "PLAINTEXT://0.0.0.0:9092,CONTROLLER://0.0.0.0:9093",
        "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://127.0.0.1:{port}",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
    }
    container = DockerContainer(KAFKA_IMAGE).with_bind_ports(9092, port)
    for key, value in env.items():
        container = container.with_env(key, value)
    stack.enter_context(container)
    wait_for_logs(container, "Kafka Server started", timeout=120)
    return f"127.0.0.1:{port}"


def _postgres_container(stack: ExitStack) -> str:
    from testcontainers.postgres import PostgresContainer

    container = PostgresContainer(POSTGRES_IMAGE, username="postgres", password="postgres",
                                  dbname="harbour")
    stack.enter_context(container)
    return str(container.get_connection_url(driver=None))


def _local_stack(stack: ExitStack) -> tuple[str, str]:
    from shared.localstack.kafka import LocalKafka, fetch_kafka_jars
    from shared.localstack.postgres import LocalPostgres

    settings = StackSettings()
    # A fresh broker and cluster per session, in a directory of its own: nothing a previous run
    # left can mask a bug, and two sessions at once (a developer's, an editor's) cannot delete
    # each other's data. Directories of sessions that are gone are removed here.
    runs = _REPO / ".harbour" / "test"
    _remove_dead_runs(runs)
    home = runs / f"run-{os.getpid()}"
    shutil.rmtree(home, ignore_errors=True)
    stack.callback(shutil.rmtree, home, True)
    lib = fetch_kafka_jars(settings.cache_dir, settings.kafka_version)
    kafka = LocalKafka(home / "kafka", _free_port(), _free_port(), lib)
    postgres = LocalPostgres(home / "postgres", _free_port())
    stack.callback(kafka.stop)
    kafka.start()
    stack.callback(postgres.stop)
    postgres.start()
    return kafka.bootstrap, postgres.url


def _remove_dead_runs(runs: Path) -> None:
    for run in runs.glob("run-*"):
        try:
            os.kill(int(run.name.removeprefix("run-")), 0)
        except ProcessLookupError:
            shutil.rmtree(run, ignore_errors=True)
        except (ValueError, PermissionError):  # not ours to judge
            continue


def start_backends(stack: ExitStack, log: Callable[[str], None]) -> tuple[str, str]:
    """Return (kafka bootstrap, database url), starting whatever is not given."""
    kafka = os.environ.get("HARBOUR_KAFKA_BOOTSTRAP")
    database = os.environ.get("HARBOUR_DATABASE_URL")
    if kafka and database:
        log(f"using Kafka {kafka} and PostgreSQL from HARBOUR_DATABASE_URL")
        return kafka, database
    if docker_answers():
        log("Docker engine answers: starting pinned Kafka and PostgreSQL containers")
        return kafka or _kafka_container(stack), database or _postgres_container(stack)
    log("no Docker engine: starting the local stack (Apache Kafka via Maven, embedded PostgreSQL)")
    local_kafka, local_db = _local_stack(stack)
    return kafka or local_kafka, database or local_db
