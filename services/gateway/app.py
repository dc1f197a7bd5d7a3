"""Composition root of the gateway: the FastAPI app and ``python -m services.gateway.app``.

Runs under uvicorn on ``HARBOUR_GATEWAY_HOST:HARBOUR_GATEWAY_PORT`` (default
``127.0.0.1:18080``; ``make up`` starts it with every other service). OpenAPI is served at
``/docs`` and ``/openapi.json`` and checked in as ``docs/openapi.json``
(``python -m services.gateway.openapi`` rewrites it; a test fails when they drift).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg
import uvicorn
from fastapi import FastAPI

from shared.config import KafkaSettings, PostgresSettings
from shared.runtime import tune_gc
from shared.store.pool import create_pool

from .context import Gateway
from .errors import ERROR_CODES, install_error_handlers
from .ledger_read import LedgerReader
from .metrics import GatewayMetrics, RequestMiddleware
from .publisher import CommandPublisher
from .ratelimit import TokenBucketLimiter
from .repository import IdempotencyStore, KeyStore
from .routes import commands, ops, reads
from .settings import GatewaySettings

log = logging.getLogger("harbour.gateway")
_PURGE_EVERY_S = 3600.0

_DESCRIPTION = """\
The HTTP API through which banks post tokenized-deposit instructions and banks, fund
administrators and ops read transfers, balances and statements.

**Authentication.** Every endpoint needs an API key sent as `Authorization: Bearer hbk_...`
(issued with `harbour keys issue`, revoked with `harbour keys revoke`); only `/docs` and
`/openapi.json` are public, and `HARBOUR_GATEWAY_PUBLIC_DOCS=false` turns them off. Roles:
`bank` posts for itself and reads its own accounts; `fund_admin` reads the participants it
administers; `ops` reads everything, cancels transfers and reads `/health` and `/metrics`.

**Commands** answer `202` with the command id only after Kafka confirmed the record
(`acks=all`). Send an `Idempotency-Key`: the same key and body return the first response
(header `Idempotent-Replayed: true`), the same key with another body is
`409 idempotency_conflict`. Amounts are JSON strings (`"1250.75"`) within the currency's decimals.

**Limits.** Bodies over 16384 bytes (`HARBOUR_GATEWAY_MAX_BODY_BYTES`) get `413`. Each key has
a token bucket of 400 requests refilled at 200/s (`HARBOUR_GATEWAY_RATE_BURST`,
`HARBOUR_GATEWAY_RATE_PER_S`), per gateway instance; beyond it `429` with `Retry-After`.

**Errors.** Every 4xx/5xx body is `{"code", "message", "details"}`; validation errors list
`details.errors[] = {field, message, type}`. Codes:

""" + "\n".join(f"- `{code}`: {text}" for code, text in ERROR_CODES.items())


def create_app(settings: GatewaySettings | None = None, kafka: KafkaSettings | None = None,
               postgres: PostgresSettings | None = None) -> FastAPI:
    """The gateway app; its lifespan opens the pool and the Kafka producer (nothing before)."""
    settings = settings or GatewaySettings()
    metrics = GatewayMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with _resources(settings, kafka or KafkaSettings(), postgres or PostgresSettings(),
                              metrics) as gateway:
            app.state.gateway = gateway
            purge = asyncio.create_task(_purge_idempotency(gateway), name="gateway-purge")
            try:
                yield
            finally:
                purge.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await purge

    docs = settings.public_docs
    app = FastAPI(title="Harbour gateway", version="1.0.0", description=_DESCRIPTION,
                  lifespan=lifespan, docs_url="/docs" if docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)
    app.add_middleware(RequestMiddleware, metrics=metrics)
    install_error_handlers(app)
    for router in (commands.router, reads.router, ops.router):
        app.include_router(router)
    return app


@contextlib.asynccontextmanager
async def _resources(settings: GatewaySettings, kafka: KafkaSettings, postgres: PostgresSettings,
                     metrics: GatewayMetrics) -> AsyncIterator[Gateway]:
    pool = await create_pool(postgres.database_url, min_size=settings.pool_min_size,
                             max_size=settings.pool_max_size, application_name="harbour-gateway",
                             reset=_keep_session)
    publisher = CommandPublisher(kafka.kafka_bootstrap, client_id=f"{kafka.client_id}-gateway",
                                 timeout_s=settings.publish_timeout_s)
    try:
        await publisher.start()
        yield Gateway(
            settings=settings, pool=pool, publisher=publisher, metrics=metrics,
            limiter=TokenBucketLimiter(settings.rate_per_s, settings.rate_burst),
            keys=KeyStore(pool), idempotency=IdempotencyStore(pool, settings.stale_claim_s),
            ledger=LedgerReader(pool),
        )
    finally:
        await publisher.stop()
        await pool.close()


async def _keep_session(_: asyncpg.Connection) -> None:
    """Pool release hook replacing asyncpg's default reset (``RESET ALL``, ``UNLISTEN *``,
    ``pg_advisory_unlock_all()``: one more round trip per query). The gateway sets no session
    state, listens to nothing and takes no advisory locks; asyncpg still rolls back a
    transaction left open before calling this."""


async def _purge_idempotency(gateway: Gateway) -> None:
    while True:
        try:
            purged = await gateway.idempotency.purge(gateway.settings.idempotency_retention_h)
            if purged:
                log.info("purged %d Idempotency-Key rows", purged)
        except Exception as exc:  # the next round tries again; requests are unaffected
            log.warning("Idempotency-Key purge failed: %r", exc)
        await asyncio.sleep(_PURGE_EVERY_S)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = GatewaySettings()
    tune_gc()
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                            access_log=False, server_header=False, timeout_graceful_shutdown=15,
                            log_config=None)
    log.info("gateway listening on http://%s:%d", settings.host, settings.port)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
