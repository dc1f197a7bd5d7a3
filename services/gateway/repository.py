"""The gateway's own tables (schema ``gateway``): participants, API keys, accepted commands, the
Idempotency-Key store and the transfer-status view. Ledger reads are in ``ledger_read.py``."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from .auth import IssuedKey, Principal, Role, auth_failure, new_key, parse_key_id, secret_matches
from .errors import ApiError

# --- participants and keys (operator commands and authentication) -----------------------------


class ParticipantExistsError(ValueError):
    pass


class UnknownParticipantError(LookupError):
    pass


async def add_participant(conn: asyncpg.Connection, participant_id: str, name: str, role: Role,
                          administers: Sequence[str] = ()) -> None:
    """Create a participant; ``administers`` is for ``fund_admin`` only.

    Raises:
        ParticipantExistsError: the id is taken.
        ValueError: ``administers`` given for another role.
    """
    if administers and role is not Role.FUND_ADMIN:
        raise ValueError("only a fund_admin administers other participants")
    try:
        await conn.execute(
            "INSERT INTO gateway.participants (id, name, role, administers) VALUES ($1,$2,$3,$4)",
            participant_id, name, role.value, sorted(set(administers)))
    except asyncpg.UniqueViolationError:
        raise ParticipantExistsError(f"participant {participant_id} exists") from None


async def disable_participant(conn: asyncpg.Connection, participant_id: str) -> bool:
    """Refuse every key of the participant from the next request on; ``False`` if unknown."""
    status = await conn.execute(
        "UPDATE gateway.participants SET disabled_at = coalesce(disabled_at, now()) "
        "WHERE id = $1", participant_id)
    return status.split()[-1] != "0"


async def list_participants(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT p.id, p.name, p.role, p.administers, p.created_at, p.disabled_at, "
        "(SELECT count(*) FROM gateway.api_keys k WHERE k.participant_id = p.id "
        " AND k.revoked_at IS NULL) AS active_keys FROM gateway.participants p ORDER BY p.id")


async def issue_key(conn: asyncpg.Connection, participant_id: str, label: str = "",
                    expires_at: datetime | None = None) -> IssuedKey:
    """Store a new key's digest and return the key; the token exists only in the result."""
    exists = await conn.fetchval(
        "SELECT 1 FROM gateway.participants WHERE id = $1 AND disabled_at IS NULL",
        participant_id)
    if not exists:
        raise UnknownParticipantError(f"no active participant {participant_id}")
    key = new_key()
    await conn.execute(
        "INSERT INTO gateway.api_keys (key_id, participant_id, secret_sha256, label, expires_at) "
        "VALUES ($1, $2, $3, $4, $5)", key.key_id, participant_id, key.digest, label, expires_at)
    return key


async def revoke_key(conn: asyncpg.Connection, key_id: str) -> bool:
    """Revoke a key at once (the next request with it gets 401); ``False`` if unknown."""
    status = await conn.execute(
        "UPDATE gateway.api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE key_id = $1",
        key_id)
    return status.split()[-1] != "0"


async def list_keys(conn: asyncpg.Connection, participant_id: str | None) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT key_id, participant_id, label, created_at, expires_at, revoked_at "
        "FROM gateway.api_keys WHERE ($1::text IS NULL OR participant_id = $1) "
        "ORDER BY participant_id, created_at", participant_id)


_KEY_LOOKUP = """
SELECT k.secret_sha256, k.participant_id, p.role, p.administers,
       (k.revoked_at IS NOT NULL OR (k.expires_at IS NOT NULL AND k.expires_at <= now()))
           AS revoked,
       p.disabled_at IS NOT NULL AS disabled
FROM gateway.api_keys k JOIN gateway.participants p ON p.id = k.participant_id
WHERE k.key_id = $1
"""


class KeyStore:
    """Resolves a bearer token to a :class:`Principal`, one indexed read per request (so a
    revocation takes effect on the very next request, on every instance)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def principal(self, token: str) -> Principal:
        key_id = parse_key_id(token)
        row = await self._pool.fetchrow(_KEY_LOOKUP, key_id) if key_id else None
        # Always one constant-time comparison, whether or not the key id exists.
        if not secret_matches(token, row["secret_sha256"] if row else None):
            raise auth_failure("invalid_api_key", "the API key is not valid")
        assert row is not None and key_id is not None
        if row["revoked"]:
            raise auth_failure("api_key_revoked", "the API key was revoked or has expired")
        if row["disabled"]:
            raise auth_failure("participant_disabled", "the key's participant is disabled")
        return Principal(key_id, row["participant_id"], Role(row["role"]),
                         frozenset(row["administers"]))


# --- Idempotency-Key store ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    """Either this request owns ``command_id`` (``replay is None``) or it replays a response."""

    command_id: uuid.UUID
    replay: tuple[int, dict[str, Any]] | None = None


_CLAIM = """
INSERT INTO gateway.idempotency (participant_id, idem_key, request_hash, command_id, state)
VALUES ($1, $2, $3, $4, 'pending') ON CONFLICT DO NOTHING RETURNING command_id"""
_EXISTING = """
SELECT request_hash, command_id, state, status_code, response, claimed_at
FROM gateway.idempotency WHERE participant_id = $1 AND idem_key = $2"""
# Compare-and-set on claimed_at: of two retries racing for a stale claim, one wins.
_TAKE_OVER = """
UPDATE gateway.idempotency SET claimed_at = clock_timestamp()
WHERE participant_id = $1 AND idem_key = $2 AND state = 'pending' AND claimed_at = $3
  AND claimed_at < clock_timestamp() - make_interval(secs => $4)
