"""Built-in traces and rate curves, shipped inside the package (``traces/data``).

Why shipped: scenario files name them (``workload: {trace: mooncake-conversation}``) and must
work on a fresh install, without the repository's ``../shared`` folder. See data/SOURCES.md for
origins and licenses, docs/workloads.md for what each one is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True)
class BuiltinTrace:
    file: str  # relative to DATA_DIR
    format: str
    description: str
    options: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return DATA_DIR / self.file


# llm-d-benchmark's "long-input" LMBench profile: system_prompt 1000, chat_history 20000,
# answer_len 100 (its benchmark-report example); the 1000-token system prompt is shared by users.
_LMBENCH = {"system_prompt_tokens": 1000}

TRACES: dict[str, BuiltinTrace] = {
    "azure2023-conv": BuiltinTrace(
        "azure2023/AzureLLMInferenceTrace_conv.csv.gz", "azure",
        "Azure LLM inference 2023, conversation: 19,366 requests over 58 min, 5.5 req/s, CV 1.1"),
    "azure2023-code": BuiltinTrace(
        "azure2023/AzureLLMInferenceTrace_code.csv.gz", "azure",
        "Azure LLM inference 2023, code: 8,819 requests over 57 min, very bursty (CV 13)"),
    "mooncake-conversation": BuiltinTrace(
        "mooncake_fast25/conversation_trace.jsonl.gz", "mooncake",
        "Kimi/Mooncake FAST'25 conversation: 12,031 requests over 1 h, 512-token prefix blocks, 36.6% reusable"),
    "mooncake-synthetic": BuiltinTrace(
        "mooncake_fast25/synthetic_trace.jsonl.gz", "mooncake",
        "Mooncake FAST'25 synthetic (public datasets, Poisson arrivals): 3,993 requests, 64% reusable"),
    "llmservingsim-sharegpt": BuiltinTrace(
        "llmservingsim/workload.jsonl.gz", "tokenids",
        "LLMServingSim's ShareGPT replay for Llama-3.1-8B: 300 requests at ~10 req/s with full token ids"),
    "lmbench-long-input": BuiltinTrace(
        "lmbench/LMBench_long_input_output_3.0.csv.gz", "lmbench",
        "LMBench multi-round QA, long input (~21k-token context per user, 100-token answers), 3 QPS target: "
        "301 requests, 30 users (sessions) of up to 19 turns", _LMBENCH),
    "lmbench-long-input-qps1": BuiltinTrace(
        "lmbench/LMBench_long_input_output_1.0.csv.gz", "lmbench",
        "as lmbench-long-input at 1 QPS: 105 requests, 20 users", _LMBENCH),
    "lmbench-long-input-qps10": BuiltinTrace(
        "lmbench/LMBench_long_input_output_10.0.csv.gz", "lmbench",
        "as lmbench-long-input at a 10 QPS target (the measured system saturated: 233 requests, 67 users)", _LMBENCH),
}

RATE_CURVES: dict[str, str] = {
    "m-large": "servegen/aggregate_rate_language_m-large.csv.gz",
    "m-mid": "servegen/aggregate_rate_language_m-mid.csv.gz",
    "m-small": "servegen/aggregate_rate_language_m-small.csv.gz",
    "mm-image": "servegen/aggregate_rate_multimodal_mm-image.csv.gz",
    "deepseek-r1": "servegen/aggregate_rate_reason_deepseek-r1.csv.gz",
}


def trace_names() -> list[str]:
    return sorted(TRACES)


def curve_names() -> list[str]:
    return sorted(RATE_CURVES)
