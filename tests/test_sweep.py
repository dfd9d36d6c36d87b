"""Sweeps: grid expansion, the results table, failures as rows, the rerun cache, and a real
(small) sweep on a local Ray, through the Python API and the ``fleetsim sweep`` command."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

import sim
from sim.errors import ConfigError
from sim.sweep import RESULTS_FILE, expand, load_grid, run_key, run_sweep

BASE = {"workload": {"synthetic": {"rate_per_s": 8, "num_requests": 40, "prompt_tokens": 300, "output_tokens": 20}},
        "cluster": {"replicas": 2}, "slo": {"ttft_s": 1.0}}


def _grid(**extra):
    return {"base": BASE, "grid": {"router.policy": ["round-robin", "least-requests"], "cluster.replicas": [1, 2]},
            "seeds": [0, 1], **extra}


# ------------------------------------------------------------------------------- expansion
def test_expand_is_the_cartesian_product_with_seeds():
    pts = expand(_grid())
    assert len(pts) == 2 * 2 * 2
    assert [p.params for p in pts[:3]] == [
        {"router.policy": "round-robin", "cluster.replicas": 1, "seed": 0},
        {"router.policy": "round-robin", "cluster.replicas": 1, "seed": 1},
        {"router.policy": "round-robin", "cluster.replicas": 2, "seed": 0},
    ]
    p = pts[3]
    assert p.scenario["router"]["policy"] == "round-robin" and p.scenario["cluster"]["replicas"] == 2
    assert p.scenario["seed"] == 1
    assert len({q.run_id for q in pts}) == len(pts)


def test_cases_cross_the_grid_and_nested_cases_are_flattened():
    pts = expand({"base": BASE, "cases": [{"cluster": {"gpu": "A100-80GB"}}, {"cluster.gpu": "H100-80GB"}],
                  "grid": {"cluster.replicas": [1, 3]}})
    assert [(p.params["cluster.gpu"], p.params["cluster.replicas"]) for p in pts] == [
        ("A100-80GB", 1), ("A100-80GB", 3), ("H100-80GB", 1), ("H100-80GB", 3)]
    assert all(p.params["seed"] == 0 for p in pts)  # the base's seed, recorded


def test_run_id_depends_only_on_the_resolved_scenario():
    a = expand(_grid())
    b = expand(_grid())
    assert [p.run_id for p in a] == [p.run_id for p in b]
    # an explicit default changes nothing that matters... but a real change does
    sc = a[0].scenario
    assert run_key(sc, None) == run_key(json.loads(json.dumps(sc)), None)
    assert run_key({**sc, "seed": 99}, None) != run_key(sc, None)


def test_trace_file_edits_invalidate_the_cache(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n")
    sc = {"workload": {"trace": "t.csv"}}
    k1 = run_key(sc, str(tmp_path))
    trace.write_text(trace.read_text() + "2023-11-16 18:15:50.0,100,10\n")
    assert run_key(sc, str(tmp_path)) != k1


def test_base_path_resolves_relative_to_the_grid_file(tmp_path):
    (tmp_path / "scn").mkdir()
    (tmp_path / "scn" / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({"base": "scn/base.yaml", "grid": {"cluster.replicas": [1]}}))
    pts = expand(tmp_path / "grid.yaml")
    assert pts[0].base_dir == str((tmp_path / "scn").resolve())
    assert pts[0].scenario["workload"]["synthetic"]["num_requests"] == 40


@pytest.mark.parametrize("grid,needle", [
    ({"base": BASE, "grid": {"router.policy": []}}, "sweep: grid: router.policy: needs at least one value"),
    ({"base": BASE, "grids": {}}, "grids: unknown key"),
    ({"base": BASE, "seeds": [-1]}, "seeds"),
    ({"base": "nope.yaml"}, "not found"),
    ({"base": {"cluster": {"replicaz": 1}}}, "base: scenario: cluster.replicaz: unknown key"),
])
def test_bad_grids_are_one_line_config_errors(grid, needle):
    with pytest.raises(ConfigError) as e:
        expand(grid)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_grid_file_yaml_errors_name_the_line(tmp_path):
    f = tmp_path / "g.yaml"
    f.write_text("base:\n  cluster: [1,\n")
    with pytest.raises(ConfigError, match=r"g.yaml:\d+: invalid YAML"):
        load_grid(f)


# --------------------------------------------------------------------- running (inline)
def test_inline_sweep_table_failures_and_cache(tmp_path):
    grid = {"base": BASE, "grid": {"router.policy": ["round-robin", "nope"], "cluster.replicas": [1, 2]},
            "seeds": [3]}
    t = run_sweep(grid, tmp_path, backend="inline", progress=False)
    assert list(t.columns[:7]) == ["router.policy", "cluster.replicas", "seed", "status", "error", "cached", "run_id"]
    assert (tmp_path / RESULTS_FILE).exists()
    ok = t[t["status"] == "ok"]
    bad = t[t["status"] == "failed"]
    assert len(ok) == 2 and len(bad) == 2
    assert bad["error"].str.contains("unknown router 'nope'").all()
    assert ok["requests_completed"].tolist() == [40, 40]
    assert str(t["requests_completed"].dtype) == "Int64"
    # the table's numbers are those of sim.run on the same scenario
    direct = sim.run({**BASE, "router": {"policy": "round-robin"}, "cluster": {"replicas": 2}, "seed": 3})
    row = ok[ok["cluster.replicas"] == 2].iloc[0]
    assert row["ttft_p99_s"] == pytest.approx(direct.summary["ttft_p99_s"])
    # rerun: done points come from the cache, failed points are tried again
    calls = []
    t2 = run_sweep(grid, tmp_path, backend="inline", progress=False, on_result=calls.append)
    assert t2[t2["status"] == "ok"]["cached"].all()
    assert not t2[t2["status"] == "failed"]["cached"].any()
    assert len(calls) == 4
    pd.testing.assert_series_equal(t["ttft_p99_s"], t2["ttft_p99_s"])
    on_disk = pd.read_parquet(tmp_path / RESULTS_FILE)
    assert len(on_disk) == 4 and set(on_disk["status"]) == {"ok", "failed"}


def test_extending_a_grid_runs_only_the_new_points(tmp_path):
    small = {"base": BASE, "grid": {"cluster.replicas": [1]}}
    run_sweep(small, tmp_path, backend="inline", progress=False)
    big = {"base": BASE, "grid": {"cluster.replicas": [1, 2]}}
    t = run_sweep(big, tmp_path, backend="inline", progress=False)
    assert t.set_index("cluster.replicas")["cached"].to_dict() == {1: True, 2: False}


def test_invalid_point_is_a_failed_row_not_a_crash(tmp_path):
    t = run_sweep({"base": BASE, "grid": {"cluster.replicas": [1, -1]}}, tmp_path, backend="inline", progress=False)
    assert t["status"].tolist() == ["ok", "failed"]
    assert "cluster.replicas" in t["error"].iloc[1]


def test_save_runs_keeps_each_runs_tables(tmp_path):
    t = run_sweep({"base": BASE, "grid": {"cluster.replicas": [1]}}, tmp_path, backend="inline", progress=False,
                  save_runs=True)
    folder = tmp_path / "runs" / t["run_id"].iloc[0]
    assert len(pd.read_parquet(folder / "requests.parquet")) == 40
    assert yaml.safe_load((folder / "scenario.yaml").read_text())["cluster"]["replicas"] == 1


# --------------------------------------------------------------------------- running (Ray)
@pytest.fixture
def ray_shutdown():
    ray = pytest.importorskip("ray")
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.slow
def test_small_sweep_on_local_ray_via_the_cli(tmp_path, ray_shutdown):
    import ray

    from sim.cli import app

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "base": BASE, "grid": {"router.policy": ["round-robin", "least-requests", "no-such-router"],
                               "cluster.replicas": [1, 2]}, "seeds": [0]}))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["sweep", str(grid), "--out", str(out), "--max-parallel", "2", "--no-progress"])
    assert res.exit_code == 1, res.output  # some runs failed: reported, the rest completed
    assert "6 runs: 4 ok (0 from cache), 2 failed" in res.output
    assert not ray.is_initialized()  # the sweep shut down the Ray it started
    t = pd.read_parquet(out / RESULTS_FILE)
    assert len(t) == 6
    ok = t[t["status"] == "ok"]
    assert sorted(ok["router.policy"].unique()) == ["least-requests", "round-robin"]
    assert (ok["requests_completed"] == 40).all()
    # same numbers as a direct run
    direct = sim.run({**BASE, "router": {"policy": "least-requests"}, "cluster": {"replicas": 2}})
    row = ok[(ok["router.policy"] == "least-requests") & (ok["cluster.replicas"] == 2)].iloc[0]
    assert row["e2e_p99_s"] == pytest.approx(direct.summary["e2e_p99_s"])
    # a rerun of only cached points does not even start Ray
    ok_grid = tmp_path / "ok.yaml"
    ok_grid.write_text(yaml.safe_dump({"base": BASE, "grid": {"router.policy": ["round-robin"],
                                                              "cluster.replicas": [1, 2]}, "seeds": [0]}))
    res = CliRunner().invoke(app, ["sweep", str(ok_grid), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "2 runs: 2 ok (2 from cache), 0 failed" in res.output


def test_cli_bad_grid_exits_2(tmp_path):
    from sim.cli import app

    g = tmp_path / "g.yaml"
    g.write_text("grid: {cluster.replicas: []}\n")
    res = CliRunner().invoke(app, ["sweep", str(g), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "needs at least one value" in res.output
