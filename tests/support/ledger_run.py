"""Run the ledger as an operator would, and know independently what it must end up with.

- :class:`LedgerProcess` / :class:`Processes`: ``python -m services.ledger.app`` as a child
  process (its own topic, group and database), stopped with SIGTERM or killed with SIGKILL.
- :func:`publish`: many records fast (one idempotent producer, acks=all, sends pipelined).
- :func:`read_topic`: every record of a topic from the beginning up to its current end.
- :class:`Scenario` / :func:`make_scenario`: assets, no-overdraft accounts, funding and
  transfers, each with the outcome it must have whatever the interleaving of partitions, and
  :meth:`Scenario.expected_balances` computed by plain dict arithmetic on what was generated
  (never from the ledger's own results).
- :func:`ledger_snapshot` and :func:`wait_for`: what an operator looks at, and bounded waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from shared.events import ledger as wire
from shared.events.envelope import decode
from tests.support import ledger as L

_REPO = Path(__file__).resolve().parents[2]
ASSET = "HKD"
SCALE = 2
TREASURY = "bank:treasury"
SETUP_KEY = b"setup"
# Sessions (by client port) inside a transaction that has written or locked rows; the relay's
# one-statement "mark sent" UPDATE is not what a kill should aim at.
_IN_WRITE_TX = """
    SELECT count(*) FROM pg_stat_activity
    WHERE datname = current_database() AND client_port = ANY($1::int[])
      AND backend_xid IS NOT NULL AND query NOT LIKE '%sent_at = clock_timestamp()%'"""


# -- the ledger process -----------------------------------------------------------------------


class LedgerProcess:
    """One ``python -m services.ledger.app`` child: a writer-group member plus the relay."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path, name: str) -> None:
        self.proc = proc
        self.log_path = log_path
        self.name = name

    @classmethod
    async def start(cls, *, db_url: str, bootstrap: str, topic: str, group_id: str,
                    log_path: Path, name: str = "ledger",
                    instance_id: str | None = None, metrics_port: int = 0) -> LedgerProcess:
        env = {
            **os.environ,
            "HARBOUR_KAFKA_BOOTSTRAP": bootstrap,
            "HARBOUR_DATABASE_URL": db_url,
            "HARBOUR_LEDGER_COMMANDS_TOPIC": topic,
            "HARBOUR_LEDGER_GROUP_ID": group_id,
            "HARBOUR_LEDGER_METRICS_PORT": str(metrics_port),
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("HARBOUR_LEDGER_INSTANCE_ID", None)
        if instance_id is not None:
            env["HARBOUR_LEDGER_INSTANCE_ID"] = instance_id
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            log.write(f"==== start {name} at {time.time():.3f}\n".encode())
            log.flush()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.ledger.app", cwd=_REPO, env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
            )
        return cls(proc, log_path, name)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def kill(self) -> None:
        """SIGKILL: no shutdown code runs, transactions in flight are lost by PostgreSQL."""
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self, timeout_s: float = 30) -> int | None:
        """SIGTERM and wait for a clean exit (SIGKILL after ``timeout_s``); return the code."""
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                await self.kill()
        return self.proc.returncode

    def client_ports(self) -> set[int]:
        """Local TCP ports of this process's sockets (to find its PostgreSQL sessions)."""
        try:
            conns = psutil.Process(self.proc.pid).net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return set()
        return {c.laddr.port for c in conns if c.laddr}

    async def in_transaction(self, pool: asyncpg.Pool) -> bool:
        """One of this process's writer sessions is inside a write transaction right now."""
        ports = self.client_ports()
        if not ports:
            return False
        return bool(await pool.fetchval(
            _IN_WRITE_TX, sorted(ports)))

    async def kill_in_transaction(self, pool: asyncpg.Pool, timeout_s: float = 5) -> bool:
        """SIGKILL as soon as a write transaction of this process is seen (or at the timeout);
        return whether it was in one."""
        ports = self.client_ports()
        deadline = time.monotonic() + timeout_s
        hit = False
        while self.alive and time.monotonic() < deadline:
            if ports and await pool.fetchval(
                    _IN_WRITE_TX, sorted(ports)):
                hit = True
                break
            await asyncio.sleep(0.001)
            if not ports:
                ports = self.client_ports()
        await self.kill()
        return hit

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """Every ledger process a test started, so none outlives it (``async with``)."""

    def __init__(self, *, db_url: str, bootstrap: str, topic: str, log_dir: Path) -> None:
        self.db_url, self.bootstrap, self.topic, self.log_dir = db_url, bootstrap, topic, log_dir
        self.started: list[LedgerProcess] = []

    async def start(self, group_id: str, name: str = "ledger",
                    instance_id: str | None = None, metrics_port: int = 0) -> LedgerProcess:
        p = await LedgerProcess.start(
            db_url=self.db_url, bootstrap=self.bootstrap, topic=self.topic, group_id=group_id,
            log_path=self.log_dir / f"{name}.log", name=name, instance_id=instance_id,
            metrics_port=metrics_port,
        )
        self.started.append(p)
        return p

    def crashed(self) -> list[LedgerProcess]:
        """Processes that exited on their own (a crash the test did not cause)."""
        return [p for p in self.started if p.proc.returncode not in (None, 0, -signal.SIGKILL,
                                                                     -signal.SIGTERM)]

    def logs(self, lines: int = 30) -> str:
        return "\n".join(f"--- {p.name} (pid {p.proc.pid}, rc {p.proc.returncode}) "
                         f"{p.log_path}\n{p.log_tail(lines)}" for p in self.started)

    async def __aenter__(self) -> Processes:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for p in self.started:
            with contextlib.suppress(ProcessLookupError):
                await p.kill()


