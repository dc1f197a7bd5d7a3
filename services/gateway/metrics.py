"""Prometheus metrics of one gateway process, and the ASGI middleware that records requests.

Each app gets its own registry (two apps in one test process must not collide on the global
one); ``GET /metrics`` exposes it. Labels use the route template (``/v1/accounts/{account_id}/
balance``), never the raw path, so an attacker cannot blow up the series count.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("harbour_gateway_requests", "HTTP requests answered",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("harbour_gateway_request_seconds", "HTTP request latency",
                                 ["method", "route"], buckets=_LATENCY_BUCKETS_S, registry=r)
        self.published = Counter("harbour_gateway_commands_published",
                                 "commands confirmed by Kafka", ["type"], registry=r)
        self.publish_latency = Histogram("harbour_gateway_publish_seconds",
                                         "send to broker confirmation (acks=all)",
                                         buckets=_LATENCY_BUCKETS_S, registry=r)
        self.publish_failures = Counter("harbour_gateway_publish_failures",
                                        "commands Kafka did not confirm", registry=r)
        self.idempotent_replays = Counter("harbour_gateway_idempotent_replays",
                                          "responses replayed for a repeated Idempotency-Key",
                                          registry=r)
        self.auth_failures = Counter("harbour_gateway_auth_failures",
                                     "requests refused with 401", ["reason"], registry=r)
        self.rate_limited = Counter("harbour_gateway_rate_limited",
                                    "requests refused with 429", registry=r)


class RequestMiddleware:
    """Per request: a request id, no-store/nosniff headers, and the request metrics."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        request_id = _request_id(scope)

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-Id"] = request_id
                headers.setdefault("Cache-Control", "no-store")
                headers["X-Content-Type-Options"] = "nosniff"
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - started)


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id" and 0 < len(value) <= 64 and value.isascii():
            text: str = value.decode("ascii")
            if text.isprintable():
                return text
    return uuid.uuid4().hex
