"""What the explorer offers in its pickers, read from the live registries and catalogs.

Why dynamic: routers, autoscalers, built-in traces, GPUs and models are added by other modules
(and by users' plugins and catalog files); a hard-coded list in the UI would silently go stale.
Every function here degrades to the older, smaller interfaces so the app keeps working while
those modules evolve.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Choice:
    """One option of a picker: its scenario value and a one-line description."""

    name: str
    description: str = ""


def _first_doc_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def builtin_traces() -> list[Choice]:
    """Built-in trace names (``workload.trace``) with their one-line descriptions."""
    try:
        from traces.builtin import TRACES, trace_names

        return [Choice(n, TRACES[n].description) for n in trace_names()]
    except ImportError:  # older layout: a plain name -> file mapping
        from traces.config import BUILTIN  # type: ignore[attr-defined]

        return [Choice(n, "") for n in sorted(BUILTIN)]


def trace_formats() -> list[str]:
    """Names accepted by ``workload.format`` (``auto`` first)."""
    try:
        from traces.formats import FORMAT_NAMES

        names = list(FORMAT_NAMES)
    except ImportError:
        names = ["auto"]
    return ["auto"] + sorted(n for n in names if n != "auto")


def gpus() -> list[Choice]:
    from sim.catalog import load_catalog

    cat = load_catalog()
    return [Choice(g.name, f"{g.memory_gib:g} GiB, {g.hbm_bandwidth_tbs:g} TB/s, ${g.usd_per_hour:g}/h")
            for g in sorted(cat.gpus(), key=lambda g: g.name)]


def models() -> list[Choice]:
    from sim.catalog import load_catalog

    cat = load_catalog()
    out = []
    for m in sorted(cat.models(), key=lambda m: m.name):
        size = m.num_params / 1e9
        kind = f", MoE {m.num_experts}x" if m.is_moe else ""
        out.append(Choice(m.name, f"{size:.3g}B params{kind}, max context {m.max_position_embeddings}"))
    return out


def _policies(kind: str) -> dict[str, type]:
    from policies import registry

    registry._load_builtin()
    return registry.ROUTERS if kind == "router" else registry.AUTOSCALERS


def routers() -> list[Choice]:
    return [Choice(n, _first_doc_line(c)) for n, c in sorted(_policies("router").items())]


def autoscalers() -> list[Choice]:
    items = sorted(_policies("autoscaler").items(), key=lambda kv: (kv[0] != "none", kv[0]))
    return [Choice(n, _first_doc_line(c)) for n, c in items]


def policy_doc(kind: str, name: str) -> str:
    """The policy's full docstring (module docstring when the class defers to it)."""
    cls = _policies(kind).get(name)
    if cls is None:
        return ""
    doc = inspect.getdoc(cls) or ""
    if "module docstring" in doc:
        mod = inspect.getmodule(cls)
        doc = (inspect.getdoc(mod) or doc) if mod is not None else doc
    return doc


def policy_param_defaults(kind: str, name: str) -> dict[str, Any] | None:
    """Default parameters of a policy that declares a pydantic ``Params`` model, else ``None``.

    Shown as a hint next to the parameters box, so users see the knobs without opening the docs.
    """
    cls = _policies(kind).get(name)
    params = getattr(cls, "Params", None)
    if params is None or not hasattr(params, "model_fields"):
        return None
    out: dict[str, Any] = {}
    for field_name, f in params.model_fields.items():
        if f.is_required():
            continue
        default = f.get_default(call_default_factory=True)
        if hasattr(default, "model_dump"):
            default = default.model_dump(mode="json")
        if default is None or isinstance(default, (int, float, str, bool, list, dict)):
            out[field_name] = default
    return out


def weight_dtypes() -> list[str]:
    from sim.memory import WEIGHT_DTYPES

    keys = list(WEIGHT_DTYPES)
    return sorted(keys, key=lambda k: (k != "bf16", k))


def kv_cache_dtypes() -> list[str]:
    from sim.memory import KV_CACHE_DTYPES

    return sorted(KV_CACHE_DTYPES, key=lambda k: (k != "auto", k))
