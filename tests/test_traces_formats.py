"""Loaders: every shipped trace against the MANIFEST figures, every external-format fixture,
auto-detection, and malformed input (errors name file, line and field; skip_invalid counts)."""

import gzip
import json
import time
from pathlib import Path

import numpy as np
import pytest

import sim  # noqa: F401  (import order: see traces/__init__.py)
from sim.errors import ConfigError, TraceError
from traces.builtin import DATA_DIR, RATE_CURVES, TRACES
from traces.config import load_trace
from traces.formats import detect, load_file
from traces.formats.native import write
from traces.stats import trace_stats
from traces.synthetic.arrivals import load_servegen

FIX = Path(__file__).parent / "fixtures" / "traces"


def stats(name, **kw):
    return trace_stats(load_trace(name, **kw))


# ------------------------------------------------------------------------------ shipped traces
def test_azure2023_conv_matches_manifest():
    s = stats("azure2023-conv")
    assert s["requests"] == 19_366
    assert s["mean_rate_per_s"] == pytest.approx(5.5, abs=0.05)
    assert s["interarrival_cv"] == pytest.approx(1.1, abs=0.05)
    assert s["prefix_reuse"] is None and s["sessions"] is None


def test_azure2023_code_matches_manifest():
    s = stats("azure2023-code")
    assert s["requests"] == 8_819
    assert s["duration_s"] / 60 == pytest.approx(57, abs=1)
    assert s["interarrival_cv"] == pytest.approx(13, abs=0.5)


def test_mooncake_conversation_matches_manifest():
    s = stats("mooncake-conversation")
    assert s["requests"] == 12_031
    assert s["duration_s"] == pytest.approx(3600, rel=0.03)
    assert s["prompt_tokens"]["mean"] == pytest.approx(12_035, abs=1)
    assert s["output_tokens"]["mean"] == pytest.approx(343, abs=1)
    pr = s["prefix_reuse"]
    assert pr["block_size"] == 512 and pr["blocks_total"] == 288_500
    assert pr["ratio"] == pytest.approx(0.366, abs=0.0005)


def test_mooncake_synthetic_matches_manifest():
    s = stats("mooncake-synthetic")
    assert s["requests"] == 3_993
    assert s["prompt_tokens"]["mean"] == pytest.approx(15_325, abs=1)
    assert s["prefix_reuse"]["ratio"] == pytest.approx(0.64, abs=0.005)
    assert s["interarrival_cv"] == pytest.approx(1.0, abs=0.05)  # Poisson arrivals


def test_llmservingsim_token_ids():
    w = load_trace("llmservingsim-sharegpt")
    assert len(w) == 300
    assert w.df["token_ids"].list.len().to_numpy().tolist() == w.df["prompt_tokens"].tolist()
    s = trace_stats(w)
    assert s["mean_rate_per_s"] == pytest.approx(10, rel=0.05)
    assert s["prefix_reuse"]["basis"] == "token_ids" and s["prefix_reuse"]["block_size"] == 16


@pytest.mark.parametrize("name,n,users", [("lmbench-long-input", 301, 30), ("lmbench-long-input-qps1", 105, 20), ("lmbench-long-input-qps10", 233, 67)])
def test_lmbench_sessions(name, n, users):
    w = load_trace(name)
    s = trace_stats(w)
    assert s["requests"] == n and s["sessions"]["count"] == users
    assert np.all(np.diff(w.df["arrival_s"].to_numpy()) >= 0)
    # each user's turns: prompts grow and each prompt's ids extend the previous turn's
    for _, g in w.df.groupby("session_id"):
        ids = g["hash_ids"].tolist()
        assert g["turn"].is_monotonic_increasing
        for a, b in zip(ids, ids[1:]):
            assert b[: len(a)] == a
        assert g["parent_request_id"].iloc[1:].tolist() == g["request_id"].iloc[:-1].tolist()
    # the 1000-token system prompt (62 full 16-token blocks) is common to all users
    firsts = w.df.groupby("session_id")["hash_ids"].first().tolist()
    assert all(f[:62] == firsts[0][:62] for f in firsts) and firsts[0][62] != firsts[1][62]


