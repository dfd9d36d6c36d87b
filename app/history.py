"""Scenario dictionaries: merging user YAML over the form, and naming runs by what changed.

A what-if explorer lives on comparisons, and "run #3" says nothing; "#3 router.policy=least-kv"
says what the run is. Labels come from the difference of the flattened scenarios.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Mapping

import yaml

from sim.errors import ConfigError


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else replaces.

    The workload's sources are exclusive, so giving ``trace``, ``synthetic`` or ``merge`` in
    ``over`` drops the others from ``base``.
    """
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if k == "workload" and isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            sources = {"trace", "synthetic", "merge"}
            if sources & set(v):
                out[k] = {kk: vv for kk, vv in out[k].items() if kk not in sources}
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_yaml_mapping(text: str, where: str) -> dict[str, Any]:
    """A YAML mapping typed into the page (empty = ``{}``); one-line ConfigError otherwise."""
    if not text or not text.strip():
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}:{line} invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a YAML mapping (key: value lines), got {type(data).__name__}")
    return data


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        s = json.dumps(v, separators=(",", ":"))
        return s if len(s) <= 24 else s[:21] + "..."
    s = str(v)
    return s if len(s) <= 28 else "..." + s[-25:]


def diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Keys of flattened ``b`` whose values differ from ``a`` (``None`` = removed)."""
    fa, fb = flatten(a), flatten(b)
    out = {k: fb.get(k) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k) and k != "name"}
    return out


def describe(sc: Mapping[str, Any]) -> str:
    """A short description of a scenario's main knobs, for the first run of a session."""
    wl = sc.get("workload", {})
    if wl.get("trace"):
        src = str(wl["trace"]).rsplit("/", 1)[-1]
    elif wl.get("synthetic"):
        src = f"synthetic {wl['synthetic'].get('rate_per_s', '?')} req/s"
    else:
        src = "merged workload"
    cl = sc.get("cluster", {})
    tp = f" TP{cl.get('tensor_parallel')}" if cl.get("tensor_parallel", 1) != 1 else ""
    return (f"{src} · {cl.get('replicas')}x {cl.get('gpu')}{tp} · {cl.get('model')} · "
            f"{sc.get('router', {}).get('policy')}/{sc.get('autoscaler', {}).get('policy')}")


def label_for(sc: Mapping[str, Any], baseline: Mapping[str, Any] | None, number: int) -> str:
    """``#n`` plus what differs from the baseline scenario (or a description for the first run)."""
    if baseline is None:
        return f"#{number} {describe(sc)}"
    d = diff(baseline, sc)
    if not d:
        return f"#{number} same as baseline"
    parts = [f"{k.split('.', 1)[-1] if k.count('.') > 1 else k}={_short(v)}" for k, v in list(d.items())[:3]]
    more = f" +{len(d) - 3}" if len(d) > 3 else ""
    return f"#{number} " + ", ".join(parts) + more
