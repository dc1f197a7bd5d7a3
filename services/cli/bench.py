"""``harbour bench ...``: benchmarks, printed beside the machine's raw ceiling of the same run."""

from __future__ import annotations

import typer

bench_app = typer.Typer(help="Benchmarks (throughput and latency beside the raw ceiling).",
                        no_args_is_help=True)
