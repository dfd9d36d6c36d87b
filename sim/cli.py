"""The ``fleetsim`` command line.

``fleetsim run [SCENARIO.yaml] [--set key=value ...] [--out DIR] [--json]`` and friends. User
errors print one line ``error: ...`` on stderr and exit with code 2, never a traceback.
"""

from __future__ import annotations

import gc
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from sim.errors import FleetsimError

app = typer.Typer(help="fleetsim: simulate LLM serving clusters (vLLM-faithful replicas).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _root() -> None:
    """fleetsim: simulate LLM serving clusters whose replicas behave like vLLM V1."""


@contextmanager
def _gc_paused():
    """Import the simulator (pandas, numpy, pyarrow, pydantic: ~70k long-lived objects) without the
    cyclic garbage collector running over them again and again (~180 young, ~16 middle and one full
    collection, 50-100 ms, finding nothing). The imported objects then go to the oldest generation as
    they are (freeze + unfreeze), so nothing is left uncollectable."""
    enabled = gc.isenabled()
    own = gc.get_freeze_count() == 0  # a caller's own frozen set is left alone
    gc.disable()
    try:
        yield
    finally:
        if own:
            gc.freeze()
            gc.unfreeze()
        if enabled:
            gc.enable()


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


@app.command()
def run(
    scenario: Optional[Path] = typer.Argument(None, help="Scenario YAML (default: built-in Azure-conv scenario)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key, e.g. --set cluster.replicas=8 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write requests/timeseries Parquet, summary JSON, scenario YAML here."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
) -> None:
    """Simulate a scenario and print its summary."""
    with _gc_paused():
        import sim
        from sim.api import json_safe

    try:
        result = sim.run(scenario, overrides=set_, progress=progress and sys.stderr.isatty())
    except FleetsimError as e:
        _fail(str(e))
        return
    if out is not None:
        result.save(out)
    s = json_safe(result.summary)
    if as_json:
        typer.echo(json.dumps(s))
    else:
        _print_summary(result.scenario.name, s, out)
    if not result.summary.get("complete", True):
        typer.echo("error: the run hit its horizon with requests unfinished; they are counted as failed "
                   "(reason unfinished_at_horizon)", err=True)
        raise typer.Exit(1)


def _print_summary(name: str, s: dict, out: Optional[Path]) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(v, unit=""):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}{unit}"
        return f"{v}{unit}"

    c = Console()
    t = Table(title=name, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("p50", justify="right")
    t.add_column("p90", justify="right")
    t.add_column("p99", justify="right")
    t.add_column("mean", justify="right")
    for m in ("ttft", "tpot", "itl", "e2e", "queue"):
        t.add_row(f"{m} (s)", f(s.get(f"{m}_p50_s")), f(s.get(f"{m}_p90_s")), f(s.get(f"{m}_p99_s")), f(s.get(f"{m}_mean_s")))
    c.print(t)
    c.print(
        f"requests {s['requests_total']}: completed {s['requests_completed']}, rejected {s['requests_rejected']}, "
        f"failed {s['requests_failed']} | throughput {f(s['throughput_req_s'])} req/s, "
        f"{f(s['throughput_output_tok_s'])} output tok/s | prefix hit rate {f(s['prefix_hit_rate'])} | "
        f"preemptions {s['preemptions']}")
    slo = f" | SLO attainment {f(s['slo_attainment'])}" if "slo_attainment" in s else ""
    c.print(f"{s.get('replicas_max')} replicas max ({s.get('gpu')} x{s.get('tensor_parallel')}, {s.get('model')}) | "
            f"GPU-hours {f(s['gpu_hours'])} | cost ${f(s['cost_usd'])} | "
            f"${f(s['cost_per_million_output_tokens_usd'])}/M output tokens{slo} | simulated in {f(s['sim_wall_s'])} s")
    if out is not None:
        c.print(f"results written to {out}/")


def _mount_optional() -> None:
    """Sub-apps owned by other packages; each is optional so a partial install still runs."""
    try:
        from traces.cli import app as trace_app

        app.add_typer(trace_app, name="trace", help="Inspect and convert workload traces.")
    except ImportError:
        pass
    try:
        from validation.cli import register as register_validation

        register_validation(app)
    except ImportError:
        pass
    for mod in ("benchmarks_cli", "app_cli", "sweep_cli"):
        try:
            m = __import__(f"sim.{mod}", fromlist=["register"])
            m.register(app)
        except ImportError:
            pass


_mount_optional()


def main() -> None:
    try:
        app()
    except FleetsimError as e:  # errors raised outside command bodies (e.g. while mounting)
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    finally:
        # The process ends next. Python's shutdown runs full garbage collections over every live
        # object (~80k: the imported libraries), 0.1-0.25 s that free nothing the OS would not.
        # Frozen objects are skipped; modules are still torn down, atexit handlers still run.
        gc.freeze()


if __name__ == "__main__":
    main()
