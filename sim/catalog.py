"""Hardware and model catalog: the numbers every other model in fleetsim starts from.

The built-in entries live in ``sim/catalog_data/{gpus,models}.yaml`` (each number cites its source
there). Users add GPUs/models, or change single fields of built-in ones (a price, say), with their
own YAML files of the same shape::

    gpus:
      RTX-4090:                       # a new entry: every required field
        memory_gib: 23.52
        hbm_bandwidth_tbs: 1.008
        ...
      H100-80GB: {usd_per_hour: 2.49} # an existing entry: only the fields to change
    models:
      my-model: {num_layers: ..., ...}

Lookups are case-insensitive and accept aliases and Hugging Face ids
(``"llama-3.1-8b"``, ``"meta-llama/Llama-3.1-8B-Instruct"``). Every problem -- an unknown name, a
malformed file, an inconsistent model -- is a :class:`~sim.errors.ConfigError` whose one line names
the file, line and field.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sim.errors import ConfigError

DATA_DIR = Path(__file__).with_name("catalog_data")
GiB = 1 << 30

Interconnect = Literal["nvlink", "pcie", "xgmi"]


# ---------------------------------------------------------------------------------------------------
# Specs (immutable; what the rest of the simulator sees)


@dataclass(frozen=True)
class GPUSpec:
    """One GPU. Peaks are dense (no 2:4 sparsity); see gpus.yaml for units and sources."""

    name: str
    memory_gib: float  # total memory the CUDA runtime reports (what vLLM's utilization multiplies)
    hbm_bandwidth_tbs: float  # TB/s
    bf16_tflops: float  # dense
    fp8_tflops: float | None  # dense; None = no FP8 tensor cores
    int8_tops: float | None  # dense
    interconnect: str  # "nvlink" | "pcie" | "xgmi"
    interconnect_bandwidth_gbs: float  # GPU-to-GPU, per direction, GB/s
    usd_per_hour: float  # on-demand, one GPU
    aliases: tuple[str, ...] = ()

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GiB)

    @property
    def hbm_bandwidth_bytes_s(self) -> float:
        return self.hbm_bandwidth_tbs * 1e12

    @property
    def interconnect_bandwidth_bytes_s(self) -> float:
        return self.interconnect_bandwidth_gbs * 1e9


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer's shapes (Hugging Face config.json names in brackets).

    MoE fields are ``None`` for dense models. Parameter breakdowns are computed from the shapes so
    weight bytes, FLOPs and KV size all follow from the same numbers.
    """

    name: str
    num_layers: int  # [num_hidden_layers]
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int  # [num_key_value_heads]
    head_dim: int
    intermediate_size: int  # dense MLP width (unused by all-MoE models)
    vocab_size: int
    num_params: int  # total, as published (or computed from shapes when not given)
    max_position_embeddings: int
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    num_active_params: int | None = None
    tie_word_embeddings: bool = False
    hf_id: str | None = None
    aliases: tuple[str, ...] = ()

    # -- shapes ------------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def q_size(self) -> int:
        """Width of the query projection (= hidden_size for most models, not for Qwen3)."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    # -- parameter breakdown (per the standard Llama-style layout) ---------------------------------
    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Separate output projection; 0 when tied to the embedding."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def attention_params_per_layer(self) -> int:
        """q, k, v and o projections."""
        h = self.hidden_size
        return h * self.q_size + 2 * h * self.kv_size + self.q_size * h

    @property
    def expert_params(self) -> int:
        """One expert's gate, up and down projections (0 for dense models)."""
        if not self.is_moe:
            return 0
        return 3 * self.hidden_size * int(self.moe_intermediate_size)

    @property
    def router_params_per_layer(self) -> int:
        return self.hidden_size * int(self.num_experts) if self.is_moe else 0

    @property
    def mlp_params_per_layer(self) -> int:
        """Dense: gate+up+down. MoE: all experts (the router is counted separately)."""
        if self.is_moe:
            return int(self.num_experts) * self.expert_params
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def linear_params(self) -> int:
        """Parameters of the transformer-block matmuls that quantization methods quantize
        (attention and MLP/expert projections; not embeddings, lm_head, norms or the MoE router)."""
        return self.num_layers * (self.attention_params_per_layer + self.mlp_params_per_layer)

    @property
    def computed_num_params(self) -> int:
        """Total parameters implied by the shapes (norm weights included; biases are not)."""
        per_layer = (self.attention_params_per_layer + self.mlp_params_per_layer
                     + self.router_params_per_layer + 2 * self.hidden_size)
        return self.embedding_params + self.lm_head_params + self.num_layers * per_layer + self.hidden_size

    @property
    def computed_active_params(self) -> int:
        """Parameters touched by one token (MoE: only ``num_experts_per_tok`` experts)."""
        if not self.is_moe:
            return self.computed_num_params
        inactive = int(self.num_experts) - int(self.num_experts_per_tok)
        return self.computed_num_params - self.num_layers * inactive * self.expert_params

    @property
    def active_params(self) -> int:
        return int(self.num_active_params) if self.num_active_params is not None else self.num_params

    @property
    def matmul_params_per_token(self) -> int:
        """Active parameters in per-token matmuls of the transformer blocks (excludes the embedding
        lookup and the lm_head, which runs once per sequence, not per token)."""
        mlp = (int(self.num_experts_per_tok) * self.expert_params + self.router_params_per_layer
               if self.is_moe else self.mlp_params_per_layer)
        return self.num_layers * (self.attention_params_per_layer + mlp)