# -- Kafka ------------------------------------------------------------------------------------


Item = tuple[bytes, bytes | None]  # (value, key)


async def publish(bootstrap: str, topic: str, items: Sequence[Item], *,
                  partition: int | None = None, rate_per_s: float | None = None,
                  chunk: int = 500) -> None:
    """Publish ``items`` in order (per key) with an idempotent producer, ``acks=all``.

    Sends are pipelined and acknowledged chunk by chunk; ``rate_per_s`` spreads the chunks out
    in time (a steady client), otherwise it goes as fast as the broker takes it.
    """
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                                linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    try:
        loop = asyncio.get_running_loop()
        began = loop.time()
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            futures = [await producer.send(topic, value, key=key, partition=partition)
                       for value, key in part]
            await asyncio.gather(*futures)
            if rate_per_s:
                due = began + (start + len(part)) / rate_per_s
                await asyncio.sleep(max(0.0, due - loop.time()))
    finally:
        await producer.stop()


class Feed:
    """A steady client publishing in the background; the last ``held`` records wait for
    :meth:`release`, so a test's faults are sure to land before the run can complete."""

    def __init__(self, bootstrap: str, topic: str, items: Sequence[Item], *, rate_per_s: float,
                 held: int, chunk: int = 100) -> None:
        self._gate = asyncio.Event()
        self.task = asyncio.create_task(self._run(bootstrap, topic, list(items), rate_per_s,
                                                  held, chunk), name="feed")

    async def _run(self, bootstrap: str, topic: str, items: list[Item], rate: float, held: int,
                   chunk: int) -> None:
        cut = max(0, len(items) - held)
        await publish(bootstrap, topic, items[:cut], rate_per_s=rate, chunk=chunk)
        await self._gate.wait()
        await publish(bootstrap, topic, items[cut:])

    def release(self) -> None:
        self._gate.set()

    async def finish(self, timeout_s: float) -> None:
        self.release()
        await asyncio.wait_for(self.task, timeout_s)

    def cancel(self) -> None:
        self.task.cancel()


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """The current end offset of every partition of ``topic``."""
    # Named at construction (no group): start() then holds the topic's metadata.
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        assert partitions, f"topic {topic} has no partitions"
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in sorted(partitions)])
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        await consumer.stop()


@dataclass(frozen=True, slots=True)
class Reply:
    """One record from a reply topic: the envelope id and type, and the result payload."""

    partition: int
    offset: int
    event_id: str
    type: str
    payload: dict[str, Any]

    @property
    def command_id(self) -> str:
        return str(self.payload["command_id"])


