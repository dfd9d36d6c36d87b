"""Mooncake / Kimi FAST'25 traces (JSONL): ``timestamp`` (ms), ``input_length``,
``output_length``, ``hash_ids`` (prefix-block ids of 512 tokens; equal leading ids = shared
prefix). Rows are in arrival order. No sessions.
"""

from __future__ import annotations

from pathlib import Path

from traces.formats.common import assemble, list_column, require_columns, take_options
from traces.issues import IssueLog, RowValidator, check_float, check_int, check_monotonic
from traces.readers import read_jsonl
from traces.schema import Workload

BLOCK_SIZE = 512


def sniff(keys: set[str]) -> bool:
    return {"timestamp", "input_length", "output_length"} <= keys and "chat_id" not in keys


def load(path: Path, log: IssueLog, opts: dict) -> Workload:
    o = take_options("mooncake", opts, {"block_size": BLOCK_SIZE})
    raw, lines = read_jsonl(path, log)
    require_columns(path, raw, ["timestamp", "input_length", "output_length"], "Mooncake")
    v = RowValidator(log, lines)
    t_ms = check_float(v, raw["timestamp"], "timestamp", minimum=0)
    prompt = check_int(v, raw["input_length"], "input_length", minimum=1)
    output = check_int(v, raw["output_length"], "output_length", minimum=1)
    cols = {"arrival_s": t_ms / 1000.0, "prompt_tokens": prompt, "output_tokens": output}
    hbs = None
    if "hash_ids" in raw.columns:
        cols["hash_ids"] = list_column(v, raw["hash_ids"], "hash_ids")
        hbs = int(o["block_size"])
    check_monotonic(v, t_ms, "timestamp", raw["timestamp"])
    return assemble(path, log, v, cols, fmt="mooncake", hash_block_size=hbs)
