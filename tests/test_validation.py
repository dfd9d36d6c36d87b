"""Validation module, without vLLM: log parsing, step reconstruction, fitting, prompt construction."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sim.step_time import LINEAR_FEATURES, BatchShape, LinearStepTime, linear_features
from traces.schema import Workload
from validation.engine import EngineSpec, build_command, hf_config, parse_startup_log
from validation.fit import feature_matrix, fit_step_time, heldout_mask, nnls_fit, write_profile
from validation.replay import build_requests, parse_prometheus, prompt_token_ids
from validation.steps import parse_iteration_log, reconstruct_shapes

# Lines as vLLM 0.32.0 logs them with validation.engine.LOGGING_CONFIG (format checked against
# vllm/v1/metrics/loggers.py:_log_iteration_details).
LOG = """\
(APIServer pid=1) INFO t=1000.000000 [loggers.py:199] Engine 000: Iteration(0): 1 context requests, 300 context tokens, 0 generation requests, 0 generation tokens, iteration elapsed time: 75.41 ms, CPU KV cache usage: 1.0%
(APIServer pid=1) INFO t=1000.013693 [loggers.py:199] Engine 000: Iteration(1): 0 context requests, 0 context tokens, 1 generation requests, 1 generation tokens, iteration elapsed time: 13.22 ms, CPU KV cache usage: 1.0%
(APIServer pid=1) INFO t=1000.020000 [other.py:5] unrelated line mentioning Iteration( nothing
(APIServer pid=1) INFO t=1000.025211 [loggers.py:199] Engine 000: Iteration(2): 1 context requests, 12 context tokens, 1 generation requests, 1 generation tokens, iteration elapsed time: 10.98 ms, CPU KV cache usage: 2.5%
(APIServer pid=1) INFO t=1003.000000 [loggers.py:199] Engine 000: Iteration(3): 1 context requests, 40 context tokens, 0 generation requests, 0 generation tokens, iteration elapsed time: 9.00 ms (dummy), CPU KV cache usage: 0.0%
(APIServer pid=1) INFO t=1009.000000 [loggers.py:199] Engine 000: Iteration(4): 1 context requests, 40 context tokens, 0 generation requests, 0 generation tokens, iteration elapsed time: 9.00 ms, CPU KV cache usage: 0.0%
"""


def test_parse_iteration_log_fields_periods_and_dummy():
    st = parse_iteration_log(LOG)
    assert list(st["iteration"]) == [0, 1, 2, 4]  # unrelated line and the dummy step dropped
    r0 = st.iloc[0]
    assert (r0.ctx_requests, r0.ctx_tokens, r0.gen_requests, r0.gen_tokens) == (1, 300, 0, 0)
    assert r0.elapsed_s == pytest.approx(0.07541)
    assert r0.kv_usage == pytest.approx(0.01)
    assert st.iloc[2].kv_usage == pytest.approx(0.025)
    # period only where the step has decodes (back-to-back guaranteed) and follows its predecessor
    assert np.isnan(st.iloc[0].period_s)
    assert st.iloc[1].period_s == pytest.approx(0.013693)
    assert st.iloc[2].period_s == pytest.approx(0.011518)
    assert np.isnan(st.iloc[3].period_s)  # no decodes: may follow an idle gap


def test_parse_iteration_log_without_timestamps_or_engine_prefix():
    line = ("INFO 11-22 07:59:35 [loggers.py:199] Iteration(7): 2 context requests, 64 context tokens, "
            "3 generation requests, 3 generation tokens, iteration elapsed time: 1.50 ms, GPU KV cache usage: 4.0%")
    st = parse_iteration_log(line)
    assert len(st) == 1 and st.iloc[0].iteration == 7 and st.iloc[0].gen_requests == 3
    assert np.isnan(st.iloc[0].t_log)


def test_parse_startup_log():
    text = """\
(EngineCore pid=8) INFO t=1.0 [core.py:133] Initializing a V1 LLM engine (v0.32.0) with config: model='/m', dtype=torch.bfloat16, max_seq_len=2048, device_config=cpu, enable_prefix_caching=True, enable_chunked_prefill=False, pooler_config=None
(APIServer pid=7) INFO t=1.0 [scheduler.py:307] Chunked prefill is enabled with max_num_batched_tokens=512.
(EngineCore pid=8) INFO t=2.0 [kv_cache_utils.py:2619] Overriding num_gpu_blocks=8192 with num_gpu_blocks_override=1024
(EngineCore pid=8) INFO t=2.0 [kv_cache_utils.py:2327] CPU KV cache size: 32,768 tokens, Maximum concurrency for 2,048 tokens per request: 16.00x
"""
    f = parse_startup_log(text, block_size=32)
    assert f["vllm_version"] == "0.32.0" and f["device"] == "cpu" and f["dtype"] == "bfloat16"
    assert f["num_gpu_blocks"] == 1024 and f["kv_capacity_tokens"] == 32768
    assert f["max_model_len"] == 2048 and f["max_num_batched_tokens"] == 512
    assert f["enable_prefix_caching"] is True and f["enable_chunked_prefill"] is False
    no_override = text.replace("Overriding num_gpu_blocks=8192 with num_gpu_blocks_override=1024", "")
    assert parse_startup_log(no_override, block_size=32)["num_gpu_blocks"] == 32768 // 32


def test_engine_command_is_explicit(tmp_path):
    spec = EngineSpec(enable_prefix_caching=False, num_gpu_blocks_override=512, engine_cpus=None, nice=None)
    cmd = build_command(spec, tmp_path / "python", tmp_path / "m", 8001)
    joined = " ".join(cmd)
    for flag in ("--load-format dummy", "--skip-tokenizer-init", "--enable-logging-iteration-details",
                 "--block-size 32", "--max-num-batched-tokens 512", "--max-num-seqs 32",
                 "--no-enable-prefix-caching", "--enable-chunked-prefill", "--num-gpu-blocks-override 512",
                 "--port 8001", "--host 127.0.0.1"):
        assert flag in joined
    cfg = hf_config("tiny-llama")
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["vocab_size"]) == (4, 512, 8, 4, 1024, 32000)
    assert cfg["architectures"] == ["LlamaForCausalLM"]


def test_engine_priority_and_pinning_wrap_the_command(tmp_path, monkeypatch):
    import validation.engine as eng

    monkeypatch.setattr(eng.os, "geteuid", lambda: 0)
    cmd = build_command(EngineSpec(nice=-7, engine_cpus="0"), tmp_path / "python", tmp_path / "m", 8001)
    assert cmd[:3] == [cmd[0], "-c", "0"] and cmd[0].endswith("taskset")
    assert cmd[3].endswith("nice") and cmd[4:6] == ["-n", "-7"]
    monkeypatch.setattr(eng.os, "geteuid", lambda: 1000)  # not root: a negative nice cannot apply
    assert eng.effective_nice(EngineSpec(nice=-7)) is None
    assert eng.effective_nice(EngineSpec(nice=5)) == 5


def test_vllm_absent_gives_install_message(tmp_path, monkeypatch):
    from validation.engine import EngineUnavailable, vllm_python

    monkeypatch.delenv("FLEETSIM_VLLM_PYTHON", raising=False)
    monkeypatch.setenv("FLEETSIM_VLLM_VENV", str(tmp_path / "nope"))
    with pytest.raises(EngineUnavailable, match="install_vllm_cpu.sh"):
        vllm_python()


# -- reconstruction ----------------------------------------------------------------------------------

def _synthetic_engine_run(seed: int = 0):
    """A tiny hand-made engine schedule (budget 64, no preemption) with its log and client timings.

    Request A: prompt 100, 4 tokens: chunk 64 in step 0, 36 in step 1 (first token), decodes 2..4.
    Request B: prompt 40 with 32 cached, 3 tokens: its 8 uncached tokens fit in step 1 after A's 36
    (first token there), decodes in steps 2 and 3.
    """
    steps = [  # (ctx_req, ctx_tok, gen_req)
        (1, 64, 0),
        (2, 44, 0),
        (0, 0, 2),
        (0, 0, 2),
        (0, 0, 1),
    ]
    t = 1000.0 + np.arange(len(steps)) * 0.02
    log = "\n".join(
        f"(APIServer pid=1) INFO t={t[i]:.6f} [loggers.py:199] Engine 000: Iteration({i}): {a} context requests, "
        f"{b} context tokens, {c} generation requests, {c} generation tokens, iteration elapsed time: 10.00 ms, "
        f"CPU KV cache usage: 1.0%" for i, (a, b, c) in enumerate(steps))
    t0 = 999.9
    lag = 0.003
    reqs = pd.DataFrame({
        "request_id": ["A", "B"], "send_s": [0.0, 0.05], "prompt_tokens": [100, 40], "output_tokens": [4, 3],
        "cached_tokens": [0, 32],
        "token_times": [list(t[1:5] - t0 + lag), list(t[1:4] - t0 + lag)],
    })
    reqs["tokens_received"] = reqs["token_times"].map(len)
    return log, reqs, t0


def test_reconstruct_shapes_exact_on_known_schedule():
    log, reqs, t0 = _synthetic_engine_run()
    st, rep = reconstruct_shapes(parse_iteration_log(log), reqs, t0)
    assert rep["steps_reconstructed"] == 5 and rep["requests_unplaced"] == 0
    # step 0: A's first chunk 64 tokens from 0 -> 64*64; step 1: A 36 after 64 -> 36*100, B 8 after 32 -> 8*40
    assert list(st["prefill_attn"]) == [64 * 64, 36 * 100 + 8 * 40, 0, 0, 0]
    # decodes: A at steps 2,3,4 with context 101,102,103; B at 2,3 with 41,42
    assert list(st["decode_context"]) == [0, 0, 101 + 41, 102 + 42, 103]
    assert list(st["num_seqs"]) == [1, 2, 2, 2, 1]


def test_reconstruct_flags_steps_it_cannot_explain():
    log, reqs, t0 = _synthetic_engine_run()
    reqs = reqs.copy()
    reqs.loc[1, "cached_tokens"] = 0  # B now needs 40 prefill tokens; the log has room for 8 only
    st, rep = reconstruct_shapes(parse_iteration_log(log), reqs, t0)
    # only the step whose context tokens cannot hold both prompts is flagged; the error stays local
    assert list(st["reconstructed"]) == [True, False, True, True, True]
    assert rep["steps_reconstructed"] == 4 and np.isnan(st.loc[1, "prefill_attn"])


# -- fitting -----------------------------------------------------------------------------------------

def _synthetic_steps(n: int, coef: np.ndarray, noise: float, rng: np.random.Generator) -> pd.DataFrame:
    pre_seqs = rng.integers(0, 3, n)
    pre_tok = np.where(pre_seqs > 0, rng.integers(16, 512, n), 0)
    before = rng.integers(0, 1500, n)
    dec = rng.integers(0, 48, n)
    df = pd.DataFrame({
        "prefill_seqs": pre_seqs, "prefill_tokens": pre_tok,
        "prefill_attn": (pre_tok * (before + pre_tok)).astype(float) * (pre_seqs > 0),
        "decode_seqs": dec, "decode_context": dec * rng.integers(100, 2000, n),
    })
    true = feature_matrix(df) @ coef
    df["elapsed_s"] = true * (1 + noise * rng.standard_normal(n))
    df["period_s"] = df["elapsed_s"] + 0.002
    df["reconstructed"] = True
    return df


TRUE = np.array([4e-3, 6e-5, 2e-9, 2e-4, 1.5e-7, 5e-5])


def test_nnls_recovers_known_coefficients_without_noise():
    df = _synthetic_steps(400, TRUE, 0.0, np.random.default_rng(1))
    for weights in ("predicted", "measured"):
        c = nnls_fit(feature_matrix(df), df["elapsed_s"].to_numpy(), weights=weights)
        np.testing.assert_allclose(c, TRUE, rtol=1e-6, atol=1e-12)


def test_predicted_weights_stay_unbiased_under_long_tailed_noise():
    """Contention noise is multiplicative with a long right tail (mean 1 here): dividing rows by
    the measured time under-weights slow steps and biases the fit low; prediction weights do not."""
    rng = np.random.default_rng(7)
    df = _synthetic_steps(4000, TRUE, 0.0, rng)
    X, true = feature_matrix(df), df["elapsed_s"].to_numpy()
    sigma = 0.5
    y = true * rng.lognormal(-sigma**2 / 2, sigma, len(true))
    bias = {w: y.sum() / (X @ nnls_fit(X, y, weights=w)).sum() - 1 for w in ("predicted", "measured")}
    assert abs(bias["predicted"]) < 0.03
    assert bias["measured"] > 0.15  # the textbook weighting lands well below the mean


def test_fit_recovers_coefficients_with_noise_and_reports_heldout_mape():
    rng = np.random.default_rng(2)
    train = _synthetic_steps(3000, TRUE, 0.03, rng)
    test = _synthetic_steps(800, TRUE, 0.03, rng)
    f = fit_step_time(train, test, target="elapsed")
    c = np.array([f.coefficients[k] for k in LINEAR_FEATURES])
    big = TRUE * feature_matrix(train).mean(0) > 1e-4  # terms that matter at these shapes
    np.testing.assert_allclose(c[big], TRUE[big], rtol=0.15)  # num_seqs ~ collinear with decode_seqs
    assert 0.015 < f.heldout_mape < 0.035  # ~ the injected 3% noise, no worse
    assert f.heldout_source == "separate run"
    cyc = fit_step_time(train, test, target="cycle")  # cycle = elapsed fit + 2 ms overhead
    assert cyc.coefficients["const"] == pytest.approx(f.coefficients["const"] + 0.002, rel=0.05)


def test_fit_rejects_too_few_steps_and_keeps_coefficients_nonnegative():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="too few"):
        fit_step_time(_synthetic_steps(5, TRUE, 0.0, rng), target="elapsed")
    neg = TRUE.copy()
    df = _synthetic_steps(500, neg, 0.05, rng)
    f = fit_step_time(df, target="period")
    assert all(v >= 0 for v in f.coefficients.values()) and f.coefficients["const"] > 0


def test_heldout_mask_holds_out_whole_blocks():
    m = heldout_mask(100, 0.3, 10, np.random.default_rng(0))
    assert 0 < m.sum() < 100
    blocks = m.reshape(10, 10)
    assert all(b.all() or not b.any() for b in blocks)


def test_profile_roundtrip_loads_in_simulator(tmp_path):
    rng = np.random.default_rng(4)
    f = fit_step_time(_synthetic_steps(600, TRUE, 0.02, rng), target="cycle")
    p = write_profile(tmp_path / "profile.json", f, {"vllm_version": "0.32.0", "block_size": 32})
    model = LinearStepTime.from_file(p)
    doc = json.loads(p.read_text())
    assert doc["form"] == "linear" and doc["tensor_parallel"] == 1 and doc["engine"]["block_size"] == 32
    assert doc["fit"]["heldout_mape"] == pytest.approx(f.heldout_mape)
    shape = BatchShape(prefill_seqs=1, prefill_tokens=100, prefill_attn=1e4, decode_seqs=3, decode_context=900)
    expect = float(np.dot([f.coefficients[k] for k in LINEAR_FEATURES], linear_features(shape)))
    assert model.step_time(shape) == pytest.approx(expect)


# -- replay request construction ------------------------------------------------------------------------

def test_shared_prefix_blocks_give_identical_token_ids():
    df = pd.DataFrame({
        "arrival_s": [0.0, 1.0, 2.0, 3.0],
        "prompt_tokens": [200, 150, 200, 100],
        "output_tokens": [5, 5, 5, 5],
        "hash_ids": [[7, 8, 9, 10], [7, 8, 11], [7, 99, 9, 10], [12, 13]],
    })
    w = Workload(df, hash_block_size=64, name="t")
    p = prompt_token_ids(w, block_size=32, vocab_size=32000, seed=0)
    assert [len(x) for x in p] == [200, 150, 200, 100]
    assert p[0][:128] == p[1][:128]  # two shared 64-token source blocks = 4 engine blocks
    assert p[0][128:150] != p[1][128:150]
    assert p[0][:64] == p[2][:64] and p[0][64:96] != p[2][64:96]  # diverge at source block 2
    assert p[3][:32] != p[0][:32]
    assert all(3 <= t < 32000 for x in p for t in x)
    assert p == prompt_token_ids(w, block_size=32, vocab_size=32000, seed=0)  # deterministic
    assert p != prompt_token_ids(w, block_size=32, vocab_size=32000, seed=1)


def test_requests_without_prefix_info_share_nothing_and_token_traces_are_used():
    w = Workload(pd.DataFrame({"arrival_s": [0.0, 0.5], "prompt_tokens": [64, 64], "output_tokens": [3, 4]}))
    p = prompt_token_ids(w, block_size=32, vocab_size=1000)
    assert p[0][:32] != p[1][:32]
    tok = Workload(pd.DataFrame({"arrival_s": [0.0], "prompt_tokens": [4], "output_tokens": [2],
                                 "token_ids": [[5, 128000, 7, 8]]}))
    reqs = build_requests(tok, block_size=32, vocab_size=1000)
    assert reqs[0].prompt_ids == [3 + 5 % 997, 3 + 128000 % 997, 3 + 7 % 997, 3 + 8 % 997]
    assert reqs[0].output_tokens == 2 and reqs[0].request_id == "r0"
    salted = build_requests(tok, block_size=32, vocab_size=1000, seed=5)[0].prompt_ids
    assert salted != reqs[0].prompt_ids and len(set(salted)) == len(set(reqs[0].prompt_ids))
    with pytest.raises(ValueError, match="row 0"):
        build_requests(w, block_size=32, vocab_size=1000, max_model_len=66)


def test_parse_prometheus_sums_label_sets():
    text = """# HELP x
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_preemptions_total{engine="0",model_name="m"} 2.0
vllm:num_preemptions_total{engine="1",model_name="m"} 1.0
vllm:other 5
"""
    m = parse_prometheus(text)
    assert m == {"vllm:num_requests_running": 3.0, "vllm:num_preemptions_total": 3.0}
