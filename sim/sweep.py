"""Parameter sweeps: a grid (or list) of scenarios run as Ray tasks, gathered into one table.

A grid file::

    base: scenario.yaml            # a scenario path (relative to this file) or an inline mapping
    grid:                          # dotted scenario keys -> values; the cartesian product is run
      router.policy: [round-robin, least-requests, prefix-aware]
      cluster.replicas: [2, 4, 8]
    cases:                         # optional: an explicit list of variants (each a mapping of keys),
      - {cluster.gpu: H100-80GB}   #   crossed with the grid
      - {cluster.gpu: A100-80GB, cluster.engine.max_num_seqs: 128}
    seeds: [0, 1]                  # optional: every point once per seed (default: the base's seed)

``run_sweep(grid, out_dir)`` writes ``out_dir/results.parquet``: one row per point, the grid's
parameters as columns (named by their dotted keys, plus ``seed``), ``status`` (``ok``/``failed``),
``error``, ``cached``, ``run_id``, then every summary column of :func:`sim.run`.

Why this shape:
- **Failures are data, not crashes.** A point whose scenario is invalid, or whose run raises, is a
  row with ``status == "failed"`` and a one-line ``error``; the rest of the sweep goes on.
- **Reruns skip done work.** Each point's resolved scenario (plus the size and mtime of its trace
  file and the fleetsim version) is hashed into ``run_id``; ``out_dir/runs/<run_id>/summary.json``
  marks it done. Extending a grid, or rerunning after a crash, only runs what is missing.
  Failed points are tried again.
- **Ray with no setup.** Without ``address`` a private local Ray starts (``num_cpus`` = the
  parallelism asked for, no dashboard) and is shut down at the end; with ``address`` the tasks run
  on an existing cluster, and fleetsim's code is shipped with them (``runtime_env.py_modules``), so
  the nodes need only fleetsim's dependencies. An already-initialized Ray (say, in a notebook) is
  used as is. ``backend="inline"`` runs the points one by one in this process (debugging, tiny grids).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sim.errors import ConfigError, FleetsimError

RESULTS_FILE = "results.parquet"
RUNS_DIR = "runs"


class GridSpec(BaseModel):
    """A sweep file, validated (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")
    base: str | dict[str, Any] | None = None  # None = the built-in default scenario
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    cases: list[dict[str, Any]] = Field(default_factory=list)
    seeds: list[int] | None = None

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not key or key.startswith(".") or key.endswith("."):
                raise ValueError(f"{key!r} is not a dotted scenario key")
            if not values:
                raise ValueError(f"{key}: needs at least one value")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(s < 0 for s in v)):
            raise ValueError("give one or more seeds >= 0")
        return v


@dataclass(frozen=True)
class Point:
    """One run of the sweep: its parameters (dotted key -> value) and resolved scenario."""

    params: dict[str, Any]
    scenario: dict[str, Any] | None  # model_dump of the validated Scenario; None if invalid
    base_dir: str | None
    run_id: str
    error: str | None = None


# ----------------------------------------------------------------------------------- loading
def load_grid(source: str | Path | dict[str, Any]) -> tuple[GridSpec, Path]:
    """A grid from a YAML path or a mapping; returns it with the folder relative paths start from."""
    if isinstance(source, dict):
        data, label, root = copy.deepcopy(source), "sweep", Path.cwd()
    else:
        path = Path(source)
        label, root = str(path), path.resolve().parent
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: grid file not found") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a grid file must be a YAML mapping with base/grid/seeds")
    try:
        spec = GridSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = "unknown key (expected base, grid, cases, seeds)" if err["type"] == "extra_forbidden" else err["msg"]
        raise ConfigError(f"{label}: {loc}: {msg.removeprefix('Value error, ')}") from None
    return spec, root


