"""shared.ids (UUIDv7, deterministic UUIDv5) and shared.clock."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import ids
from shared.clock import Clock, ManualClock, SystemClock
from shared.ids import (
    HARBOUR_NAMESPACE,
    DeterministicIds,
    deterministic_id,
    new_id,
    uuid7_unix_ms,
)

# --- new_id -------------------------------------------------------------------------------------


@pytest.fixture
def restore_v7_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put the generator's state back afterwards: a test that fakes a future clock must not make
    every later id in the session come from that future."""
    monkeypatch.setattr(ids._state, "last_ms", ids._state.last_ms)
    monkeypatch.setattr(ids._state, "last_rand", ids._state.last_rand)


def test_new_id_is_a_rfc_9562_version_7_uuid() -> None:
    value = new_id()
    assert value.version == 7
    assert value.variant == uuid.RFC_4122


def test_new_id_embeds_the_current_unix_milliseconds() -> None:
    before = time.time_ns() // 1_000_000
    value = new_id()
    after = time.time_ns() // 1_000_000
    # The monotonic rule may have borrowed a millisecond or two from earlier calls.
    assert before <= uuid7_unix_ms(value) <= after + 2


def test_new_ids_are_unique_and_strictly_increasing() -> None:
    values = [new_id() for _ in range(20_000)]
    assert values == sorted(values)
    assert len(set(values)) == len(values)
    # Strings sort the same way as the UUIDs: what a text index or a log reader sees.
    assert [str(v) for v in values] == sorted(str(v) for v in values)


@pytest.mark.usefixtures("restore_v7_state")
def test_new_id_stays_monotonic_when_the_clock_stands_still(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frozen_ns = time.time_ns() + 10**12  # ahead of any id issued so far
    monkeypatch.setattr(ids.time, "time_ns", lambda: frozen_ns)
    values = [new_id() for _ in range(1_000)]
    assert values == sorted(set(values))
    assert {uuid7_unix_ms(v) for v in values} == {frozen_ns // 1_000_000}


@pytest.mark.usefixtures("restore_v7_state")
def test_new_id_stays_monotonic_when_the_clock_steps_back(monkeypatch: pytest.MonkeyPatch) -> None:
    first = new_id()
    monkeypatch.setattr(ids.time, "time_ns", lambda: 1_000_000)  # 1970
    second = new_id()
    assert second > first
    assert uuid7_unix_ms(second) == uuid7_unix_ms(first)


@pytest.mark.usefixtures("restore_v7_state")
def test_new_id_borrows_the_next_millisecond_when_the_counter_runs_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now_ms = time.time_ns() // 1_000_000 + 10**6
    monkeypatch.setattr(ids.time, "time_ns", lambda: now_ms * 1_000_000)
    ids._state.last_ms, ids._state.last_rand = now_ms, (1 << 74) - 1
    value = new_id()
    assert uuid7_unix_ms(value) == now_ms + 1
    assert value.version == 7


def test_uuid7_unix_ms_refuses_other_versions() -> None:
    with pytest.raises(ValueError, match="UUIDv7"):
        uuid7_unix_ms(uuid.uuid4())


# --- deterministic_id ---------------------------------------------------------------------------


def test_deterministic_id_is_pinned_forever() -> None:
    # Stored idempotency keys depend on these exact values: a change here is a breaking change.
    assert uuid.UUID("5f3c2a8e-6d1b-5c47-9a0e-4b8f7d2e1c93") == HARBOUR_NAMESPACE
    assert deterministic_id("ledger.posting", "bank-a", "instr-1") == uuid.UUID(
        "56ad7f9f-a143-5b37-ae87-4f26917a31a0"
    )
    assert deterministic_id("x") == uuid.UUID("6e9fc01f-16c6-55ef-9a6a-d739ad992c72")


_ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()))  # lone surrogates too


@given(_ANY_TEXT.filter(bool), st.lists(_ANY_TEXT, max_size=3), st.lists(_ANY_TEXT, max_size=3))
def test_deterministic_ids_derive_the_same_ids_as_deterministic_id(
        namespace: str, fixed: list[str], rest: list[str]) -> None:
    # Any text: quotes, backslashes, control characters, non-ASCII and lone surrogates.
    assert DeterministicIds(namespace, *fixed).text(*rest) == str(
        deterministic_id(namespace, *fixed, *rest))


def test_deterministic_ids_take_strings_only() -> None:
    with pytest.raises(TypeError):
        DeterministicIds("ledger.answer", "t").text("1", 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DeterministicIds("")


def test_deterministic_id_is_stable_and_version_5() -> None:
    first = deterministic_id("deposits.mint", "bank-a", "42")
    assert first == deterministic_id("deposits.mint", "bank-a", "42")
    assert first.version == 5


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (("n", "a|b", "c"), ("n", "a", "b|c")),
        (("n", "ab"), ("n", "a", "b")),
        (("n", "a"), ("m", "a")),
        (("n",), ("n", "")),
        (("n", '"', ","), ("n", '",')),
    ],
)
def test_deterministic_id_keeps_part_boundaries(
    left: tuple[str, ...], right: tuple[str, ...]
) -> None:
    assert deterministic_id(*left) != deterministic_id(*right)


def test_deterministic_id_takes_strings_only() -> None:
    with pytest.raises(TypeError):
        deterministic_id("n", uuid.uuid4())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        deterministic_id("n", 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="namespace"):
        deterministic_id("", "a")


# --- clocks -------------------------------------------------------------------------------------


def test_system_clock_is_aware_utc_now() -> None:
    clock = SystemClock()
    before = datetime.now(UTC)
    now = clock.now()
    assert now.tzinfo is UTC
    assert before <= now <= datetime.now(UTC)
    assert isinstance(clock, Clock)


def test_manual_clock_moves_only_when_told() -> None:
    start = datetime(2025, 3, 3, 9, 30, tzinfo=UTC)
    clock = ManualClock(start)
    assert isinstance(clock, Clock)
    assert clock.now() == start
    assert clock.now() == start
    assert clock.advance(timedelta(seconds=90)) == start + timedelta(seconds=90)
    assert clock.now() == start + timedelta(seconds=90)
    clock.set(start - timedelta(days=1))
    assert clock.now() == start - timedelta(days=1)


def test_manual_clock_reports_utc_whatever_offset_it_was_given() -> None:
    hong_kong = timezone(timedelta(hours=8))
    clock = ManualClock(datetime(2025, 3, 3, 17, 30, tzinfo=hong_kong))
    assert clock.now() == datetime(2025, 3, 3, 9, 30, tzinfo=UTC)
    assert clock.now().tzinfo is UTC
    clock.set(datetime(2025, 3, 4, 8, 0, tzinfo=hong_kong))
    assert clock.now().tzinfo is UTC
    assert clock.now().hour == 0


def test_manual_clock_refuses_naive_times_and_going_back_by_advance() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        ManualClock(datetime(2025, 1, 1))
    clock = ManualClock(datetime(2025, 1, 1, tzinfo=UTC))
    with pytest.raises(ValueError, match="timezone-aware"):
        clock.set(datetime(2025, 1, 2))
    with pytest.raises(ValueError, match="forward"):
        clock.advance(timedelta(seconds=-1))
    assert clock.now() == datetime(2025, 1, 1, tzinfo=UTC)


def test_a_forked_child_starts_a_fresh_sequence() -> None:
    # What os.register_at_fork runs in the child; forking itself is left to integration tests.
    state = ids._V7State()
    state.last_ms, state.last_rand = 123, 456
    state.reset()
    assert (state.last_ms, state.last_rand) == (-1, 0)
    assert not state.lock.locked()
