"""Transforms and the scenario entry point (WorkloadSpec / build_workload)."""

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

import sim  # noqa: F401  (import order: see traces/__init__.py)
from sim.errors import ConfigError
from traces import transforms
from traces.config import WorkloadSpec, build_workload, load_trace
from traces.formats import load_file
from traces.prefix_ids import reblock
from traces.stats import reusable_fraction, trace_stats

FIX = Path(__file__).parent / "fixtures" / "traces"


def build(seed=0, **spec):
    return build_workload(WorkloadSpec(**spec), seed=seed)


def test_window_rate_scale_and_max_requests():
    full = load_trace("azure2023-conv")
    w = build(trace="azure2023-conv", window_s=[600, 1200])
    t = full.df["arrival_s"]
    assert len(w) == int(((t >= 600) & (t < 1200)).sum())
    assert w.df["arrival_s"].min() >= 0 and w.df["arrival_s"].max() < 600
    w2 = build(trace="azure2023-conv", window_s=[600, 1200], rate_scale=2.0, max_requests=500)
    assert len(w2) == 500
    np.testing.assert_allclose(w2.df["arrival_s"], w.df["arrival_s"].iloc[:500] / 2)
    assert [n.split(":")[0] for n in w2.notes[1:]] == ["window [600, 1200) s", "rate scaled x2 (arrival times divided by 2)", "max_requests 500"]
    with pytest.raises(ConfigError, match="no request arrives"):
        build(trace="azure2023-conv", window_s=[1e6, 2e6])


def test_sample_fraction_keeps_whole_sessions():
    full = load_trace("lmbench-long-input")
    w = build(seed=1, trace="lmbench-long-input", sample_fraction=0.5)
    sizes = full.df.groupby("session_id").size()
    kept = w.df.groupby("session_id").size()
    assert (kept == sizes[kept.index]).all() and 0 < len(kept) < len(sizes)
    assert "sessions" in w.notes[-1]
    a = build(seed=1, trace="azure2023-code", sample_fraction=0.25)
    b = build(seed=1, trace="azure2023-code", sample_fraction=0.25)
    assert len(a) == pytest.approx(8819 / 4, rel=0.1) and a.df.equals(b.df)


