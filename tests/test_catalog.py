"""Catalog: built-in entries are complete and self-consistent; lookups and user files behave."""

from __future__ import annotations

import pytest

from sim.catalog import GPUSpec, ModelSpec, load_catalog, relative_param_error
from sim.errors import ConfigError

REQUIRED_GPUS = ["A10G", "L4", "L40S", "A100-40GB", "A100-80GB", "H100-80GB", "H200", "B200"]
REQUIRED_MODELS = ["llama-3.1-8b", "llama-3.1-70b", "llama-2-7b", "mistral-7b-v0.3", "qwen2.5-7b", "qwen3-32b",
                   "qwen3-30b-a3b", "tiny-llama"]


@pytest.fixture(scope="module")
def cat():
    return load_catalog()


def test_required_entries_present(cat):
    assert set(REQUIRED_GPUS) <= set(cat.gpu_names)
    assert set(REQUIRED_MODELS) <= set(cat.model_names)


@pytest.mark.parametrize("name", REQUIRED_GPUS + ["MI300X"])
def test_gpu_entries_are_sane(cat, name):
    g = cat.gpu(name)
    assert isinstance(g, GPUSpec)
    assert 16 < g.memory_gib < 200
    assert 0.2 < g.hbm_bandwidth_tbs < 10
    assert g.usd_per_hour > 0
    assert g.interconnect in ("nvlink", "pcie", "xgmi")
    # Machine balance (FLOP per byte at the ridge point) of real GPUs is in the tens to hundreds.
    assert 50 < g.bf16_tflops * 1e12 / (g.hbm_bandwidth_tbs * 1e12) < 600
    if g.fp8_tflops is not None:
        assert g.fp8_tflops == pytest.approx(2 * g.bf16_tflops, rel=0.05)  # FP8 doubles dense throughput


def test_gpu_generations_are_ordered(cat):
    # Facts the step-time model relies on: newer parts have more bandwidth and compute.
    bw = [cat.gpu(n).hbm_bandwidth_tbs for n in ("A100-80GB", "H100-80GB", "H200", "B200")]
    assert bw == sorted(bw)
    assert cat.gpu("H200").bf16_tflops == cat.gpu("H100-80GB").bf16_tflops
    assert cat.gpu("A100-40GB").fp8_tflops is None and cat.gpu("A10G").fp8_tflops is None


@pytest.mark.parametrize("name", REQUIRED_MODELS)
def test_model_entries_are_self_consistent(cat, name):
    m = cat.model(name)
    assert isinstance(m, ModelSpec)
    assert m.num_attention_heads % m.num_kv_heads == 0
    # Published parameter count vs the count implied by the shapes (biases and q/k norms are the
    # only things the shape count leaves out).
    assert relative_param_error(m) < 0.02, (m.num_params, m.computed_num_params)
    if m.is_moe:
        assert m.num_experts_per_tok < m.num_experts
        assert m.active_params == pytest.approx(m.computed_active_params, rel=0.03)
        assert m.active_params < 0.2 * m.num_params
    else:
        assert m.active_params == m.num_params


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.1-70b", "llama-2-7b", "mistral-7b-v0.3", "qwen2.5-7b",
                                  "tiny-llama"])
def test_head_dim_times_heads_is_hidden_where_it_should_be(cat, name):
    m = cat.model(name)
    assert m.num_attention_heads * m.head_dim == m.hidden_size


def test_qwen3_projects_attention_wider_than_hidden(cat):
    m = cat.model("qwen3-32b")
    assert m.q_size == 8192 and m.hidden_size == 5120


def test_known_hf_numbers(cat):
    m = cat.model("llama-3.1-8b")
    assert (m.num_layers, m.hidden_size, m.num_kv_heads, m.intermediate_size, m.vocab_size) == (
        32, 4096, 8, 14336, 128256)
    moe = cat.model("qwen3-30b-a3b")
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (128, 8, 768)
    tiny = cat.model("tiny-llama")
    assert (tiny.num_layers, tiny.hidden_size, tiny.num_attention_heads, tiny.num_kv_heads,
            tiny.intermediate_size, tiny.vocab_size) == (4, 512, 8, 4, 1024, 32000)
    assert tiny.num_params == tiny.computed_num_params == 42_209_792


