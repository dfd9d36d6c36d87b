"""Streamlit AppTest unit tests of the what-if explorer, plus its pure helpers.

AppTest runs app/explorer.py headless (no browser): it checks widgets, runs, errors and tables.
Scenarios are kept tiny (synthetic workloads of ~100 requests, short trace windows) so the file
stays fast. The browser-level test is tests/test_app_browser.py.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("streamlit")
pytest.importorskip("plotly")

from streamlit.testing.v1 import AppTest  # noqa: E402

import sim  # noqa: E402
from app import capacity, history, options, plots, report, uploads  # noqa: E402
from app.runner import BackgroundRun, accepts_progress_callback  # noqa: E402
from sim.errors import ConfigError, FleetsimError, TraceError  # noqa: E402

APP = str(Path(__file__).parents[1] / "app" / "explorer.py")
TINY = {"workload": {"synthetic": {"rate_per_s": 8, "num_requests": 80, "prompt_tokens": 400, "output_tokens": 40}},
        "cluster": {"replicas": 2}, "slo": {"ttft_s": 1.0, "tpot_s": 0.1}}


@pytest.fixture(scope="module")
def tiny_result():
    return sim.run(TINY)


def _app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def _synthetic(at: AppTest, n: int = 100) -> AppTest:
    at.radio(key="w_source").set_value("Synthetic").run()
    at.slider(key="w_nreq").set_value(n).run()
    return at


# ------------------------------------------------------------------------------------- the page
def test_page_loads_with_live_choices():
    at = _app()
    assert not at.error
    assert at.button(key="run").disabled is False
    routers = at.selectbox(key="router_policy").options
    assert set(c.name for c in options.routers()) == set(routers)
    assert "round-robin" in routers
    assert at.selectbox(key="w_trace").value == "azure2023-conv"
    assert "H100-80GB" in at.selectbox(key="c_gpu").options


def test_run_shows_numbers_tables_and_charts():
    at = _synthetic(_app())
    at.button(key="run").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Completed"] == "100 / 100"
    assert metrics["TTFT p99"].endswith(("ms", " s"))
    assert metrics["SLO attainment"].endswith("%")
    assert len(at.get("plotly_chart")) >= 4  # CDFs, time series, replica load, heatmap
    assert len(at.session_state.runs) == 1
    # downloads exist for every artefact of the run
    assert len(at.get("download_button")) >= 7


def test_synthetic_run_matches_the_python_api():
    at = _synthetic(_app(), 120)
    at.button(key="run").click().run()
    r = next(iter(at.session_state.runs.values()))
    again = sim.run(r.scenario)  # the scenario kept with the run reproduces its numbers
    assert r.summary["requests_completed"] == 120
    assert again.summary["ttft_p99_s"] == pytest.approx(r.summary["ttft_p99_s"])


def test_bad_advanced_yaml_is_one_readable_error_and_blocks_run():
    at = _app()
    at.text_area(key="s_advanced").set_value("cluster: [unclosed").run()
    assert not at.exception
    msgs = [e.value for e in at.error]
    assert any("advanced YAML" in m and "invalid YAML" in m for m in msgs), msgs
    assert all("Traceback" not in m for m in msgs)
    assert at.button(key="run").disabled


def test_unknown_scenario_key_is_reported_with_its_path():
    at = _app()
    at.text_area(key="s_advanced").set_value("cluster:\n  replicaz: 3\n").run()
    msgs = [e.value for e in at.error]
    assert any("cluster.replicaz" in m and "unknown key" in m for m in msgs), msgs


def test_bad_router_params_fail_as_one_line_at_run_time():
    at = _synthetic(_app(), 60)
    at.selectbox(key="router_policy").set_value("power-of-two").run()
    at.text_area(key="router_params_power-of-two").set_value("no_such_knob: 1").run()
    at.button(key="run").click().run()
    assert not at.exception
    msgs = [e.value for e in at.error]
    assert any("no_such_knob" in m for m in msgs), msgs
    assert all("\n" not in m for m in msgs)
    assert len(at.session_state.runs) == 0


def test_two_runs_give_a_comparison_with_a_diff_label():
    at = _synthetic(_app(), 80)
    at.button(key="run").click().run()
    at.number_input(key="c_replicas").set_value(3).run()
    at.button(key="run").click().run()
    labels = list(at.session_state.runs)
    assert len(labels) == 2
    assert labels[1].startswith("#2") and "replicas=3" in labels[1]
    # Compare tab content: summary table + charts rendered for both runs
    assert at.multiselect(key="cmp_runs").value == labels
    assert any("Green: better" in c.value for c in at.caption)


def test_quick_variants_run_each_value():
    at = _synthetic(_app(), 60)
    at.multiselect(key="v_vals_router.policy").set_value(["round-robin", "least-requests"]).run()
    at.button(key="v_run").click().run()
    assert not at.exception, at.exception
    labels = list(at.session_state.runs)
    assert [lab.split(" ", 1)[1] for lab in labels] == ["router.policy=round-robin", "router.policy=least-requests"]
    runs = at.session_state.runs
    assert [r.summary["router"] for r in runs.values()] == ["round-robin", "least-requests"]


def test_numeric_variant_values_are_checked():
    at = _app()
    at.selectbox(key="v_knob").set_value("cluster.replicas").run()
    at.text_input(key="v_vals_cluster.replicas").set_value("2, three").run()
    assert any("not an integer: three" in e.value for e in at.error)
    assert at.button(key="v_run").disabled


def test_capacity_finder_in_the_page():
    at = _synthetic(_app(), 80)
    at.button(key="cap_run").click().run()
    assert not at.exception, at.exception
    res = at.session_state.capacity
    assert res is not None and res.best is not None
    assert any(s.value == res.message for s in at.success)
    assert any(lab.split(" ", 1)[1].startswith("capacity: replicas=") for lab in at.session_state.runs)


def test_upload_of_a_bad_file_is_a_readable_error(tmp_path):
    at = _app()
    at.radio(key="w_source").set_value("Upload a trace").run()
    # No file yet: a clear instruction, and Run is disabled.
    assert any("upload a trace file" in e.value for e in at.error)
    assert at.button(key="run").disabled


# ------------------------------------------------------------------------------------- uploads
def test_upload_check_reads_a_real_trace(tmp_path):
    src = Path(__file__).parents[1] / "traces" / "data" / "azure2023" / "AzureLLMInferenceTrace_code.csv.gz"
    data = gzip.decompress(src.read_bytes())
    up = uploads.check("code.csv", data, root=tmp_path)
    assert up.requests == 8819
    assert up.format == "azure"
    assert up.path.read_bytes() == data
    assert "8,819 requests" in up.describe()
    # the stored path runs as a workload
    r = sim.run({"workload": {"trace": str(up.path), "max_requests": 50}, "cluster": {"replicas": 1}})
    assert r.summary["requests_total"] == 50


@pytest.mark.parametrize("name,data,needle", [
    ("empty.csv", b"", "file is empty"),
    ("junk.csv", b"a,b,c\n1,2,3\n", "cannot tell the format"),
    ("bad.jsonl", b'{"timestamp": 1, "input_length": 5\n', "bad JSON"),
])
def test_upload_errors_name_the_file_not_the_temp_path(tmp_path, name, data, needle):
    with pytest.raises(TraceError) as e:
        uploads.check(name, data, root=tmp_path)
    msg = str(e.value)
    assert needle in msg
    assert name in msg
    assert str(tmp_path) not in msg
    assert "\n" not in msg


def test_upload_store_is_content_addressed(tmp_path):
    a = uploads.store("x.csv", b"hello", tmp_path)
    b = uploads.store("x.csv", b"hello", tmp_path)
    c = uploads.store("x.csv", b"other", tmp_path)
    assert a == b != c


# ------------------------------------------------------------------------------- helpers & plots
def test_deep_merge_and_exclusive_workload_sources():
    base = {"workload": {"trace": "azure2023-conv", "window_s": [0, 10]}, "cluster": {"replicas": 2, "gpu": "L4"}}
    out = history.deep_merge(base, {"workload": {"synthetic": {"rate_per_s": 1}}, "cluster": {"replicas": 4}})
    assert out["workload"] == {"window_s": [0, 10], "synthetic": {"rate_per_s": 1}}
    assert out["cluster"] == {"replicas": 4, "gpu": "L4"}
    assert base["cluster"]["replicas"] == 2  # inputs untouched


def test_labels_name_what_changed():
    a = {"name": "x", "router": {"policy": "round-robin"}, "cluster": {"replicas": 2, "gpu": "L4"},
         "workload": {"trace": "t"}, "autoscaler": {"policy": "none"}}
    b = history.deep_merge(a, {"router": {"policy": "least-kv"}, "name": "y"})
    assert history.label_for(b, a, 2) == "#2 router.policy=least-kv"
    assert history.label_for(a, a, 3) == "#3 same as baseline"
    assert history.label_for(a, None, 1).startswith("#1 t · 2x L4")


def test_parse_yaml_mapping_errors():
    assert history.parse_yaml_mapping("  ", "box") == {}
    with pytest.raises(ConfigError, match="box: expected a YAML mapping"):
        history.parse_yaml_mapping("- 1\n- 2", "box")
    with pytest.raises(ConfigError, match="box: line 1 invalid YAML"):
        history.parse_yaml_mapping("a: [", "box")


def test_cdf_points_are_the_empirical_cdf():
    x, y = plots.cdf_points(pd.Series([3.0, 1.0, 2.0, float("nan")]).to_numpy())
    assert list(x) == [1.0, 2.0, 3.0]
    assert list(y) == pytest.approx([1 / 3, 2 / 3, 1.0])
    import numpy as np

    big = np.arange(10_000, dtype=float)
    x, y = plots.cdf_points(big, n=101)
    assert len(x) == 101 and x[0] == 0 and x[-1] == 9999 and x[50] == pytest.approx(4999.5)


def test_figures_have_one_trace_per_run_and_panel(tiny_result):
    runs = {"a": tiny_result, "b": tiny_result}
    cdf = plots.latency_cdfs(runs, {"ttft_s": 1.0})
    assert len(cdf.data) == 2 * 3
    ts = plots.cluster_timeseries(runs)
    assert len(ts.data) == 2 * 5
    assert len(plots.replica_load(tiny_result).data) == 3
    assert plots.replica_heatmap(tiny_result).data[0].z.shape[0] == 2


def test_cost_series_ends_at_the_runs_cost(tiny_result):
    c = plots.cost_series(tiny_result)
    # billed per sample interval, so it matches the exact cost to within one interval of the fleet
    per_interval = plots.usd_per_replica_hour(tiny_result) * 2 / 3600 * tiny_result.scenario.metrics.sample_interval_s
    assert c.iloc[-1] == pytest.approx(tiny_result.summary["cost_usd"], abs=1.5 * per_interval)
    assert (c.diff().dropna() >= 0).all()


def test_replica_table_counts_every_routed_request(tiny_result):
    t = plots.replica_table(tiny_result)
    assert t["requests"].sum() == tiny_result.summary["requests_completed"]
    assert ((t["prefix_hit_rate"] >= 0) & (t["prefix_hit_rate"] <= 1)).all()


def test_latency_table_and_slo_verdicts(tiny_result):
    t = report.latency_table(tiny_result.summary, {"ttft_s": 1e-9, "tpot_s": 10.0})
    assert t.loc["TTFT", "p99 within SLO"] == "no"
    assert t.loc["TPOT", "p99 within SLO"] == "yes"
    assert t.loc["E2E", "p99 within SLO"] == ""
    assert t.loc["TTFT", "p99 (s)"] == pytest.approx(tiny_result.summary["ttft_p99_s"])


def test_delta_table_is_relative_to_the_first_run(tiny_result):
    d = report.delta_table({"a": tiny_result, "b": tiny_result})
    assert (d.fillna(0) == 0).all().all()
    assert report.better_direction("TTFT p99 (s)") is True
    assert report.better_direction("SLO attainment") is False


def test_slo_criterion_modes():
    s = {"requests_total": 10, "requests_failed": 0, "requests_rejected": 0, "ttft_p99_s": 0.5, "tpot_p99_s": 0.02,
         "slo_attainment": 0.95, "complete": True}
    assert report.SLOCriterion(ttft_s=1.0).check(s)[0]
    assert not report.SLOCriterion(ttft_s=0.1).check(s)[0]
    assert not report.SLOCriterion(ttft_s=1.0, mode="attainment", min_attainment=0.99).check(s)[0]
    assert report.SLOCriterion(ttft_s=1.0, mode="attainment", min_attainment=0.9).check(s)[0]
    assert not report.SLOCriterion(ttft_s=1.0).check({**s, "requests_failed": 1})[0]
    assert not report.SLOCriterion(ttft_s=1.0).check({**s, "complete": False})[0]
    with pytest.raises(ConfigError):
        report.SLOCriterion().check(s)


# --------------------------------------------------------------------------------- capacity
class _FakeRun:
    """A monotone stand-in for sim.run: TTFT p99 = load / replicas (seconds)."""

    def __init__(self, load: float = 10.0):
        self.load, self.calls = load, []

    def __call__(self, sc):
        n, scale = sc.cluster.replicas, sc.workload.rate_scale
        self.calls.append((n, scale))
        ttft = self.load * scale / n
        summary = {"requests_total": 10, "requests_failed": 0, "requests_rejected": 0, "complete": True,
                   "ttft_p99_s": ttft, "tpot_p99_s": 0.01, "e2e_p99_s": ttft + 1, "cost_usd": n}
        req = pd.DataFrame({"arrival_s": [0.0, 10.0 / scale]})
        return type("R", (), {"summary": summary, "requests": req, "scenario": sc})()


@pytest.mark.parametrize("start,load,expect", [(2, 10.0, 10), (32, 10.0, 10), (1, 0.5, 1), (7, 10.0, 10), (3, 29.0, 29)])
def test_smallest_fleet_bisects_to_the_exact_answer(start, load, expect):
    sc = sim.load_scenario({**TINY, "cluster": {"replicas": start}})
    fake = _FakeRun(load)
    res = capacity.smallest_fleet(sc, report.SLOCriterion(ttft_s=1.0), max_replicas=64, run=fake)
    assert res.best == expect
    assert len(fake.calls) == len(set(fake.calls))  # no point simulated twice
    assert len(fake.calls) <= 2 * math.ceil(math.log2(64)) + 2
    assert res.points["meets_slo"].sum() >= 1


def test_smallest_fleet_reports_when_nothing_fits():
    sc = sim.load_scenario(TINY)
    res = capacity.smallest_fleet(sc, report.SLOCriterion(ttft_s=1.0), max_replicas=8, run=_FakeRun(100.0))
    assert res.best is None and "even 8 replicas" in res.message


def test_highest_load_brackets_then_bisects():
    sc = sim.load_scenario({**TINY, "cluster": {"replicas": 4}})
    res = capacity.highest_load(sc, report.SLOCriterion(ttft_s=1.0), rel_tol=0.02, run=_FakeRun(10.0))
    # meets while 10 * scale / 4 <= 1  ->  scale <= 0.4
    assert 0.4 / 1.02 <= res.best <= 0.4


def test_capacity_on_the_real_simulator():
    sc = sim.load_scenario({"workload": {"synthetic": {"rate_per_s": 10, "num_requests": 120, "prompt_tokens": 1000,
                                                        "output_tokens": 50}},
                            "cluster": {"replicas": 1, "gpu": "L4", "engine": {"max_model_len": 8192}},
                            "slo": {"ttft_s": 1.0}})
    res = capacity.smallest_fleet(sc, report.SLOCriterion(ttft_s=1.0), max_replicas=16)
    assert res.best is not None and res.best > 1
    at_best = res.results[res.best].summary["ttft_p99_s"]
    assert at_best <= 1.0
    below = res.points.set_index("cluster.replicas")
    assert not below.loc[res.best - 1, "meets_slo"]


# ------------------------------------------------------------------------------------ runner
def test_background_run_returns_result_and_errors():
    h = BackgroundRun(TINY)
    assert h.wait(60)
    assert h.error is None and h.result.summary["requests_completed"] == 80
    assert h.fraction == 1.0

    def boom(sc):
        raise ConfigError("cluster.gpu: unknown GPU 'X'")

    h = BackgroundRun(TINY, run=boom)
    assert h.wait(10)
    assert isinstance(h.error, FleetsimError) and h.result is None


def test_background_run_uses_a_progress_callback_when_the_core_offers_one():
    seen = []

    def run(sc, on_progress=None):
        for k in range(1, 5):
            on_progress(k, 4, float(k))
            seen.append(k)
        return "done"

    assert accepts_progress_callback(run) and not accepts_progress_callback(lambda sc: None)
    h = BackgroundRun(TINY, run=run)
    assert h.wait(10) and h.result == "done" and seen == [1, 2, 3, 4]
    assert h.fraction == 1.0 and h.sim_time_s == 4.0
