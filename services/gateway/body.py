"""Reading a request body: size limit, media type, strict JSON, validation into a model.

FastAPI's own body parsing lets a duplicate key silently win and has no size limit, so command
endpoints read their body here instead. The limit is checked on ``Content-Length`` before
anything is read and again while streaming (a chunked body cannot exceed it either).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from decimal import Decimal
from typing import Any, TypeVar

import pydantic
from fastapi import Request

from shared.events.envelope import canonical_json

from .errors import ApiError, field_errors, validation_error

M = TypeVar("M", bound=pydantic.BaseModel)


async def read_json_object(request: Request, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object.

    Raises:
        ApiError: 415 ``unsupported_media_type``, 413 ``payload_too_large``, 400
            ``malformed_json`` (bad UTF-8 or syntax, duplicate keys, NaN, not an object).
    """
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "the body must be application/json")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise _too_large(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return parse_json_object(b"".join(chunks))


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                           parse_constant=_no_constant, parse_float=Decimal)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "malformed_json", "the body must be a JSON object")
    return value


def validate(model: type[M], body: dict[str, Any]) -> M:
    """``body`` as ``model``, or 422 naming every offending field."""
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as exc:
        raise validation_error(field_errors(exc.errors(include_url=False))) from None


def request_hash(method: str, path: str, body: dict[str, Any]) -> bytes:
    """What an Idempotency-Key is bound to: the route and the body's canonical JSON (so key
    order and whitespace do not matter, values do)."""
    return hashlib.sha256(f"{method} {path}\n".encode() + canonical_json(body)).digest()


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the body exceeds {max_bytes} bytes",
                    max_bytes=max_bytes)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        counts = Counter(key for key, _ in pairs)
        raise ValueError(f"duplicate keys {sorted(k for k, n in counts.items() if n > 1)}")
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
