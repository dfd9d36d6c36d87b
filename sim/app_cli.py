"""``fleetsim app [--port N]``: start the Streamlit what-if explorer (app/explorer.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer


def explorer_path() -> Path:
    """The explorer script (inside the installed ``app`` package or the checkout)."""
    import app

    return Path(app.__file__).resolve().parent / "explorer.py"


def streamlit_command(port: int, host: Optional[str], open_browser: bool) -> list[str]:
    cmd = [sys.executable, "-m", "streamlit", "run", str(explorer_path()),
           "--server.port", str(port), "--server.headless", "false" if open_browser else "true",
           "--browser.gatherUsageStats", "false", "--theme.base", "light"]
    if host:
        cmd += ["--server.address", host]
    return cmd


def register(app: typer.Typer) -> None:
    @app.command(name="app")
    def app_command(
        port: int = typer.Option(8501, "--port", min=1, max=65535, help="Port to serve on."),
        host: Optional[str] = typer.Option(None, "--host", help="Address to bind (default: Streamlit's, all interfaces)."),
        open_browser: bool = typer.Option(True, "--browser/--no-browser", help="Open a browser tab."),
    ) -> None:
        """Start the what-if explorer in the browser (Streamlit)."""
        try:
            import streamlit  # noqa: F401
        except ImportError:
            typer.echo("error: the explorer needs Streamlit and Plotly: pip install 'streamlit>=1.67' 'plotly>=5.20'",
                       err=True)
            raise typer.Exit(2) from None
        where = f"http://{host or 'localhost'}:{port}"
        typer.echo(f"fleetsim explorer on {where} (Ctrl+C to stop)", err=True)
        cmd = streamlit_command(port, host, open_browser)
        sys.stderr.flush()
        if os.name == "posix":
            # Become the Streamlit server: signals (Ctrl+C, a supervisor's SIGTERM) reach it directly
            # and no orphaned server can outlive this command.
            os.execv(cmd[0], cmd)
        raise typer.Exit(subprocess.call(cmd))