def _base_scenario(spec: GridSpec, root: Path) -> tuple[dict[str, Any], str | None]:
    """The base scenario as a plain mapping, and the folder its relative paths resolve from."""
    from sim.scenario import DEFAULT_SCENARIO

    if spec.base is None:
        return copy.deepcopy(DEFAULT_SCENARIO), str(root)
    if isinstance(spec.base, dict):
        return copy.deepcopy(spec.base), str(root)
    path = Path(spec.base)
    if not path.is_absolute():
        path = root / path
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"base: scenario file {str(path)!r} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a scenario must be a YAML mapping")
    return data, str(path.resolve().parent)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _trace_stamp(sc: dict[str, Any], base_dir: str | None) -> list:
    """Size and mtime of the trace file a scenario reads, so an edited trace invalidates the cache."""
    trace = (sc.get("workload") or {}).get("trace")
    if not trace:
        return []
    p = Path(trace).expanduser()
    if not p.is_absolute() and base_dir:
        p = Path(base_dir) / p
    try:
        st = p.stat()
    except OSError:
        return [trace]  # a built-in name: the package version covers it
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def run_key(scenario: dict[str, Any], base_dir: str | None) -> str:
    """Hash of everything that determines a run's result."""
    import sim

    blob = json.dumps({"scenario": scenario, "base_dir": base_dir, "trace": _trace_stamp(scenario, base_dir),
                       "fleetsim": sim.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def expand(source: str | Path | dict[str, Any] | GridSpec, root: Path | None = None) -> list[Point]:
    """Every point of a grid, resolved and validated (an invalid point carries its error)."""
    from sim.scenario import apply_overrides, load_scenario

    if isinstance(source, GridSpec):
        spec, root = source, root or Path.cwd()
    else:
        spec, root = load_grid(source)
    base, base_dir = _base_scenario(spec, root)
    # Validate the base alone first: a broken base is the sweep's error, not N run failures.
    try:
        load_scenario(copy.deepcopy(base))
    except FleetsimError as e:
        raise ConfigError(f"base: {e}") from None
    cases = [_flatten(c) for c in spec.cases] or [{}]
    keys = list(spec.grid)
    combos = list(itertools.product(*(spec.grid[k] for k in keys))) if keys else [()]
    seeds: list[int | None] = list(spec.seeds) if spec.seeds is not None else [None]
    points = []
    for case, combo, seed in itertools.product(cases, combos, seeds):
        params = {**case, **dict(zip(keys, combo, strict=True))}
        if seed is not None:
            params["seed"] = seed
        data = copy.deepcopy(base)
        try:
            data = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in params.items()])
            sc = load_scenario(data)
        except FleetsimError as e:
            msg = str(e).splitlines()[0]
            points.append(Point(params, None, base_dir, "invalid-" + hashlib.sha256(
                json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12], msg))
            continue
        dumped = sc.model_dump(mode="json")
        if "seed" not in params:
            params["seed"] = sc.seed
        points.append(Point(params, dumped, base_dir, run_key(dumped, base_dir)))
    return points


# ----------------------------------------------------------------------------------- running
def simulate_point(scenario: dict[str, Any], base_dir: str | None, keep_tables: bool = False) -> dict[str, Any]:
    """Run one point (in a Ray worker or inline). Never raises: failures come back as data."""
    import traceback

    from sim.api import json_safe
    from sim.scenario import load_scenario

    t0 = time.perf_counter()
    try:
        sc = load_scenario(scenario)
        sc.base_dir = base_dir
        import sim

        r = sim.run(sc)
    except FleetsimError as e:
        return {"ok": False, "error": str(e).splitlines()[0]}
    except Exception as e:  # noqa: BLE001 - a bug in one run must not end the sweep
        return {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0],
                "traceback": traceback.format_exc()}
    out: dict[str, Any] = {"ok": True, "summary": json_safe(r.summary), "wall_s": time.perf_counter() - t0}
    if keep_tables:
        out["requests"], out["timeseries"] = r.requests, r.timeseries
    return out