# ---------------------------------------------------------------------------------------------------
# File schema (pydantic): catches typos and missing fields with the field's name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _GPUEntry(_Strict):
    aliases: list[str] = Field(default_factory=list)
    memory_gib: float = Field(gt=0)
    hbm_bandwidth_tbs: float = Field(gt=0)
    bf16_tflops: float = Field(gt=0)
    fp8_tflops: float | None = Field(gt=0)
    int8_tops: float | None = Field(gt=0)
    interconnect: Interconnect
    interconnect_bandwidth_gbs: float = Field(gt=0)
    usd_per_hour: float = Field(ge=0)


class _ModelEntry(_Strict):
    hf_id: str | None = None
    aliases: list[str] = Field(default_factory=list)
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int | None = Field(None, gt=0)
    intermediate_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    num_params: int | None = Field(None, gt=0)
    max_position_embeddings: int = Field(gt=0)
    tie_word_embeddings: bool = False
    num_experts: int | None = Field(None, gt=0)
    num_experts_per_tok: int | None = Field(None, gt=0)
    moe_intermediate_size: int | None = Field(None, gt=0)
    num_active_params: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> "_ModelEntry":
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError("head_dim is missing and hidden_size is not a multiple of num_attention_heads")
        moe = (self.num_experts, self.num_experts_per_tok, self.moe_intermediate_size)
        if any(v is not None for v in moe) and any(v is None for v in moe):
            raise ValueError("MoE models need all of num_experts, num_experts_per_tok, moe_intermediate_size")
        if self.num_experts is not None and self.num_experts_per_tok > self.num_experts:
            raise ValueError("num_experts_per_tok exceeds num_experts")
        if self.num_experts is None and self.num_active_params is not None:
            raise ValueError("num_active_params is only for MoE models (set num_experts too)")
        return self


class _CatalogFile(_Strict):
    gpus: dict[str, dict[str, Any]] = Field(default_factory=dict)
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# Loading


def _norm(name: str) -> str:
    """Lookup key: case-insensitive, '_' and ' ' equivalent to '-'."""
    return str(name).strip().lower().replace("_", "-").replace(" ", "-")