@pytest.mark.parametrize("alias", ["llama-3.1-8b", "LLAMA-3.1-8B", "meta-llama/Llama-3.1-8B",
                                   "meta-llama/Llama-3.1-8B-Instruct", "llama_3.1_8b"])
def test_model_aliases(cat, alias):
    assert cat.model(alias).name == "llama-3.1-8b"


@pytest.mark.parametrize("alias", ["H100-80GB", "h100", "H100_80GB", "NVIDIA H100 80GB HBM3"])
def test_gpu_aliases(cat, alias):
    assert cat.gpu(alias).name == "H100-80GB"


def test_unknown_names_list_the_known_ones(cat):
    with pytest.raises(ConfigError) as e:
        cat.gpu("H900")
    msg = str(e.value)
    assert "cluster.gpu" in msg and "H900" in msg and "H100-80GB" in msg and "\n" not in msg
    with pytest.raises(ConfigError) as e:
        cat.model("gpt-5")
    assert "cluster.model" in str(e.value) and "llama-3.1-8b" in str(e.value)


NEW_GPU = """\
gpus:
  RTX-4090:
    aliases: [rtx4090]
    memory_gib: 23.52
    hbm_bandwidth_tbs: 1.008
    bf16_tflops: 165.2
    fp8_tflops: 330.3
    int8_tops: 660.6
    interconnect: pcie
    interconnect_bandwidth_gbs: 32
    usd_per_hour: 0.69
  H100-80GB:
    usd_per_hour: 2.49
models:
  my-model:
    num_layers: 2
    hidden_size: 256
    num_attention_heads: 4
    num_kv_heads: 2
    intermediate_size: 512
    vocab_size: 1000
    max_position_embeddings: 1024
"""


def test_user_file_adds_and_overrides(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text(NEW_GPU)
    cat = load_catalog([f])
    g = cat.gpu("rtx4090")
    assert g.name == "RTX-4090" and g.memory_gib == 23.52
    h = cat.gpu("H100-80GB")
    assert h.usd_per_hour == 2.49 and h.hbm_bandwidth_tbs == 3.35  # only the price changed
    m = cat.model("my-model")
    assert m.head_dim == 64  # derived from hidden / heads, as Hugging Face does
    assert m.num_params == m.computed_num_params
    assert load_catalog().gpu("H100-80GB").usd_per_hour != 2.49  # no global state


@pytest.mark.parametrize("text, needles", [
    ("gpus:\n  X:\n    memory_gib: 10\n", ["hbm_bandwidth_tbs", "gpus.X"]),
    ("gpus:\n  X:\n    memory_gib: lots\n    hbm_bandwidth_tbs: 1\n", ["memory_gib", ":3:"]),
    ("gpus:\n  H100-80GB:\n    memroy_gib: 10\n", ["memroy_gib", ":3:"]),
    ("gpus:\n  X:\n    interconnect: infiniband\n", ["interconnect"]),
    ("gpu:\n  X: {}\n", ["gpu", "sections"]),
    ("models:\n  m:\n    num_layers: 2\n    hidden_size: 256\n    num_attention_heads: 4\n    num_kv_heads: 3\n"
     "    intermediate_size: 8\n    vocab_size: 10\n    max_position_embeddings: 16\n", ["num_kv_heads", "models.m"]),
    ("models:\n  m:\n    num_layers: 2\n    hidden_size: 256\n    num_attention_heads: 4\n    num_kv_heads: 2\n"
     "    intermediate_size: 8\n    vocab_size: 10\n    max_position_embeddings: 16\n    num_experts: 8\n",
     ["num_experts_per_tok"]),
    ("gpus: [1, 2\n", ["invalid YAML", ":2"]),
])
def test_malformed_user_file_names_file_line_and_field(tmp_path, text, needles):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_catalog([f])
    msg = str(e.value)
    assert str(f) in msg and "\n" not in msg
    for n in needles:
        assert n in msg, msg


def test_missing_user_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_catalog([tmp_path / "nope.yaml"])