def test_every_builtin_loads_quickly():
    slowest = 0.0
    for name, b in TRACES.items():
        assert b.path.exists(), name
        t = time.perf_counter()
        w = load_file(b.path, b.format, options=b.options)
        slowest = max(slowest, time.perf_counter() - t)
        assert len(w) > 0 and w.df["arrival_s"].iloc[0] == 0.0
    assert slowest < 10.0  # measured ~0.2 s for the largest (mooncake-conversation)


def test_servegen_curves_span_14_days():
    for name in ("m-large", "m-mid", "m-small"):
        t, r = load_servegen(name)
        assert len(t) == 2016 and t[-1] + 600 == 14 * 86400
        assert 1.9 <= r.max() / r.mean() <= 3.31  # MANIFEST: peak/mean 1.9-3.3
    assert set(RATE_CURVES) == {"m-large", "m-mid", "m-small", "mm-image", "deepseek-r1"}


def test_shipped_data_is_small():
    total = sum(p.stat().st_size for p in DATA_DIR.rglob("*") if p.is_file())
    assert total < 3_000_000


# --------------------------------------------------------------------------- external fixtures
def test_burstgpt_without_sessions():
    w = load_file(FIX / "burstgpt_v1.csv")
    assert detect(FIX / "burstgpt_v1.csv") == "burstgpt"
    assert len(w) == 9  # one failure (Response tokens 0) dropped ...
    assert any("dropped 1 failed" in n for n in w.notes)  # ... and reported
    assert set(w.df["model"]) == {"ChatGPT", "GPT-4"}
    assert set(w.df["tenant"]) == {"conversation", "api"}
    assert "session_id" not in w.df.columns
    assert w.df["arrival_s"].tolist()[:3] == [0.0, 40.0, 113.0]


def test_burstgpt_with_sessions():
    w = load_file(FIX / "burstgpt_v1_2.csv")
    assert len(w) == 7
    s = w.df[w.df["session_id"] == "s-a"]
    assert s["turn"].tolist() == [1, 2, 3]
    b = w.df[w.df["session_id"] == "s-b"]
    assert b["turn"].tolist() == [1, 2]  # the failed turn is gone, turns renumbered
    assert w.df["session_id"].isna().sum() == 1
    assert trace_stats(w)["sessions"]["count"] == 3


def test_qwen_bailian_sessions_and_prefixes():
    w = load_file(FIX / "qwen_bailian.jsonl")
    assert detect(FIX / "qwen_bailian.jsonl") == "bailian"
    assert w.hash_block_size == 16 and len(w) == 8
    sess = dict(zip(w.df["request_id"], w.df["session_id"]))
    assert sess["105"] == "101" and sess["106"] == "102"
    assert sess["108"] == "107"  # parent 999 is outside the file: 107 roots the session
    parent = dict(zip(w.df["request_id"], w.df["parent_request_id"]))
    assert parent["103"] == "101" and parent["108"] == "107"
    assert parent["101"] != parent["101"] and parent["107"] != parent["107"]  # NaN: no parent in the file
    assert set(w.df["slo_class"]) == {"text", "search", "image", "file"}
    assert trace_stats(w)["prefix_reuse"]["blocks_reusable"] == 11


def test_sharegpt_needs_chars_per_token():
    with pytest.raises(ConfigError, match="chars_per_token"):
        load_file(FIX / "sharegpt.json")


def test_sharegpt_first_turn_and_all_turns():
    w = load_file(FIX / "sharegpt.json", options={"chars_per_token": 4})
    assert len(w) == 3 and w.df["prompt_tokens"].tolist() == [100, 250, 45]
    assert any("fewer than 2 messages" in n for n in w.notes)
    assert any("estimated from text" in n for n in w.notes)
    w = load_file(FIX / "sharegpt.json", options={"chars_per_token": 4, "turns": "all"})
    c1 = w.df[w.df["session_id"] == "c1"]
    assert c1["prompt_tokens"].tolist() == [100, 100 + 200 + 30]
    ids = c1["hash_ids"].tolist()
    assert ids[1][: len(ids[0])] == ids[0]


def test_sharegpt_with_token_counts_jsonl():
    w = load_file(FIX / "sharegpt_counts.jsonl", options={"turns": "all"})
    assert w.df["prompt_tokens"].tolist() == [120, 50, 135]
    assert w.df["output_tokens"].tolist() == [300, 60, 80]


