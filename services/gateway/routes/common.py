"""What the route modules share: error response docs and the amount check."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from services.gateway.context import Gateway
from services.gateway.errors import ApiError
from services.gateway.schemas import ErrorBody
from shared.errors import InvalidAmountError
from shared.money import parse_amount

_DESCRIPTIONS = {
    400: "malformed JSON, bad Idempotency-Key or cursor",
    401: "no, unknown, revoked or expired API key",
    403: "the key's role or participant may not do this",
    404: "not found",
    409: "Idempotency-Key conflict or still in progress",
    413: "body larger than HARBOUR_GATEWAY_MAX_BODY_BYTES (default 16384)",
    415: "body is not application/json",
    422: "validation error naming the fields (invalid_input, unknown_field, invalid_amount, "
         "unknown_currency)",
    429: "rate limit of the key exceeded (Retry-After)",
    503: "Kafka or PostgreSQL unavailable; retry",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorBody, "description": _DESCRIPTIONS[s]} for s in statuses}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` documenting a body the route reads itself (see body.py)."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}}}


async def check_amount(gateway: Gateway, currency: str, amount: str) -> int:
    """The amount in minor units of ``currency`` (an asset the ledger defines).

    Raises:
        ApiError: 422 ``unknown_currency``, or ``invalid_amount`` with the reason (too many
            decimals, zero, negative, too large).
    """
    scale = await gateway.ledger.asset_scale(currency)
    if scale is None:
        raise ApiError(422, "unknown_currency", f"currency {currency} is not defined on the "
                       "ledger", errors=[{"field": "currency", "message": "unknown currency",
                                          "type": "unknown_currency"}])
    try:
        return parse_amount(amount, scale)
    except InvalidAmountError as exc:
        reason = str(exc.details.get("reason", "invalid"))
        raise ApiError(422, "invalid_amount", f"invalid request: amount: {exc.message}",
                       errors=[{"field": "amount", "message": exc.message, "type": reason}],
                       reason=reason) from None
