"""Roofline step-time model: one engine step's duration from the catalog alone, so any GPU x model runs.

A vLLM V1 step is one forward pass over a mixed batch (prefill chunks and decode tokens share the
same GEMMs), then sampling. Per GPU rank, with tensor parallelism ``tp`` sharding weights, heads and
FLOPs::

    T = step_overhead + per_seq_overhead * num_seqs          (CPU: scheduling, launch, sampling, I/O)
      + soft_max(C_gemm, M_gemm)                             (all linear layers + lm_head)
      + soft_max(C_attn, M_attn)                             (attention kernels)
      + T_comm                                               (TP all-reduces)

    C_gemm = (2 * active_matmul_params * tokens + 2 * hidden * vocab * num_seqs) / tp / (peak * mfu)
    M_gemm = weight bytes read / (hbm_bandwidth * mbu)
             (every weight except the embedding table, once per step; MoE: only the experts the
              batch's tokens touch, E * (1 - (1 - k/E)^tokens) per layer under uniform routing)
    C_attn = 4 * head_dim * q_heads/tp * layers * (prefill_attn + decode_context) / (bf16 peak * mfu)
    M_attn = kv_bytes_per_token * (decode_context + prefill_attn / 128) / (hbm_bandwidth * mbu)
             (decode reads each context token's KV once; a prefill chunk streams its context once per
              128-row query tile, FlashAttention's I/O pattern)
    T_comm = 2 * layers * (latency + 2 (tp-1)/tp * tokens * hidden * 2 B / link bandwidth)

``soft_max(c, m) = sqrt(c^2 + m^2)``: GEMMs and attention are separate kernels, each bound by its own
roofline, and a kernel near its ridge point (compute ~ memory) is slower than either bound alone.
Vidur's measured A100 Llama-3-8B GEMM times (``mlp.csv``) follow this form within ~10% from 1 to 32k
tokens, where the hard ``max`` is 27% fast at 128 tokens (docs/catalog-and-step-time.md).
``prefill_attn`` (``sum chunk * (context_before + chunk)``) counts the full query x key square; causal
masking skips about half of it for a fresh prompt, which stands in for attention kernels reaching a
lower fraction of peak than GEMMs.

Defaults (Llama-3.1-8B, H100, bf16): decode at batch 1 = 15.0 GB / (3.35 TB/s * 0.75) + 1.5 ms
= 7.5 ms; an 8192-token prefill step ~ 0.2 s (~40k tokens/s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sim.catalog import GPUSpec, ModelSpec
from sim.errors import ConfigError
from sim.memory import (ACTIVATION_DTYPE_BYTES, check_tensor_parallel, gpu_supports, kv_bytes_per_token,
                        resolve_weight_dtype, weight_bytes_per_gpu)
from sim.step_time import BatchShape

Q_TILE = 128  # query rows per attention tile: a chunk reads its context's KV once per tile
# Latency of one small all-reduce (vLLM's custom all-reduce on NVLink is a few us; NCCL over PCIe
# tens of us). Vidur's A100 DGX all_reduce.csv: ~10 us median for 2 KB between 2 GPUs.
COMM_LATENCY_S = {"nvlink": 8e-6, "xgmi": 10e-6, "pcie": 25e-6}


@dataclass(frozen=True)
class StepBreakdown:
    """The terms of one step's time, seconds (for explanations and tests)."""

    gemm_compute_s: float
    gemm_memory_s: float
    attn_compute_s: float
    attn_memory_s: float
    comm_s: float
    overhead_s: float

    @property
    def gemm_s(self) -> float:
        return math.hypot(self.gemm_compute_s, self.gemm_memory_s)

    @property
    def attn_s(self) -> float:
        return math.hypot(self.attn_compute_s, self.attn_memory_s)

    @property
    def total_s(self) -> float:
        return self.overhead_s + self.gemm_s + self.attn_s + self.comm_s


def _check_fraction(name: str, v: float) -> float:
    if not isinstance(v, (int, float)) or not 0 < v <= 1:
        raise ConfigError(f"cluster.step_time.params.{name}: must be in (0, 1], got {v!r}")
    return float(v)


def _check_nonneg(name: str, v: float) -> float:
    if not isinstance(v, (int, float)) or v < 0 or v != v:
        raise ConfigError(f"cluster.step_time.params.{name}: must be a number >= 0, got {v!r}")
    return float(v)


