"""KV-cache memory plan: how many KV blocks a replica gets, derived the way vLLM V1 derives it.

vLLM (``Worker.determine_available_memory`` + ``kv_cache_planning.get_kv_cache_configs``)::

    requested     = total_gpu_memory * gpu_memory_utilization
    available_kv  = requested - (weights + peak activation of a profile run at max_num_batched_tokens
                                 + non-torch allocations)
    num_blocks    = available_kv // bytes_per_block            (or num_gpu_blocks_override)
    bytes_per_block = 2 (K,V) * block_size * kv_heads_per_rank * head_dim * kv_dtype_bytes * num_layers

and refuses to start unless one request of ``max_model_len`` tokens fits in the blocks left after the
null block (``_check_enough_kv_cache_memory``). We compute weights from the catalog shapes and the
weight dtype, and *estimate* the profile run's peak (vLLM measures it); see :func:`activation_bytes`
for the estimate and its calibration. Everything is per GPU rank: tensor parallelism shards weights
and KV heads, and every rank holds the same number of blocks.

Weight dtypes (``WEIGHT_DTYPES``) -- what vLLM stores for the transformer-block matmuls; embeddings,
lm_head, norms and the MoE router stay in bf16 in every scheme below (as in vLLM's fp8, compressed-
tensors W8A8, AWQ and GPTQ loaders):

- ``bf16`` / ``fp16``: 2 bytes/param.
- ``fp8``:  1 byte/param (per-tensor/per-channel scales are negligible). FP8 GEMMs where the GPU has
  FP8 tensor cores, otherwise weight-only (vLLM's FP8 Marlin) at bf16 compute.
- ``int8``: 1 byte/param, W8A8 on int8 tensor cores.
- ``int4``: AWQ/GPTQ with group size 128: 0.5 byte/param + one fp16 scale and one 4-bit zero point per
  128 weights = 0.5 + 2.5/128 = 0.5195 bytes/param; weight-only (Marlin), bf16 compute.

KV-cache dtypes (``KV_CACHE_DTYPES``): ``auto`` = the model's activation dtype, which is bf16 (or
fp16) for every weight dtype above -- quantized checkpoints still run bf16 activations -- so 2 bytes;
``fp8`` (= ``fp8_e4m3``/``fp8_e5m2``) = 1 byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sim.catalog import GiB, GPUSpec, ModelSpec
from sim.errors import ConfigError, DoesNotFitError


@dataclass(frozen=True)
class WeightDtype:
    name: str
    bytes_per_param: float  # for the quantized (transformer-block matmul) parameters
    compute: str  # which peak the GEMMs run at: "bf16" | "fp8" | "int8"
    note: str


_INT4_GROUP = 128
WEIGHT_DTYPES: dict[str, WeightDtype] = {
    "bf16": WeightDtype("bf16", 2.0, "bf16", "bfloat16 weights"),
    "fp16": WeightDtype("fp16", 2.0, "bf16", "float16 weights (same tensor-core rate as bf16)"),
    "fp8": WeightDtype("fp8", 1.0, "fp8", "FP8 W8A8 (weight-only Marlin on GPUs without FP8)"),
    "int8": WeightDtype("int8", 1.0, "int8", "INT8 W8A8"),
    "int4": WeightDtype("int4", 0.5 + (2 + 0.5) / _INT4_GROUP, "bf16",
                        "AWQ/GPTQ 4-bit, group 128, fp16 scales + 4-bit zeros, weight-only"),
}
_WEIGHT_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "awq": "int4", "gptq": "int4",
                   "w4a16": "int4", "w8a8": "int8", "fp8_e4m3": "fp8"}

# Bytes per element of the KV cache; None = "auto" (the activation dtype).
KV_CACHE_DTYPES: dict[str, int | None] = {
    "auto": None, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1,
}
ACTIVATION_DTYPE_BYTES = 2  # bf16/fp16 activations for every weight dtype above

# --- profile-run peak estimate (see activation_bytes) -------------------------------------------------
# Logits buffers of the dummy sampler run, bytes per (sequence x vocab) element: fp32 logits, fp32
# probabilities and the top-k/top-p sort buffers, about three 4-byte copies.
SAMPLER_BYTES_PER_LOGIT = 12
# Memory outside the estimated tensors: non-torch allocations (cuBLAS/NCCL workspaces, CUDA-graph
# pools), buffers kept alive across the profile run, allocator slack. Calibrated so that Llama-3.1-8B
# on an RTX 4090 (vLLM 0.19, util 0.9, 2048 tokens / 256 seqs) gets the 2,588 blocks vLLM logged.
OTHER_NON_KV_BYTES = int(0.785 * GiB)
# Extra non-torch memory when tensor_parallel > 1 (NCCL channel buffers, custom all-reduce IPC buffers).
TP_COMM_BUFFER_BYTES = int(0.5 * GiB)


def _err_dtype(kind: str, value: str, known) -> ConfigError:
    return ConfigError(f"cluster.{kind}: unknown value {value!r}; known: {', '.join(known)}")


def resolve_weight_dtype(weight_dtype: str) -> WeightDtype:
    key = str(weight_dtype).strip().lower()
    key = _WEIGHT_ALIASES.get(key, key)
    if key not in WEIGHT_DTYPES:
        raise _err_dtype("weight_dtype", weight_dtype, WEIGHT_DTYPES)
    return WEIGHT_DTYPES[key]


def kv_dtype_bytes(kv_cache_dtype: str, weight_dtype: str = "bf16") -> int:
    """Bytes per KV element. ``auto`` follows the activation dtype: 2 bytes for every weight dtype."""
    resolve_weight_dtype(weight_dtype)
    key = str(kv_cache_dtype).strip().lower()
    if key not in KV_CACHE_DTYPES:
        raise _err_dtype("kv_cache_dtype", kv_cache_dtype, KV_CACHE_DTYPES)
    b = KV_CACHE_DTYPES[key]
    return ACTIVATION_DTYPE_BYTES if b is None else b


def gpu_supports(gpu: GPUSpec, compute: str) -> bool:
    return compute == "bf16" or (compute == "fp8" and gpu.fp8_tflops is not None) or (
        compute == "int8" and gpu.int8_tops is not None)


def check_tensor_parallel(model: ModelSpec, tensor_parallel: int) -> None:
    """vLLM's sharding constraints (``ModelConfig.verify_with_parallel_config``, QKVParallelLinear,
    the MLP's ``divide``). Raises :class:`DoesNotFitError` naming the shape that does not divide."""
    tp = tensor_parallel
    if not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"cluster.tensor_parallel: must be a positive integer, got {tp!r}")
    m = model
    why = None
    if m.num_attention_heads % tp:
        why = (f"its {m.num_attention_heads} attention heads are not divisible by tensor_parallel={tp} "
               f"(vLLM: 'Total number of attention heads ({m.num_attention_heads}) must be divisible by "
               f"tensor parallel size ({tp})')")
    elif tp >= m.num_kv_heads and tp % m.num_kv_heads:
        why = f"tensor_parallel={tp} is not a multiple of its {m.num_kv_heads} KV heads (KV heads are replicated)"
    elif tp < m.num_kv_heads and m.num_kv_heads % tp:
        why = f"its {m.num_kv_heads} KV heads are not divisible by tensor_parallel={tp}"
    elif m.is_moe and int(m.moe_intermediate_size) % tp:
        why = f"its expert width {m.moe_intermediate_size} is not divisible by tensor_parallel={tp}"
    elif not m.is_moe and m.intermediate_size % tp:
        why = f"its MLP width {m.intermediate_size} is not divisible by tensor_parallel={tp}"
    if why:
        raise DoesNotFitError(f"{m.name} cannot be sharded at TP={tp}: {why}; pick a TP that divides it")


