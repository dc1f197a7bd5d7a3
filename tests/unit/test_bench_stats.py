"""The pure helpers of the benches (``shared.benchkit`` and ``harbour bench ledger``): percentiles,
rates, pacing, workload, parsing."""

from __future__ import annotations

import random

import pytest

from services.ledger.bench import (
    FUNDING_FANOUT,
    kafka_version_from_cmdline,
    plan_transfers,
    setup_commands,
)
from shared.benchkit import pacing_schedule, per_second, percentile, ratio, summarize_ns


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 99.9) == 100
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1


def test_percentile_returns_an_observed_value() -> None:
    assert percentile([10, 20, 30], 50) == 20
    assert percentile([10, 20, 30], 51) == 20
    assert percentile([10, 20, 30], 67) == 30
    assert percentile([7], 99) == 7


@pytest.mark.parametrize("q", [-1, 100.1])
def test_percentile_rejects_out_of_range(q: float) -> None:
    with pytest.raises(ValueError):
        percentile([1, 2, 3], q)


def test_percentile_rejects_empty() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize_converts_ns_to_ms_and_sorts() -> None:
    samples = [5_000_000, 1_000_000, 3_000_000, 2_000_000, 4_000_000]  # 1..5 ms, shuffled
    s = summarize_ns(samples)
    assert s is not None
    assert s.count == 5
    assert s.p50_ms == 3.0
    assert s.p99_ms == 5.0
    assert s.max_ms == 5.0
    assert s.mean_ms == 3.0


def test_summarize_nothing_is_none() -> None:
    assert summarize_ns([]) is None


def test_per_second_and_ratio() -> None:
    assert per_second(5_000, 500_000_000) == 10_000
    assert per_second(10, 0) == 0
    assert ratio(1, 4) == 0.25
    assert ratio(1, None) is None
    assert ratio(1, 0) is None


def test_pacing_schedule_is_evenly_spaced() -> None:
    sched = pacing_schedule(1_000, 2_000, 5)
    assert sched == [1_000, 501_000, 1_001_000, 1_501_000, 2_001_000]
    with pytest.raises(ValueError):
        pacing_schedule(0, 0, 1)


def test_plan_transfers_moves_between_distinct_accounts() -> None:
    accounts = ["a", "b", "c"]
    transfers = plan_transfers("tp", 500, accounts, random.Random(1))
    assert len({t.posting_id for t in transfers}) == 500
    assert all(t.debit != t.credit for t in transfers)
    assert {t.debit for t in transfers} == set(accounts)
    assert all(t.amount_minor > 0 for t in transfers)
    assert plan_transfers("tp", 20, accounts, random.Random(1)) == transfers[:20]
    with pytest.raises(ValueError):
        plan_transfers("tp", 1, ["only"], random.Random(1))


def test_setup_funds_every_account_once() -> None:
    accounts = [f"acct-{i}" for i in range(130)]
    cmds = setup_commands(accounts, "ledger.results.bench-x")
    funding = -(-len(accounts) // FUNDING_FANOUT)
    assert len(cmds) == 2 + len(accounts) + funding
    assert all(b'"reply_to":"ledger.results.bench-x"' in value for _, value in cmds)
    assert cmds[-1][0] == f"fund-{(funding - 1) * FUNDING_FANOUT:07d}".encode()


def test_kafka_version_from_a_broker_command_line() -> None:
    cmd = ["java", "-cp", "/opt/kafka/libs/kafka_2.13-4.1.1.jar:/x.jar", "kafka.Kafka", "s.p"]
    assert kafka_version_from_cmdline(cmd) == "4.1.1"
    cached = ["java", "-cp", "/root/.cache/harbour/kafka-4.4.0/lib/*", "kafka.Kafka"]
    assert kafka_version_from_cmdline(cached) == "4.4.0"
    assert kafka_version_from_cmdline(["python", "app.py"]) is None
