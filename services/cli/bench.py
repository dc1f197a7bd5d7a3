"""``harbour bench ...``: benchmarks, printed beside the machine's raw ceiling of the same run."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from services.deposits.bench import command as deposits_bench
from services.gateway.bench import bench_gateway
from shared.runtime import run

bench_app = typer.Typer(help="Benchmarks (throughput and latency beside the raw ceiling).",
                        no_args_is_help=True)
# Wide enough for the report's notes when piped to a file or CI log.
console = Console(width=None if sys.stdout.isatty() else 150)


@bench_app.command("ledger")
def ledger(
    postings: int = typer.Option(50_000, "--postings", min=1,
                                 help="two-entry postings per throughput case"),
    accounts: int = typer.Option(10_000, "--accounts", min=2, help="accounts of the main case"),
    rate: int = typer.Option(2_000, "--rate", min=1, help="offered postings/s for latency"),
    duration_s: float = typer.Option(10.0, "--duration-s", min=0.1,
                                     help="how long the latency load is offered"),
    hot: bool = typer.Option(True, "--hot/--no-hot", help="also run the 10-hot-accounts case"),
    keep: bool = typer.Option(False, "--keep", help="keep the databases and topics afterwards"),
    json_path: Path | None = typer.Option(None, "--json", help="write the report as JSON here"),
    pgbench: bool = typer.Option(True, "--pgbench/--no-pgbench",
                                 help="also run the bundled pgbench TPC-B-like reference"),
    profile: Path | None = typer.Option(
        None, "--profile", help="run the writer under a profiler and write its output here "
        "(figures then include the profiler's overhead)"),
    profiler: str = typer.Option("cprofile", "--profiler",
                                 help="cprofile (stdlib) or pyinstrument (if installed)"),
    seed: int = typer.Option(7, "--seed", help="workload random seed"),
    stall_s: float = typer.Option(60.0, "--stall-s", min=1.0,
                                  help="give up when no result arrives for this long"),
) -> None:
    """Ledger throughput, latency and peak RSS beside the raw PostgreSQL ceiling of this machine.

    Uses HARBOUR_KAFKA_BOOTSTRAP and HARBOUR_DATABASE_URL. Creates and drops its own databases.

    Creates and deletes its own topics; runs the ledger service as a subprocess.
    """
    from services.ledger.bench import BenchConfig, render, run_bench
    from shared.config import KafkaSettings, PostgresSettings

    if profiler not in ("cprofile", "pyinstrument"):
        raise typer.BadParameter("--profiler must be cprofile or pyinstrument")
    cfg = BenchConfig(
        bootstrap=KafkaSettings().kafka_bootstrap,
        database_url=PostgresSettings().database_url,
        postings=postings, accounts=accounts, rate=rate, duration_s=duration_s, hot=hot,
        keep=keep, pgbench=pgbench, profile=profile, profiler=profiler, seed=seed,
        stall_s=stall_s,
    )

    def say(line: str) -> None:
        console.print(f"[bold cyan]bench[/] {line}")

    # Ctrl-C and SIGTERM cancel the run inside run_bench, which cleans up and returns what it has.
    report = run(run_bench(cfg, say))
    render(report, console)
    if json_path is not None:
        json_path.write_text(report.to_json())
        console.print(f"report written to {json_path}")
    if report.interrupted:
        raise typer.Exit(130)
    if report.error:
        raise typer.Exit(1)


@bench_app.command("pool")
def pool(
    reports: list[Path] = typer.Argument(..., exists=True, dir_okay=False,
                                         help="`harbour bench ledger --json` reports"),
) -> None:
    """Pool the latency phases of several ledger runs: each run's p99 beside the percentiles of
    every posting of every run together."""
    import json

    from services.ledger.bench import pool_reports, render_pooled

    try:
        pooled = pool_reports([json.loads(p.read_text()) for p in reports])
    except (ValueError, KeyError) as exc:
        raise typer.BadParameter(str(exc)) from None
    render_pooled(pooled, console)


bench_app.command("deposits")(deposits_bench)
bench_app.command("gateway")(bench_gateway)