RETURNING command_id"""


class IdempotencyStore:
    def __init__(self, pool: asyncpg.Pool, stale_claim_s: float) -> None:
        self._pool = pool
        self._stale_s = stale_claim_s

    async def claim(self, participant: str, key: str, request_hash: bytes,
                    command_id: uuid.UUID) -> Claim:
        """Own the key for this request (with ``command_id``, or the id of a stale claim taken
        over), or get the stored response to replay.

        Raises:
            ApiError: 409 ``idempotency_conflict`` (another request used the key) or
                ``idempotency_in_progress`` (the first request with it is still running).
        """
        async with self._pool.acquire() as conn:
            for _ in range(3):  # a purge may remove the row between the insert and the select
                claimed = await conn.fetchval(_CLAIM, participant, key, request_hash, command_id)
                if claimed is not None:
                    return Claim(claimed)
                row = await conn.fetchrow(_EXISTING, participant, key)
                if row is not None:
                    return await self._existing(conn, participant, key, request_hash, row)
        raise ApiError(409, "idempotency_in_progress", "Idempotency-Key is busy; retry",
                       headers={"Retry-After": "1"})

    async def _existing(self, conn: asyncpg.Connection, participant: str, key: str,
                        request_hash: bytes, row: asyncpg.Record) -> Claim:
        if bytes(row["request_hash"]) != request_hash:
            raise ApiError(409, "idempotency_conflict", "this Idempotency-Key was used with a "
                           "different request", idempotency_key=key)
        if row["state"] == "completed":
            return Claim(row["command_id"], (row["status_code"], row["response"]))
        taken = await conn.fetchval(_TAKE_OVER, participant, key, row["claimed_at"],
                                    self._stale_s)
        if taken is not None:
            return Claim(taken)
        raise ApiError(409, "idempotency_in_progress", "the first request with this "
                       "Idempotency-Key is still being processed; retry",
                       headers={"Retry-After": "1"}, idempotency_key=key)

    async def release(self, participant: str, key: str) -> None:
        """After a failed publish: let the next retry take the claim over at once (it keeps
        the command id, so a record that did reach Kafka is republished with the same id)."""
        await self._pool.execute(
            "UPDATE gateway.idempotency SET claimed_at = '-infinity' "
            "WHERE participant_id = $1 AND idem_key = $2 AND state = 'pending'", participant, key)

    async def purge(self, retention_h: int) -> int:
        status = await self._pool.execute(
            "DELETE FROM gateway.idempotency WHERE created_at < now() - make_interval(hours => $1)",
            retention_h)
        return int(status.split()[-1])


# --- accepted commands and the transfer-status view ---------------------------------------------


@dataclass(frozen=True, slots=True)
class AcceptedCommand:
    command_id: uuid.UUID
    participant_id: str
    key_id: str
    command_type: str
    uetr: str
    payer_participant: str | None
    payee_participant: str | None
    payload: dict[str, Any]
    topic: str
    partition: int
    offset: int


# One statement, so one round trip and one (implicit) transaction: the command is logged and its
# Idempotency-Key claim completed together. With no key ($12 NULL) the UPDATE matches nothing.
_RECORD = """
WITH logged AS (
    INSERT INTO gateway.commands (command_id, participant_id, key_id, command_type, uetr,
        payer_participant, payee_participant, payload, topic, kafka_partition, kafka_offset)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
    ON CONFLICT (command_id) DO NOTHING
)
UPDATE gateway.idempotency SET state = 'completed', status_code = $13, response = $14
WHERE participant_id = $2 AND idem_key = $12"""


async def record_command(pool: asyncpg.Pool, command: AcceptedCommand,
                         idempotency: tuple[str, int, dict[str, Any]] | None) -> None:
    """Log an accepted command and complete its Idempotency-Key claim, atomically."""
    c = command
    key, status, body = idempotency if idempotency is not None else (None, None, None)
    await pool.execute(_RECORD, c.command_id, c.participant_id, c.key_id, c.command_type,
                       c.uetr, c.payer_participant, c.payee_participant, c.payload, c.topic,
                       c.partition, c.offset, key, status, body)


async def transfer_status(pool: asyncpg.Pool, uetr: str) -> asyncpg.Record | None:
    return await pool.fetchrow("SELECT * FROM gateway.transfer_status WHERE uetr = $1", uetr)
