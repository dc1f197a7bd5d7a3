"""Business-day calendars and settlement windows per currency, as configuration (TD-6, X-5).

Pure: no clock reads, no I/O beyond the standard library's time-zone database (``zoneinfo``).
Every function takes the instant it reasons about (``at``, a timezone-aware datetime, normally
``Context.now``) and returns timezone-aware UTC datetimes.

Model
-----
- A :class:`BusinessCalendar` says which local dates are business days for a currency: its IANA
  time zone, working weekdays and configured holidays. "T+1" is :func:`add_business_days`, never
  "the next calendar day" (X-5).
- A :class:`SettlementWindow` gives the session hours of the interbank leg on each business day,
  e.g. CHATS 08:30-18:30 Hong Kong time. A session whose ``closes_at`` is not after ``opens_at``
  runs overnight into the next calendar day (RMB RTGS style); it still belongs to the business
  day it opened on (that day is the interbank settlement date).
- :class:`CurrencyRules` ties a currency to its settlement mode (``rtgs``: the interbank leg
  settles outside Harbour, in CHATS; ``wcbdc``: the settlement asset is a Harbour asset) and to
  its window. ``window=None`` means 24/7 (tokenised central-bank money, the EnsembleTX target).
  Intra-bank token transfers ignore windows altogether (TD-6, HSBC model).

Deadlines
---------
An interbank transfer holds the payer's tokens from its earmark until its *hold deadline*
(:func:`hold_deadline`): for a windowed currency the close (cut-off) of the session it will be
settled in, for a 24/7 currency ``max_hold_s`` after the instruction. A transfer that has not
reached the settlement agent by then is released (DOMAIN.md 1.2 step 5: "queued past cut-off").
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Final, Literal, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "MAX_CALENDAR_SCAN_DAYS",
    "BusinessCalendar",
    "CurrencyRules",
    "DepositsConfig",
    "Session",
    "SettlementMode",
    "SettlementWindow",
    "add_business_days",
    "hold_deadline",
    "is_business_day",
    "next_business_day",
    "session_at",
    "settlement_date",
    "window_open",
    "window_opens_at",
]

SettlementMode = Literal["rtgs", "wcbdc"]

MAX_CALENDAR_SCAN_DAYS: Final = 400
"""How far the calendar looks for a business day before calling the configuration broken."""

_MON_FRI: Final = frozenset({0, 1, 2, 3, 4})
_CURRENCY_RE: Final = r"^[A-Z]{3}$"
_ASSET_RE: Final = r"^[A-Z0-9][A-Z0-9._:-]{1,63}$"
# The ledger accepts pending timeouts of at most 30 days on the wire (shared/events/ledger.py).
_MAX_HOLD_S: Final = 30 * 24 * 3600

_Seconds = Annotated[int, Field(ge=1, le=_MAX_HOLD_S)]


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class BusinessCalendar(_Config):
    """Which local dates are business days for one currency's market.

    Example: ``BusinessCalendar(timezone="Asia/Hong_Kong", holidays=frozenset({date(2026,
    1, 1)}))``.
    """

    timezone: str = Field(min_length=1, max_length=64)
    weekdays: frozenset[int] = _MON_FRI
    """Working weekdays, ``date.weekday()`` numbering (Monday 0 .. Sunday 6)."""
    holidays: frozenset[date] = frozenset()

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA time zone {value!r}") from exc
        return value

    @field_validator("weekdays")
    @classmethod
    def _valid_weekdays(cls, value: frozenset[int]) -> frozenset[int]:
        if not value or not value <= frozenset(range(7)):
            raise ValueError("weekdays must be a non-empty subset of 0..6 (Monday is 0)")
        return value

    @property
    def zone(self) -> ZoneInfo:
        """The calendar's time zone (``ZoneInfo`` caches instances, so this is cheap)."""
        return ZoneInfo(self.timezone)


class SettlementWindow(_Config):
    """Local session hours of the interbank leg on every business day, e.g. 08:30-18:30."""

    opens_at: time
    closes_at: time

    @model_validator(mode="after")
    def _not_empty(self) -> SettlementWindow:
        if self.opens_at == self.closes_at:
            raise ValueError("a settlement window needs opens_at != closes_at; use None for 24/7")
        if self.opens_at.tzinfo is not None or self.closes_at.tzinfo is not None:
            raise ValueError("window times are local wall-clock times: give them without tzinfo")
        return self


class CurrencyRules(_Config):
    """Everything the deposits domain needs to know about one currency.

    Thresholds are configuration with defaults, never constants in code (DOMAIN.md preamble).
    """

    currency: str = Field(pattern=_CURRENCY_RE)
    scale: int = Field(ge=0, le=18)
    settlement_mode: SettlementMode
    settlement_asset: str = Field(pattern=_ASSET_RE)
    """The ledger asset of the banks' settlement accounts: a mirror of the CHATS position in
    ``rtgs`` mode, the wholesale CBDC itself in ``wcbdc`` mode. Never the currency code itself,
    which holds the commercial-bank (conventional) side."""
    calendar: BusinessCalendar
    window: SettlementWindow | None
    """Session hours of the interbank leg; ``None`` is 24/7."""
    max_hold_s: _Seconds = 3600
    """24/7 currencies only: how long an interbank transfer may hold its earmark (queued or
    waiting) before it is released."""
    confirmation_timeout_s: _Seconds = 1800
    """``rtgs`` only: how long to wait for the agent's pacs.002 after the pacs.009 went out."""
    ledger_timeout_margin_s: _Seconds = 3600
    """Extra life of the ledger pendings beyond every deadline of the saga, so that the ledger's
    own expiry is a backstop and never races the saga's release."""

    @model_validator(mode="after")
    def _distinct_assets(self) -> CurrencyRules:
        if self.settlement_asset == self.currency:
            raise ValueError("settlement_asset must differ from the currency (conventional side)")
        return self