def _line_of(root: yaml.Node | None, path: Sequence[Any]) -> int | None:
    """1-based line of the deepest node of ``path`` found in a composed YAML tree."""
    node, line = root, None
    if node is None:
        return None
    line = node.start_mark.line + 1
    for key in path:
        if not isinstance(node, yaml.MappingNode):
            break
        for k, v in node.value:
            if str(k.value) == str(key):
                node, line = v, k.start_mark.line + 1
                break
        else:
            break
    return line


def _read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: catalog file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read catalog file: {e.strerror}") from None
    # libyaml (C) parses ~10x faster; on an error the pure-Python parser reports it (same wording
    # and line numbers whether or not libyaml is installed).
    loader = getattr(yaml, "CSafeLoader", None)
    if loader is not None:
        try:
            return yaml.load(text, Loader=loader), yaml.compose(text, Loader=loader)
        except yaml.YAMLError:
            pass
    try:
        return yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML in catalog file: {problem}") from None


def _first_error(e: ValidationError) -> tuple[tuple[Any, ...], str]:
    """The most specific problem (a wrong value before a missing field), and how many others."""
    errs = sorted(e.errors(), key=lambda err: err["type"] == "missing")
    err = errs[0]
    more = f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
    return tuple(err["loc"]), err["msg"] + more


class Catalog:
    """GPUs and models by name. Build with :func:`load_catalog`."""

    def __init__(self, gpus: dict[str, GPUSpec], models: dict[str, ModelSpec]):
        self._gpus = dict(gpus)
        self._models = dict(models)
        self._gpu_index = self._index(self._gpus.values(), lambda s: (s.name, *s.aliases))
        self._model_index = self._index(self._models.values(),
                                        lambda s: (s.name, *s.aliases, *((s.hf_id,) if s.hf_id else ())))

    @staticmethod
    def _index(specs, keys_of) -> dict[str, str]:
        index: dict[str, str] = {}
        for spec in specs:
            for key in keys_of(spec):
                index.setdefault(_norm(key), spec.name)
        return index

    @property
    def gpu_names(self) -> list[str]:
        return sorted(self._gpus)

    @property
    def model_names(self) -> list[str]:
        return sorted(self._models)

    def gpu(self, name: str, *, field: str = "cluster.gpu") -> GPUSpec:
        key = self._gpu_index.get(_norm(name))
        if key is None:
            raise ConfigError(f"{field}: unknown GPU {name!r}; known GPUs: {', '.join(self.gpu_names)} "
                              f"(add your own with a catalog file)")
        return self._gpus[key]

    def model(self, name: str, *, field: str = "cluster.model") -> ModelSpec:
        key = self._model_index.get(_norm(name))
        if key is None:
            raise ConfigError(f"{field}: unknown model {name!r}; known models: {', '.join(self.model_names)} "
                              f"(add your own with a catalog file)")
        return self._models[key]

    def gpus(self) -> list[GPUSpec]:
        return [self._gpus[n] for n in self.gpu_names]

    def models(self) -> list[ModelSpec]:
        return [self._models[n] for n in self.model_names]


def _gpu_spec(name: str, entry: _GPUEntry) -> GPUSpec:
    d = entry.model_dump()
    d["aliases"] = tuple(d["aliases"])
    return GPUSpec(name=name, **d)


def _model_spec(name: str, e: _ModelEntry) -> ModelSpec:
    head_dim = e.head_dim if e.head_dim is not None else e.hidden_size // e.num_attention_heads
    spec = ModelSpec(
        name=name, num_layers=e.num_layers, hidden_size=e.hidden_size,
        num_attention_heads=e.num_attention_heads, num_kv_heads=e.num_kv_heads, head_dim=head_dim,
        intermediate_size=e.intermediate_size, vocab_size=e.vocab_size, num_params=e.num_params or 0,
        max_position_embeddings=e.max_position_embeddings, num_experts=e.num_experts,
        num_experts_per_tok=e.num_experts_per_tok, moe_intermediate_size=e.moe_intermediate_size,
        num_active_params=e.num_active_params, tie_word_embeddings=e.tie_word_embeddings, hf_id=e.hf_id,
        aliases=tuple(e.aliases))
    # Documented derivations (see models.yaml header), never silent guesses: counts follow the shapes.
    if e.num_params is None:
        spec = replace(spec, num_params=spec.computed_num_params)
    if spec.is_moe and e.num_active_params is None:
        spec = replace(spec, num_active_params=spec.computed_active_params)
    return spec


