"""The ``harbour`` command: run the stack, migrate, create topics, and (per service) operate it."""

from __future__ import annotations

import asyncio

import typer
from rich.console import Console

from services.cli.bench import bench_app
from services.cli.dlq import dlq_app
from services.gateway.cli import client_app, deposits_app, keys_app, participants_app
from services.ledger.cli import ledger_app, verify_command
from shared.config import KafkaSettings, PostgresSettings, StackSettings

app = typer.Typer(help="Harbour: event-sourced settlement ledger for tokenized assets.",
                  no_args_is_help=True)
stack_app = typer.Typer(help="The local stack (embedded PostgreSQL + Apache Kafka).",
                        no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(bench_app, name="bench")
app.add_typer(ledger_app, name="ledger")
app.add_typer(participants_app, name="participants")
app.add_typer(keys_app, name="keys")
app.add_typer(deposits_app, name="deposits")
app.add_typer(client_app)  # harbour balances, harbour statement
app.add_typer(dlq_app, name="dlq")
console = Console()


def _say(line: str) -> None:
    console.print(f"[bold cyan]harbour[/] {line}")


@app.command()
def up() -> None:
    """Start Kafka, PostgreSQL and every service; Ctrl-C stops everything cleanly."""
    from shared.localstack.supervisor import LocalStack, run_forever

    run_forever(LocalStack(StackSettings()), _say)


@stack_app.command("start")
def stack_start() -> None:
    """Start only Kafka and PostgreSQL (migrated, topics created) and return."""
    from shared.localstack.supervisor import LocalStack

    LocalStack(StackSettings()).start(_say)


@stack_app.command("stop")
def stack_stop() -> None:
    """Stop the local Kafka and PostgreSQL."""
    from shared.localstack.supervisor import LocalStack

    LocalStack(StackSettings()).stop(_say)


@app.command()
def migrate() -> None:
    """Apply pending database migrations (forward-only; a second run is a no-op)."""
    from shared.store.migrate import migrate as run_migrations

    applied = asyncio.run(run_migrations(PostgresSettings().database_url))
    for migration_id in applied:
        _say(f"applied {migration_id}")
    _say(f"{len(applied)} migrations applied" if applied else "database is up to date")


@app.command()
def topics() -> None:
    """Create the declared Kafka topics that do not exist yet."""
    from shared.events.topics import TOPICS
    from shared.messaging.admin import ensure_topics

    created = asyncio.run(ensure_topics(KafkaSettings().kafka_bootstrap, TOPICS))
    for name in created:
        _say(f"created {name}")
    _say(f"{len(created)} topics created" if created else "all topics exist")


app.command("verify")(verify_command)


if __name__ == "__main__":
    app()
