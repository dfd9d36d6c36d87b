"""KV memory plan: vLLM's block-count derivation, does-it-fit errors, dtypes and TP sharding."""

from __future__ import annotations

import re

import pytest

from sim.catalog import GiB, load_catalog
from sim.errors import ConfigError, DoesNotFitError
from sim.memory import (WEIGHT_DTYPES, activation_bytes, default_engine_limits, kv_bytes_per_token, plan_kv,
                        weight_bytes_per_gpu)


@pytest.fixture(scope="module")
def cat():
    return load_catalog()


def test_llama8b_h100_block_count_by_hand(cat):
    """Llama-3.1-8B, H100-80GB, util 0.92, vLLM's H100 server defaults (8192 tokens, 1024 seqs).

    requested  = 79.22 GiB * 0.92                      = 78,256,881,113 B
    weights    = 8,030,261,248 params * 2 B            = 16,060,522,496 B (14.96 GiB)
    activation = max(forward 8192 tok * 2 B * (4*4096 + 6144 + 3*14336) = 1,073,741,824,
                     sampler 1024 rows * 128,256 vocab * 12 B          = 1,576,009,728)
                 + 0.785 GiB other non-KV                              =   842,887,331
                                                                       = 2,418,897,059 B
    available  = 78,256,881,113 - 16,060,522,496 - 2,418,897,059       = 59,777,461,558 B (55.67 GiB)
    per block  = 2 (K,V) * 16 tokens * 8 kv heads * 128 * 2 B * 32 layers = 2,097,152 B (2 MiB)
    blocks     = 59,777,461,558 // 2,097,152 = 28,504  ->  456,064 tokens

    vLLM logs "GPU KV cache size: ~450-480k tokens" for this model on one H100 at util 0.9-0.95.
    """
    p = plan_kv(cat.model("llama-3.1-8b"), cat.gpu("H100-80GB"), gpu_memory_utilization=0.92)
    assert p.bytes_per_block == 2_097_152
    assert p.weight_bytes_per_gpu == 16_060_522_496
    assert p.activation_bytes == 2_418_897_059
    assert p.num_gpu_blocks == 28_504
    assert p.tokens_capacity == 456_064
    assert p.max_model_len == 131_072
    assert p.max_num_batched_tokens == 8192 and p.max_num_seqs == 1024
    assert p.max_concurrency == pytest.approx(456_064 / 131_072)


def _rtx4090(tmp_path):
    f = tmp_path / "rtx.yaml"
    # device_total_memory_bytes 25,250,627,584 from the measured run's meta.json
    f.write_text(f"""gpus:
  RTX-4090:
    memory_gib: {25_250_627_584 / GiB}
    hbm_bandwidth_tbs: 1.008
    bf16_tflops: 165.2
    fp8_tflops: 330.3
    int8_tops: 660.6
    interconnect: pcie
    interconnect_bandwidth_gbs: 32
    usd_per_hour: 0.69
""")
    return load_catalog([f])


def test_matches_measured_vllm_runs(tmp_path):
    """Real vLLM 0.19 start-ups of Llama-3.1-8B:
    - RTX 4090 (shared/traces/llmservingsim_rtx4090_llama8b/meta.json): util 0.9, max_num_batched_tokens
      2048, max_num_seqs 256, max_model_len 32768 -> num_gpu_blocks 2,588 (41,408 tokens);
    - H100 at util 0.95 (a published log): "Available KV cache memory: 58.11 GiB", ~476,000 tokens.
    """
    cat = _rtx4090(tmp_path)
    m = cat.model("llama-3.1-8b")
    p = plan_kv(m, cat.gpu("RTX-4090"), gpu_memory_utilization=0.9, max_num_batched_tokens=2048,
                max_num_seqs=256, max_model_len=32768)
    assert p.num_gpu_blocks == pytest.approx(2588, rel=0.01)
    h = plan_kv(m, cat.gpu("H100-80GB"), gpu_memory_utilization=0.95)
    assert h.available_kv_bytes / GiB == pytest.approx(58.11, rel=0.02)
    assert h.tokens_capacity == pytest.approx(476_000, rel=0.02)


