"""GET /health (Kafka and PostgreSQL reachability) and /metrics (Prometheus): ops keys only.

A liveness probe that has no key can use a TCP connect to the port; Prometheus scrapes with
``authorization: {type: Bearer, credentials_file: ...}`` holding an ops key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.gateway.auth import Principal, Role, require_roles
from services.gateway.context import Gateway, gateway_of
from services.gateway.errors import error_response
from services.gateway.routes.common import error_responses
from services.gateway.schemas import Check, Health

router = APIRouter(tags=["ops"])

OpsKey = Annotated[Principal, Depends(require_roles(Role.OPS))]
Ctx = Annotated[Gateway, Depends(gateway_of)]
_CHECK_TIMEOUT_S = 2.0


@router.get("/health", response_model=Health, responses=error_responses(401, 403, 429, 503),
            summary="Kafka and PostgreSQL reachability (ops)")
async def health(_: OpsKey, gateway: Ctx) -> Any:
    postgres, kafka = await asyncio.gather(
        _check(lambda: gateway.pool.fetchval("SELECT 1")),
        _check(lambda: gateway.publisher.ping(_CHECK_TIMEOUT_S)),
    )
    checks = {"postgres": postgres, "kafka": kafka}
    if all(c.ok for c in checks.values()):
        return Health(status="ok", checks=checks)
    failing = ", ".join(name for name, c in checks.items() if not c.ok)
    details = {"checks": {name: c.model_dump() for name, c in checks.items()}}
    return error_response(503, "unhealthy", f"unreachable: {failing}", details)


@router.get("/metrics", response_class=Response, responses=error_responses(401, 403, 429),
            summary="Prometheus metrics of this gateway process (ops)")
async def metrics(_: OpsKey, gateway: Ctx) -> Response:
    return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _check(probe: Callable[[], Awaitable[Any]]) -> Check:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(probe(), _CHECK_TIMEOUT_S)
    except Exception as exc:  # any failure means "not reachable"; the type says why
        return Check(ok=False, latency_ms=_ms(started), error=type(exc).__name__)
    return Check(ok=True, latency_ms=_ms(started))


def _ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


