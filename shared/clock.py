"""An injectable clock, so that domain code, sagas and timeouts are deterministic in tests.

Code that needs the time takes a :class:`Clock`; production wires :class:`SystemClock`, tests and
saga simulations wire :class:`ManualClock`. Every clock returns timezone-aware UTC datetimes: a
naive datetime has no defined instant, and a settlement timestamp must have one.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "ManualClock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """Anything that can tell the current time."""

    def now(self) -> datetime:
        """Return the current time as a timezone-aware UTC datetime."""
        ...


class SystemClock:
    """The wall clock of the machine."""

    def now(self) -> datetime:
        """Return the current wall-clock time in UTC."""
        return datetime.now(UTC)


class ManualClock:
    """A clock that moves only when told to.

    Args:
        start: The initial time; must be timezone-aware. It is stored converted to UTC.

    Raises:
        ValueError: ``start`` is naive.
    """

    def __init__(self, start: datetime) -> None:
        self._now = _as_utc(start)

    def now(self) -> datetime:
        """Return the current manual time in UTC."""
        return self._now

    def advance(self, delta: timedelta) -> datetime:
        """Move the clock forward.

        Args:
            delta: How far to move; must not be negative (use :meth:`set` to go back on purpose).

        Returns:
            The new current time.

        Raises:
            ValueError: ``delta`` is negative.
        """
        if delta < timedelta(0):
            raise ValueError(f"advance() only moves forward, got {delta}")
        self._now += delta
        return self._now

    def set(self, when: datetime) -> None:
        """Jump to a given time, forward or back.

        Args:
            when: The new current time; must be timezone-aware.

        Raises:
            ValueError: ``when`` is naive.
        """
        self._now = _as_utc(when)


def _as_utc(when: datetime) -> datetime:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"clock times must be timezone-aware, got naive {when.isoformat()}")
    return when.astimezone(UTC)
