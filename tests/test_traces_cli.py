"""``fleetsim trace info|convert|list`` (the typer app in traces/cli.py)."""

import json
from pathlib import Path

from typer.testing import CliRunner

import sim  # noqa: F401  (import order: see traces/__init__.py)
from traces.cli import app
from traces.formats import load_file

FIX = Path(__file__).parent / "fixtures" / "traces"
runner = CliRunner()


def test_info_mooncake_conversation():
    r = runner.invoke(app, ["info", "mooncake-conversation"])
    assert r.exit_code == 0, r.output
    for text in ("requests         12,031", "mean rate", "inter-arrival CV", "p99", "sessions         none",
                 "36.6% of 288,500 blocks reusable", "512-token blocks"):
        assert text in r.stdout


def test_info_json():
    r = runner.invoke(app, ["info", "lmbench-long-input", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["requests"] == 301 and s["sessions"]["count"] == 30
    assert {"duration_s", "mean_rate_per_s", "interarrival_cv", "prompt_tokens", "output_tokens", "prefix_reuse"} <= set(s)
    assert set(s["prompt_tokens"]) >= {"p50", "p90", "p99"}


def test_malformed_file_exits_2_with_one_line_error(tmp_path):
    p = tmp_path / "az.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,374,44\n2023-11-16 18:15:47,-5,44\n")
    r = runner.invoke(app, ["info", str(p)])
    assert r.exit_code == 2
    assert r.stderr.strip() == f"error: {p}:3: field 'ContextTokens': must be positive (got -5)"
    assert r.stdout == ""
    r = runner.invoke(app, ["info", str(p), "--skip-invalid"])
    assert r.exit_code == 0 and "requests         1" in r.stdout
    assert "skipped 1 invalid row(s)" in r.stdout and "ContextTokens: must be positive (first at line 3)" in r.stdout


def test_unknown_source_and_bad_option():
    r = runner.invoke(app, ["info", "no-such-trace"])
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and "neither a built-in trace" in r.stderr
    r = runner.invoke(app, ["info", str(FIX / "sharegpt.json")])
    assert r.exit_code == 2 and "chars_per_token" in r.stderr
    r = runner.invoke(app, ["info", str(FIX / "sharegpt.json"), "-o", "chars_per_token=4", "-o", "turns=all"])
    assert r.exit_code == 0 and "sessions         3" in r.stdout
    r = runner.invoke(app, ["info", str(FIX / "burstgpt_v1.csv"), "--format", "mooncake"])
    assert r.exit_code == 2 and "burstgpt_v1.csv:1: bad JSON" in r.stderr


def test_convert_round_trip(tmp_path):
    out = tmp_path / "b.parquet"
    r = runner.invoke(app, ["convert", str(FIX / "burstgpt_v1_2.csv"), str(out)])
    assert r.exit_code == 0, r.output
    assert "wrote 7 requests" in r.stdout and "dropped 1 failed" in r.stdout
    w = load_file(out)
    assert len(w) == 7 and w.df["session_id"].notna().sum() == 6
    r = runner.invoke(app, ["convert", str(FIX / "burstgpt_v1.csv"), str(tmp_path / "x.txt")])
    assert r.exit_code == 2 and "unknown output format" in r.stderr


def test_list():
    r = runner.invoke(app, ["list"])
    assert r.exit_code == 0
    for name in ("azure2023-conv", "azure2023-code", "mooncake-conversation", "mooncake-synthetic",
                 "llmservingsim-sharegpt", "lmbench-long-input", "m-large", "burstgpt"):
        assert name in r.stdout
