"""The parity scenario: engine knobs plus a request stream, fed identically to fleetsim and vLLM.

One :class:`ParityScenario` is serialised to JSON for :mod:`validation.parity.vllm_driver` (which runs
vLLM's real scheduler in vLLM's own virtualenv) and turned into :class:`sim.engine.Engine` calls by
:mod:`validation.parity.compare`. Both sides read the same numbers, so a difference in their step
records is a difference in scheduling, never in input.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sim.errors import ConfigError

# Sampled tokens get ids >= this base, one id per request, and prompts must stay below it. Why:
# fleetsim gives blocks filled by generated tokens hashes unique to their request (it never knows
# generated token ids, docs/architecture.md). A shared sampled id would let two requests' output
# blocks hash alike in vLLM, a cache hit fleetsim cannot have by design; unique ids keep the test
# about scheduling, not about that documented modelling choice.
SAMPLED_TOKEN_BASE = 1_000_000


class EngineKnobs(BaseModel):
    """Scheduler and KV-cache knobs (vLLM names). Both engines get exactly these."""

    model_config = ConfigDict(extra="forbid")

    num_gpu_blocks: int = Field(ge=2)
    block_size: int = Field(default=16, ge=1)
    max_num_batched_tokens: int = Field(ge=1)
    max_num_seqs: int = Field(ge=1)
    max_model_len: int = Field(ge=2)
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    policy: Literal["fcfs", "priority"] = "fcfs"
    long_prefill_token_threshold: int = Field(default=0, ge=0)
    watermark: float = Field(default=0.0, ge=0.0, lt=1.0)
    # vLLM-only: None keeps vLLM's default (True in vllm 0.32: a WAITING request is admitted only if
    # its whole current sequence fits in free blocks, not just its first chunk). fleetsim has no
    # such knob; setting False asks vLLM for the behaviour fleetsim implements.
    scheduler_reserve_full_isl: bool | None = None

    @model_validator(mode="after")
    def _vllm_constraints(self) -> "EngineKnobs":
        # vLLM's SchedulerConfig refuses these; say so here, in one line, before starting vLLM.
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError("with enable_chunked_prefill=false vLLM requires "
                             "max_num_batched_tokens >= max_model_len")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("vLLM requires max_num_batched_tokens >= max_num_seqs")
        return self


class ParityRequest(BaseModel):
    """One request: its prompt token ids, output length and the step it arrives before."""

    model_config = ConfigDict(extra="forbid")

    id: str
    arrival_step: int = Field(ge=0)
    prompt_token_ids: list[int] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    priority: int = 0

    @field_validator("prompt_token_ids")
    @classmethod
    def _token_range(cls, v: list[int]) -> list[int]:
        bad = [t for t in v if not 0 <= t < SAMPLED_TOKEN_BASE]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {SAMPLED_TOKEN_BASE}); got {bad[0]}")
        return v


class ParityScenario(BaseModel):
    """A named engine configuration plus its request stream."""

    model_config = ConfigDict(extra="forbid")

    name: str
    engine: EngineKnobs
    requests: list[ParityRequest]
    max_steps: int = Field(default=20000, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> "ParityScenario":
        seen: set[str] = set()
        for i, r in enumerate(self.requests):
            if r.id in seen:
                raise ValueError(f"requests[{i}].id: duplicate id {r.id!r}")
            seen.add(r.id)
            if len(r.prompt_token_ids) + r.max_tokens > self.engine.max_model_len:
                # fleetsim rejects these at arrival (vLLM's API server answers 400); the engine
                # layer under test never sees them, so a parity scenario must not contain them.
                raise ValueError(f"requests[{i}] ({r.id}): prompt + max_tokens > max_model_len")
        return self

    @classmethod
    def parse(cls, data: dict, where: str = "scenario") -> "ParityScenario":
        """Validate with a one-line :class:`ConfigError` naming the field."""
        try:
            return cls.model_validate(data)
        except ValueError as e:
            errs = getattr(e, "errors", lambda: [])()
            if errs:
                loc = ".".join(str(x) for x in errs[0]["loc"])
                msg = str(errs[0]["msg"]).removeprefix("Value error, ")
                raise ConfigError(f"{where}: {loc + ': ' if loc else ''}{msg}") from None
            raise ConfigError(f"{where}: {e}") from None

    def arrival_time(self, i: int) -> float:
        """Distinct, ordered arrival times (priority ties break on arrival in both engines).

        vLLM breaks (priority, arrival) ties by request id, fleetsim by insertion order; distinct
        times keep the comparison about the policy, not about tie-breaking trivia.
        """
        return float(self.requests[i].arrival_step) + (i + 1) * 1e-6

    def sampled_token_id(self, i: int) -> int:
        return SAMPLED_TOKEN_BASE + i

    def to_driver_json(self) -> dict:
        """The JSON the vLLM driver reads (see validation/parity/vllm_driver.py)."""
        eng = self.engine.model_dump()
        return {
            "name": self.name,
            "engine": eng,
            "max_steps": self.max_steps,
            "requests": [
                {"id": r.id, "arrival_step": r.arrival_step, "arrival_time": self.arrival_time(i),
                 "prompt_token_ids": r.prompt_token_ids, "max_tokens": r.max_tokens,
                 "priority": r.priority, "sampled_token_id": self.sampled_token_id(i)}
                for i, r in enumerate(self.requests)
            ],
        }