def test_70b_on_one_h100_does_not_fit_because_of_weights(cat):
    with pytest.raises(DoesNotFitError) as e:
        plan_kv(cat.model("llama-3.1-70b"), cat.gpu("H100-80GB"), tensor_parallel=1)
    msg = str(e.value)
    assert "\n" not in msg
    assert "weights need 131.4 GiB per GPU at TP=1" in msg and "H100-80GB" in msg and "0.92" in msg
    assert "tensor_parallel >= 4" in msg  # 65.7 GiB at TP=2 leaves no KV room under 90% of the budget


def test_70b_on_two_h100s_needs_a_shorter_max_model_len(cat):
    m, g = cat.model("llama-3.1-70b"), cat.gpu("H100-80GB")
    with pytest.raises(DoesNotFitError) as e:
        plan_kv(m, g, tensor_parallel=2)  # max_model_len = 131072 needs 20 GiB of KV per rank
    msg = str(e.value)
    assert "max_model_len 131072" in msg and "20.00 GiB" in msg
    est = int(re.search(r"estimated maximum model length is (\d+)", msg).group(1))
    # vLLM's estimate is exact: that length fits, one block more does not.
    assert plan_kv(m, g, tensor_parallel=2, max_model_len=est).max_model_len == est
    with pytest.raises(DoesNotFitError):
        plan_kv(m, g, tensor_parallel=2, max_model_len=est + 16)
    assert plan_kv(m, g, tensor_parallel=4).max_model_len == 131_072


def test_tp_must_divide_heads(cat):
    with pytest.raises(DoesNotFitError, match=r"32 attention heads are not divisible by tensor_parallel=3"):
        plan_kv(cat.model("llama-3.1-8b"), cat.gpu("H100-80GB"), tensor_parallel=3)
    with pytest.raises(ConfigError):
        plan_kv(cat.model("llama-3.1-8b"), cat.gpu("H100-80GB"), tensor_parallel=0)


def test_kv_heads_are_replicated_beyond_their_count(cat):
    m = cat.model("llama-3.1-8b")  # 8 KV heads
    per_tok = {tp: kv_bytes_per_token(m, tensor_parallel=tp) for tp in (1, 2, 4, 8, 16, 32)}
    assert per_tok[1] == 131_072 and per_tok[2] == per_tok[1] // 2 and per_tok[8] == per_tok[1] // 8
    assert per_tok[16] == per_tok[32] == per_tok[8]  # one (replicated) KV head per rank


def test_tensor_parallel_shards_weights(cat):
    m = cat.model("llama-3.1-70b")
    assert weight_bytes_per_gpu(m, "bf16", 4) == pytest.approx(weight_bytes_per_gpu(m, "bf16", 1) / 4)
    p4 = plan_kv(m, cat.gpu("H100-80GB"), tensor_parallel=4)
    p8 = plan_kv(m, cat.gpu("H100-80GB"), tensor_parallel=8)
    assert p8.num_gpu_blocks > 2 * p4.num_gpu_blocks  # half the KV per token and more free memory


def test_weight_dtypes_shrink_weights(cat):
    m = cat.model("llama-3.1-8b")
    w = {d: weight_bytes_per_gpu(m, d) for d in WEIGHT_DTYPES}
    assert w["bf16"] == w["fp16"] == 2 * m.num_params
    # Quantized: the block matmuls shrink, embeddings and lm_head (2 x 525M params) stay bf16.
    emb = 2 * m.embedding_params * 2
    assert w["fp8"] == w["int8"] == pytest.approx(m.linear_params * 1 + emb + (m.num_params - m.linear_params
                                                                               - 2 * m.embedding_params) * 2)
    assert w["int4"] == pytest.approx(m.linear_params * 0.5195 + emb, rel=1e-3)
    assert w["bf16"] > w["fp8"] > w["int4"]
    blocks = {d: plan_kv(m, cat.gpu("L40S"), weight_dtype=d, max_model_len=32768).num_gpu_blocks
              for d in ("bf16", "fp8", "int4")}
    assert blocks["bf16"] < blocks["fp8"] < blocks["int4"]


def test_fp8_kv_cache_halves_block_bytes(cat):
    m, g = cat.model("llama-3.1-8b"), cat.gpu("H100-80GB")
    auto = plan_kv(m, g)
    fp8 = plan_kv(m, g, kv_cache_dtype="fp8")
    assert fp8.bytes_per_block * 2 == auto.bytes_per_block
    assert fp8.num_gpu_blocks in (2 * auto.num_gpu_blocks, 2 * auto.num_gpu_blocks + 1)
    # 'auto' is bf16 even for quantized weights (activations stay bf16).
    assert plan_kv(m, g, weight_dtype="int4").bytes_per_block == auto.bytes_per_block