def _runtime_env(address: str | None) -> dict[str, Any]:
    import policies
    import sim
    import traces

    if address:
        return {"py_modules": [sim, policies, traces]}
    root = str(Path(sim.__file__).resolve().parents[1])
    pp = os.pathsep.join([root] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    return {"env_vars": {"PYTHONPATH": pp}}


def _start_ray(address: str | None, num_cpus: int) -> bool:
    """Connect to or start Ray; True if this call started it (and so must shut it down)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("sweeps need Ray: pip install 'ray>=2.9' (or use backend='inline')") from None
    if ray.is_initialized():
        return False
    common = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                  runtime_env=_runtime_env(address))
    try:
        if address:
            ray.init(address=address, **common)
        else:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(num_cpus=num_cpus, object_store_memory=200 * 1024 * 1024, **common)
    except ConnectionError as e:
        raise ConfigError(f"--address {address}: cannot connect to Ray: {str(e).splitlines()[0]}") from None
    return True


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)  # atomic: an interrupted sweep never leaves a half-written marker


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="run", desc="sweep", file=sys.stderr, dynamic_ncols=True)
        self.failed = 0

    def done(self, failed: bool, message: str | None = None) -> None:
        self.failed += failed
        if self.bar is not None:
            if message:
                self.bar.write(message, file=sys.stderr)
            self.bar.set_postfix(failed=self.failed, refresh=False)
            self.bar.update(1)
        elif message:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def run_sweep(grid: str | Path | dict[str, Any], out_dir: str | Path, address: str | None = None, *,
              max_parallel: int | None = None, backend: Literal["ray", "inline"] = "ray", save_runs: bool = False,
              progress: bool = True, on_result: Callable[[dict], None] | None = None) -> pd.DataFrame:
    """Run every point of ``grid`` and return (and write) the results table.

    Args:
        grid: a grid file path or mapping (see the module docstring).
        out_dir: where ``results.parquet`` and the per-run cache (``runs/``) go.
        address: an existing Ray cluster (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``);
            ``None`` starts a private local Ray.
        max_parallel: runs in flight at once (default: the CPUs Ray reports; locally ``os.cpu_count()``).
        backend: ``"ray"``, or ``"inline"`` to run in this process one after another.
        save_runs: also write each run's ``requests.parquet`` and ``timeseries.parquet`` to its folder.
        progress: a progress bar (and one line per failure) on stderr.
        on_result: called with each finished row (dict), e.g. to update a notebook widget.
    """
    out = Path(out_dir)
    runs_dir = out / RUNS_DIR
    runs_dir.mkdir(parents=True, exist_ok=True)
    points = expand(grid)
    if isinstance(grid, (str, Path)):
        (out / "sweep.yaml").write_text(Path(grid).read_text())
    else:
        (out / "sweep.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))

    rows: dict[int, dict[str, Any]] = {}
    todo: list[int] = []
    prog = _Progress(len(points), progress)

    def finish(i: int, res: dict[str, Any], cached: bool) -> None:
        p = points[i]
        row: dict[str, Any] = {**p.params, "status": "ok" if res.get("ok") else "failed",
                               "error": res.get("error"), "cached": cached, "run_id": p.run_id}
        if res.get("ok"):
            row.update(res["summary"])
            if not cached:
                folder = runs_dir / p.run_id
                folder.mkdir(exist_ok=True)
                if save_runs and "requests" in res:
                    from sim.api import Result
                    from sim.scenario import load_scenario

                    Result(res["requests"], res["timeseries"], res["summary"], load_scenario(p.scenario)).save(folder)
                _write_json(folder / "params.json", p.params)
                (folder / "scenario.yaml").write_text(yaml.safe_dump(p.scenario, sort_keys=False))
                _write_json(folder / "summary.json", res["summary"])  # last: the "done" marker
        elif p.scenario is not None and not cached:
            folder = runs_dir / p.run_id
            folder.mkdir(exist_ok=True)
            (folder / "error.txt").write_text(res.get("traceback") or (res.get("error") or "") + "\n")
        rows[i] = row
        msg = None if res.get("ok") else f"failed: {_params_text(p.params)}: {res.get('error')}"
        prog.done(not res.get("ok"), msg)
        if on_result is not None:
            on_result(row)

    for i, p in enumerate(points):
        if p.scenario is None:
            finish(i, {"ok": False, "error": p.error}, cached=False)
            continue
        marker = runs_dir / p.run_id / "summary.json"
        if marker.exists() and (not save_runs or (runs_dir / p.run_id / "requests.parquet").exists()):
            try:
                finish(i, {"ok": True, "summary": json.loads(marker.read_text())}, cached=True)
                continue
            except json.JSONDecodeError:
                pass  # a damaged marker: run it again
        todo.append(i)

    try:
        if backend == "inline":
            for i in todo:
                finish(i, simulate_point(points[i].scenario, points[i].base_dir, save_runs), cached=False)
        elif todo:
            _run_on_ray(points, todo, address, max_parallel, save_runs, finish)
    finally:
        prog.close()

    table = _table([rows[i] for i in sorted(rows)], list(points[0].params) if points else [])
    table.to_parquet(out / RESULTS_FILE, index=False)
    return table


def _run_on_ray(points: list[Point], todo: list[int], address: str | None, max_parallel: int | None,
                save_runs: bool, finish: Callable[[int, dict, bool], None]) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None  # Ray's own convention
    local_cpus = max(1, min(max_parallel or os.cpu_count() or 1, os.cpu_count() or 1))
    started = _start_ray(address, local_cpus)
    try:
        window = max_parallel or max(1, int(ray.cluster_resources().get("CPU", local_cpus)))
        task = ray.remote(num_cpus=1, max_retries=0)(simulate_point)
        queue = list(todo)
        pending: dict[Any, int] = {}
        while queue or pending:
            while queue and len(pending) < window:
                i = queue.pop(0)
                pending[task.remote(points[i].scenario, points[i].base_dir, save_runs)] = i
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    res = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a dead worker fails one run, not the sweep
                    res = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                finish(i, res, False)
    finally:
        if started:
            ray.shutdown()


def _table(rows: list[dict[str, Any]], param_cols: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for c in df.columns:  # integer summary columns stay integers next to failed (null) rows
        vals = [r.get(c) for r in rows if r.get(c) is not None]
        if vals and all(isinstance(v, int) and not isinstance(v, bool) for v in vals) and len(vals) < len(rows):
            df[c] = pd.array([r.get(c) for r in rows], dtype="Int64")
    lead = [c for c in param_cols if c in df.columns]
    if "seed" in df.columns and "seed" not in lead:
        lead.append("seed")
    fixed = [c for c in ("status", "error", "cached", "run_id") if c in df.columns]
    rest = [c for c in df.columns if c not in lead and c not in fixed]
    df = df[lead + fixed + rest]
    for c in df.columns:  # Parquet needs one type per column
        if df[c].dtype == object:
            kinds = {type(v) for v in df[c] if v is not None and not (isinstance(v, float) and math.isnan(v))}
            if len(kinds) > 1 or (kinds and not kinds <= {str, bool, int, float}):
                df[c] = [None if v is None else (json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for v in df[c]]
    return df