def kv_heads_per_rank(model: ModelSpec, tensor_parallel: int) -> int:
    """KV heads each rank stores: ``num_kv_heads / tp``, or 1 (replicated) when ``tp > num_kv_heads``."""
    check_tensor_parallel(model, tensor_parallel)
    return max(1, model.num_kv_heads // tensor_parallel)


def kv_bytes_per_token(model: ModelSpec, *, tensor_parallel: int = 1, kv_cache_dtype: str = "auto",
                       weight_dtype: str = "bf16") -> int:
    """KV bytes one token occupies on one rank, all layers (K and V)."""
    return (2 * model.num_layers * kv_heads_per_rank(model, tensor_parallel) * model.head_dim
            * kv_dtype_bytes(kv_cache_dtype, weight_dtype))


def weight_bytes_per_gpu(model: ModelSpec, weight_dtype: str = "bf16", tensor_parallel: int = 1) -> float:
    """Weight bytes on one rank: block matmuls at the dtype's size, everything else in bf16, all /tp
    (vLLM shards the embedding and lm_head over the vocabulary too; replicated norms are negligible)."""
    wd = resolve_weight_dtype(weight_dtype)
    linear = min(model.linear_params, model.num_params)
    other = model.num_params - linear
    return (linear * wd.bytes_per_param + other * ACTIVATION_DTYPE_BYTES) / tensor_parallel


def activation_bytes(model: ModelSpec, *, tensor_parallel: int = 1, max_num_batched_tokens: int,
                     max_num_seqs: int) -> int:
    """Estimated non-KV, non-weight memory of the profile run (vLLM *measures* this).

    vLLM runs one forward pass of ``max_num_batched_tokens`` dummy tokens, then a dummy sampler run
    on ``min(max_num_seqs, max_num_batched_tokens)`` logits rows, and reserves the torch peak plus
    non-torch allocations. The two phases do not overlap (the forward's intermediates are freed
    before sampling), so the peak is the larger of:

    - forward: per token, the residual stream and its normed copies (4 x hidden), the fused QKV
      output, and the MLP's fused gate/up output plus the activation output (3 x MLP width; for MoE,
      ``num_experts_per_tok`` x expert width, plus the per-expert copies of the hidden state),
      all in bf16 and sharded by TP;
    - sampler: rows x vocab x ``SAMPLER_BYTES_PER_LOGIT`` (logits are gathered to full vocab);

    plus ``OTHER_NON_KV_BYTES`` (and ``TP_COMM_BUFFER_BYTES`` when TP > 1).

    Checks against vLLM 0.19 start-up logs of Llama-3.1-8B: RTX 4090 at util 0.9, 2048 tokens /
    256 seqs -> 1.15 GiB, which reproduces the 2,588 blocks vLLM logged (this fixed
    ``OTHER_NON_KV_BYTES``); H100 at util 0.95 logged 2.14 GiB of profile overhead and 58.11 GiB of
    KV (its batch config was not logged; the H100 defaults, 8192 tokens / 1024 seqs, give 2.25 GiB
    and 58.05 GiB here). Expect +-0.5 GiB on other models and GPUs.
    """
    tp = tensor_parallel
    m = model
    if m.is_moe:
        k = int(m.num_experts_per_tok)
        mlp = (3 * k * int(m.moe_intermediate_size)) // tp + k * m.hidden_size
    else:
        mlp = (3 * m.intermediate_size) // tp
    per_token = ACTIVATION_DTYPE_BYTES * (4 * m.hidden_size + (m.q_size + 2 * m.kv_size) // tp + mlp)
    forward = max_num_batched_tokens * per_token
    rows = min(max_num_seqs, max_num_batched_tokens)
    sampler = rows * m.vocab_size * SAMPLER_BYTES_PER_LOGIT
    return int(max(forward, sampler) + OTHER_NON_KV_BYTES + (TP_COMM_BUFFER_BYTES if tp > 1 else 0))


def default_engine_limits(gpu: GPUSpec) -> tuple[int, int]:
    """``(max_num_batched_tokens, max_num_seqs)`` vLLM picks for the OpenAI server on this GPU.

    ``EngineArgs.get_batch_defaults`` (vLLM 0.33): total memory >= 160 GiB -> (16384, 1024);
    >= 70 GiB and not an A100 -> (8192, 1024) (A100 excluded after vLLM PR #17885 measured a
    throughput regression); anything else -> (2048, 256).
    """
    if gpu.memory_gib >= 160:
        return 16384, 1024
    if gpu.memory_gib >= 70 and "a100" not in gpu.name.lower():
        return 8192, 1024
    return 2048, 256


@dataclass
class KVPlan:
    """The memory layout of one replica, per GPU rank (all ranks hold the same number of blocks).

    ``num_gpu_blocks`` counts vLLM's null block, so ``num_gpu_blocks - 1`` blocks hold KV, and
    ``tokens_capacity = num_gpu_blocks * block_size`` is what vLLM logs as "GPU KV cache size".
    """

    num_gpu_blocks: int
    block_size: int
    bytes_per_block: int  # per GPU rank
    weight_bytes_per_gpu: int
    activation_bytes: int  # estimated profile-run peak + non-torch, per rank
    kv_bytes_per_gpu: int  # num_gpu_blocks * bytes_per_block
    max_model_len: int
    tokens_capacity: int
    notes: list[str] = field(default_factory=list)
    requested_bytes: int = 0  # total memory x gpu_memory_utilization
    available_kv_bytes: int = 0  # before any num_gpu_blocks override
    kv_heads_per_rank: int = 0
    kv_dtype_bytes: int = 2
    tensor_parallel: int = 1
    max_num_batched_tokens: int = 0
    max_num_seqs: int = 0

    @property
    def max_concurrency(self) -> float:
        """vLLM's "Maximum concurrency for max_model_len tokens per request"."""
        return self.tokens_capacity / self.max_model_len

    def summary(self) -> str:
        """vLLM-style start-up lines, for logs and the CLI."""
        return (f"weights {self.weight_bytes_per_gpu / GiB:.2f} GiB; profile peak + non-torch "
                f"{self.activation_bytes / GiB:.2f} GiB; available KV cache memory "
                f"{self.available_kv_bytes / GiB:.2f} GiB; GPU KV cache size: {self.tokens_capacity:,} tokens "
                f"({self.num_gpu_blocks:,} blocks of {self.block_size}); maximum concurrency for "
                f"{self.max_model_len:,} tokens per request: {self.max_concurrency:.2f}x")


def _gib(b: float) -> str:
    return f"{b / GiB:.1f} GiB"


def _smallest_tp_that_fits(model: ModelSpec, weight_dtype: str, budget: float) -> int | None:
    for tp in (2, 4, 8, 16, 32, 64):
        try:
            check_tensor_parallel(model, tp)
        except DoesNotFitError:
            continue
        if weight_bytes_per_gpu(model, weight_dtype, tp) < 0.9 * budget:
            return tp
    return None


def plan_kv(model: ModelSpec, gpu: GPUSpec, *, tensor_parallel: int = 1, weight_dtype: str = "bf16",
            kv_cache_dtype: str = "auto", block_size: int = 16, gpu_memory_utilization: float = 0.92,
            max_num_batched_tokens: int | None = None, max_num_seqs: int | None = None,
            num_gpu_blocks_override: int | None = None, max_model_len: int | None = None) -> KVPlan:
    """Derive the KV block count like vLLM; raise :class:`DoesNotFitError` with a one-line "why".

    ``max_num_batched_tokens`` / ``max_num_seqs`` left as ``None`` take vLLM's defaults for the GPU
    (:func:`default_engine_limits`); ``max_model_len`` left as ``None`` is the model's
    ``max_position_embeddings``, as in vLLM.
    """
    tp = tensor_parallel
    check_tensor_parallel(model, tp)
    wd = resolve_weight_dtype(weight_dtype)
    kv_b = kv_dtype_bytes(kv_cache_dtype, weight_dtype)
    if not isinstance(block_size, int) or block_size <= 0:
        raise ConfigError(f"cluster.engine.block_size: must be a positive integer, got {block_size!r}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ConfigError(f"cluster.engine.gpu_memory_utilization: must be in (0, 1], got {gpu_memory_utilization}")
    d_tokens, d_seqs = default_engine_limits(gpu)
    tokens = d_tokens if max_num_batched_tokens is None else int(max_num_batched_tokens)
    seqs = d_seqs if max_num_seqs is None else int(max_num_seqs)
    if max_model_len is None:
        max_model_len = model.max_position_embeddings
    elif max_model_len > model.max_position_embeddings:
        raise ConfigError(
            f"cluster.engine.max_model_len: {max_model_len} is greater than {model.name}'s "
            f"max_position_embeddings ({model.max_position_embeddings}); vLLM refuses this too")
    notes: list[str] = []

    requested = int(gpu.memory_bytes * gpu_memory_utilization)
    weights = weight_bytes_per_gpu(model, weight_dtype, tp)
    if weights >= requested:
        hint = _smallest_tp_that_fits(model, weight_dtype, requested) if tp == 1 else None
        fix = f"use tensor_parallel >= {hint}" if hint else "use more GPUs (tensor_parallel)"
        smaller = [d for d in ("fp8", "int4") if WEIGHT_DTYPES[d].bytes_per_param < wd.bytes_per_param]
        if smaller:
            fix += f" or smaller weights ({smaller[0]}: {_gib(weight_bytes_per_gpu(model, smaller[0], tp))})"
        raise DoesNotFitError(
            f"{model.name} {wd.name} weights need {_gib(weights)} per GPU at TP={tp} but {gpu.name} offers "
            f"{gpu.memory_gib:.1f} GiB x gpu_memory_utilization {gpu_memory_utilization} = {_gib(requested)}; {fix}")
    act = activation_bytes(model, tensor_parallel=tp, max_num_batched_tokens=tokens, max_num_seqs=seqs)
    available = int(requested - weights - act)
    if available <= 0:
        raise DoesNotFitError(
            f"no memory left for the KV cache: {model.name} at TP={tp} on {gpu.name} needs {_gib(weights)} of "
            f"weights + {_gib(act)} of activations (profile run at max_num_batched_tokens={tokens}) but has "
            f"{_gib(requested)} (gpu_memory_utilization {gpu_memory_utilization}); raise gpu_memory_utilization, "
            f"lower max_num_batched_tokens or add GPUs (vLLM: 'No available memory for the cache blocks')")

    heads = kv_heads_per_rank(model, tp)
    bpb = 2 * block_size * heads * model.head_dim * kv_b * model.num_layers
    num_blocks = available // bpb
    effective = available
    if num_gpu_blocks_override is not None:
        if num_gpu_blocks_override < 2:
            raise ConfigError("cluster.engine.num_gpu_blocks: must be >= 2 (block 0 is vLLM's null block)")
        notes.append(f"num_gpu_blocks overridden: {num_blocks} -> {num_gpu_blocks_override}")
        if num_gpu_blocks_override > num_blocks:
            notes.append(f"the override needs {_gib(num_gpu_blocks_override * bpb)} of KV memory but only "
                         f"{_gib(available)} is available: a real vLLM would run out of memory")
        num_blocks = int(num_gpu_blocks_override)
        effective = num_blocks * bpb

    # vLLM's _check_enough_kv_cache_memory, against usable memory (the null block is held back).
    check = effective - bpb
    needed = -(-max_model_len // block_size) * bpb
    if needed > check:
        est = max(0, check // bpb) * block_size
        est_txt = (f"; based on the available memory the estimated maximum model length is {est}"
                   if est > 0 else "")
        raise DoesNotFitError(
            f"{model.name} at TP={tp} on {gpu.name}: one request of max_model_len {max_model_len} needs "
            f"{needed / GiB:.2f} GiB of KV cache but only {max(check, 0) / GiB:.2f} GiB is available{est_txt}; "
            f"lower max_model_len, raise gpu_memory_utilization, use kv_cache_dtype fp8 or more GPUs "
            f"(vLLM: 'To serve at least one request with the models's max seq len ...')")

    if wd.compute != "bf16" and not gpu_supports(gpu, wd.compute):
        notes.append(f"{gpu.name} has no {wd.compute} tensor cores: {wd.name} weights run weight-only "
                     f"(dequantized to bf16), saving memory but not compute")
    return KVPlan(
        num_gpu_blocks=int(num_blocks), block_size=block_size, bytes_per_block=int(bpb),
        weight_bytes_per_gpu=int(weights), activation_bytes=int(act), kv_bytes_per_gpu=int(num_blocks * bpb),
        max_model_len=int(max_model_len), tokens_capacity=int(num_blocks * block_size), notes=notes,
        requested_bytes=requested, available_kv_bytes=available, kv_heads_per_rank=heads, kv_dtype_bytes=kv_b,
        tensor_parallel=tp, max_num_batched_tokens=tokens, max_num_seqs=seqs)


__all__ = ["WEIGHT_DTYPES", "KV_CACHE_DTYPES", "WeightDtype", "KVPlan", "plan_kv", "default_engine_limits",
           "activation_bytes", "weight_bytes_per_gpu", "kv_bytes_per_token", "kv_heads_per_rank",
           "kv_dtype_bytes", "check_tensor_parallel", "resolve_weight_dtype", "gpu_supports"]
