"""Trace file formats: detection by content, loading by name.

``load_file(path, fmt="auto")`` picks the loader from the file's first record (CSV header or
first JSON object), never from the file name alone, so a renamed or gzipped file still loads.
Every loader returns a :class:`traces.schema.Workload` with arrivals starting at 0.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from sim.errors import ConfigError
from traces.formats.common import Loader
from traces.issues import IssueLog, trace_error
from traces.readers import head_text
from traces.schema import Workload


def _module(name: str):
    """A format module, imported on first use: loading one trace (e.g. ``fleetsim run``'s built-in
    Azure trace) should not import every reader (Parquet, Arrow JSON, ...)."""
    return importlib.import_module(f"traces.formats.{name}")


def _lazy(module: str, func: str) -> Loader:
    def load(path: Path, log: IssueLog, opts: dict) -> Workload:
        return getattr(_module(module), func)(path, log, opts)

    load.__name__ = load.__qualname__ = f"{module}.{func}"
    return load


# format name -> loader(path, IssueLog, options) -> Workload
LOADERS: dict[str, Loader] = {
    "azure": _lazy("azure", "load"),
    "mooncake": _lazy("mooncake", "load"),
    "bailian": _lazy("bailian", "load"),
    "burstgpt": _lazy("burstgpt", "load"),
    "lmbench": _lazy("lmbench", "load"),
    "tokenids": _lazy("tokenids", "load"),
    "sharegpt": _lazy("vllm_bench", "load_sharegpt"),
    "custom": _lazy("vllm_bench", "load_custom"),
    "parquet": _lazy("native", "load_parquet"),
    "csv": _lazy("native", "load_csv"),
    "jsonl": _lazy("native", "load_jsonl"),
}
ALIASES = {
    "azure2023": "azure",
    "azure2024": "azure",
    "kimi": "mooncake",
    "qwen-bailian": "bailian",
    "llmservingsim": "tokenids",
    "vllm-custom": "custom",
    "fleetsim": "auto",
}
FORMAT_NAMES = sorted([*LOADERS, *ALIASES, "auto"])

RATE_CURVE_HEADER = {"window_start_s", "aggregate_rate_req_per_s"}


def canonical_format(fmt: str) -> str:
    f = ALIASES.get(fmt, fmt)
    if f != "auto" and f not in LOADERS:
        raise ConfigError(f"workload.format: unknown format {fmt!r} (known: {', '.join(FORMAT_NAMES)})")
    return f


def detect(path: Path) -> str:
    """The format name of ``path`` from its content."""
    from traces.formats import azure, bailian, burstgpt, lmbench, mooncake, native, tokenids, vllm_bench

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PAR1":
        return "parquet"
    head = head_text(path)
    text = head.lstrip("\ufeff \t\r\n")
    if not text:
        raise trace_error(str(path), None, None, "file is empty")
    if text[0] == "[":
        keys = _first_array_keys(path, text)
        if vllm_bench.sniff_sharegpt(keys):
            return "sharegpt"
        if native.sniff(keys):
            return "jsonl"
        if vllm_bench.sniff_custom(keys):
            return "custom"
        raise trace_error(str(path), 1, None, f"cannot tell the format of this JSON array (first record keys {sorted(keys)}); set workload.format")
    if text[0] == "{":
        first = text.split("\n", 1)[0]
        try:
            keys = set(json.loads(first))
        except json.JSONDecodeError:
            raise trace_error(str(path), 1, None, "bad JSON on the first line; set workload.format to get per-line errors") from None
        for name, sniff in (
            ("tokenids", tokenids.sniff),
            ("bailian", bailian.sniff),
            ("mooncake", mooncake.sniff),
            ("jsonl", native.sniff),
            ("sharegpt", vllm_bench.sniff_sharegpt),
            ("custom", vllm_bench.sniff_custom),
        ):
            if sniff(keys):
                return name
        raise trace_error(str(path), 1, None, f"cannot tell the format from the first record's keys {sorted(keys)}; set workload.format")
    header = [h.strip().strip('"') for h in text.split("\n", 1)[0].rstrip("\r").split(",")]
    if RATE_CURVE_HEADER <= set(header):
        raise trace_error(str(path), 1, None, "this is a request-rate curve, not a trace: use it as synthetic.rate_curve")
    for name, sniff in (("azure", azure.sniff), ("burstgpt", burstgpt.sniff), ("csv", native.sniff), ("lmbench", lmbench.sniff)):
        if sniff(header):
            return name
    raise trace_error(str(path), 1, None, f"cannot tell the format from the CSV header {header}; set workload.format")


def _first_array_keys(path: Path, text: str) -> set[str]:
    dec = json.JSONDecoder()
    i = 1
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    try:
        obj, _ = dec.raw_decode(text, i)
    except json.JSONDecodeError:
        # first record longer than the sniffed head: read the whole file once
        from traces.readers import read_bytes

        full = read_bytes(path).decode("utf-8").lstrip("\ufeff \t\r\n")
        try:
            obj, _ = dec.raw_decode(full, 1 + len(full[1:]) - len(full[1:].lstrip()))
        except json.JSONDecodeError as e:
            raise trace_error(str(path), e.lineno, None, f"bad JSON: {e.msg}") from None
    return set(obj) if isinstance(obj, dict) else set()


def load_file(path: str | Path, fmt: str = "auto", *, skip_invalid: bool = False, options: dict | None = None) -> Workload:
    """Load any supported trace file into a Workload (errors: TraceError / ConfigError)."""
    path = Path(path)
    if not path.exists():
        raise trace_error(str(path), None, None, "no such file")
    if path.is_dir():
        raise trace_error(str(path), None, None, "is a directory, not a trace file")
    f = canonical_format(fmt)
    if f == "auto":
        f = detect(path)
    log = IssueLog(str(path), skip_invalid=skip_invalid)
    return LOADERS[f](path, log, dict(options or {}))


__all__ = ["LOADERS", "FORMAT_NAMES", "detect", "load_file", "canonical_format"]