def test_cap_to_context_reports_and_truncates():
    w = build(trace="mooncake-conversation", cap_to_context=32768)
    p, o = w.df["prompt_tokens"], w.df["output_tokens"]
    assert p.max() <= 32767 and (p + o).max() <= 32768
    full = load_trace("mooncake-conversation").df
    n_capped = int((full["prompt_tokens"] > 32767).sum())
    assert f"capped {n_capped:,} prompt(s)" in w.notes[-1]
    assert (w.df["hash_ids"].list.len() <= -(-p // 512)).all()
    with pytest.raises(ConfigError, match="max_model_len"):
        build(trace="mooncake-conversation", cap_to_context=True)
    w = build_workload(WorkloadSpec(trace="mooncake-conversation", cap_to_context=True), max_model_len=8192)
    assert w.df["prompt_tokens"].max() <= 8191


def test_reblock_preserves_engine_level_sharing():
    w = transforms.head(load_trace("mooncake-synthetic"), 400)
    small = reblock(w, 16)
    assert small.hash_block_size == 16
    off_a, h_a = w.block_hashes_csr(16)
    off_b, h_b = small.block_hashes_csr(16)
    np.testing.assert_array_equal(off_a, off_b)
    assert reusable_fraction(off_a, h_a) == reusable_fraction(off_b, h_b)
    def partition(h):  # label each block by the first block equal to it
        _, first, inv = np.unique(h, return_index=True, return_inverse=True)
        return first[inv]

    np.testing.assert_array_equal(partition(h_a), partition(h_b))  # the same blocks are equal to each other
    assert len(np.unique(h_a)) < len(h_a)  # (and there is sharing to preserve)


def test_merge_tenants():
    w = build(merge=[
        {"trace": "mooncake-synthetic", "tenant": "kimi", "max_requests": 200},
        {"trace": "lmbench-long-input", "tenant": "qa"},
        {"synthetic": {"num_requests": 50}, "tenant": "synth"},
    ])
    assert len(w) == 200 + 301 + 50
    assert trace_stats(w)["tenants"] == {"qa": 301, "kimi": 200, "synth": 50}
    assert np.all(np.diff(w.df["arrival_s"].to_numpy()) >= 0)
    assert w.hash_block_size == 16  # gcd(512, 16)
    assert w.df["session_id"].dropna().str.startswith("qa/").all()
    kimi = w.df[w.df["tenant"] == "kimi"]["hash_ids"].explode().astype(int)
    qa = w.df[w.df["tenant"] == "qa"]["hash_ids"].explode().astype(int)
    assert not set(kimi) & set(qa)  # id spaces kept apart
    synth = w.df[w.df["tenant"] == "synth"]["hash_ids"]
    assert synth.notna().all() and (synth.list.len() == 0).all()  # no prefix identity: nothing shared, no NA


def test_merge_converts_token_ids_to_hash_ids_exactly():
    from traces.prefix_ids import token_ids_to_hash_ids

    w = transforms.head(load_trace("llmservingsim-sharegpt"), 120)
    h = token_ids_to_hash_ids(w)
    assert "token_ids" not in h.df.columns and h.hash_block_size == 16
    assert (h.df["hash_ids"].list.len() == -(-h.df["prompt_tokens"] // 16)).all()
    off_a, a = w.block_hashes_csr(16)
    off_b, b = h.block_hashes_csr(16)
    np.testing.assert_array_equal(off_a, off_b)

    def partition(x):
        _, first, inv = np.unique(x, return_index=True, return_inverse=True)
        return first[inv]

    np.testing.assert_array_equal(partition(a), partition(b))
    m = build(merge=[{"trace": "llmservingsim-sharegpt", "tenant": "tok", "max_requests": 120},
                     {"trace": "azure2023-conv", "tenant": "az", "max_requests": 10}])
    assert "token_ids" not in m.df.columns and m.df["hash_ids"].notna().all()


def test_retime_sessions_follow_think_time():
    spec = {"arrival": "poisson", "rate_per_s": 0.5, "think_time_s": 3.0,
            "service_estimate": {"prefill_tokens_per_s": 10000, "s_per_output_token": 0.02}}
    w = build(seed=2, trace="lmbench-long-input", retime=spec)
    assert len(w) == 301
    for _, g in w.df.groupby("session_id"):
        g = g.sort_values("turn")
        p, o, t = g["prompt_tokens"].to_numpy(), g["output_tokens"].to_numpy(), g["arrival_s"].to_numpy()
        np.testing.assert_allclose(np.diff(t), p[:-1] / 10000 + o[:-1] * 0.02 + 3.0)
    w = build(seed=2, trace=str(FIX / "vllm_custom.jsonl"), retime={"rate_per_s": 2.0})
    assert len(w) == 3 and w.df["arrival_s"].iloc[-1] > 0


def test_session_prefix_inference():
    w = build(trace=str(FIX / "burstgpt_v1_2.csv"), session_prefix={"block_size": 16, "shared_tokens": 0})
    a = w.df[w.df["session_id"] == "s-a"]["hash_ids"].tolist()
    assert a[1][: len(a[0])] == a[0] and a[2][: len(a[1])] == a[1]
    assert w.hash_block_size == 16 and "inferred from sessions" in w.notes[-1]
    with pytest.raises(ConfigError, match="no sessions"):
        build(trace="azure2023-conv", session_prefix=True)
    with pytest.raises(ConfigError, match="already has prefix identity"):
        build(trace="lmbench-long-input", session_prefix=True)


def test_trace_paths_are_relative_to_the_scenario(tmp_path):
    w = build_workload(WorkloadSpec(trace="burstgpt_v1.csv"), base_dir=FIX)
    assert len(w) == 9
    with pytest.raises(ConfigError, match="neither a built-in trace"):
        build_workload(WorkloadSpec(trace="burstgpt_v1.csv"), base_dir=tmp_path)


def test_format_options_and_skip_invalid_pass_through(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 10, "output_length": 2}\n{"timestamp": 1, "input_length": 0, "output_length": 2}\n')
    w = build(trace=str(p), skip_invalid=True)
    assert len(w) == 1 and "skipped 1 invalid row(s)" in w.notes[-1]
    w = build(trace=str(FIX / "sharegpt.json"), options={"chars_per_token": 2.0})
    assert w.df["prompt_tokens"].iloc[0] == 200


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"trace": "azure2023-conv", "synthetic": {}},
        {"synthetic": {}, "format": "azure"},
        {"trace": "azure2023-conv", "format": "nope"},
        {"trace": "azure2023-conv", "window_s": [10, 5]},
        {"trace": "azure2023-conv", "rate_scale": 0},
        {"trace": "azure2023-conv", "typo": 1},
        {"trace": "azure2023-conv", "cap_to_context": 1},
    ],
)
def test_invalid_workload_specs(bad):
    with pytest.raises((ValidationError, ConfigError)):
        WorkloadSpec(**bad)


def test_build_accepts_a_plain_dict_and_tenant_label():
    w = build_workload({"trace": "azure2023-code", "max_requests": 10, "tenant": "code"})
    assert len(w) == 10 and set(w.df["tenant"]) == {"code"}


def test_transforms_do_not_mutate_their_input():
    w = load_trace("azure2023-conv")
    before = w.df.copy()
    transforms.scale_rate(w, 3.0)
    transforms.window(w, 10, 100)
    transforms.cap_to_context(w, 512)
    assert w.df.equals(before)
    assert load_file(FIX / "burstgpt_v1.csv").df.equals(load_file(FIX / "burstgpt_v1.csv").df)


def test_rate_scale_compresses_think_times_of_sessions():
    from traces.config import WorkloadSpec, build_workload

    syn = {"arrival": "poisson", "rate_per_s": 1, "num_requests": 40,
           "sessions": {"turns": 3, "think_time_s": {"dist": "fixed", "value": 6.0}}}
    base = build_workload(WorkloadSpec(synthetic=syn), seed=1)
    fast = build_workload(WorkloadSpec(synthetic=syn, rate_scale=3.0), seed=1)
    t0 = base.df["think_time_s"].dropna()
    t1 = fast.df["think_time_s"].dropna()
    assert len(t0) > 0 and (t1.to_numpy() == t0.to_numpy() / 3).all()
