"""HTTP errors: every 4xx/5xx body is ``{"code", "message", "details"}``.

Codes are stable, snake_case and documented in the OpenAPI description (:data:`ERROR_CODES`).
Validation errors name the offending field in ``details.errors[].field``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Final

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import HarbourError

log = logging.getLogger("harbour.gateway")

ERROR_CODES: Final[dict[str, str]] = {
    "missing_api_key": "401: no `Authorization: Bearer <key>` header",
    "invalid_api_key": "401: the key is malformed, unknown or its secret does not match",
    "api_key_revoked": "401: the key was revoked or has expired",
    "participant_disabled": "401: the key's participant is disabled",
    "role_forbidden": "403: the key's role may not call this endpoint",
    "participant_forbidden": "403: the request acts for another participant",
    "account_forbidden": "403: the account is not readable with this key (or does not exist)",
    "transfer_forbidden": "403: the transfer is neither paid nor received by this participant",
    "not_found": "404: no such route",
    "transfer_not_found": "404: no transfer with this UETR was accepted here",
    "account_not_found": "404: no such account (ops keys only; others get account_forbidden)",
    "method_not_allowed": "405: the route exists, the method does not",
    "idempotency_conflict": "409: Idempotency-Key reused with a different request",
    "idempotency_in_progress": "409: the first request with this Idempotency-Key is running",
    "payload_too_large": "413: the body is larger than the documented limit",
    "unsupported_media_type": "415: the body must be application/json",
    "malformed_json": "400: the body is not one strict JSON object (syntax, duplicate keys)",
    "invalid_idempotency_key": "400: Idempotency-Key must be 1-255 printable ASCII characters",
    "invalid_cursor": "400: the pagination cursor was not issued by this API",
    "invalid_input": "422: a field is missing, has the wrong type or does not match its format",
    "unknown_field": "422: the body has a field the endpoint does not define",
    "invalid_amount": "422: an amount is not a decimal string, or has too many decimals",
    "unknown_currency": "422: the currency is not an asset the ledger knows",
    "rate_limited": "429: this key's request budget is spent; see Retry-After",
    "broker_unavailable": "503: Kafka did not confirm the write in time; retry with the "
                          "same Idempotency-Key",
    "database_unavailable": "503: PostgreSQL did not answer; retry",
    "unhealthy": "503: a dependency of the gateway is unreachable",
    "internal_error": "500: a bug; nothing about it is returned, see the gateway log",
}


# Connection-level failures: the database is unreachable, restarting or too slow; retryable.
_DATABASE_UNAVAILABLE: Final = (
    asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError, OSError, TimeoutError,
)


class ApiError(HarbourError):
    """An error with its HTTP status; ``code`` must be one of :data:`ERROR_CODES`."""

    def __init__(self, status: int, code: str, message: str,
                 headers: Mapping[str, str] | None = None, **details: Any) -> None:
        super().__init__(message, code=code, **details)
        self.status = status
        self.headers = dict(headers or {})


def error_response(status: int, code: str, message: str, details: Mapping[str, Any] | None = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = {"code": code, "message": message, "details": dict(details or {})}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def field_errors(errors: Iterable[Mapping[str, Any]], *, skip_prefix: str | None = None
                 ) -> list[dict[str, str]]:
    """pydantic errors as ``{"field", "message", "type"}`` with dotted field paths."""
    out = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())]
        if skip_prefix is not None and loc[:1] == [skip_prefix]:
            loc = loc[1:]
        out.append({"field": ".".join(loc) or "body", "message": str(error.get("msg", "")),
                    "type": str(error.get("type", ""))})
    return out


def validation_error(errors: list[dict[str, str]]) -> ApiError:
    """The 422 for field errors: ``invalid_amount`` if an amount is wrong, ``unknown_field`` if a
    field is not defined, else ``invalid_input``; the message names every field."""
    fields = ", ".join(dict.fromkeys(e["field"] for e in errors))
    if any(e["field"] == "amount" or e["field"].endswith(".amount") for e in errors):
        code = "invalid_amount"
    elif any(e["type"] == "extra_forbidden" for e in errors):
        code = "unknown_field"
    else:
        code = "invalid_input"
    return ApiError(422, code, f"invalid request: {fields}", errors=errors)


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception a request can raise to the one error body shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = field_errors(exc.errors())
        for entry in errors:  # "query.limit" -> "limit", with where it was sent
            where, _sep, name = entry["field"].partition(".")
            if where in ("query", "path", "header") and name:
                entry["field"], entry["in"] = name, where
        err = validation_error(errors)
        return error_response(err.status, err.code, err.message, err.details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_input")
        return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)

    async def _database(_: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %r", exc)
        return error_response(503, "database_unavailable", "PostgreSQL did not answer; retry",
                              headers={"Retry-After": "1"})

    for exc_class in _DATABASE_UNAVAILABLE:
        app.add_exception_handler(exc_class, _database)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path,
                      exc_info=exc)
        return error_response(500, "internal_error", "internal error")
