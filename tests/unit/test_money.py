"""shared.money: exact amounts, strict parsing with reason codes, AmountStr payload fields."""

from __future__ import annotations

from decimal import Decimal

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from shared.errors import InvalidAmountError, ValidationError
from shared.money import (
    AMOUNT_PATTERN,
    MAX_AMOUNT_MINOR,
    MAX_SCALE,
    AmountStr,
    Asset,
    format_amount,
    parse_amount,
    to_decimal,
)

# --- Asset -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code", ["HKD", "CNH", "HKDS", "FUND.HKMMF.A", "USDC:ETH", "E-HKD_1", "X1"]
)
def test_asset_accepts_data_codes(code: str) -> None:
    assert Asset(code=code, scale=2).code == code


@pytest.mark.parametrize("code", ["hkd", "H", ".HKD", "HK D", "HKD\n", "", "A" * 65, "HKD$"])
def test_asset_refuses_bad_codes(code: str) -> None:
    with pytest.raises(pydantic.ValidationError):
        Asset(code=code, scale=2)


@pytest.mark.parametrize("scale", [-1, 19, True, "2"])
def test_asset_refuses_bad_scales(scale: object) -> None:
    with pytest.raises(pydantic.ValidationError):
        Asset.model_validate({"code": "HKD", "scale": scale})


def test_asset_is_frozen_and_closed() -> None:
    asset = Asset(code="HKD", scale=2)
    with pytest.raises(pydantic.ValidationError):
        asset.scale = 3  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        Asset.model_validate({"code": "HKD", "scale": 2, "name": "Hong Kong dollar"})
    assert asset == Asset.model_validate_json('{"code": "HKD", "scale": 2}')


# --- parse_amount: accepted forms ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "scale", "minor"),
    [
        ("1250.75", 2, 125075),
        ("0.05", 2, 5),
        ("12", 0, 12),
        ("12", 2, 1200),
        ("1.5", 2, 150),
        ("007.50", 2, 750),
        ("1", 18, 10**18),
        ("9" * 38, 0, MAX_AMOUNT_MINOR),
        ("9" * 20 + "." + "9" * 18, 18, MAX_AMOUNT_MINOR),
        ("0" * 5000 + "1", 2, 100),
    ],
)
def test_parse_amount_accepts_plain_decimals(text: str, scale: int, minor: int) -> None:
    assert parse_amount(text, scale) == minor


def test_parse_amount_zero_and_negative_only_when_allowed() -> None:
    assert parse_amount("0.00", 2, allow_zero=True) == 0
    assert parse_amount("-5.25", 2, allow_negative=True) == -525
    assert parse_amount("-0", 2, allow_zero=True, allow_negative=True) == 0
    assert parse_amount("-" + "9" * 38, 0, allow_negative=True) == -MAX_AMOUNT_MINOR


# --- parse_amount: every refused form has its reason ----------------------------------------------

BAD_AMOUNTS: list[tuple[object, int, str]] = [
    (1250, 2, "not_a_string"),
    (12.5, 2, "not_a_string"),
    (True, 2, "not_a_string"),
    (None, 2, "not_a_string"),
    (b"12", 2, "not_a_string"),
    (Decimal("12"), 2, "not_a_string"),
    ("", 2, "malformed"),
    (" 1", 2, "malformed"),
    ("1 ", 2, "malformed"),
    ("1\n", 2, "malformed"),
    ("+1", 2, "malformed"),
    ("1e5", 2, "malformed"),
    ("1E5", 2, "malformed"),
    ("1.5e-2", 2, "malformed"),
    ("NaN", 2, "malformed"),
    ("nan", 2, "malformed"),
    ("Infinity", 2, "malformed"),
    ("-Infinity", 2, "malformed"),
    ("inf", 2, "malformed"),
    ("1,000.00", 2, "malformed"),
    ("1 000", 2, "malformed"),
    ("1_000", 2, "malformed"),
    (".5", 2, "malformed"),
    ("5.", 2, "malformed"),
    ("1.2.3", 2, "malformed"),
    ("--1", 2, "malformed"),
    ("-", 2, "malformed"),
    ("0x10", 2, "malformed"),
    ("\uff11\uff12", 2, "malformed"),  # fullwidth digits
    ("\u0661\u0662", 2, "malformed"),  # Arabic-Indic digits
    ("HKD 12", 2, "malformed"),
    ("1.500", 2, "too_many_decimals"),
    ("1.001", 2, "too_many_decimals"),
    ("1.5", 0, "too_many_decimals"),
    ("-1.001", 2, "too_many_decimals"),
    ("-1", 2, "negative"),
    ("-0.00", 2, "negative"),
    ("0", 2, "zero"),
    ("0.00", 2, "zero"),
    ("000", 0, "zero"),
    ("1" + "0" * 38, 0, "too_large"),
    ("1" * 37, 2, "too_large"),
    ("1" + "0" * 20, 18, "too_large"),
    ("9" * 10000, 0, "too_large"),
]


