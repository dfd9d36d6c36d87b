"""The explorer in a real browser: `fleetsim app` serves it, Debian's chromium (via Playwright)
loads it, runs a scenario, and checks that the charts and numbers appear, that the downloaded
scenario YAML reproduces the numbers on the page, and that a bad upload is a readable error.

Screenshots go to $FLEETSIM_SCREENSHOTS (default: pytest's tmp dir) for humans to look at.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from _browser import browser, chromium  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """`fleetsim app` on a free port (through the real CLI), stopped after the module."""
    pytest.importorskip("streamlit")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "sim.cli", "app", "--port", str(port), "--host", "127.0.0.1",
                             "--no-browser"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            proc.kill()
            pytest.fail(f"fleetsim app did not come up on {url}:\n{out[-2000:]}")
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def shots(tmp_path) -> Path:
    d = Path(os.environ.get("FLEETSIM_SCREENSHOTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def wait_idle(page, timeout: float = 180) -> None:
    """Until Streamlit's script run ends (its status widget says "Running" meanwhile)."""
    time.sleep(0.4)
    deadline = time.time() + timeout
    while page.locator('[data-testid="stStatusWidget"]').filter(has_text="Running").count():
        if time.time() > deadline:
            raise TimeoutError("the app kept running")
        time.sleep(0.25)


def metric(page, label: str) -> str:
    card = page.locator('[data-testid="stMetric"]').filter(has=page.get_by_text(label, exact=True)).first
    return card.locator('[data-testid="stMetricValue"]').inner_text().strip()


def tall_screenshot(page, path: Path, height: int = 3200) -> None:
    """Streamlit scrolls inside its own container, so a full-page shot needs a tall viewport."""
    size = page.viewport_size
    page.set_viewport_size({"width": size["width"], "height": height})
    time.sleep(1.5)  # let plotly re-layout
    page.screenshot(path=str(path))
    page.set_viewport_size(size)


def fmt_s(v: float) -> str:  # as the page shows latencies
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def open_page(browser, url: str):  # noqa: F811
    page = browser.new_page(viewport={"width": 1500, "height": 1100}, accept_downloads=True)
    page.set_default_timeout(60_000)
    page.goto(url)
    page.get_by_role("button", name="Run simulation").wait_for()
    wait_idle(page)
    return page


def test_run_a_scenario_and_see_charts_and_numbers(browser, server, shots):  # noqa: F811
    import sim

    page = open_page(browser, server)
    assert "fleetsim" in page.title()
    page.screenshot(path=str(shots / "explorer-start.png"))
    page.get_by_role("button", name="Run simulation").click()
    page.locator(".js-plotly-plot").nth(3).wait_for(timeout=180_000)
    wait_idle(page)
    assert page.get_by_text("Traceback").count() == 0
    # charts: the CDFs, time series, replica load and heatmap, each with drawn data
    assert page.locator(".js-plotly-plot").count() >= 4
    assert page.locator(".js-plotly-plot .scatterlayer .trace").count() >= 3 + 5
    # numbers: the headline cards
    completed = metric(page, "Completed")
    ttft = metric(page, "TTFT p99")
    tall_screenshot(page, shots / "explorer-results.png")
    # the downloaded scenario YAML reproduces what the page shows
    with page.expect_download() as dl:
        page.get_by_role("button", name="scenario.yaml").click()
    text = Path(dl.value.path()).read_text()
    assert text.startswith("# fleetsim scenario")
    r = sim.run(yaml.safe_load(text))
    s = r.summary
    assert completed == f"{s['requests_completed']:,} / {s['requests_total']:,}"
    assert ttft == fmt_s(s["ttft_p99_s"])
    with page.expect_download() as dl:
        page.get_by_role("button", name="requests.csv").click()
    assert Path(dl.value.path()).read_text().count("\n") == s["requests_total"] + 1
    page.close()


def test_compare_two_routers_side_by_side(browser, server, shots):  # noqa: F811
    page = open_page(browser, server)
    page.get_by_text("Synthetic", exact=True).click()
    wait_idle(page)
    tab = page.get_by_role("tab", name="Compare")
    tab.click()
    wait_idle(page)
    assert tab.get_attribute("aria-selected") == "true"
    page.locator('[data-testid="stMultiSelect"]').first.locator("input").click()
    for v in ("round-robin", "least-kv"):
        page.keyboard.type(v)
        time.sleep(0.3)
        page.keyboard.press("Enter")
        time.sleep(0.3)
    page.keyboard.press("Escape")
    wait_idle(page)
    page.get_by_role("button", name="Run variants").click()
    page.get_by_text("2 / 2 variants").wait_for(timeout=180_000)
    wait_idle(page)
    assert tab.get_attribute("aria-selected") == "true"  # the page stays on the tab it was on
    page.get_by_text("#2 router.policy=least-kv").first.wait_for()
    assert page.get_by_text("Green: better than the baseline").count() == 1
    page.locator(".js-plotly-plot").nth(3).wait_for()  # two bar charts, CDFs, time series
    time.sleep(1)
    tall_screenshot(page, shots / "explorer-compare.png")
    page.close()


def test_bad_upload_is_a_readable_error(browser, server, shots, tmp_path):  # noqa: F811
    page = open_page(browser, server)
    page.get_by_text("Upload a trace", exact=True).click()
    wait_idle(page)
    bad = tmp_path / "mystery.csv"
    bad.write_text("foo,bar\n1,2\n")
    page.locator('[data-testid="stSidebar"] [data-testid="stFileUploader"] input[type="file"]').set_input_files(str(bad))
    page.get_by_text("mystery.csv:1: cannot tell the format").first.wait_for(timeout=30_000)
    wait_idle(page)
    assert page.get_by_text("Traceback").count() == 0
    assert page.get_by_role("button", name="Run simulation").is_disabled()
    page.screenshot(path=str(shots / "explorer-bad-upload.png"))
    page.close()