def test_block_size_scales_bytes_per_block(cat):
    m, g = cat.model("llama-3.1-8b"), cat.gpu("H100-80GB")
    p16, p32 = plan_kv(m, g), plan_kv(m, g, block_size=32)
    assert p32.bytes_per_block == 2 * p16.bytes_per_block
    assert abs(p32.tokens_capacity - p16.tokens_capacity) <= 32


def test_num_gpu_blocks_override(cat):
    m, g = cat.model("llama-3.1-8b"), cat.gpu("H100-80GB")
    p = plan_kv(m, g, num_gpu_blocks_override=600, max_model_len=4096)
    assert p.num_gpu_blocks == 600 and p.tokens_capacity == 9600 and p.kv_bytes_per_gpu == 600 * p.bytes_per_block
    assert any("overridden" in n for n in p.notes)
    # vLLM checks the overridden capacity too: 4096 tokens need 256 blocks plus the null block.
    assert plan_kv(m, g, num_gpu_blocks_override=257, max_model_len=4096).num_gpu_blocks == 257
    with pytest.raises(DoesNotFitError, match="max_model_len 4096"):
        plan_kv(m, g, num_gpu_blocks_override=256, max_model_len=4096)
    big = plan_kv(m, g, num_gpu_blocks_override=10**6)
    assert any("run out of memory" in n for n in big.notes)


def test_max_model_len_checks(cat):
    m, g = cat.model("llama-2-7b"), cat.gpu("H100-80GB")
    assert plan_kv(m, g).max_model_len == 4096
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        plan_kv(m, g, max_model_len=8192)


def test_no_room_for_kv(cat):
    with pytest.raises(DoesNotFitError, match="no memory left for the KV cache"):
        plan_kv(cat.model("llama-3.1-8b"), cat.gpu("H100-80GB"), gpu_memory_utilization=0.2)


def test_bad_dtype_names(cat):
    m, g = cat.model("llama-3.1-8b"), cat.gpu("H100-80GB")
    with pytest.raises(ConfigError, match="cluster.weight_dtype"):
        plan_kv(m, g, weight_dtype="int3")
    with pytest.raises(ConfigError, match="cluster.kv_cache_dtype"):
        plan_kv(m, g, kv_cache_dtype="int8")


def test_default_engine_limits(cat):
    assert default_engine_limits(cat.gpu("H100-80GB")) == (8192, 1024)
    assert default_engine_limits(cat.gpu("H200")) == (8192, 1024)
    assert default_engine_limits(cat.gpu("B200")) == (16384, 1024)
    assert default_engine_limits(cat.gpu("A100-80GB")) == (2048, 256)  # A100 excluded (vLLM PR #17885)
    assert default_engine_limits(cat.gpu("L4")) == (2048, 256)


def test_defaults_follow_the_gpu(cat):
    m = cat.model("llama-3.1-8b")
    for g in (cat.gpu("H100-80GB"), cat.gpu("A100-80GB")):
        t, s = default_engine_limits(g)
        assert plan_kv(m, g).num_gpu_blocks == plan_kv(m, g, max_num_batched_tokens=t, max_num_seqs=s).num_gpu_blocks
    # A larger profile batch reserves more activation memory and leaves fewer blocks.
    small = activation_bytes(m, max_num_batched_tokens=2048, max_num_seqs=256)
    large = activation_bytes(m, max_num_batched_tokens=16384, max_num_seqs=1024)
    assert large > small


def test_every_catalog_pair_plans_or_says_why(cat):
    """No GPU x model x TP combination crashes: it fits, or raises one line saying why."""
    for g in cat.gpus():
        for m in cat.models():
            for tp in (1, 2, 4, 8):
                try:
                    p = plan_kv(m, g, tensor_parallel=tp)
                except DoesNotFitError as e:
                    assert "\n" not in str(e) and m.name in str(e)
                    continue
                assert p.num_gpu_blocks - 1 >= -(-p.max_model_len // p.block_size)
                assert p.weight_bytes_per_gpu + p.activation_bytes + p.kv_bytes_per_gpu <= p.requested_bytes
