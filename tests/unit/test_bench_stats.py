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


def test_histogram_counts_each_sample_in_the_bucket_it_rounds_up_to() -> None:
    from shared.benchkit import histogram_ns

    # 100 µs buckets keyed by their upper bound: a sample is never reported faster than it was.
    assert histogram_ns([1, 100_000, 100_001, 250_000, 250_000]) == {100: 2, 200: 1, 300: 2}
    assert histogram_ns([]) == {}


def test_pooled_summary_of_one_run_matches_its_own_percentiles() -> None:
    from shared.benchkit import histogram_ns, pooled_summary

    samples = [ms * 1_000_000 for ms in range(1, 201)]  # 1..200 ms, on bucket bounds
    own, pooled = summarize_ns(samples), pooled_summary([histogram_ns(samples)])
    assert own is not None and pooled is not None
    assert (pooled.count, pooled.p50_ms, pooled.p99_ms, pooled.max_ms) == (
        own.count, own.p50_ms, own.p99_ms, own.max_ms) == (200, 100, 198, 200)
    assert pooled_summary([]) is None


def test_a_stall_in_one_run_is_its_p99_but_not_the_pooled_one() -> None:
    from shared.benchkit import histogram_ns, pooled_summary

    calm = [10_000_000] * 1000
    stalled = [10_000_000] * 980 + [150_000_000] * 20  # 2% of this run waited 150 ms
    own = summarize_ns(stalled)
    assert own is not None and own.p99_ms == 150
    pooled = pooled_summary([histogram_ns(calm), histogram_ns(stalled)])
    assert pooled is not None
    assert (pooled.count, pooled.p99_ms, pooled.p999_ms) == (2000, 10, 150)  # 1% of all: p99.9


def _report(label: str, p99_ms: float, samples_ms: list[int]) -> dict:
    """A latency phase as `harbour bench ledger --json` writes it (histogram keys are text)."""
    from shared.benchkit import histogram_ns

    histogram = histogram_ns(ms * 1_000_000 for ms in samples_ms)
    return {"latency": [{"label": label, "latency": {"p99_ms": p99_ms}, "complete": True,
                         "histogram_us": {str(k): v for k, v in histogram.items()}}]}


def test_pool_reports_groups_phases_by_label_and_counts_runs_over_the_bar() -> None:
    from services.ledger.bench import pool_reports

    reports = [_report("latency, hot", 40.0, [20] * 99 + [40]),
               _report("latency, hot", 120.0, [20] * 98 + [120] * 2)]
    [hot] = pool_reports(reports)
    assert (hot.label, hot.runs, hot.window_p99_ms, hot.windows_over_bar) == (
        "latency, hot", 2, [40.0, 120.0], 1)
    # Pooled, 3 of 200 postings were slow: the p99 is the slowest but two.
    assert hot.pooled is not None
    assert (hot.pooled.count, hot.pooled.p99_ms, hot.pooled.p999_ms) == (200, 40, 120)


def test_pool_refuses_a_report_without_histograms() -> None:
    from services.ledger.bench import pool_reports

    old = {"latency": [{"label": "latency, hot", "latency": {"p99_ms": 40.0}, "complete": True}]}
    with pytest.raises(ValueError, match="no histogram"):
        pool_reports([old])


def test_pool_refuses_a_run_that_did_not_receive_every_result() -> None:
    from services.ledger.bench import pool_reports

    # Its slowest postings never arrived: its histogram lacks exactly the tail being measured.
    short = _report("latency, hot", 40.0, [20] * 99 + [40])
    short["latency"][0]["complete"] = False
    with pytest.raises(ValueError, match="did not receive every result"):
        pool_reports([_report("latency, hot", 40.0, [20] * 100), short])


def test_bench_pool_command_prints_runs_over_the_bar_and_the_pooled_p99(tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from services.cli.main import app

    paths = []
    for i, report in enumerate([_report("latency, hot", 40.0, [20] * 99 + [40]),
                                _report("latency, hot", 120.0, [20] * 98 + [120] * 2)]):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(report))
    shown = CliRunner().invoke(app, ["bench", "pool", *map(str, paths)], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "1 of 2" in shown.output, shown.output
    assert "40.0 / 120.0 / 120.0 ms" in shown.output, shown.output  # each run's p99
    assert "20.0 / 20.0 / 40.0 / 120.0 / 120.0 ms" in shown.output, shown.output  # pooled
