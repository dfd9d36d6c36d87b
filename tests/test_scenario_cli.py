"""Scenario validation and the CLI contract: one-line errors with exit code 2, --json summary, --set."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import sim
from sim.errors import ConfigError
from sim.scenario import apply_overrides, load_scenario

SMALL = ["workload.synthetic.num_requests=30", "workload.synthetic.rate_per_s=3"]
SYN = {"workload": {"synthetic": {"arrival": "poisson", "rate_per_s": 4, "num_requests": 40,
                                  "prompt_tokens": 500, "output_tokens": 30}},
       "cluster": {"replicas": 2}}


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sim.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_overrides_parse_yaml_values_and_switch_workload_source():
    d = apply_overrides({"workload": {"trace": "azure2023-conv"}},
                        ["cluster.replicas=8", "cluster.engine.enable_prefix_caching=false",
                         "workload.synthetic.rate_per_s=2.5"])
    assert d["cluster"]["replicas"] == 8 and d["cluster"]["engine"]["enable_prefix_caching"] is False
    assert "trace" not in d["workload"] and d["workload"]["synthetic"]["rate_per_s"] == 2.5


@pytest.mark.parametrize("data,needle", [
    ({"cluster": {"replicaz": 2}}, "cluster.replicaz: unknown key"),
    ({"cluster": {"engine": {"block_size": 0}}}, "cluster.engine.block_size"),
    ({"seed": -1}, "seed"),
    ({"workload": {"trace": "x", "synthetic": {}}}, "exactly one"),
])
def test_bad_scenarios_name_the_field(data, needle):
    with pytest.raises(ConfigError) as e:
        load_scenario(data)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("cluster:\n  replicas: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_scenario(p)


def test_run_api_returns_tables_and_summary(tmp_path):
    r = sim.run(SYN)
    s = r.summary
    for key in ("requests_total", "requests_completed", "requests_failed", "ttft_p50_s", "ttft_p90_s",
                "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "e2e_p50_s", "e2e_p99_s", "throughput_req_s",
                "throughput_output_tok_s", "prefix_hit_rate", "preemptions", "gpu_hours", "cost_usd", "sim_wall_s"):
        assert key in s, key
    assert s["requests_completed"] == 40 and len(r.requests) == 40
    assert s["cost_usd"] > 0 and s["gpu_hours"] > 0
    out = r.save(tmp_path / "o")
    assert {p.name for p in out.iterdir()} == {"requests.parquet", "timeseries.parquet", "replicas.parquet", "summary.json", "scenario.yaml"}
    # The saved scenario reproduces the run.
    again = sim.run(load_scenario(out / "scenario.yaml"))
    assert again.requests["e2e_s"].tolist() == r.requests["e2e_s"].tolist()


def test_cli_json_and_set(tmp_path):
    sc = tmp_path / "s.yaml"
    sc.write_text(json.dumps(SYN))
    p = _cli("run", str(sc), "--set", "cluster.replicas=1", "--json", "--out", str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["requests_total"] == 40 and s["replicas_max"] == 1
    assert (tmp_path / "out" / "requests.parquet").exists()


@pytest.mark.parametrize("args,needle", [
    (["--set", "cluster.gpu=H900"], "unknown GPU"),
    (["--set", "cluster.model=llama-9"], "model"),
    (["--set", "router.policy=telepathy"], "unknown router 'telepathy'"),
    (["--set", "cluster.model=llama-3.1-70b"], "weights need"),
    (["--set", "cluster.replicas=-1"], "cluster.replicas"),
    (["--set", "cluster.step_time.model=linear", "--set", "cluster.step_time.profile=nope.json"], "nope.json"),
])
def test_cli_bad_input_one_line_exit_2(tmp_path, args, needle):
    sc = tmp_path / "s.yaml"
    sc.write_text(json.dumps(SYN))
    p = _cli("run", str(sc), *args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert needle.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in p.stderr


def test_cli_missing_scenario_file():
    p = _cli("run", "does-not-exist.yaml")
    assert p.returncode == 2 and "not found" in p.stderr and "Traceback" not in p.stderr


def test_default_scenario_contract():
    sc = load_scenario(None)
    assert sc.workload.trace == "azure2023-conv" and sc.cluster.gpu == "H100-80GB"
    assert sc.cluster.model == "llama-3.1-8b" and sc.cluster.replicas >= 2


def test_naive_path_switch_in_scenario_gives_same_results():
    base = {"workload": {"trace": "azure2023-conv", "max_requests": 400}, "cluster": {"replicas": 2}}
    fast = sim.run(base)
    naive = sim.run(base, overrides=["cluster.engine_fast_forward=false"])
    assert naive.summary["engine_steps"] == fast.summary["engine_steps"]
    assert (abs(naive.requests.e2e_s - fast.requests.e2e_s) <= 1e-9 * fast.requests.e2e_s).all()
