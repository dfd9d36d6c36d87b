"""``fleetsim trace``: inspect and convert workload traces.

    fleetsim trace info mooncake-conversation
    fleetsim trace info burst.csv --skip-invalid --json
    fleetsim trace convert sharegpt.json out.parquet -o chars_per_token=4 -o turns=all
    fleetsim trace list

User errors (bad file, malformed row, unknown option) print ``error: ...`` on stderr and exit 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml

from sim.errors import FleetsimError

app = typer.Typer(
    help="Inspect and convert workload traces (built-in names or files in any supported format).",
    no_args_is_help=True,
    add_completion=False,
)

_FORMAT_HELP = "Trace format (default: detected from the content); see `fleetsim trace list`."
_OPTION_HELP = "Format option KEY=VALUE (repeatable), e.g. chars_per_token=4, turns=all, system_prompt_tokens=1000."


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _options(pairs: list[str] | None) -> dict:
    out = {}
    for p in pairs or []:
        if "=" not in p:
            _fail(f"--option {p!r}: expected KEY=VALUE")
        k, v = p.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _load(source: str, fmt: str, skip_invalid: bool, options: dict):
    from traces.config import load_trace

    return load_trace(source, fmt, base_dir=Path.cwd(), skip_invalid=skip_invalid, options=options)


@app.command()
def info(
    source: str = typer.Argument(..., metavar="FILE_OR_NAME", help="Built-in trace name or trace file."),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON."),
    fmt: str = typer.Option("auto", "--format", "-f", help=_FORMAT_HELP),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip malformed rows (counted and reported) instead of failing."),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", help=_OPTION_HELP),
) -> None:
    """Requests, duration, rate, inter-arrival CV, length percentiles, sessions, prefix reuse."""
    from traces.stats import format_stats, trace_stats

    try:
        w = _load(source, fmt, skip_invalid, _options(option))
        stats = trace_stats(w)
    except FleetsimError as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps(stats, indent=2, default=float))
    else:
        typer.echo(format_stats(stats))


@app.command()
def convert(
    source: str = typer.Argument(..., metavar="IN", help="Built-in trace name or trace file."),
    out: Path = typer.Argument(..., metavar="OUT", help="Output file: .parquet, .csv(.gz) or .jsonl(.gz)."),
    fmt: str = typer.Option("auto", "--format", "-f", help=_FORMAT_HELP),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip malformed rows (counted and reported) instead of failing."),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", help=_OPTION_HELP),
) -> None:
    """Convert a trace to fleetsim's own format (Parquet recommended)."""
    from traces.formats.native import write

    try:
        w = _load(source, fmt, skip_invalid, _options(option))
        write(w, out)
    except FleetsimError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"{out}: cannot write ({e.strerror or e})")
    typer.echo(f"wrote {len(w):,} requests to {out}")
    for note in w.notes:
        typer.echo(f"note: {note}")


@app.command("list")
def list_builtins() -> None:
    """Built-in traces, rate curves and known formats."""
    from traces.builtin import RATE_CURVES, TRACES
    from traces.formats import FORMAT_NAMES

    typer.echo("built-in traces:")
    for name, b in sorted(TRACES.items()):
        typer.echo(f"  {name:26s} {b.description}")
    typer.echo("rate curves (synthetic.rate_curve.servegen): " + ", ".join(sorted(RATE_CURVES)))
    typer.echo("formats: " + ", ".join(FORMAT_NAMES))


def main() -> None:  # pragma: no cover - `python -m traces.cli`
    try:
        app()
    except FleetsimError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