def test_vllm_custom_formats():
    w = load_file(FIX / "vllm_custom.jsonl")
    assert detect(FIX / "vllm_custom.jsonl") == "custom"
    assert w.df["prompt_tokens"].tolist() == [9, 104, 803] and w.df["output_tokens"].tolist() == [32, 256, 128]
    assert any("t=0" in n for n in w.notes)
    w = load_file(FIX / "vllm_custom_lengths.json")
    assert w.df["arrival_s"].tolist() == [0.0, 0.2, 0.4]  # sorted by timestamp
    assert w.df["prompt_tokens"].tolist() == [512, 128, 2048]


def test_azure2024_timestamps_with_offset():
    w = load_file(FIX / "azure2024_code.csv")
    assert len(w) == 6 and w.df["arrival_s"].iloc[-1] == pytest.approx(3.50007)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".csv.gz", ".jsonl", ".jsonl.gz"])
def test_native_round_trip(tmp_path, suffix):
    w = load_file(FIX / "qwen_bailian.jsonl")
    out = write(w, tmp_path / f"t{suffix}")
    back = load_file(out)
    assert back.hash_block_size == 16
    for c in ("arrival_s", "prompt_tokens", "output_tokens", "session_id", "turn", "slo_class"):
        assert back.df[c].tolist() == w.df[c].tolist(), c
    assert back.df["hash_ids"].tolist() == w.df["hash_ids"].tolist()
    assert trace_stats(back)["prefix_reuse"] == trace_stats(w)["prefix_reuse"]


def test_parquet_keeps_name_and_notes(tmp_path):
    w = load_trace("mooncake-synthetic")
    back = load_file(write(w, tmp_path / "m.parquet"))
    assert back.name == "mooncake-synthetic" and "format: mooncake" in back.notes
    assert trace_stats(back)["prefix_reuse"]["ratio"] == trace_stats(w)["prefix_reuse"]["ratio"]


# ------------------------------------------------------------------------------- malformed
def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


AZ_HEAD = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