async def read_topic(bootstrap: str, topic: str, *, since: dict[int, int] | None = None,
                     timeout_s: float = 60) -> list[Reply]:
    """Every record of ``topic`` from ``since`` (default: the beginning) to its end now."""
    ends = await end_offsets(bootstrap, topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    out: list[Reply] = []
    try:
        parts = [TopicPartition(topic, p) for p in sorted(ends)]
        consumer.assign(parts)
        for tp in parts:
            consumer.seek(tp, (since or {}).get(tp.partition, 0))
        position = {p: (since or {}).get(p, 0) for p in ends}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while any(position[p] < ends[p] for p in ends):
            if loop.time() > deadline:
                raise AssertionError(f"read_topic {topic}: at {position}, end {ends}")
            for tp, records in (await consumer.getmany(timeout_ms=500,
                                                       max_records=10_000)).items():
                for r in records:
                    position[tp.partition] = r.offset + 1
                    envelope, _ = decode(r.value, reject_duplicate_keys=False)
                    out.append(Reply(tp.partition, r.offset, str(envelope.event_id),
                                     envelope.type, dict(envelope.payload)))
    finally:
        await consumer.stop()
    return out


# -- waiting and looking ----------------------------------------------------------------------


async def wait_for(what: str, check: Callable[[], Awaitable[bool]], *, timeout_s: float,
                   interval_s: float = 0.2, detail: Callable[[], str] | None = None) -> float:
    """Poll ``check`` until true; fail naming ``what`` after ``timeout_s``. Return seconds."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    while True:
        if await check():
            return loop.time() - began
        if loop.time() - began > timeout_s:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}"
                                 + (f"\n{detail()}" if detail else ""))
        await asyncio.sleep(interval_s)


async def consumed(pool: asyncpg.Pool, topic: str) -> int:
    """Records applied so far: the sum of stored next offsets (offsets start at 0, no gaps)."""
    return int(await pool.fetchval(
        "SELECT coalesce(sum(next_offset), 0) FROM ledger.consumed_offsets WHERE topic = $1",
        topic))


_UNANSWERED = """(SELECT coalesce(sum(next_offset - coalesce(answered_offset, next_offset)), 0)
                   FROM ledger.consumed_offsets)"""


async def unsent(pool: asyncpg.Pool) -> int:
    """Answers not known to be in Kafka: records past the answered watermark (the writer sends
    those itself) and outbox rows (expiries, through the relay)."""
    return int(await pool.fetchval(
        f"SELECT (SELECT count(*) FROM ledger.outbox WHERE sent_at IS NULL) + {_UNANSWERED}"))


async def wait_applied_and_relayed(pool: asyncpg.Pool, topic: str, total: int, *,
                                   timeout_s: float, procs: Processes | None = None) -> None:
    async def done() -> bool:
        if procs is not None and procs.crashed():
            raise AssertionError(f"a ledger process crashed:\n{procs.logs()}")
        return await consumed(pool, topic) >= total and await unsent(pool) == 0

    async def state() -> str:
        return f"consumed {await consumed(pool, topic)}/{total}, unsent {await unsent(pool)}"

    last = {"s": ""}

    async def check() -> bool:
        last["s"] = await state()
        return await done()

    await wait_for(f"{total} records applied and every result relayed", check,
                   timeout_s=timeout_s, interval_s=0.3,
                   detail=lambda: last["s"] + ("\n" + procs.logs() if procs else ""))


@dataclass
class Snapshot:
    """What an operator checks after a run."""

    balances: dict[str, tuple[int, int, int, int]]
    postings: int
    posting_ids: set[str]
    entries: int
    entries_sum: int
    results: dict[str, tuple[bool, str | None]]  # command id -> (accepted, code)
    chain_heads: dict[int, tuple[int, bytes]]


async def ledger_snapshot(pool: asyncpg.Pool) -> Snapshot:
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                        readonly=True):
        rows = await conn.fetch("SELECT * FROM ledger.balances")
        balances = {r["account_id"]: (int(r["debits_posted"]), int(r["credits_posted"]),
                                      int(r["debits_pending"]), int(r["credits_pending"]))
                    for r in rows}
        ids = {r["id"] for r in await conn.fetch("SELECT id FROM ledger.postings")}
        e = await conn.fetchrow("SELECT count(*) AS n, coalesce(sum(amount), 0) AS s "
                                "FROM ledger.entries")
        results = {r["command_id"]: (r["accepted"], r["code"]) for r in await conn.fetch(
            "SELECT command_id, accepted, code FROM ledger.results")}
        heads = {r["partition"]: (r["sequence"], bytes(r["hash"]))
                 for r in await conn.fetch("SELECT * FROM ledger.chain_heads")}
    return Snapshot(balances, len(ids), ids, int(e["n"]), int(e["s"]), results, heads)


# -- the scenario and its independent expectations -------------------------------------------


@dataclass(frozen=True, slots=True)
class Transfer:
    """A two-entry posting ``debit`` -> ``credit``, and the outcome it must have.

    ``expect`` is ``None`` for accepted, else the rejection code. ``amount`` is the wire string
    (it may be deliberately invalid); ``minor`` the amount in minor units when it is valid.
    """

    posting_id: str
    debit: str
    credit: str
    amount: str
    minor: int
    expect: str | None = None
    credit_amount: str | None = None  # differs from ``amount`` for an unbalanced posting

    def record(self, reply_to: str) -> bytes:
        if self.credit_amount is None:
            return L.transfer(self.posting_id, self.debit, self.credit, ASSET, self.amount,
                              reply_to=reply_to)
        return L.record(wire.Post(posting_id=self.posting_id, entries=[
            L.entry(self.debit, ASSET, "debit", self.amount),
            L.entry(self.credit, ASSET, "credit", self.credit_amount),
        ]), reply_to=reply_to)

    @property
    def key(self) -> bytes:
        return self.debit.encode()


def fmt(minor: int) -> str:
    """Minor units of a scale-2 asset as the wire's decimal string."""
    return f"{minor // 100}.{minor % 100:02d}"


@dataclass
class Scenario:
    accounts: list[str]
    funding: dict[str, int]
    transfers: list[Transfer]
    reply_to: str
    setup: list[tuple[str, bytes]] = field(default_factory=list)  # (command id, record)
    order_free: bool = False  # outcomes hold even if one account's debits are reordered

    # The commands, in publish order, as (command id, value, key).
    def setup_items(self) -> list[Item]:
        return [(v, SETUP_KEY) for _, v in self.setup]

    def transfer_items(self) -> list[Item]:
        return [(t.record(self.reply_to), t.key) for t in self.transfers]

    def command_ids(self) -> set[str]:
        return {cid for cid, _ in self.setup} | {t.posting_id for t in self.transfers}

    def accepted_postings(self) -> set[str]:
        return {f"fund:{a}" for a in self.accounts} | {
            t.posting_id for t in self.transfers if t.expect is None}

    def expected_rejections(self) -> dict[str, str]:
        return {t.posting_id: t.expect for t in self.transfers if t.expect is not None}

    def expected_balances(self) -> dict[str, tuple[int, int, int, int]]:
        """(debits_posted, credits_posted, 0, 0) per account, by dict arithmetic."""
        dp: dict[str, int] = {a: 0 for a in [TREASURY, *self.accounts]}
        cp: dict[str, int] = dict.fromkeys(dp, 0)
        for account, amount in self.funding.items():
            dp[TREASURY] += amount
            cp[account] += amount
        for t in self.transfers:
            if t.expect is None:
                dp[t.debit] += t.minor
                cp[t.credit] += t.minor
        return {a: (dp[a], cp[a], 0, 0) for a in dp}

    def expected_entries(self) -> tuple[int, int]:
        """(rows, sum of amounts) of ledger.entries: two entries per accepted posting."""
        amounts = [*self.funding.values(), *(t.minor for t in self.transfers if t.expect is None)]
        return 2 * len(amounts), 2 * sum(amounts)

    def check_order_independent(self) -> None:
        """Prove each expected outcome holds for every interleaving of the partitions.

        A debited account's transfers are on one partition, in order; credits to it come from
        other partitions at any time. Accepted: the account's own funding covers every accepted
        debit before it even with no incoming credit. Insufficient: the amount exceeds its
        funding minus accepted debits before it plus every credit it could ever receive (with
        ``order_free``, minus none: copies on other partitions may run ahead of the debits).
        """
        incoming: dict[str, int] = dict.fromkeys(self.accounts, 0)
        for t in self.transfers:
            if t.expect is None:
                incoming[t.credit] += t.minor
        spent: dict[str, int] = dict.fromkeys(self.accounts, 0)
        for t in self.transfers:
            if t.expect is None:
                spent[t.debit] += t.minor
                assert spent[t.debit] <= self.funding[t.debit], t
            elif t.expect == "insufficient_funds":
                before = 0 if self.order_free else spent[t.debit]
                most = self.funding[t.debit] - before + incoming[t.debit]
                assert t.minor > most, t


def make_scenario(rng: random.Random, *, accounts: int, transfers: int, reply_to: str,
                  invalid_every: int = 97, order_free: bool = False) -> Scenario:
    """Funded no-overdraft accounts and ``transfers`` postings whose outcomes are certain.

    Every ``invalid_every``-th transfer is one the ledger must reject: ``insufficient_funds``
    (by the tightest certain margin), ``unknown_account``, ``invalid_amount_scale`` or
    ``unbalanced``. Some accounts are funded with exactly what they spend (drained to zero).
    ``order_free`` sizes the insufficient ones so that per-account order does not matter.
    """
    names = [f"cust:{i:04d}" for i in range(accounts)]
    plan: list[tuple[str, str, int] | None] = []  # None: a slot for a deliberate rejection
    for n in range(transfers):
        if invalid_every and n % invalid_every == invalid_every - 1:
            plan.append(None)
            continue
        debit = rng.choice(names)
        credit = rng.choice(names)
        while credit == debit:
            credit = rng.choice(names)
        plan.append((debit, credit, rng.randint(1, 20_000)))
    spend: dict[str, int] = dict.fromkeys(names, 0)
    incoming: dict[str, int] = dict.fromkeys(names, 0)
    for p in plan:
        if p is not None:
            spend[p[0]] += p[2]
            incoming[p[1]] += p[2]
    funding = {a: max(1, spend[a] + (0 if i % 7 == 0 else rng.randint(1, 50_000)))
               for i, a in enumerate(names)}
    out: list[Transfer] = []
    spent: dict[str, int] = dict.fromkeys(names, 0)
    kinds = ["insufficient_funds", "unknown_account", "invalid_amount_scale", "unbalanced"]
    bad = 0
    for n, p in enumerate(plan):
        pid = f"t{n:06d}"
        if p is not None:
            debit, credit, minor = p
            spent[debit] += minor
            out.append(Transfer(pid, debit, credit, fmt(minor), minor))
            continue
        kind = kinds[bad % len(kinds)]
        bad += 1
        debit = rng.choice(names)
        credit = rng.choice(names)
        while credit == debit:
            credit = rng.choice(names)
        if kind == "insufficient_funds":
            minor = funding[debit] - (0 if order_free else spent[debit]) + incoming[debit] + 1
            out.append(Transfer(pid, debit, credit, fmt(minor), minor, kind))
        elif kind == "unknown_account":
            out.append(Transfer(pid, debit, f"ghost:{n}", "1.00", 100, kind))
        elif kind == "invalid_amount_scale":
            out.append(Transfer(pid, debit, credit, "1.001", 0, kind))
        else:
            out.append(Transfer(pid, debit, credit, "2.00", 200, kind, credit_amount="1.99"))
    scenario = Scenario(names, funding, out, reply_to, order_free=order_free)
    scenario.setup = _setup_commands(scenario)
    scenario.check_order_independent()
    return scenario


def _setup_commands(s: Scenario) -> list[tuple[str, bytes]]:
    """Asset, treasury, accounts and funding: one key, so one partition keeps their order."""
    out: list[tuple[str, bytes]] = []

    def add(value: bytes) -> None:
        envelope, payload = decode(value)
        cid = getattr(payload, "posting_id", None) or str(envelope.event_id)
        out.append((cid, value))

    add(L.asset(ASSET, SCALE, reply_to=s.reply_to))
    add(L.account(TREASURY, ASSET, reply_to=s.reply_to))
    for a in s.accounts:
        add(L.account(a, ASSET, no_overdraft=True, reply_to=s.reply_to))
    for a in s.accounts:
        add(L.transfer(f"fund:{a}", TREASURY, a, ASSET, fmt(s.funding[a]), reply_to=s.reply_to))
    return out


def dedupe_replies(replies: Iterable[Reply]) -> dict[str, list[Reply]]:
    """Replies grouped by command id, in topic order (one key, one partition: publish order)."""
    by_id: dict[str, list[Reply]] = {}
    for r in sorted(replies, key=lambda r: (r.partition, r.offset)):
        by_id.setdefault(r.command_id, []).append(r)
    return by_id


def fault_seed() -> int:
    """``HARBOUR_FAULT_SEED`` to replay a failure, else a fresh seed (printed by the tests)."""
    raw = os.environ.get("HARBOUR_FAULT_SEED")
    return int(raw) if raw else random.SystemRandom().randrange(2**32)