class _Builder:
    """Accumulates raw entries file by file, merging overrides, then validates each entry."""

    def __init__(self) -> None:
        self.raw: dict[str, dict[str, dict[str, Any]]] = {"gpus": {}, "models": {}}
        self.origin: dict[tuple[str, str], tuple[Path, yaml.Node | None, str]] = {}

    def _existing(self, section: str, name: str) -> str | None:
        """The canonical name an entry (or alias / hf_id) of ``section`` already has, if any."""
        want = _norm(name)
        for canon, d in self.raw[section].items():
            keys = [canon, *d.get("aliases", [])] + ([d["hf_id"]] if d.get("hf_id") else [])
            if want in {_norm(k) for k in keys}:
                return canon
        return None

    def add_file(self, path: Path) -> None:
        data, root = _read_yaml(path)
        if data is None:
            return
        try:
            parsed = _CatalogFile.model_validate(data)
        except ValidationError as e:
            loc, msg = _first_error(e)
            raise ConfigError(f"{path}:{_line_of(root, loc[:1])}: {'.'.join(map(str, loc))}: {msg} "
                              f"(a catalog file has the sections 'gpus:' and 'models:')") from None
        for section in ("gpus", "models"):
            for name, entry in getattr(parsed, section).items():
                if not isinstance(entry, dict):
                    raise ConfigError(f"{path}:{_line_of(root, (section, name))}: {section}.{name}: "
                                      f"expected a mapping of fields")
                canon = self._existing(section, name)
                if canon is not None:  # partial override of an existing entry
                    merged = {**self.raw[section][canon], **entry}
                    self.raw[section][canon] = merged
                    self.origin[(section, canon)] = (path, root, name)
                else:
                    self.raw[section][str(name)] = dict(entry)
                    self.origin[(section, str(name))] = (path, root, name)

    def build(self) -> Catalog:
        gpus: dict[str, GPUSpec] = {}
        models: dict[str, ModelSpec] = {}
        for section, schema, make, out in (("gpus", _GPUEntry, _gpu_spec, gpus),
                                           ("models", _ModelEntry, _model_spec, models)):
            for name, entry in self.raw[section].items():
                try:
                    out[name] = make(name, schema.model_validate(entry))
                except ValidationError as e:
                    path, root, written = self.origin[(section, name)]
                    loc, msg = _first_error(e)
                    field_path = (section, written, *loc)
                    line = _line_of(root, field_path if loc else (section, written))
                    where = ".".join(map(str, field_path))
                    raise ConfigError(f"{path}:{line}: {where}: {msg}") from None
        return Catalog(gpus, models)


def load_catalog(extra_files: Sequence[str | Path] = ()) -> Catalog:
    """The built-in catalog plus the user's files, applied in order (later files win).

    A user entry whose name (or alias / Hugging Face id) matches an existing entry changes only the
    fields it gives; any other entry is new and must give every required field.
    """
    b = _Builder()
    b.add_file(DATA_DIR / "gpus.yaml")
    b.add_file(DATA_DIR / "models.yaml")
    for f in extra_files:
        b.add_file(Path(f))
    return b.build()


def relative_param_error(model: ModelSpec) -> float:
    """|published - computed| / published parameter count: a self-consistency check of an entry."""
    return abs(model.num_params - model.computed_num_params) / model.num_params


__all__ = ["GPUSpec", "ModelSpec", "Catalog", "load_catalog", "relative_param_error", "GiB", "DATA_DIR"]