class RooflineStepTime:
    """Analytic :class:`~sim.step_time.StepTimeModel` (``name = "roofline"``); see the module docstring.

    Args:
        mfu_prefill: fraction of the dense peak that matmuls and attention reach when compute-bound
            (0.6: H100 bf16 GEMMs reach 0.6-0.75, and a whole step has norms, rope and activations;
            Vidur's A100 GEMMs reach 0.73).
        mbu: fraction of HBM bandwidth reached when memory-bound (0.75: Vidur's A100 batch-1 GEMMs
            stream weights at 0.775 of 2.04 TB/s).
        step_overhead_s: fixed CPU/launch time per step (1.5 ms; sets the batch-1 decode step of
            Llama-3.1-8B on an H100 to 7.5 ms).
        per_seq_overhead_s: CPU time per scheduled sequence (10 us: input preparation, sampling,
            detokenization bookkeeping).
        comm_latency_s: latency of one all-reduce; default by interconnect (``COMM_LATENCY_S``).
    """

    name = "roofline"

    def __init__(self, model: ModelSpec, gpu: GPUSpec, *, tensor_parallel: int = 1, weight_dtype: str = "bf16",
                 kv_cache_dtype: str = "auto", mfu_prefill: float = 0.6, mbu: float = 0.75,
                 step_overhead_s: float = 1.5e-3, per_seq_overhead_s: float = 1e-5,
                 comm_latency_s: float | None = None):
        tp = tensor_parallel
        check_tensor_parallel(model, tp)
        wd = resolve_weight_dtype(weight_dtype)
        self.model, self.gpu, self.tensor_parallel = model, gpu, tp
        self.weight_dtype = wd.name
        self.mfu = _check_fraction("mfu_prefill", mfu_prefill)
        self.mbu = _check_fraction("mbu", mbu)
        self.step_overhead_s = _check_nonneg("step_overhead_s", step_overhead_s)
        self.per_seq_overhead_s = _check_nonneg("per_seq_overhead_s", per_seq_overhead_s)
        lat = COMM_LATENCY_S.get(gpu.interconnect, COMM_LATENCY_S["pcie"]) if comm_latency_s is None \
            else comm_latency_s
        self.comm_latency_s = _check_nonneg("comm_latency_s", lat)

        # Peaks (FLOP/s) and bandwidths (B/s).
        if wd.compute == "fp8" and gpu_supports(gpu, "fp8"):
            gemm_tflops = float(gpu.fp8_tflops)
        elif wd.compute == "int8" and gpu_supports(gpu, "int8"):
            gemm_tflops = float(gpu.int8_tops)
        else:  # bf16/fp16, and weight-only schemes (int4, fp8/int8 without the tensor cores)
            gemm_tflops = gpu.bf16_tflops
        self._gemm_flops_s = gemm_tflops * 1e12 * self.mfu
        self._attn_flops_s = gpu.bf16_tflops * 1e12 * self.mfu
        self._mem_bytes_s = gpu.hbm_bandwidth_bytes_s * self.mbu
        self._link_bytes_s = gpu.interconnect_bandwidth_bytes_s

        # Work per rank.
        m = model
        self._gemm_flops_per_token = 2.0 * m.matmul_params_per_token / tp
        self._lm_head_flops_per_seq = 2.0 * m.hidden_size * m.vocab_size / tp
        self._attn_flops_per_pair = 4.0 * m.head_dim * (m.num_attention_heads / tp) * m.num_layers
        self._kv_bytes_per_token = float(kv_bytes_per_token(m, tensor_parallel=tp, kv_cache_dtype=kv_cache_dtype,
                                                            weight_dtype=wd.name))
        total_w = weight_bytes_per_gpu(m, wd.name, tp)
        embed_table = 0.0 if m.tie_word_embeddings else m.embedding_params * ACTIVATION_DTYPE_BYTES / tp
        self._expert_bytes = m.expert_params * wd.bytes_per_param / tp  # one expert, one layer
        all_experts = m.num_layers * (m.num_experts or 0) * self._expert_bytes
        self._fixed_weight_bytes = total_w - embed_table - all_experts  # read every step
        self._allreduce_bytes_per_token = m.hidden_size * ACTIVATION_DTYPE_BYTES

    # -- pieces ---------------------------------------------------------------------------------------
    def experts_touched(self, num_tokens: int) -> float:
        """Expected distinct experts per MoE layer hit by ``num_tokens`` tokens (uniform top-k routing;
        real routing is skewed, so this errs towards more weight traffic at mid-size batches)."""
        m = self.model
        if not m.is_moe or num_tokens <= 0:
            return 0.0
        e, k = int(m.num_experts), int(m.num_experts_per_tok)
        return e * (1.0 - (1.0 - k / e) ** num_tokens)

    def weight_bytes_read(self, num_tokens: int) -> float:
        """Weight bytes one rank streams from HBM in a step of ``num_tokens`` tokens."""
        return self._fixed_weight_bytes + self.model.num_layers * self.experts_touched(num_tokens) * self._expert_bytes

    def layer_gemm_time(self, num_tokens: int) -> float:
        """Time of one transformer layer's linear layers (no attention, lm_head or overhead): the
        quantity Vidur profiles per layer; used to check the model against measurements."""
        m = self.model
        flops = self._gemm_flops_per_token * num_tokens / m.num_layers
        per_layer_w = (self._fixed_weight_bytes - (m.lm_head_params or m.embedding_params)
                       * ACTIVATION_DTYPE_BYTES / self.tensor_parallel) / m.num_layers
        bytes_ = per_layer_w + self.experts_touched(num_tokens) * self._expert_bytes
        return math.hypot(flops / self._gemm_flops_s, bytes_ / self._mem_bytes_s)

    def breakdown(self, shape: BatchShape) -> StepBreakdown:
        tokens = shape.prefill_tokens + shape.decode_seqs
        seqs = shape.prefill_seqs + shape.decode_seqs
        overhead = self.step_overhead_s + self.per_seq_overhead_s * seqs
        if tokens <= 0:
            return StepBreakdown(0.0, 0.0, 0.0, 0.0, 0.0, overhead)
        gemm_c = (self._gemm_flops_per_token * tokens + self._lm_head_flops_per_seq * seqs) / self._gemm_flops_s
        gemm_m = self.weight_bytes_read(tokens) / self._mem_bytes_s
        pairs = float(shape.prefill_attn) + float(shape.decode_context)
        attn_c = self._attn_flops_per_pair * pairs / self._attn_flops_s
        kv_tokens = float(shape.decode_context) + float(shape.prefill_attn) / Q_TILE
        attn_m = self._kv_bytes_per_token * kv_tokens / self._mem_bytes_s
        comm = 0.0
        tp = self.tensor_parallel
        if tp > 1:
            per_ar = self.comm_latency_s + 2.0 * (tp - 1) / tp * tokens * self._allreduce_bytes_per_token / self._link_bytes_s
            comm = 2 * self.model.num_layers * per_ar
        return StepBreakdown(gemm_c, gemm_m, attn_c, attn_m, comm, overhead)

    def step_time(self, shape: BatchShape) -> float:
        # Same arithmetic as breakdown(), inlined: this runs once per simulated engine step.
        tokens = shape.prefill_tokens + shape.decode_seqs
        seqs = shape.prefill_seqs + shape.decode_seqs
        t = self.step_overhead_s + self.per_seq_overhead_s * seqs
        if tokens > 0:
            gemm_c = (self._gemm_flops_per_token * tokens + self._lm_head_flops_per_seq * seqs) / self._gemm_flops_s
            w = self._fixed_weight_bytes
            if self.model.is_moe:
                w += self.model.num_layers * self.experts_touched(tokens) * self._expert_bytes
            t += math.hypot(gemm_c, w / self._mem_bytes_s)
            pa, dc = float(shape.prefill_attn), float(shape.decode_context)
            t += math.hypot(self._attn_flops_per_pair * (pa + dc) / self._attn_flops_s,
                            self._kv_bytes_per_token * (dc + pa / Q_TILE) / self._mem_bytes_s)
            tp = self.tensor_parallel
            if tp > 1:
                t += 2 * self.model.num_layers * (
                    self.comm_latency_s
                    + 2.0 * (tp - 1) / tp * tokens * self._allreduce_bytes_per_token / self._link_bytes_s)
        return t if t > 0 else 1e-6  # the protocol requires > 0 (all knobs at zero and an empty step)

    # decode_run_times() is nondecreasing up to hypot's last-ulp rounding: both attention terms grow
    # with the context (the engine's fast-forward relies on this for its ITL histogram bounds).
    decode_run_monotone = True

    def decode_run_affine(self, num_seqs: int) -> tuple[float, float] | None:
        """``(T, g)`` with ``step_time(decode_seqs=num_seqs, decode_context=dc) == T + g * dc`` to
        round-off, or ``None`` if the model is not affine in the context for this batch.

        In a pure-decode step both attention terms are proportional to the context sum ``dc``
        (``prefill_attn`` is 0), so ``hypot(A * dc, M * dc) = dc * hypot(A, M)``: the step time is
        affine in ``dc`` and a decode run's step ends have a closed form (sim.engine.AffineDecodeRun).
        """
        if num_seqs <= 0:
            return None
        t = self._decode_batch_terms(num_seqs) + self._decode_comm_term(num_seqs)
        if t <= 0:
            return None  # step_time() would clamp: not affine
        return t, math.hypot(self._attn_flops_per_pair / self._attn_flops_s, self._kv_bytes_per_token / self._mem_bytes_s)

    def _decode_batch_terms(self, num_seqs: int) -> float:
        """The part of a pure-decode step's time that depends on the batch size only (overheads,
        weights and GEMMs), computed with the same operations in the same order as step_time()."""
        tokens = seqs = num_seqs
        t = self.step_overhead_s + self.per_seq_overhead_s * seqs
        gemm_c = (self._gemm_flops_per_token * tokens + self._lm_head_flops_per_seq * seqs) / self._gemm_flops_s
        w = self._fixed_weight_bytes
        if self.model.is_moe:
            w += self.model.num_layers * self.experts_touched(tokens) * self._expert_bytes
        return t + math.hypot(gemm_c, w / self._mem_bytes_s)

    def _decode_comm_term(self, num_seqs: int) -> float:
        """Tensor-parallel all-reduces of a pure-decode step (0 at TP=1), as in step_time()."""
        tp = self.tensor_parallel
        if tp <= 1:
            return 0.0
        return 2 * self.model.num_layers * (
            self.comm_latency_s
            + 2.0 * (tp - 1) / tp * num_seqs * self._allreduce_bytes_per_token / self._link_bytes_s)

    def decode_run_times(self, num_seqs: int, context_sum_start: int, k: int, out=None):
        """Durations of ``k`` consecutive decode-only steps (``num_seqs`` sequences, context sum
        ``context_sum_start`` growing by ``num_seqs`` per step), for the engine's exact fast-forward.

        Element ``j`` equals ``step_time(BatchShape(decode_seqs=num_seqs,
        decode_context=context_sum_start + j * num_seqs))`` to the last bit or within one ulp: the
        batch-size terms are computed once with the same scalar code and the context terms
        element-wise with the same operations in the same order; only ``np.hypot`` may round
        differently from ``math.hypot`` (in ~0.2% of cases, by one ulp). Calling ``math.hypot`` per
        step would cost more than the rest of a simulated step.
        """
        import numpy as np

        if out is None:
            out = np.empty(k)
        if num_seqs <= 0:
            t = self.step_overhead_s + self.per_seq_overhead_s * num_seqs
            out[:] = t if t > 0 else 1e-6
            return out
        t = self._decode_batch_terms(num_seqs)
        # prefill_attn is 0.0 here, so (pa + dc) and (dc + pa / Q_TILE) are exactly dc.
        dc = np.arange(context_sum_start, context_sum_start + k * num_seqs, num_seqs, dtype=np.float64)[:k]
        a = self._attn_flops_per_pair * dc
        a /= self._attn_flops_s
        dc *= self._kv_bytes_per_token  # now the KV-read term, (kv_bytes * dc) / bandwidth
        dc /= self._mem_bytes_s
        np.hypot(a, dc, out=out)
        out += t
        if self.tensor_parallel > 1:
            out += self._decode_comm_term(num_seqs)
        if t <= 0:
            out[out <= 0] = 1e-6
        return out

    def __repr__(self) -> str:
        return (f"RooflineStepTime({self.model.name} on {self.gpu.name}, tp={self.tensor_parallel}, "
                f"{self.weight_dtype}, mfu={self.mfu}, mbu={self.mbu})")


__all__ = ["RooflineStepTime", "StepBreakdown", "COMM_LATENCY_S", "Q_TILE"]