@pytest.mark.parametrize(("text", "scale", "reason"), BAD_AMOUNTS)
def test_parse_amount_refuses_with_reason(text: object, scale: int, reason: str) -> None:
    with pytest.raises(InvalidAmountError) as caught:
        parse_amount(text, scale)
    assert caught.value.details == {"reason": reason}
    assert caught.value.code == "invalid_amount"
    assert isinstance(caught.value, ValidationError)


def test_parse_amount_negative_zero_is_refused_even_when_zero_is_allowed() -> None:
    with pytest.raises(InvalidAmountError) as caught:
        parse_amount("-0", 2, allow_zero=True)
    assert caught.value.details["reason"] == "negative"


def test_parse_amount_too_large_when_negative() -> None:
    with pytest.raises(InvalidAmountError) as caught:
        parse_amount("-1" + "0" * 38, 0, allow_negative=True)
    assert caught.value.details["reason"] == "too_large"


@pytest.mark.parametrize("scale", [-1, 19, True])
def test_bad_scale_is_a_programming_error(scale: int) -> None:
    with pytest.raises(ValueError, match="scale"):
        parse_amount("1", scale)
    with pytest.raises(ValueError, match="scale"):
        format_amount(1, scale)


@given(st.text(max_size=60), st.integers(0, MAX_SCALE))
def test_parse_amount_never_fails_any_other_way(text: str, scale: int) -> None:
    try:
        minor = parse_amount(text, scale, allow_zero=True, allow_negative=True)
    except InvalidAmountError as exc:
        assert exc.details["reason"] in {"malformed", "too_many_decimals", "too_large"}
    else:
        assert abs(minor) <= MAX_AMOUNT_MINOR


# --- format_amount and to_decimal ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("minor", "scale", "text"),
    [
        (125075, 2, "1250.75"),
        (5, 2, "0.05"),
        (-5, 2, "-0.05"),
        (12, 0, "12"),
        (-12, 0, "-12"),
        (0, 2, "0.00"),
        (0, 0, "0"),
        (1, 18, "0.000000000000000001"),
        (MAX_AMOUNT_MINOR, 18, "9" * 20 + "." + "9" * 18),
    ],
)
def test_format_amount(minor: int, scale: int, text: str) -> None:
    assert format_amount(minor, scale) == text


@pytest.mark.parametrize("minor", [True, 1.5, Decimal("1"), "1"])
def test_format_amount_takes_int_only(minor: object) -> None:
    with pytest.raises(TypeError):
        format_amount(minor, 2)  # type: ignore[arg-type]


def test_to_decimal_is_exact_beyond_default_context_precision() -> None:
    assert to_decimal(125075, 2) == Decimal("1250.75")
    assert str(to_decimal(MAX_AMOUNT_MINOR, 2)) == "9" * 36 + ".99"
    assert str(to_decimal(-5, 2)) == "-0.05"


amounts = st.integers(-MAX_AMOUNT_MINOR, MAX_AMOUNT_MINOR)
scales = st.integers(0, MAX_SCALE)


@given(amounts, scales)
def test_round_trip_parse_format(minor: int, scale: int) -> None:
    text = format_amount(minor, scale)
    assert parse_amount(text, scale, allow_zero=True, allow_negative=True) == minor


@given(amounts, scales)
def test_to_decimal_matches_minor_units(minor: int, scale: int) -> None:
    sign, digits, exponent = to_decimal(minor, scale).as_tuple()
    assert exponent == -scale
    assert int("".join(map(str, digits))) == abs(minor)
    assert sign == (1 if minor < 0 else 0)


# --- AmountStr ----------------------------------------------------------------------------------


class _Order(BaseModel):
    amount: AmountStr


def test_amount_str_accepts_decimal_strings_without_checking_scale() -> None:
    # The scale is the asset's business, checked later with parse_amount.
    assert _Order.model_validate_json('{"amount": "1.005"}').amount == "1.005"


@pytest.mark.parametrize("raw", ['{"amount": 1250.75}', '{"amount": 125075}', '{"amount": true}'])
def test_amount_str_refuses_json_numbers_with_a_clear_message(raw: str) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        _Order.model_validate_json(raw)
    (error,) = caught.value.errors()
    assert error["type"] == "amount_not_string"
    assert "JSON string" in error["msg"]


@pytest.mark.parametrize("text", ["1e5", "NaN", "+1", " 1", "1,000", "1.5\n", ""])
def test_amount_str_refuses_malformed_strings(text: str) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        _Order.model_validate({"amount": text})
    assert caught.value.errors()[0]["type"] == "amount_malformed"


def test_amount_str_refuses_python_numbers_too() -> None:
    with pytest.raises(pydantic.ValidationError):
        _Order.model_validate({"amount": Decimal("1.5")})


def test_amount_str_publishes_its_pattern_in_the_json_schema() -> None:
    schema = _Order.model_json_schema()["properties"]["amount"]
    assert schema == {"pattern": AMOUNT_PATTERN, "title": "Amount", "type": "string"}