class DepositsConfig(_Config):
    """The deposits service's per-currency configuration, keyed by currency code."""

    currencies: dict[str, CurrencyRules]

    @model_validator(mode="after")
    def _keys_match(self) -> DepositsConfig:
        for code, rules in self.currencies.items():
            if code != rules.currency:
                raise ValueError(f"currencies[{code!r}] holds the rules of {rules.currency!r}")
        assets = [r.settlement_asset for r in self.currencies.values()]
        if len(set(assets)) != len(assets):
            raise ValueError("each currency needs its own settlement asset")
        return self

    def rules(self, currency: str) -> CurrencyRules | None:
        """Return the rules of a currency, or ``None`` when it is not configured."""
        return self.currencies.get(currency)


class Session(NamedTuple):
    """One settlement session: the business day it belongs to and its UTC bounds."""

    business_date: date
    opens_at: datetime
    closes_at: datetime


# --- business days -----------------------------------------------------------------------------


def is_business_day(calendar: BusinessCalendar, day: date) -> bool:
    """Return whether ``day`` is a working weekday that is not a configured holiday."""
    return day.weekday() in calendar.weekdays and day not in calendar.holidays


def next_business_day(calendar: BusinessCalendar, day: date) -> date:
    """Return the first business day on or after ``day``.

    Raises:
        ValueError: No business day within :data:`MAX_CALENDAR_SCAN_DAYS` (broken configuration).
    """
    for offset in range(MAX_CALENDAR_SCAN_DAYS):
        candidate = day + timedelta(days=offset)
        if is_business_day(calendar, candidate):
            return candidate
    raise ValueError(f"no business day within {MAX_CALENDAR_SCAN_DAYS} days of {day}")


def add_business_days(calendar: BusinessCalendar, day: date, days: int) -> date:
    """Return the business day ``days`` business days after ``day`` (T+n); ``days >= 0``.

    ``add_business_days(cal, d, 0)`` is ``d`` rolled forward to a business day.
    """
    if days < 0:
        raise ValueError("add_business_days counts forward only")
    current = next_business_day(calendar, day)
    for _ in range(days):
        current = next_business_day(calendar, current + timedelta(days=1))
    return current


# --- sessions ----------------------------------------------------------------------------------


def _session_of(rules: CurrencyRules, window: SettlementWindow, day: date) -> Session:
    zone = rules.calendar.zone
    close_day = day if window.closes_at > window.opens_at else day + timedelta(days=1)
    start = datetime.combine(day, window.opens_at, tzinfo=zone).astimezone(UTC)
    end = datetime.combine(close_day, window.closes_at, tzinfo=zone).astimezone(UTC)
    return Session(day, start, end)


def session_at(rules: CurrencyRules, at: datetime) -> Session | None:
    """Return the session open at ``at``, or else the next one; ``None`` for a 24/7 currency.

    Raises:
        ValueError: ``at`` is naive, or the calendar has no business day ahead.
    """
    _require_aware(at)
    window = rules.window
    if window is None:
        return None
    local_day = at.astimezone(rules.calendar.zone).date()
    # Start a day early: an overnight session opened yesterday may still be running.
    day = local_day - timedelta(days=1)
    for _ in range(MAX_CALENDAR_SCAN_DAYS):
        day = next_business_day(rules.calendar, day)
        session = _session_of(rules, window, day)
        if session.closes_at > at:
            return session
        day += timedelta(days=1)
    raise ValueError(f"no settlement session within {MAX_CALENDAR_SCAN_DAYS} days of {at}")


def window_open(rules: CurrencyRules, at: datetime) -> bool:
    """Return whether the interbank leg of ``rules.currency`` may settle at ``at`` (TD-6)."""
    session = session_at(rules, at)
    return session is None or session.opens_at <= at


def window_opens_at(rules: CurrencyRules, at: datetime) -> datetime:
    """Return ``at`` if the window is open, else when it next opens (UTC)."""
    session = session_at(rules, at)
    if session is None or session.opens_at <= at:
        return at.astimezone(UTC)
    return session.opens_at


def hold_deadline(rules: CurrencyRules, at: datetime) -> datetime:
    """Return when an interbank transfer instructed at ``at`` must release its earmark.

    Windowed currencies: the close (cut-off) of the session open at ``at`` or of the next one, so
    an instruction on Friday night waits for Monday's session and fails at Monday's cut-off.
    24/7 currencies: ``at + max_hold_s``.
    """
    session = session_at(rules, at)
    if session is None:
        return at.astimezone(UTC) + timedelta(seconds=rules.max_hold_s)
    return session.closes_at


def settlement_date(rules: CurrencyRules, at: datetime) -> date:
    """Return the interbank settlement date (pacs.009 ``IntrBkSttlmDt``) for a leg sent at ``at``.

    Windowed currencies: the business day of the current (or next) session. 24/7 currencies: the
    local calendar date in the currency's time zone (wCBDC settles on calendar days).
    """
    session = session_at(rules, at)
    if session is None:
        return at.astimezone(rules.calendar.zone).date()
    return session.business_date


def _require_aware(at: datetime) -> None:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"calendar times must be timezone-aware, got naive {at.isoformat()}")
