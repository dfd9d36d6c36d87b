"""fleetsim what-if explorer (Streamlit). Start it with ``fleetsim app``.

Layout: the sidebar builds one scenario (workload, cluster, router, autoscaler, SLOs); the main
area runs it and keeps every run of the session, so a change of one knob is one click away from
a side-by-side comparison with the baseline. The capacity finder searches fleet size or load.

All simulation goes through :func:`sim.run`; all figures come from :mod:`app.plots` (usable in
notebooks too). User errors (:class:`sim.errors.FleetsimError`) are shown as one readable line.
"""

from __future__ import annotations

import io
import json
import logging
import math
import sys
import zipfile
from pathlib import Path

if __package__ in (None, ""):  # `streamlit run app/explorer.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import streamlit as st
import yaml

from app import capacity, history, options, plots, report, uploads
from app.runner import BackgroundRun
from sim.errors import FleetsimError
from sim.api import json_safe
from sim.scenario import Scenario, load_scenario

log = logging.getLogger("fleetsim.app")

MAX_HISTORY = 12
RATE_SCALES = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0]
SOURCE_BUILTIN, SOURCE_UPLOAD, SOURCE_SYNTH = "Built-in trace", "Upload a trace", "Synthetic"
VARIANT_KNOBS = {
    "router.policy": "categorical",
    "autoscaler.policy": "categorical",
    "cluster.replicas": "int",
    "cluster.gpu": "categorical",
    "cluster.model": "categorical",
    "cluster.tensor_parallel": "int",
    "workload.rate_scale": "float",
    "cluster.engine.max_num_seqs": "int",
    "cluster.engine.max_num_batched_tokens": "int",
    "cluster.engine.enable_prefix_caching": "bool",
}


# ------------------------------------------------------------------------------------------ state
def _state() -> None:
    ss = st.session_state
    ss.setdefault("runs", {})  # label -> Result, in run order
    ss.setdefault("run_meta", {})  # label -> {"uploads": {path: name}, "wall_s": float}
    ss.setdefault("run_counter", 0)
    ss.setdefault("capacity", None)
    ss.setdefault("downloads", {})


def show_error(e: BaseException, context: str = "") -> None:
    """One readable line; user errors as they are, internal ones named as such (logged in full)."""
    prefix = f"{context}: " if context else ""
    if isinstance(e, FleetsimError):
        st.error(prefix + str(e).splitlines()[0], icon=":material/error:")
    else:
        log.exception("internal error in the explorer", exc_info=e)
        first = str(e).splitlines()[0] if str(e) else ""
        st.error(f"{prefix}internal error ({type(e).__name__}: {first}); the server log has the details. "
                 "Please report it with the scenario YAML.", icon=":material/bug_report:")


@st.cache_data(show_spinner=False)
def _choices() -> dict:
    return {
        "traces": options.builtin_traces(), "formats": options.trace_formats(), "gpus": options.gpus(),
        "models": options.models(), "routers": options.routers(), "autoscalers": options.autoscalers(),
        "weight_dtypes": options.weight_dtypes(), "kv_dtypes": options.kv_cache_dtypes(),
    }


def _names(choices) -> list[str]:
    return [c.name for c in choices]


def _desc(choices, name: str) -> str:
    return next((c.description for c in choices if c.name == name), "")


def _index(names: list[str], preferred: str) -> int:
    return names.index(preferred) if preferred in names else 0


