"""What a request handler needs, composed once per app in its lifespan (``app.state.gateway``)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from fastapi import Request

from .ledger_read import LedgerReader
from .metrics import GatewayMetrics
from .publisher import CommandPublisher
from .ratelimit import TokenBucketLimiter
from .repository import IdempotencyStore, KeyStore
from .settings import GatewaySettings


@dataclass(slots=True)
class Gateway:
    settings: GatewaySettings
    pool: asyncpg.Pool
    publisher: CommandPublisher
    metrics: GatewayMetrics
    limiter: TokenBucketLimiter
    keys: KeyStore
    idempotency: IdempotencyStore
    ledger: LedgerReader


async def gateway_of(request: Request) -> Gateway:
    """FastAPI dependency: the app's :class:`Gateway` (async: FastAPI runs a sync dependency
    in a worker thread, which costs more than the lookup)."""
    gateway: Gateway = request.app.state.gateway
    return gateway
