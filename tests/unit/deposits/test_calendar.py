"""services.deposits.calendar: business days and settlement windows as configuration (TD-6, X-5).

The Hong Kong examples use HKD RTGS hours 09:00-17:30 HKT (UTC+8, no daylight saving), Monday to
Friday, with 25-26 December 2025 and 1 January 2026 as configured holidays. 2025-12-01 is a Monday.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta, timezone

import pydantic
import pytest

from services.deposits import calendar as cal

HKT = timezone(timedelta(hours=8))
HOLIDAYS = frozenset({date(2025, 12, 25), date(2025, 12, 26), date(2026, 1, 1)})
HK_CAL = cal.BusinessCalendar(timezone="Asia/Hong_Kong", holidays=HOLIDAYS)
CHATS = cal.SettlementWindow(opens_at=time(9, 0), closes_at=time(17, 30))


def rules(window: cal.SettlementWindow | None = CHATS, calendar: cal.BusinessCalendar = HK_CAL,
          currency: str = "HKD", **kw: object) -> cal.CurrencyRules:
    return cal.CurrencyRules.model_validate({
        "currency": currency, "scale": 2, "settlement_mode": "rtgs" if window else "wcbdc",
        "settlement_asset": f"CB.{currency}", "calendar": calendar, "window": window, **kw,
    })


HKD = rules()


def hkt(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, s, tzinfo=HKT)


# --- business days (X-5) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("day", "business"),
    [
        (date(2025, 12, 1), True),    # Monday
        (date(2025, 12, 5), True),    # Friday
        (date(2025, 12, 6), False),   # Saturday
        (date(2025, 12, 7), False),   # Sunday
        (date(2025, 12, 25), False),  # configured holiday on a Thursday
        (date(2026, 1, 1), False),
    ],
)
def test_business_days_are_weekdays_minus_configured_holidays(day: date, business: bool) -> None:
    assert cal.is_business_day(HK_CAL, day) is business


@pytest.mark.parametrize(
    ("start", "n", "expected"),
    [
        (date(2025, 12, 1), 0, date(2025, 12, 1)),    # T+0 on a business day is that day
        (date(2025, 12, 6), 0, date(2025, 12, 8)),    # T+0 on Saturday rolls to Monday
        (date(2025, 12, 5), 1, date(2025, 12, 8)),    # Friday T+1 is Monday, not Saturday
        (date(2025, 12, 24), 1, date(2025, 12, 29)),  # skips Christmas holidays and a weekend
        (date(2025, 12, 31), 1, date(2026, 1, 2)),    # skips New Year's Day
        (date(2025, 12, 1), 5, date(2025, 12, 8)),
    ],
)
def test_t_plus_n_counts_business_days_never_calendar_days(start: date, n: int,
                                                           expected: date) -> None:
    assert cal.add_business_days(HK_CAL, start, n) == expected


def test_a_calendar_without_any_business_day_is_a_configuration_error() -> None:
    closed = cal.BusinessCalendar(timezone="Asia/Hong_Kong", weekdays=frozenset({0}),
                                  holidays=frozenset(date(2025, 12, 1) + timedelta(days=7 * k)
                                                     for k in range(100)))
    with pytest.raises(ValueError, match="no business day"):
        cal.next_business_day(closed, date(2025, 12, 1))
    with pytest.raises(ValueError, match="forward"):
        cal.add_business_days(HK_CAL, date(2025, 12, 1), -1)


# --- the window (TD-6) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "is_open"),
    [
        (hkt(2025, 12, 1, 8, 59, 59), False),   # before opening
        (hkt(2025, 12, 1, 9, 0), True),         # opening instant is inside
        (hkt(2025, 12, 1, 17, 29, 59), True),
        (hkt(2025, 12, 1, 17, 30), False),      # the cut-off instant is outside
        (hkt(2025, 12, 6, 11, 0), False),       # Saturday
        (hkt(2025, 12, 25, 11, 0), False),      # holiday
        (datetime(2025, 12, 1, 1, 0, tzinfo=UTC), True),  # 09:00 HKT given in UTC
    ],
)
def test_rtgs_window_follows_local_hours_on_business_days(at: datetime, is_open: bool) -> None:
    assert cal.window_open(HKD, at) is is_open


def test_a_24_7_currency_is_always_open() -> None:
    wcbdc = rules(window=None)
    for at in (hkt(2025, 12, 6, 3, 0), hkt(2025, 12, 25, 23, 59)):
        assert cal.window_open(wcbdc, at)
        assert cal.window_opens_at(wcbdc, at) == at
        assert cal.session_at(wcbdc, at) is None


@pytest.mark.parametrize(
    ("at", "opens"),
    [
        (hkt(2025, 12, 1, 11, 0), hkt(2025, 12, 1, 11, 0)),   # open now: now
        (hkt(2025, 12, 1, 7, 0), hkt(2025, 12, 1, 9, 0)),     # later today
        (hkt(2025, 12, 5, 18, 0), hkt(2025, 12, 8, 9, 0)),    # Friday evening: Monday
        (hkt(2025, 12, 24, 17, 45), hkt(2025, 12, 29, 9, 0)),  # Christmas Eve after cut-off
    ],
)
def test_window_opens_at_is_the_next_session_start(at: datetime, opens: datetime) -> None:
    got = cal.window_opens_at(HKD, at)
    assert got == opens and got.tzinfo is UTC


@pytest.mark.parametrize(
    ("at", "deadline"),
    [
        (hkt(2025, 12, 1, 11, 0), hkt(2025, 12, 1, 17, 30)),   # in session: today's cut-off
        (hkt(2025, 12, 1, 18, 0), hkt(2025, 12, 2, 17, 30)),   # after cut-off: tomorrow's
        (hkt(2025, 12, 5, 20, 0), hkt(2025, 12, 8, 17, 30)),   # Friday night: Monday's
        (hkt(2025, 12, 24, 18, 0), hkt(2025, 12, 29, 17, 30)),
    ],
)
def test_hold_deadline_is_the_cutoff_of_the_session_the_leg_will_use(at: datetime,
                                                                     deadline: datetime) -> None:
    assert cal.hold_deadline(HKD, at) == deadline


def test_hold_deadline_of_a_24_7_currency_is_max_hold_after_now() -> None:
    at = hkt(2025, 12, 6, 3, 0)
    assert cal.hold_deadline(rules(window=None, max_hold_s=600), at) == at + timedelta(minutes=10)


@pytest.mark.parametrize(
    ("at", "value_date"),
    [
        (hkt(2025, 12, 1, 11, 0), date(2025, 12, 1)),
        (hkt(2025, 12, 5, 19, 0), date(2025, 12, 8)),   # after Friday's cut-off: Monday
        (hkt(2025, 12, 1, 1, 0), date(2025, 12, 1)),    # before opening: today's session
    ],
)
def test_interbank_settlement_date_is_the_session_business_day(at: datetime,
                                                               value_date: date) -> None:
    assert cal.settlement_date(HKD, at) == value_date


def test_settlement_date_of_a_24_7_currency_is_the_local_calendar_date() -> None:
    # 2025-12-06 20:00 UTC is Sunday 04:00 in Hong Kong.
    assert cal.settlement_date(rules(window=None), datetime(2025, 12, 6, 20, 0, tzinfo=UTC)) \
        == date(2025, 12, 7)


def test_an_overnight_session_belongs_to_the_business_day_it_opened_on() -> None:
    # RMB RTGS style: 08:30 to 05:00 the next morning (20.5 hours).
    cnh = rules(window=cal.SettlementWindow(opens_at=time(8, 30), closes_at=time(5, 0)),
                currency="CNH")
    assert cal.window_open(cnh, hkt(2025, 12, 2, 2, 0))        # Monday's session, Tuesday 02:00
    assert cal.window_open(cnh, hkt(2025, 12, 6, 2, 0))        # Friday's session, Saturday 02:00
    assert not cal.window_open(cnh, hkt(2025, 12, 8, 2, 0))    # Sunday opened no session
    assert not cal.window_open(cnh, hkt(2025, 12, 2, 6, 0))    # between sessions
    assert cal.settlement_date(cnh, hkt(2025, 12, 6, 2, 0)) == date(2025, 12, 5)
    assert cal.hold_deadline(cnh, hkt(2025, 12, 5, 23, 0)) == hkt(2025, 12, 6, 5, 0)


def test_windows_follow_daylight_saving_in_the_currency_time_zone() -> None:
    usd = rules(calendar=cal.BusinessCalendar(timezone="America/New_York"), currency="USD",
                window=cal.SettlementWindow(opens_at=time(9, 0), closes_at=time(17, 0)))
    summer, winter = datetime(2025, 7, 1, 12, 0, tzinfo=UTC), datetime(2025, 1, 7, 12, 0,
                                                                          tzinfo=UTC)
    assert cal.window_opens_at(usd, summer) == datetime(2025, 7, 1, 13, 0, tzinfo=UTC)
    assert cal.window_opens_at(usd, winter) == datetime(2025, 1, 7, 14, 0, tzinfo=UTC)


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        cal.window_open(HKD, datetime(2025, 12, 1, 11, 0))


# --- configuration validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: cal.BusinessCalendar(timezone="Mars/Olympus"), "unknown IANA"),
        (lambda: cal.BusinessCalendar(timezone="Asia/Hong_Kong", weekdays=frozenset()),
         "weekdays"),
        (lambda: cal.BusinessCalendar(timezone="Asia/Hong_Kong", weekdays=frozenset({7})),
         "weekdays"),
        (lambda: cal.SettlementWindow(opens_at=time(9), closes_at=time(9)), "24/7"),
        (lambda: rules(settlement_asset="HKD"), "differ"),
        (lambda: rules(max_hold_s=0), "greater than or equal"),
        (lambda: cal.DepositsConfig(currencies={"USD": HKD}), "holds the rules"),
        (lambda: cal.DepositsConfig(currencies={
            "HKD": HKD, "USD": rules(currency="USD", settlement_asset="CB.HKD")}),
         "own settlement asset"),
    ],
)
def test_broken_configuration_is_refused_at_load_time(build: object, message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        build()  # type: ignore[operator]


def test_thresholds_have_documented_defaults() -> None:
    assert (HKD.max_hold_s, HKD.confirmation_timeout_s, HKD.ledger_timeout_margin_s) == (
        3600, 1800, 3600)
    assert cal.DepositsConfig(currencies={"HKD": HKD}).rules("USD") is None
