"""``fleetsim validate``: replay traces on a real vLLM engine, fit the step-time model, report the
simulator's error. Mounted on the main CLI by :func:`register` (``sim/cli.py`` calls it).

Importing this module never imports vLLM (nor starts anything); a missing vLLM install is reported
with the command that installs it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

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
) -> None:
    """Validate the simulator against a real vLLM engine (start it, replay, fit, simulate, compare)."""
    from validation.compare import format_table, full_plan, quick_plan, validate as run_validation
    from validation.engine import EngineSpec

    try:
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
        log = (lambda *a: print(*a, file=sys.stderr)) if as_json else print
        report = run_validation(plan, out, attach_url=attach, attach_log=str(engine_log) if engine_log else None,
                                log=log)
    except FleetsimError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    doc = report.to_json()
    if as_json:
        typer.echo(json.dumps(doc))
    else:
        typer.echo(format_table(report))
        typer.echo(f"\nfit: held-out step MAPE {doc['fit']['heldout_mape']:.1%} (training run blocks), "
                   f"{(doc['fit']['test_trace_mape'] or float('nan')):.1%} (held-out trace); profile {report.profile}")
        typer.echo(f"report: {out / 'report.json'}")
    if max_error is not None:
        bad = {k: v for k, v in doc["error"].items() if v is None or abs(v) > max_error}
        if bad:
            typer.echo(f"error: relative error above {max_error:.0%}: "
                       + ", ".join(f"{k} {'n/a' if v is None else f'{v:+.1%}'}" for k, v in bad.items()), err=True)
            raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("validate")(validate)