# --------------------------------------------------------------------------------------- sidebar
def workload_section(ch: dict) -> tuple[dict, dict, str | None]:
    """The ``workload`` section, the uploads it uses ({path: name}), and an upload error."""
    up_map: dict[str, str] = {}
    err = None
    source = st.radio("Source", [SOURCE_BUILTIN, SOURCE_UPLOAD, SOURCE_SYNTH], key="w_source", horizontal=False,
                      label_visibility="collapsed")
    wl: dict = {}
    if source == SOURCE_SYNTH:
        arrival = st.selectbox("Arrival process", ["poisson", "gamma"], key="w_arrival",
                               help="gamma: bursty arrivals with the given inter-arrival coefficient of variation")
        syn: dict = {"arrival": arrival}
        syn["rate_per_s"] = float(st.slider("Arrival rate (req/s)", 0.5, 100.0, 8.0, 0.5, key="w_rate"))
        if arrival == "gamma":
            syn["cv"] = float(st.slider("Burstiness (inter-arrival CV)", 0.1, 10.0, 2.0, 0.1, key="w_cv"))
        syn["num_requests"] = int(st.slider("Requests", 50, 20000, 1000, 50, key="w_nreq"))
        c1, c2 = st.columns(2)
        p_mean = c1.number_input("Prompt tokens (mean)", 16, 200_000, 1000, 100, key="w_prompt")
        p_cv = c2.slider("Prompt spread (CV)", 0.0, 3.0, 0.0, 0.1, key="w_prompt_cv", help="0 = every prompt the same length")
        c1, c2 = st.columns(2)
        o_mean = c1.number_input("Output tokens (mean)", 1, 32_000, 150, 10, key="w_output")
        o_cv = c2.slider("Output spread (CV)", 0.0, 3.0, 0.0, 0.1, key="w_output_cv")
        syn["prompt_tokens"] = int(p_mean) if p_cv == 0 else {"dist": "lognormal", "mean": float(p_mean), "cv": float(p_cv)}
        syn["output_tokens"] = int(o_mean) if o_cv == 0 else {"dist": "lognormal", "mean": float(o_mean), "cv": float(o_cv)}
        shared = st.slider("Shared system prompt (tokens)", 0, 8000, 0, 250, key="w_shared",
                           help="Prefix shared by requests: what prefix caching and prefix-aware routing exploit")
        if shared:
            n_prompts = st.slider("Distinct system prompts", 1, 64, 4, key="w_nprompts")
            syn["shared_prefix"] = {"system_prompt_tokens": int(shared), "prompts_per_tenant": int(n_prompts)}
        turns = st.slider("Turns per session", 1, 20, 1, key="w_turns",
                          help=">1: multi-turn chats whose prompts grow with the conversation")
        if turns > 1:
            syn["sessions"] = {"turns": int(turns)}
        wl["synthetic"] = syn
        return wl, up_map, err
    if source == SOURCE_BUILTIN:
        names = _names(ch["traces"])
        name = st.selectbox("Trace", names, index=_index(names, "azure2023-conv"), key="w_trace")
        st.caption(_desc(ch["traces"], name))
        wl["trace"] = name
    else:
        f = st.file_uploader("Trace file (CSV, JSONL, JSON, Parquet; gzip ok)", key="w_upload",
                             help="Formats are detected from the content: Azure, Mooncake, BurstGPT, Bailian, "
                                  "LMBench, ShareGPT, vLLM bench, fleetsim's own CSV/JSONL/Parquet")
        fmt = st.selectbox("Format", ch["formats"], key="w_format")
        skip = st.checkbox("Skip malformed rows", key="w_skip", help="Otherwise the first bad row is an error")
        if f is None:
            err = "upload a trace file (or pick another workload source)"
        else:
            try:
                up = _checked_upload(f.name, f.getvalue(), fmt, skip)
                st.caption(f":material/check_circle: {up.name}: {up.describe()}")
                wl["trace"] = str(up.path)
                up_map[str(up.path)] = up.name
                if fmt != "auto":
                    wl["format"] = fmt
                if skip:
                    wl["skip_invalid"] = True
            except FleetsimError as e:
                err = str(e).splitlines()[0]
                st.error(err, icon=":material/error:")
            except Exception as e:  # noqa: BLE001 - a loader bug must not take the page down
                log.exception("upload check failed", exc_info=e)
                err = f"{f.name}: could not read this file ({type(e).__name__})"
                st.error(err, icon=":material/error:")
    c1, c2 = st.columns(2)
    start = c1.number_input("Window start (s)", 0.0, 1e7, 0.0, 60.0, key="w_win_start")
    length = c2.number_input("Window length (s)", 0.0, 1e7, 300.0, 60.0, key="w_win_len",
                             help="0 = the whole trace. Shorter windows simulate faster.")
    if length > 0:
        wl["window_s"] = [float(start), float(start + length)]
    max_req = st.number_input("Max requests (0 = all)", 0, 10_000_000, 0, 500, key="w_maxreq")
    if max_req:
        wl["max_requests"] = int(max_req)
    scale = st.select_slider("Load (× the trace's arrival rate)", RATE_SCALES, value=1.0, key="w_scale")
    if scale != 1.0:
        wl["rate_scale"] = float(scale)
    return wl, up_map, err


@st.cache_data(show_spinner=False, max_entries=16)
def _checked_upload(name: str, data: bytes, fmt: str, skip: bool) -> uploads.Upload:
    return uploads.check(name, data, fmt, skip_invalid=skip)