@pytest.mark.parametrize(
    "rows,line,field,why",
    [
        ("2023-11-16 18:15:46,374,44\n2023-11-16 18:15:47,-5,44\n", 3, "ContextTokens", "must be positive"),
        ("2023-11-16 18:15:46,374,44\n2023-11-16 18:15:47,374\n", 3, "GeneratedTokens", "missing"),
        ("2023-11-16 18:15:46,374,44\n2023-11-16 18:15:47,12x,4\n", 3, "ContextTokens", "not a number"),
        ("2023-11-16 18:15:46,3.5,44\n", 2, "ContextTokens", "not an integer"),
        ("2023-11-16 18:15:46,374,44\nyesterday,1,1\n", 3, "TIMESTAMP", "not a date-time"),
        ("2023-11-16 18:15:46,374,44\n2023-11-16 18:15:40,1,1\n", 3, "TIMESTAMP", "time goes backwards"),
    ],
)
def test_malformed_azure_rows_name_file_line_field(tmp_path, rows, line, field, why):
    p = _write(tmp_path, "az.csv", AZ_HEAD + rows)
    with pytest.raises(TraceError) as e:
        load_file(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:{line}: field '{field}'") and why in msg and "\n" not in msg


def test_csv_row_with_too_many_fields(tmp_path):
    p = _write(tmp_path, "az.csv", AZ_HEAD + "2023-11-16 18:15:46,374,44\n2023-11-16 18:15:47,1,2,3\n")
    with pytest.raises(TraceError, match=r"az.csv:3: row has 4 fields, the header has 3"):
        load_file(p)
    w = load_file(p, skip_invalid=True)
    assert len(w) == 1 and "wrong number of fields" in w.notes[-1]


def test_skip_invalid_loads_the_rest_and_counts_reasons(tmp_path):
    rows = (
        "2023-11-16 18:15:46,374,44\n2023-11-16 18:15:47,-5,44\n2023-11-16 18:15:48,374\n"
        "2023-11-16 18:15:49,abc,3\n2023-11-16 18:15:45,374,44\n\n2023-11-16 18:15:51,10,2\n"
    )
    p = _write(tmp_path, "az.csv", AZ_HEAD + rows)
    w = load_file(p, skip_invalid=True)
    assert len(w) == 2
    note = w.notes[-1]
    assert note.startswith(f"skipped 5 invalid row(s) of {p}")
    for part in ("ContextTokens: must be positive (first at line 3)", "GeneratedTokens: missing (first at line 4)",
                 "ContextTokens: not a number (first at line 5)", "time goes backwards", "TIMESTAMP: missing (first at line 7)"):
        assert part in note


MC = '{{"timestamp": {t}, "input_length": {i}, "output_length": 2, "hash_ids": {h}}}\n'


def test_malformed_mooncake_jsonl(tmp_path):
    good = MC.format(t=0, i=10, h="[1]")
    cases = [
        (good + '{"timestamp": 5, "input_length": 10\n', 2, None, "bad JSON"),
        (good + '{"timestamp": 5, "output_length": 2, "hash_ids": [1]}\n', 2, "input_length", "missing"),
        (good + MC.format(t=5, i=-3, h="[1]"), 2, "input_length", "must be positive"),
        (good + MC.format(t=5, i=10, h='"x"'), 2, "hash_ids", "list of integers"),
        (MC.format(t=9, i=10, h="[1]") + good, 2, "timestamp", "time goes backwards"),
    ]
    for text, line, field, why in cases:
        p = _write(tmp_path, "m.jsonl", text)
        with pytest.raises(TraceError) as e:
            load_file(p, "mooncake")
        msg = str(e.value)
        assert msg.startswith(f"{p}:{line}:"), msg
        assert why in msg and (field is None or f"field '{field}'" in msg)
        w = load_file(p, "mooncake", skip_invalid=True)
        assert len(w) == 1 and "skipped 1 invalid row(s)" in w.notes[-1]


def test_bailian_child_before_parent_is_an_error(tmp_path):
    rows = [
        dict(chat_id=1, parent_chat_id=-1, timestamp=5.0, input_length=16, output_length=1, type="text", turn=1, hash_ids=[1]),
        dict(chat_id=2, parent_chat_id=1, timestamp=5.0, input_length=16, output_length=1, type="text", turn=2, hash_ids=[1]),
    ]
    rows[1]["timestamp"] = 4.0
    p = _write(tmp_path, "q.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TraceError, match=r"q.jsonl:2: field 'timestamp'"):
        load_file(p)


def test_lmbench_out_of_order_questions(tmp_path):
    text = (
        "prompt_tokens,generation_tokens,ttft,generation_time,user_id,question_id,launch_time,finish_time\n"
        "100,10,0.1,1,7,2,1000.0,1001\n100,10,0.1,1,7,1,1005.0,1006\n"
    )
    p = _write(tmp_path, "LMBench_x.csv", text)
    with pytest.raises(TraceError, match=r"LMBench_x.csv:3: field 'question_id': question launched out of order"):
        load_file(p)


def test_tokenids_length_mismatch(tmp_path):
    rec = {"input_toks": 3, "output_toks": 2, "arrival_time_ns": 0, "input_tok_ids": [1, 2]}
    p = _write(tmp_path, "w.jsonl", json.dumps(rec) + "\n")
    with pytest.raises(TraceError, match=r"w.jsonl:1: field 'input_tok_ids': length differs"):
        load_file(p)


def test_json_array_syntax_error_names_line(tmp_path):
    p = _write(tmp_path, "c.json", '[\n {"prompt_len": 5, "output_len": 3},\n {"prompt_len": 5 "output_len": 3}\n]\n')
    with pytest.raises(TraceError, match=r"c.json:3: bad JSON"):
        load_file(p, "custom")


def test_detection_errors_are_one_line(tmp_path):
    p = _write(tmp_path, "x.csv", "a,b,c\n1,2,3\n")
    with pytest.raises(TraceError, match="cannot tell the format"):
        load_file(p)
    with pytest.raises(TraceError, match="rate curve"):
        load_file(DATA_DIR / RATE_CURVES["m-large"])
    with pytest.raises(TraceError, match="no such file"):
        load_file(tmp_path / "missing.csv")
    with pytest.raises(ConfigError, match="unknown format"):
        load_file(FIX / "burstgpt_v1.csv", "nope")
    with pytest.raises(ConfigError, match="unknown option"):
        load_file(FIX / "burstgpt_v1.csv", options={"bogus": 1})


def test_gzipped_input_is_detected(tmp_path):
    p = tmp_path / "b.csv.gz"
    p.write_bytes(gzip.compress((FIX / "burstgpt_v1.csv").read_bytes()))
    assert detect(p) == "burstgpt" and len(load_file(p)) == 9
