"""An outbox relay in its own process, for the kill -9 test.

    python -m tests.support.relay_proc --database-url URL --schema S --bootstrap HOST:PORT \
        [--batch-size N] [--stall-at-batch K]

Prints ``LEADER`` once it holds the schema's lock, ``MARKED <n>`` after each batch is marked sent
and, with ``--stall-at-batch K``, ``STALLED <first id> <last id>`` after batch K has been published
and acknowledged by Kafka but before it is marked sent; it then hangs there, so the test can
SIGKILL it inside the window where at-least-once delivery must re-send. SIGTERM stops it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import asyncpg

from shared.store.outbox import OutboxRelay


class ObservableRelay(OutboxRelay):
    """The production relay plus progress lines on stdout and an optional stall before marking."""

    def __init__(self, *args: object, stall_at_batch: int | None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._stall_at_batch = stall_at_batch
        self._seen_batches = 0

    async def _acquire_lock(self, conn: asyncpg.Connection) -> bool:
        locked = await super()._acquire_lock(conn)
        if locked:
            say("LEADER")
        return locked

    async def _mark_sent(self, conn: asyncpg.Connection, ids: list[int]) -> None:
        self._seen_batches += 1
        if self._seen_batches == self._stall_at_batch:
            say(f"STALLED {ids[0]} {ids[-1]}")
            await asyncio.Event().wait()  # never returns: waits for SIGKILL
        await super()._mark_sent(conn, ids)
        say(f"MARKED {len(ids)}")


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--schema", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--stall-at-batch", type=int, default=None)
    args = parser.parse_args(argv)
    relay = ObservableRelay(
        args.database_url, args.schema, args.bootstrap,
        batch_size=args.batch_size, poll_interval_s=0.2, stall_at_batch=args.stall_at_batch,
    )
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, relay.stop)
    await relay.run()
    say("STOPPED")


if __name__ == "__main__":
    asyncio.run(main())