def cluster_section(ch: dict) -> dict:
    gpus, models = _names(ch["gpus"]), _names(ch["models"])
    c1, c2 = st.columns(2)
    gpu = c1.selectbox("GPU", gpus, index=_index(gpus, "H100-80GB"), key="c_gpu")
    model = c2.selectbox("Model", models, index=_index(models, "llama-3.1-8b"), key="c_model")
    st.caption(f"{gpu}: {_desc(ch['gpus'], gpu)}  \n{model}: {_desc(ch['models'], model)}")
    c1, c2 = st.columns(2)
    tp = c1.selectbox("Tensor parallel", [1, 2, 4, 8], key="c_tp")
    replicas = c2.number_input("Replicas", 1, 512, 2, key="c_replicas")
    cluster: dict = {"gpu": gpu, "model": model, "tensor_parallel": int(tp), "replicas": int(replicas)}
    with st.popover("Engine knobs (vLLM)", width="stretch"):
        eng: dict = {}
        c1, c2 = st.columns(2)
        mns = c1.number_input("max_num_seqs (0 = vLLM default)", 0, 4096, 0, 32, key="e_mns")
        mbt = c2.number_input("max_num_batched_tokens (0 = default)", 0, 131072, 0, 512, key="e_mbt")
        if mns:
            eng["max_num_seqs"] = int(mns)
        if mbt:
            eng["max_num_batched_tokens"] = int(mbt)
        mml = st.number_input("max_model_len (0 = the model's context)", 0, 1_048_576, 0, 1024, key="e_mml",
                              help="Lower it when the model's full context does not fit in the KV cache of one replica")
        if mml:
            eng["max_model_len"] = int(mml)
        c1, c2 = st.columns(2)
        eng["block_size"] = int(c1.selectbox("block_size", [16, 32, 64, 8], key="e_block"))
        eng["gpu_memory_utilization"] = float(c2.slider("gpu_memory_utilization", 0.5, 0.98, 0.92, 0.01, key="e_gmu"))
        eng["enable_prefix_caching"] = st.checkbox("enable_prefix_caching", True, key="e_prefix")
        eng["enable_chunked_prefill"] = st.checkbox("enable_chunked_prefill", True, key="e_chunked")
        c1, c2 = st.columns(2)
        cluster["weight_dtype"] = c1.selectbox("weight dtype", ch["weight_dtypes"], key="e_wdtype")
        cluster["kv_cache_dtype"] = c2.selectbox("kv_cache_dtype", ch["kv_dtypes"], key="e_kvdtype")
        price = st.number_input("USD per GPU-hour (0 = catalog price)", 0.0, 1000.0, 0.0, 0.1, key="c_price")
        if price:
            cluster["usd_per_gpu_hour"] = float(price)
        cluster["engine"] = eng
    return cluster


def policy_section(ch: dict, kind: str) -> tuple[dict, dict]:
    """(router or autoscaler section, cluster additions)."""
    choices = ch["routers" if kind == "router" else "autoscalers"]
    names = _names(choices)
    default = "round-robin" if kind == "router" else "none"
    policy = st.selectbox(f"{kind.capitalize()} policy", names, index=_index(names, default), key=f"{kind}_policy")
    st.caption(_desc(choices, policy))
    sec: dict = {"policy": policy}
    extra_cluster: dict = {}
    if kind == "router":
        stale = st.slider("Metrics staleness (s)", 0.0, 5.0, 0.0, 0.1, key="router_stale",
                          help="How old the replica metrics the router sees are (a real scrape interval)")
        if stale:
            sec["staleness_s"] = float(stale)
    elif policy != "none":
        c1, c2 = st.columns(2)
        lo = c1.number_input("min replicas", 0, 512, 1, key="as_min")
        hi = c2.number_input("max replicas", 1, 512, 8, key="as_max")
        sec["min_replicas"], sec["max_replicas"] = int(lo), int(hi)
        cold = st.slider("Cold start of a new replica (s)", 0, 900, 60, 10, key="as_cold",
                         help="Provisioning + weight load + graph capture before a new replica serves")
        extra_cluster["cold_start_s"] = float(cold)
    defaults = options.policy_param_defaults(kind, policy)
    text = st.text_area(f"{policy} parameters (YAML)", key=f"{kind}_params_{policy}", height=80,
                        placeholder="e.g. target: 0.8" if defaults else "key: value",
                        help="Passed to the policy as-is; unknown keys are errors.")
    if defaults:
        with st.expander("Parameters and their defaults"):
            st.code(yaml.safe_dump(defaults, sort_keys=False), language="yaml")
    doc = options.policy_doc(kind, policy)
    if doc and len(doc) > len(_desc(choices, policy)) + 10:
        with st.expander("How it works"):
            st.markdown(doc)
    params = history.parse_yaml_mapping(text, f"{kind} parameters")
    sec.update(params)
    return sec, extra_cluster


def slo_section() -> dict:
    c1, c2, c3 = st.columns(3)
    ttft = c1.number_input("TTFT (s)", 0.0, 600.0, 1.0, 0.1, key="slo_ttft", help="0 = no SLO")
    tpot = c2.number_input("TPOT (s)", 0.0, 10.0, 0.1, 0.01, key="slo_tpot", help="0 = no SLO")
    e2e = c3.number_input("E2E (s)", 0.0, 3600.0, 0.0, 1.0, key="slo_e2e", help="0 = no SLO")
    return {k: float(v) for k, v in (("ttft_s", ttft), ("tpot_s", tpot), ("e2e_s", e2e)) if v}


