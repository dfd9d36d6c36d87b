"""Token-id workloads as replayed by LLMServingSim (JSONL): ``input_toks``, ``output_toks``,
``arrival_time_ns``, ``input_tok_ids`` (and ``output_tok_ids``, not needed).

The prompt's full token ids give exact prefix identity: the engine hashes them into vLLM-style
16-token blocks like vLLM itself. ``input_toks`` must equal the number of ``input_tok_ids``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pandas as pd

from traces.formats.common import assemble, list_column, require_columns, take_options
from traces.issues import IssueLog, RowValidator, check_float, check_int, check_monotonic
from traces.readers import read_jsonl
from traces.schema import Workload


def sniff(keys: set[str]) -> bool:
    return {"input_toks", "output_toks", "arrival_time_ns"} <= keys


def load(path: Path, log: IssueLog, opts: dict) -> Workload:
    take_options("tokenids", opts, {})
    raw, lines = read_jsonl(path, log)
    require_columns(path, raw, ["input_toks", "output_toks", "arrival_time_ns"], "LLMServingSim")
    v = RowValidator(log, lines)
    t_ns = check_float(v, raw["arrival_time_ns"], "arrival_time_ns", minimum=0)
    prompt = check_int(v, raw["input_toks"], "input_toks", minimum=1)
    output = check_int(v, raw["output_toks"], "output_toks", minimum=1)
    cols = {"arrival_s": t_ns / 1e9, "prompt_tokens": prompt, "output_tokens": output}
    if "input_tok_ids" in raw.columns:
        ids = list_column(v, raw["input_tok_ids"], "input_tok_ids")
        n = pc.list_value_length(pa.chunked_array(ids.array._pa_array)).fill_null(-1).to_numpy()
        v.check(n != prompt, "input_tok_ids", "length differs from input_toks", pd.Series(np.asarray(n)))
        cols["token_ids"] = ids
    check_monotonic(v, t_ns, "arrival_time_ns", raw["arrival_time_ns"])
    return assemble(path, log, v, cols, fmt="tokenids")
