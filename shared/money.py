"""Money is exact: ``int`` minor units inside, decimal strings at the edges, never ``float``.

An amount travels as a decimal string in the asset's units (``"1250.75"``) and is held as an
``int`` count of the asset's smallest unit (``125075`` for a scale-2 asset). The asset, and with it
the scale, is data (``Asset``), never an enum: new tokens, funds and bridged assets appear without
a code change.

Parsing is strict on purpose. Banks expect the instruction text they sent to be the amount that
settles, so anything that needs interpretation is refused with a reason code instead of being
"fixed": exponents, ``NaN``/``Infinity``, a leading ``+``, whitespace, thousands separators, and
more decimals than the asset has, even when the extra digits are zeros (``"1.500"`` on a scale-2
asset is refused as ``too_many_decimals``).
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any, Final

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints
from pydantic_core import PydanticCustomError

from shared.errors import InvalidAmountError

__all__ = [
    "AMOUNT_PATTERN",
    "ASSET_CODE_PATTERN",
    "MAX_AMOUNT_MINOR",
    "MAX_SCALE",
    "AmountStr",
    "Asset",
    "format_amount",
    "parse_amount",
    "to_decimal",
]

# Largest magnitude that fits PostgreSQL NUMERIC(38,0), the ledger's amount column.
MAX_AMOUNT_MINOR: Final = 10**38 - 1
MAX_DIGITS: Final = 38
MAX_SCALE: Final = 18

# [0-9], not \d: \d also matches Arabic-Indic, fullwidth and other Unicode digits.
AMOUNT_PATTERN: Final = r"^-?[0-9]+(\.[0-9]+)?$"
ASSET_CODE_PATTERN: Final = r"^[A-Z0-9][A-Z0-9._:-]{1,63}$"

_AMOUNT_RE: Final = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?")


class Asset(BaseModel):
    """An asset and its scale: how many decimal places its minor unit has.

    Examples: ``Asset(code="HKD", scale=2)``, ``Asset(code="FUND.HKMMF.A", scale=4)``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    code: str = Field(pattern=ASSET_CODE_PATTERN)
    scale: int = Field(ge=0, le=MAX_SCALE)


def parse_amount(
    text: object, scale: int, *, allow_zero: bool = False, allow_negative: bool = False
) -> int:
    """Parse a decimal amount string into integer minor units.

    Args:
        text: The amount as sent, e.g. ``"1250.75"``. Only ``str`` is accepted: a JSON number has
            already been through a binary float somewhere and may not be what the sender meant.
        scale: Decimal places of the asset (0..18).
        allow_zero: Accept an amount equal to zero.
        allow_negative: Accept a leading ``-`` (adjustments, balances). Without it any ``-`` is
            refused, ``"-0"`` included.

    Returns:
        The amount in minor units, e.g. ``125075`` for ``"1250.75"`` at scale 2.

    Raises:
        InvalidAmountError: ``details["reason"]`` is one of ``not_a_string``, ``malformed``,
            ``too_many_decimals``, ``negative``, ``zero``, ``too_large``.
        ValueError: ``scale`` is outside 0..18 (a programming error, not bad input).
    """
    _check_scale(scale)
    if not isinstance(text, str):
        raise _invalid(
            "not_a_string", f"amount must be a decimal string, not {type(text).__name__}"
        )
    match = _AMOUNT_RE.fullmatch(text)
    if match is None:
        raise _invalid("malformed", "amount must look like 1250.75 (digits, optional '.' part)")
    sign, whole, fraction = match.group(1), match.group(2), match.group(3) or ""
    if len(fraction) > scale:
        raise _invalid(
            "too_many_decimals", f"amount has {len(fraction)} decimals, asset allows {scale}"
        )
    if sign and not allow_negative:
        raise _invalid("negative", "amount must not be negative")
    # Count digits before converting so that a huge string never reaches int().
    significant = whole.lstrip("0")
    if significant and len(significant) + scale > MAX_DIGITS:
        raise _invalid("too_large", f"amount exceeds {MAX_DIGITS} significant digits")
    minor = int((significant or "0") + fraction.ljust(scale, "0"))
    if minor == 0 and not allow_zero:
        raise _invalid("zero", "amount must not be zero")
    return -minor if sign else minor


def format_amount(minor: int, scale: int) -> str:
    """Render minor units as the canonical decimal string; the inverse of :func:`parse_amount`.

    Args:
        minor: Amount in minor units.
        scale: Decimal places of the asset (0..18).

    Returns:
        Exactly ``scale`` decimals and no exponent: ``(125075, 2) -> "1250.75"``,
        ``(5, 2) -> "0.05"``, ``(-5, 2) -> "-0.05"``, ``(12, 0) -> "12"``.

    Raises:
        TypeError: ``minor`` is not an ``int`` (``bool`` included).
        ValueError: ``scale`` is outside 0..18.
    """
    _check_scale(scale)
    if type(minor) is not int:
        raise TypeError(f"minor units must be int, not {type(minor).__name__}")
    sign = "-" if minor < 0 else ""
    digits = str(abs(minor))
    if scale == 0:
        return sign + digits
    digits = digits.rjust(scale + 1, "0")
    return f"{sign}{digits[:-scale]}.{digits[-scale:]}"


def to_decimal(minor: int, scale: int) -> Decimal:
    """Return the exact ``Decimal`` for an amount in minor units (for reports, never for sums).

    Args:
        minor: Amount in minor units.
        scale: Decimal places of the asset (0..18).

    Returns:
        A ``Decimal`` with exactly ``scale`` decimal places, e.g. ``Decimal("1250.75")``.
    """
    # Through the string: Decimal(str) is exact, whereas arithmetic would round to the context's
    # 28-digit precision and a NUMERIC(38) amount has up to 38 digits.
    return Decimal(format_amount(minor, scale))


def _check_scale(scale: int) -> None:
    if type(scale) is not int or not 0 <= scale <= MAX_SCALE:
        raise ValueError(f"scale must be an int in 0..{MAX_SCALE}, got {scale!r}")


def _invalid(reason: str, message: str) -> InvalidAmountError:
    return InvalidAmountError(message, reason=reason)


def _require_amount_text(value: Any) -> Any:
    # Runs before pydantic's own str check so that a JSON number gets a message that says why.
    if not isinstance(value, str):
        raise PydanticCustomError(
            "amount_not_string",
            'amount must be a JSON string such as "1250.75"; numbers and other values are refused',
        )
    if _AMOUNT_RE.fullmatch(value) is None:
        raise PydanticCustomError(
            "amount_malformed",
            'amount must be a plain decimal string such as "1250.75" '
            "(no exponent, sign '+', spaces or separators)",
        )
    return value


# The constraint comes first so that it shapes the JSON schema (AsyncAPI/OpenAPI show the
# pattern); the before-validator wraps it and runs first, to give a JSON number a clear message.
AmountStr = Annotated[
    str,
    StringConstraints(strict=True, pattern=AMOUNT_PATTERN),
    BeforeValidator(_require_amount_text),
]
"""A payload field holding an amount as a decimal string.

Only the form is checked here; the scale is checked with :func:`parse_amount` once the asset is
known, because the asset is data.
"""