def sidebar() -> tuple[dict | None, Scenario | None, dict, str | None]:
    """(scenario dict, validated Scenario, uploads used, error) from the sidebar widgets."""
    ch = _choices()
    err: str | None = None
    with st.sidebar:
        st.markdown("## :material/tune: Scenario")
        name = st.text_input("Name", "what-if", key="s_name")
        data: dict = {"name": name}
        up_map: dict = {}
        try:
            with st.expander("Workload", key="x_workload", expanded=True):
                wl, up_map, err = workload_section(ch)
                data["workload"] = wl
            with st.expander("Cluster", key="x_cluster", expanded=True):
                data["cluster"] = cluster_section(ch)
            with st.expander("Router", key="x_router", expanded=False):
                data["router"], _ = policy_section(ch, "router")
            with st.expander("Autoscaler", key="x_autoscaler", expanded=False):
                data["autoscaler"], extra = policy_section(ch, "autoscaler")
                data["cluster"].update(extra)
            with st.expander("SLOs", key="x_slos", expanded=True):
                data["slo"] = slo_section()
            with st.expander("Advanced (YAML, merged on top)"):
                data["seed"] = int(st.number_input("Seed", 0, 2**31 - 1, 0, key="s_seed"))
                adv = st.text_area("Scenario keys", key="s_advanced", height=120,
                                   placeholder="cluster:\n  failures: {mtbf_s: 3600}\nmetrics: {sample_interval_s: 5}",
                                   help="Any scenario key the form does not show; see docs/app-and-sweeps.md")
                data = history.deep_merge(data, history.parse_yaml_mapping(adv, "advanced YAML"))
        except FleetsimError as e:
            err = str(e).splitlines()[0]
        if err:
            if err.startswith("advanced YAML") or " parameters" in err.split(":")[0]:
                st.error(err, icon=":material/error:")  # upload errors are already shown in place
            return None, None, up_map, err
        try:
            sc = load_scenario(data)
        except FleetsimError as e:
            err = str(e).splitlines()[0]
            st.error(err, icon=":material/error:")
            return data, None, up_map, err
    return data, sc, up_map, None


# ------------------------------------------------------------------------------------------- runs
def run_scenario(sc: Scenario, label: str = "") -> tuple[object | None, BaseException | None]:
    """Run with a live status line and progress bar; returns (Result, None) or (None, error)."""
    handle = BackgroundRun(sc, label=label)
    status = st.status(handle.status_text(), expanded=False)
    slot = st.empty()  # the progress bar, once the core reports progress
    while not handle.wait(0.3):
        status.update(label=handle.status_text())
        if handle.fraction is not None:
            slot.progress(handle.fraction)
    slot.empty()
    if handle.error is not None:
        status.update(label=f"Failed after {handle.elapsed_s:.1f} s", state="error")
        return None, handle.error
    status.update(label=f"Simulated {label or sc.name} in {handle.elapsed_s:.1f} s", state="complete")
    return handle.result, None


def add_run(result, sc_dict: dict, up_map: dict, label: str | None = None) -> str:
    ss = st.session_state
    ss.run_counter += 1
    runs: dict = ss.runs
    base = ss.run_meta[next(iter(runs))]["scenario"] if runs else None
    label = f"#{ss.run_counter} {label}" if label else history.label_for(sc_dict, base, ss.run_counter)
    runs[label] = result
    ss.run_meta[label] = {"uploads": dict(up_map), "scenario": sc_dict}
    while len(runs) > MAX_HISTORY:
        old = next(iter(runs))
        runs.pop(old)
        ss.run_meta.pop(old, None)
    ss.selected_run = label
    return label


def export_yaml(result, up_map: dict) -> str:
    """The scenario YAML that reproduces a run; uploaded traces are named by their file name."""
    text = result.scenario.to_yaml()
    head = ["# fleetsim scenario exported from the what-if explorer", "# reproduce: fleetsim run scenario.yaml"]
    for path, name in up_map.items():
        if path in text:
            text = text.replace(path, name)
            head.append(f"# workload.trace was uploaded: put {name} next to this file")
    return "\n".join(head) + "\n" + text


