"""API keys, the authenticated principal, and who may act on and read what.

Keys look like ``hbk_<key id>_<secret>``: ``hbk`` marks a Harbour bank key (so secret scanners
and log filters can find leaked ones), the key id (16 hex digits) is the database row, and the
secret is 32 random bytes (base64url). Only ``sha256(token)`` is stored; the whole token is
compared in constant time (``hmac.compare_digest``). 256 random bits make a slow password hash
unnecessary: nobody can guess a token, and the hash only protects a stolen table.

Roles (issue 5):

- ``bank``: posts deposit commands for itself and reads its own accounts and transfers;
- ``fund_admin``: reads the accounts and transfers of the participants it administers;
- ``ops``: reads everything, checks health and metrics, cancels transfers.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import ApiError

KEY_PREFIX: Final = "hbk"
_TOKEN_RE: Final = re.compile(r"hbk_(?P<key_id>[0-9a-f]{16})_(?P<secret>[A-Za-z0-9_-]{43})")
# Compared against when the key id is unknown, so that an unknown id costs the same as a
# wrong secret (no timing oracle for which key ids exist).
_DUMMY_DIGEST: Final = hashlib.sha256(b"harbour-no-such-key").digest()
_BEARER_CHALLENGE: Final = {"WWW-Authenticate": 'Bearer realm="harbour"'}


class Role(StrEnum):
    BANK = "bank"
    FUND_ADMIN = "fund_admin"
    OPS = "ops"


@dataclass(frozen=True, slots=True)
class IssuedKey:
    key_id: str
    token: str
    digest: bytes


def new_key() -> IssuedKey:
    """A fresh key: the token is shown once to the operator and never stored."""
    key_id = secrets.token_hex(8)
    token = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    return IssuedKey(key_id, token, token_digest(token))


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii")).digest()


def parse_key_id(token: str) -> str | None:
    """The key id of a well-formed token, else ``None``."""
    match = _TOKEN_RE.fullmatch(token)
    return match.group("key_id") if match else None


def secret_matches(token: str, stored_digest: bytes | None) -> bool:
    expected = stored_digest if stored_digest is not None else _DUMMY_DIGEST
    return hmac.compare_digest(token_digest(token), expected) and stored_digest is not None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: one API key of one participant."""

    key_id: str
    participant_id: str
    role: Role
    administers: frozenset[str] = frozenset()

    @property
    def reads_all(self) -> bool:
        return self.role is Role.OPS

    def readable(self) -> frozenset[str] | None:
        """The participants whose accounts this key may read; ``None`` means all."""
        if self.role is Role.OPS:
            return None
        if self.role is Role.FUND_ADMIN:
            return self.administers
        return frozenset({self.participant_id})

    def can_read(self, participant: str | None) -> bool:
        allowed = self.readable()
        return allowed is None or (participant is not None and participant in allowed)

    def require_acts_for(self, participant: str) -> None:
        """Only a bank posts, and only for itself (403 ``participant_forbidden``)."""
        if self.role is not Role.BANK or participant != self.participant_id:
            raise ApiError(403, "participant_forbidden",
                           f"this key acts for {self.participant_id} only, not {participant}",
                           participant=participant)


_bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer hbk_...`")


async def authenticate(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> Principal:
    """FastAPI dependency: the caller's principal, or 401; then the per-key rate limit (429)."""
    gateway = request.app.state.gateway
    if credentials is None:
        gateway.metrics.auth_failures.labels("missing_api_key").inc()
        raise ApiError(401, "missing_api_key", "an API key is required: "
                       "Authorization: Bearer hbk_...", headers=_BEARER_CHALLENGE)
    try:
        principal = await gateway.keys.principal(credentials.credentials)
    except ApiError as exc:
        gateway.metrics.auth_failures.labels(exc.code).inc()
        raise
    wait_s = gateway.limiter.acquire(principal.key_id)
    if wait_s > 0:
        gateway.metrics.rate_limited.inc()
        retry_after = max(1, int(wait_s + 0.999))
        raise ApiError(429, "rate_limited", f"rate limit of this key exceeded; retry in "
                       f"{retry_after} s", headers={"Retry-After": str(retry_after)},
                       retry_after_s=retry_after)
    request.state.principal = principal
    return principal


def require_roles(*roles: Role) -> Callable[..., Awaitable[Principal]]:
    """A dependency that authenticates and then allows only ``roles`` (403 ``role_forbidden``)."""
    allowed = frozenset(roles)

    async def dependency(principal: Principal = Depends(authenticate)) -> Principal:
        if principal.role not in allowed:
            names = ", ".join(sorted(r.value for r in allowed))
            raise ApiError(403, "role_forbidden",
                           f"role {principal.role.value} may not call this; needs {names}",
                           role=principal.role.value)
        return principal

    return dependency


def auth_failure(code: str, message: str) -> ApiError:
    return ApiError(401, code, message, headers=_BEARER_CHALLENGE)
