"""``harbour dlq ...``: inspect and replay dead letters (one topic per consumer group).

A dead letter keeps the original key, value and headers plus ``x-harbour-*`` headers naming the
error, the attempts and where the record came from. Replaying republishes the original record to
its original topic with an idempotent producer; every Harbour consumer is idempotent, so a record
replayed twice is applied once.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import typer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from rich.console import Console
from rich.table import Table

from shared.config import KafkaSettings
from shared.events.topics import CONSUMER_GROUPS, dlq_topic
from shared.messaging.dlq import H_ERROR, H_ERROR_CODE, H_ORIGINAL_OFFSET, H_ORIGINAL_TOPIC

dlq_app = typer.Typer(help="Inspect and replay dead letters.", no_args_is_help=True)
console = Console()
_PREFIX = "x-harbour-"


@dataclass(frozen=True)
class DeadLetter:
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    def header(self, name: str) -> str:
        for key, value in self.headers:
            if key == name:
                return value.decode("utf-8", "replace")
        return ""

    def original_headers(self) -> list[tuple[str, bytes]]:
        return [(k, v) for k, v in self.headers if not k.startswith(_PREFIX)]


async def read_dead_letters(bootstrap: str, group: str, limit: int = 10_000) -> list[DeadLetter]:
    """Every dead letter of ``group`` (reads the topic without joining a group or committing)."""
    topic = dlq_topic(group)
    # No group: nothing is committed, and a fresh assignment starts at the earliest record.
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        metadata = await consumer._client.fetch_all_metadata()  # fresh: the topic may be new
        partitions = [TopicPartition(topic, p) for p in metadata.partitions_for_topic(topic) or ()]
        if not partitions:
            return []
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        out: list[DeadLetter] = []
        while len(out) < limit and any(await _behind(consumer, ends)):
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                out += [DeadLetter(r.offset, r.key, r.value, list(r.headers)) for r in records]
        return out[:limit]
    finally:
        await consumer.stop()


async def _behind(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> list[bool]:
    return [await consumer.position(tp) < end for tp, end in ends.items()]


async def replay(bootstrap: str, letters: list[DeadLetter]) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for letter in letters:
            await producer.send_and_wait(letter.header(H_ORIGINAL_TOPIC), letter.value,
                                         key=letter.key, headers=letter.original_headers())
    finally:
        await producer.stop()
    return len(letters)


def _group_option() -> str:
    return typer.Option(CONSUMER_GROUPS[0], help=f"consumer group: {', '.join(CONSUMER_GROUPS)}")


@dlq_app.command("list")
def list_command(group: str = _group_option(),
                 as_json: bool = typer.Option(False, "--json", help="JSON lines")) -> None:
    """Show a group's dead letters: where they came from and why."""
    letters = asyncio.run(read_dead_letters(KafkaSettings().kafka_bootstrap, group))
    if as_json:
        for letter in letters:
            print(json.dumps({"offset": letter.offset, **{k: v.decode("utf-8", "replace")
                                                         for k, v in letter.headers}}))
        return
    table = Table("offset", "from", "code", "error", "key")
    for letter in letters:
        origin = f"{letter.header(H_ORIGINAL_TOPIC)}@{letter.header(H_ORIGINAL_OFFSET)}"
        table.add_row(str(letter.offset), origin, letter.header(H_ERROR_CODE),
                      letter.header(H_ERROR)[:80], (letter.key or b"").decode("utf-8", "replace"))
    console.print(table)
    console.print(f"{len(letters)} dead letters in {dlq_topic(group)}")


@dlq_app.command("replay")
def replay_command(group: str = _group_option(),
                   offset: list[int] = typer.Option(..., help="dead-letter offset(s) to replay"),
                   ) -> None:
    """Republish chosen dead letters to their original topic (after fixing the cause)."""
    bootstrap = KafkaSettings().kafka_bootstrap
    letters = [x for x in asyncio.run(read_dead_letters(bootstrap, group)) if x.offset in offset]
    missing = sorted(set(offset) - {x.offset for x in letters})
    if missing:
        console.print(f"[red]no dead letter at offset(s) {missing}[/]")
        raise typer.Exit(2)
    count = asyncio.run(replay(bootstrap, letters))
    console.print(f"replayed {count} record(s) to their original topics")
