"""Alibaba Qwen-Bailian usage traces (``alibaba-edu/qwen-bailian-usagetraces-anon``), JSONL.

Fields: ``chat_id``, ``parent_chat_id`` (-1 for the first turn), ``timestamp`` (s),
``input_length``, ``output_length``, ``type`` (text / image / search / file / ...), ``turn``,
``hash_ids`` (16-token blocks). A session is the chain of chats reachable through
``parent_chat_id``; its id is the root's ``chat_id``. Follow-up turns carry the earlier turns
in their prompt, which ``hash_ids`` show as a growing shared prefix.

Mapping: ``request_id`` = chat_id, ``session_id`` = root chat_id, ``turn`` = turn,
``slo_class`` = type. A parent missing from the file (the trace is a time window) makes the
child the root of its session. A child arriving before its parent is an error (order matters).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from traces.formats.common import assemble, list_column, require_columns, take_options
from traces.issues import IssueLog, RowValidator, check_float, check_int, check_monotonic
from traces.readers import read_jsonl
from traces.schema import Workload

BLOCK_SIZE = 16


def sniff(keys: set[str]) -> bool:
    return {"chat_id", "parent_chat_id", "input_length", "output_length"} <= keys


def load(path: Path, log: IssueLog, opts: dict) -> Workload:
    o = take_options("bailian", opts, {"block_size": BLOCK_SIZE})
    raw, lines = read_jsonl(path, log)
    require_columns(path, raw, ["chat_id", "parent_chat_id", "timestamp", "input_length", "output_length"], "Qwen-Bailian")
    v = RowValidator(log, lines)
    chat = check_int(v, raw["chat_id"], "chat_id", minimum=-(1 << 62))
    parent = check_int(v, raw["parent_chat_id"], "parent_chat_id", minimum=-1)
    t = check_float(v, raw["timestamp"], "timestamp", minimum=0)
    prompt = check_int(v, raw["input_length"], "input_length", minimum=1)
    output = check_int(v, raw["output_length"], "output_length", minimum=1)
    turn = check_int(v, raw["turn"], "turn", minimum=1) if "turn" in raw.columns else None
    dup = pd.Series(chat).duplicated().to_numpy()
    v.check(dup, "chat_id", "duplicate chat_id", pd.Series(chat))
    check_monotonic(v, t, "timestamp", raw["timestamp"])

    # Resolve each chat's session root by pointer jumping over row indices.
    n = len(chat)
    index = pd.Series(np.arange(n), index=chat)
    index = index[~index.index.duplicated()]
    prow = pd.Series(parent).map(index).to_numpy()  # row of the parent, NaN if absent / -1
    has_parent = ~np.isnan(prow)
    prow_i = np.where(has_parent, prow, np.arange(n)).astype(np.int64)
    # child must not arrive before its parent
    early = has_parent & (t < t[prow_i])
    v.check(early, "timestamp", "arrives before its parent chat", pd.Series(t))
    root = prow_i.copy()
    for _ in range(64):
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    cols = {
        "arrival_s": t,
        "prompt_tokens": prompt,
        "output_tokens": output,
        "request_id": pd.Series(chat).astype("str"),
        "session_id": pd.Series(chat[root]).astype("str"),
        # the chat this one continues, when it is in the file (closed-loop replay)
        "parent_request_id": pd.Series(parent).astype("str").where(has_parent, np.nan),
    }
    if turn is not None:
        cols["turn"] = turn
    if "type" in raw.columns:
        cols["slo_class"] = raw["type"].astype("str")
    hbs = None
    if "hash_ids" in raw.columns:
        cols["hash_ids"] = list_column(v, raw["hash_ids"], "hash_ids")
        hbs = int(o["block_size"])
    return assemble(path, log, v, cols, fmt="bailian", hash_block_size=hbs)
