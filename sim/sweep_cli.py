"""``fleetsim sweep GRID.yaml [--out DIR] [--address ADDR] [--max-parallel N]`` (see sim/sweep.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def sweep(
        grid: Path = typer.Argument(..., help="Grid file: {base: SCENARIO, grid: {dotted.key: [values]}, seeds: [...]}"),
        out: Path = typer.Option(Path("sweep-out"), "--out", help="Output folder: results.parquet and runs/ (the cache)."),
        address: Optional[str] = typer.Option(None, "--address", help="Existing Ray cluster (e.g. auto, ray://head:10001); "
                                              "default: start a private local Ray."),
        max_parallel: Optional[int] = typer.Option(None, "--max-parallel", min=1, help="Runs in flight at once."),
        inline: bool = typer.Option(False, "--inline", help="No Ray: run the points one by one in this process."),
        save_runs: bool = typer.Option(False, "--save-runs", help="Also keep each run's requests/timeseries Parquet."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
    ) -> None:
        """Run a grid of scenarios (as Ray tasks) into OUT/results.parquet; reruns skip finished points.

        Exit code 0 if every run succeeded, 1 if some failed (their rows have status 'failed'
        and an 'error'), 2 for an invalid grid file.
        """
        import sys

        from sim.errors import FleetsimError
        from sim.sweep import RESULTS_FILE, run_sweep

        try:
            table = run_sweep(grid, out, address, max_parallel=max_parallel, backend="inline" if inline else "ray",
                              save_runs=save_runs, progress=progress and sys.stderr.isatty())
        except FleetsimError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        n = len(table)
        failed = int((table["status"] == "failed").sum()) if n else 0
        cached = int(table["cached"].sum()) if n else 0
        typer.echo(f"{n} runs: {n - failed} ok ({cached} from cache), {failed} failed -> {out / RESULTS_FILE}")
        if failed:  # each failure was already reported on stderr as it happened
            raise typer.Exit(1)
