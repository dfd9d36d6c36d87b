"""Browser fixtures: Debian's chromium driven by Playwright (never ``playwright install``).

``chromium`` installs the distribution's package (``apt-get install -y chromium``) only when
/usr/bin/chromium is missing; CI runs on a fresh machine as root. Under ``CI=true`` a browser that
cannot be had is a test FAILURE, not a skip, so a broken install step cannot turn the browser tests
into silent no-ops; on a developer's machine it is a skip with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
INSTALL = "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(reason: str):
    if _in_ci():
        pytest.fail(f"browser tests cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def install_chromium() -> Path:
    """/usr/bin/chromium, installed with apt-get if it is missing (root only)."""
    if CHROMIUM.exists():
        return CHROMIUM
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        _unavailable(f"{CHROMIUM} is missing and apt-get as root is not available to install it")
    proc = subprocess.run(["bash", "-c", INSTALL], capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0 or not CHROMIUM.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        _unavailable(f"`{INSTALL}` failed (exit {proc.returncode}): {tail[0]}")
    return CHROMIUM


@pytest.fixture(scope="session")
def chromium() -> Path:
    return install_chromium()


@pytest.fixture(scope="session")
def browser(chromium: Path):
    """A headless Playwright Browser on the system chromium, closed after the session."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright Python package is not installed (pip install playwright)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(chromium), headless=True,
                              args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()