def _download_payloads(label: str) -> dict[str, tuple[bytes, str]]:
    cache: dict = st.session_state.downloads
    if label in cache:
        return cache[label]
    r = st.session_state.runs[label]
    meta = st.session_state.run_meta.get(label, {})
    req = r.requests.copy()
    for col in req.columns:
        if req[col].dtype == object:
            req[col] = req[col].astype("string")

    def parquet(df: pd.DataFrame) -> bytes:
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        return buf.getvalue()

    files = {
        "requests.parquet": (parquet(req), "application/octet-stream"),
        "requests.csv": (req.to_csv(index=False).encode(), "text/csv"),
        "timeseries.parquet": (parquet(r.timeseries), "application/octet-stream"),
        "timeseries.csv": (r.timeseries.to_csv(index=False).encode(), "text/csv"),
        "summary.json": (json.dumps(json_safe(r.summary), indent=2).encode(), "application/json"),
        "scenario.yaml": (export_yaml(r, meta.get("uploads", {})).encode(), "application/x-yaml"),
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for fname, (blob, _) in files.items():
            z.writestr(fname, blob)
    files["all.zip"] = (buf.getvalue(), "application/zip")
    cache[label] = files
    while len(cache) > 4:
        cache.pop(next(iter(cache)))
    return files


def _slug(label: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_=." else "-" for c in label)
    return "-".join(p for p in keep.split("-") if p)[:60] or "run"


# ------------------------------------------------------------------------------------------ views
def _fmt_s(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def headline(r) -> None:
    s, slo = r.summary, report.slo_dict(r.scenario.slo)
    total = s.get("requests_total", 0)
    cols = st.columns(4)
    done = s.get("requests_completed", 0)
    cols[0].metric("Completed", f"{done:,} / {total:,}", border=True,
                   delta=f"-{total - done:,} failed/rejected" if done < total else None, delta_color="inverse")
    att = s.get("slo_attainment")
    cols[1].metric("SLO attainment", f"{att:.1%}" if att is not None else "no SLO", border=True,
                   help="Fraction of all requests that completed within every SLO")
    cols[2].metric("Output throughput", f"{s.get('throughput_output_tok_s', 0):,.0f} tok/s", border=True,
                   help=f"{s.get('throughput_req_s', 0):.2f} req/s completed")
    cols[3].metric("Cost", f"${s.get('cost_usd', 0):,.2f}", border=True,
                   delta=f"${s.get('cost_per_million_output_tokens_usd', math.nan):.2f} / M output tokens",
                   delta_color="off", delta_arrow="off", help=f"{s.get('gpu_hours', 0):.2f} GPU-hours")
    cols = st.columns(4)
    for col, key, name in zip(cols[:3], ("ttft", "tpot", "e2e"), ("TTFT p99", "TPOT p99", "E2E p99")):
        v, limit = s.get(f"{key}_p99_s"), slo.get(f"{key}_s")
        delta = None
        if limit and v is not None and math.isfinite(v):
            delta = f"{'within' if v <= limit else 'over'} SLO {_fmt_s(limit)}"
        col.metric(name, _fmt_s(v), delta=delta, border=True,
                   delta_color="normal" if delta and v <= limit else "inverse",
                   delta_arrow="off" if delta else "auto",
                   help=f"p50 {_fmt_s(s.get(f'{key}_p50_s'))} · p90 {_fmt_s(s.get(f'{key}_p90_s'))}")
    cols[3].metric("Prefix cache hit rate", f"{s.get('prefix_hit_rate', 0):.1%}", border=True,
                   delta=f"{s.get('preemptions', 0):,} preemptions", delta_color="off", delta_arrow="off")
    if not s.get("complete", True):
        st.warning("The run hit its horizon with requests unfinished: the fleet cannot keep up with this load. "
                   "They count as failed (reason unfinished_at_horizon).", icon=":material/timer:")


def results_view() -> None:
    runs: dict = st.session_state.runs
    if not runs:
        st.info("Build a scenario in the sidebar and press **Run simulation**. Every run is kept for this "
                "session, so you can change one knob, run again and compare in the next tab.", icon=":material/arrow_back:")
        return
    labels = list(runs)
    sel = st.session_state.get("selected_run")
    label = st.selectbox("Run", labels[::-1], index=labels[::-1].index(sel) if sel in labels else 0, key="view_run")
    r = runs[label]
    s = r.summary
    st.caption(f"{s.get('requests_total', 0):,} requests · {s.get('replicas_max')}× {s.get('gpu')} "
               f"(TP{s.get('tensor_parallel')}) · {s.get('model')} · router **{s.get('router')}** · "
               f"autoscaler **{s.get('autoscaler')}** · {s.get('num_gpu_blocks', 0):,} KV blocks/replica · "
               f"simulated in {s.get('sim_wall_s', 0):.1f} s")
    headline(r)

    st.subheader("Latency")
    log_x = st.toggle("Log time axis", True, key="cdf_log")
    slo = report.slo_dict(r.scenario.slo)
    st.plotly_chart(plots.latency_cdfs({label: r}, slo, log_x=log_x), key="cdf_single")
    st.dataframe(_styled_latency(report.latency_table(s, slo)))

    st.subheader("Cluster over time")
    st.plotly_chart(plots.cluster_timeseries({label: r}), key="ts_single")

    st.subheader("Per replica")
    st.plotly_chart(plots.replica_load(r), key="replica_load")
    c1, c2 = st.columns([5, 4])
    with c1:
        st.plotly_chart(plots.replica_heatmap(r, "in_flight", title="in-flight requests per replica"), key="heat")
    with c2:
        t = plots.replica_table(r)[["requests", "prefix_hit_rate", "ttft_p99_s", "e2e_p99_s"]]
        st.dataframe(t, column_config={
            "requests": st.column_config.NumberColumn("requests", format="%d"),
            "prefix_hit_rate": st.column_config.ProgressColumn("prefix hit rate", min_value=0.0, max_value=1.0, format="percent"),
            "ttft_p99_s": st.column_config.NumberColumn("TTFT p99 (s)", format="%.3f"),
            "e2e_p99_s": st.column_config.NumberColumn("E2E p99 (s)", format="%.2f"),
        })

    st.subheader("Download")
    st.caption("Per-request table, sampled time series, summary, and the scenario YAML that reproduces this run "
               "(`fleetsim run scenario.yaml`).")
    files = _download_payloads(label)
    slug = _slug(label)
    items = list(files.items())
    for start in range(0, len(items), 4):
        cols = st.columns(4)
        for col, (fname, (blob, mime)) in zip(cols, items[start:start + 4]):
            col.download_button(fname, blob, file_name=f"{slug}.yaml" if fname == "scenario.yaml" else f"{slug}-{fname}",
                                mime=mime, key=f"dl_{fname}", icon=":material/download:", width="stretch")


def _styled_latency(t: pd.DataFrame):
    def colour(col: pd.Series) -> list[str]:
        return ["color: #1b7a3a; font-weight: 600" if v == "yes" else "color: #b22222; font-weight: 600" if v == "no"
                else "" for v in col]

    t = t.copy()
    t["SLO (s)"] = [f"{v:g}" if pd.notna(v) else "–" for v in t["SLO (s)"]]
    nums = [c for c in t.columns if c.endswith("(s)") and c != "SLO (s)"]
    return t.style.format({c: "{:.4f}" for c in nums}, na_rep="–").apply(colour, subset=["p99 within SLO"])


def _styled_comparison(runs: dict):
    values = report.compare_table(runs)
    deltas = report.delta_table(runs)

    def colour(_df: pd.DataFrame) -> pd.DataFrame:
        out = pd.DataFrame("", index=values.index, columns=values.columns)
        for c in values.columns:
            lower = report.better_direction(c)
            if lower is None or c not in deltas:
                continue
            for i in values.index[1:]:
                d = deltas.at[i, c]
                if pd.isna(d) or abs(d) < 0.02:
                    continue
                good = (d < 0) == lower
                out.at[i, c] = "background-color: #d8f3dc" if good else "background-color: #ffd6d6"
        return out

    fmt = {c: "{:,.4g}" for c in values.columns if pd.api.types.is_numeric_dtype(values[c])}
    for c in ("SLO attainment", "prefix hit rate"):
        if c in values:
            fmt[c] = "{:.1%}"
    return values.style.apply(colour, axis=None).format(fmt, na_rep="–")


def compare_view(sc_dict: dict | None, sc: Scenario | None, up_map: dict) -> None:
    with st.container(border=True):
        st.markdown("**Quick what-if**: run the sidebar scenario once per value of one knob.")
        ch = _choices()
        c1, c2, c3 = st.columns([2, 4, 1.3], vertical_alignment="bottom")
        knob = c1.selectbox("Knob", list(VARIANT_KNOBS), key="v_knob")
        kind = VARIANT_KNOBS[knob]
        if kind == "categorical":
            pool = {"router.policy": ch["routers"], "autoscaler.policy": ch["autoscalers"], "cluster.gpu": ch["gpus"],
                    "cluster.model": ch["models"]}[knob]
            values = c2.multiselect("Values", _names(pool), key=f"v_vals_{knob}")
        elif kind == "bool":
            values = c2.multiselect("Values", [True, False], default=[True, False], key=f"v_vals_{knob}")
        else:
            raw = c2.text_input("Values (comma-separated)", key=f"v_vals_{knob}",
                                placeholder="e.g. 2, 4, 8" if kind == "int" else "e.g. 0.5, 1, 2")
            values = []
            bad = []
            for tok in (t.strip() for t in raw.split(",") if t.strip()):
                try:
                    values.append(int(tok) if kind == "int" else float(tok))
                except ValueError:
                    bad.append(tok)
            if bad:
                st.error(f"{knob}: not {'an integer' if kind == 'int' else 'a number'}: {', '.join(bad)}", icon=":material/error:")
                values = []
        go = c3.button("Run variants", key="v_run", disabled=sc is None or not values, width="stretch")
        if go and sc_dict is not None:
            run_variants(sc_dict, knob, values, up_map)

    runs: dict = st.session_state.runs
    if len(runs) < 2:
        st.info("Compare needs two runs or more: run the sidebar scenario, change a knob, run again — "
                "or use Quick what-if above.", icon=":material/compare_arrows:")
        return
    labels = list(runs)
    chosen = st.multiselect("Runs to compare (the first is the baseline)", labels,
                            default=labels[-min(4, len(labels)):], key="cmp_runs")
    if len(chosen) < 1:
        return
    base = st.selectbox("Baseline", chosen, key="cmp_base")
    ordered = {base: runs[base], **{k: runs[k] for k in chosen if k != base}}
    st.markdown("#### Summary")
    st.caption("Green: better than the baseline by more than 2 %; red: worse.")
    st.dataframe(_styled_comparison(ordered))
    c1, c2 = st.columns(2)
    values = report.compare_table(ordered)
    if "TTFT p99 (s)" in values:
        c1.plotly_chart(plots.metric_bars(values, "TTFT p99 (s)"), key="cmp_bar_ttft")
    if "USD / M output tokens" in values:
        c2.plotly_chart(plots.metric_bars(values, "USD / M output tokens"), key="cmp_bar_cost")
    st.markdown("#### Latency CDFs")
    slo = report.slo_dict(ordered[base].scenario.slo)
    st.plotly_chart(plots.latency_cdfs(ordered, slo, log_x=st.session_state.get("cdf_log", True)), key="cmp_cdf")
    st.markdown("#### Over time")
    st.plotly_chart(plots.cluster_timeseries(ordered), key="cmp_ts")
    st.download_button("comparison.csv", values.to_csv().encode(), file_name="comparison.csv", mime="text/csv",
                       icon=":material/download:", key="dl_cmp")


def run_variants(sc_dict: dict, knob: str, values: list, up_map: dict) -> None:
    from sim.scenario import apply_overrides

    bar = st.progress(0.0, text=f"0 / {len(values)} variants")
    for i, v in enumerate(values):
        try:
            data = apply_overrides(json.loads(json.dumps(sc_dict)), [f"{knob}={json.dumps(v)}"])
            vsc = load_scenario(data)
        except FleetsimError as e:
            show_error(e, f"{knob}={v}")
            continue
        result, err = run_scenario(vsc, f"{knob}={v}")
        if err is not None:
            show_error(err, f"{knob}={v}")
        else:
            add_run(result, data, up_map, label=f"{knob}={v}")
        bar.progress((i + 1) / len(values), text=f"{i + 1} / {len(values)} variants")


def capacity_view(sc_dict: dict | None, sc: Scenario | None, up_map: dict) -> None:
    st.markdown("Find the **smallest fleet** that meets the SLOs at this load, or the **highest load** this "
                "fleet sustains. Each step is one simulation; the search brackets the answer by doubling, "
                "then bisects.")
    c1, c2, c3, c4 = st.columns([2, 2.4, 1.6, 1.6])
    question = c1.radio("Question", ["Smallest fleet", "Highest load"], key="cap_q", horizontal=True)
    mode = c2.radio("A run meets the SLOs when", ["percentile", "attainment"], key="cap_mode", horizontal=True,
                    format_func=lambda m: "its latency percentile is within them" if m == "percentile"
                    else "enough requests meet all of them")
    if mode == "percentile":
        pct = c3.selectbox("Percentile", ["p99", "p90", "p50"], key="cap_pct")
        att = 0.99
    else:
        pct = "p99"
        att = c3.slider("Minimum attainment", 0.5, 1.0, 0.99, 0.005, key="cap_att", format="%.3f")
    limit = (c4.number_input("Largest fleet to try", 1, 1024, 32, key="cap_max") if question == "Smallest fleet"
             else c4.number_input("Largest load multiple", 1.0, 1024.0, 32.0, key="cap_maxf"))
    slo = sc.slo.model_dump(exclude_none=True) if sc is not None else {}
    st.caption("SLOs (from the sidebar): " + (", ".join(f"{k[:-2].upper()} ≤ {v:g} s" for k, v in slo.items()) or "none set"))
    if question == "Smallest fleet" and sc is not None and sc.autoscaler.policy != "none":
        st.caption(f"The search sizes a fixed fleet: the autoscaler ({sc.autoscaler.policy}) is turned off for it.")
    go = st.button("Find capacity", type="primary", key="cap_run", disabled=sc is None or not slo)
    if go and sc is not None:
        crit = report.SLOCriterion(**{k: slo.get(k) for k in report.SLO_KEYS}, mode=mode, percentile=pct,
                                   min_attainment=att)
        table = st.empty()
        rows: list[dict] = []

        def on_step(n: int, row: dict) -> None:
            rows.append(row)
            table.dataframe(pd.DataFrame(rows), hide_index=True)

        def run(s: Scenario):
            label = f"{'replicas' if question == 'Smallest fleet' else 'load ×'}="
            label += str(s.cluster.replicas if question == "Smallest fleet" else s.workload.rate_scale)
            result, err = run_scenario(s, label)
            if err is not None:
                raise err
            return result

        try:
            if question == "Smallest fleet":
                res = capacity.smallest_fleet(sc, crit, max_replicas=int(limit), run=run, on_step=on_step)
            else:
                res = capacity.highest_load(sc, crit, max_factor=float(limit), run=run, on_step=on_step)
        except Exception as e:  # noqa: BLE001 - shown on the page (Streamlit's reruns are BaseExceptions)
            show_error(e, "capacity search")
            return
        table.empty()
        if res.best is not None:
            best = res.results[res.best]
            data = json.loads(json.dumps(sc_dict or {}))
            key = "cluster.replicas" if res.knob == "cluster.replicas" else "workload.rate_scale"
            add_run(best, data, up_map, label=f"capacity: {key.split('.')[-1]}={res.best:g}")
        st.session_state.capacity = res
    res = st.session_state.capacity
    if res is not None:
        (st.success if res.best is not None else st.warning)(res.message, icon=":material/target:" if res.best is not None else ":material/error:")
        metric = "ttft_p99_s" if res.points["ttft_p99_s"].notna().any() else "e2e_p99_s"
        lim = slo.get("ttft_s") if metric == "ttft_p99_s" else slo.get("e2e_s")
        st.plotly_chart(plots.capacity_curve(res.points, res.knob, metric, limit=lim,
                                             title="tried points (green: meets the SLOs)"), key="cap_curve")
        st.dataframe(res.points.sort_values(res.knob), hide_index=True)
        if res.best is not None:
            st.caption("The answer's run was added to the history (Results and Compare tabs).")


def yaml_view(sc: Scenario | None, up_map: dict) -> None:
    st.markdown("The scenario the sidebar describes: what **Run simulation** runs. `fleetsim run` accepts it as is.")
    if sc is not None:
        class _R:  # export_yaml wants a Result-like object
            scenario = sc

        text = export_yaml(_R, up_map)
        st.code(text, language="yaml")
        st.download_button("scenario.yaml", text.encode(), file_name="scenario.yaml", mime="application/x-yaml",
                           icon=":material/download:", key="dl_form_yaml")
    st.markdown("##### Run a scenario file")
    f = st.file_uploader("Scenario YAML", type=["yaml", "yml"], key="yaml_upload")
    if f is not None and st.button("Run this file", key="yaml_run"):
        try:
            data = history.parse_yaml_mapping(f.getvalue().decode("utf-8", errors="replace"), f.name)
            fsc = load_scenario(data)
        except FleetsimError as e:
            show_error(e, f.name)
            return
        result, err = run_scenario(fsc, f.name)
        if err is not None:
            show_error(err, f.name)
        else:
            add_run(result, data, {}, label=f.name)
            st.success("Added to the history: see the Results tab.")


# ------------------------------------------------------------------------------------------- page
CSS = """
<style>
.block-container {padding-top: 2.2rem; padding-bottom: 2rem; max-width: 1500px;}
[data-testid="stMetricValue"] {font-size: 1.55rem;}
[data-testid="stSidebar"] {min-width: 370px;}
[data-testid="stSidebar"] [data-testid="stExpander"] summary p {font-weight: 600;}
h3 {margin-top: 0.6rem;}
</style>
"""


def main() -> None:
    st.set_page_config(page_title="fleetsim explorer", page_icon=":material/hub:", layout="wide")
    st.markdown(CSS, unsafe_allow_html=True)
    _state()
    sc_dict, sc, up_map, err = sidebar()

    c1, c2, c3 = st.columns([6, 1.4, 1.1], vertical_alignment="center")
    c1.markdown("# fleetsim · what-if explorer")
    c1.caption("Simulate an LLM serving fleet (vLLM-faithful replicas) on your workload: latency, queueing, "
               "KV cache and cost, before buying a GPU.")
    run_clicked = c2.button("Run simulation", icon=":material/play_arrow:", type="primary", key="run", disabled=sc is None,
                            width="stretch")
    if c3.button("Clear runs", key="clear", disabled=not st.session_state.runs, width="stretch"):
        st.session_state.runs.clear()
        st.session_state.run_meta.clear()
        st.session_state.downloads.clear()
        st.session_state.capacity = None
    # One fixed container above the tabs, so the page's element tree keeps its shape between reruns
    # (a tab strip that moves is re-created by Streamlit, which would jump back to the first tab).
    with st.container():
        if err:
            st.error(f"Scenario not valid: {err}", icon=":material/error:")
        if run_clicked and sc is not None:
            result, run_err = run_scenario(sc)
            if run_err is not None:
                show_error(run_err)
            else:
                add_run(result, sc_dict or {}, up_map)

    tabs = st.tabs([":material/monitoring: Results", ":material/compare_arrows: Compare",
                    ":material/target: Capacity finder", ":material/description: Scenario YAML"], key="main_tabs")
    with tabs[0]:
        results_view()
    with tabs[1]:
        compare_view(sc_dict, sc, up_map)
    with tabs[2]:
        capacity_view(sc_dict, sc, up_map)
    with tabs[3]:
        yaml_view(sc, up_map)


main()
