"""LMBench / LMCache multi-round QA result CSVs (as in llm-d-benchmark's ``lmbenchmark`` runs).

Columns: ``prompt_tokens, generation_tokens, ttft, generation_time, user_id, question_id,
launch_time, finish_time`` (times in unix seconds; the ``sharegpt`` variant has no
``user_id``/``question_id``). Rows are *not* in arrival order; they are sorted by
``launch_time``.

Sessions: each ``user_id`` is a session and ``question_id`` its turn. In multi-round QA the
prompt of round k is the whole conversation so far (shared system prompt + the user's history
+ earlier questions and answers + the new question), so every prompt of a user is a prefix of
that user's growing stream. ``hash_ids`` are built that way (16-token blocks, see
:class:`traces.prefix_ids.SessionStreams`); the option ``system_prompt_tokens`` makes the first
N tokens common to *all* users (LMBench's ``--shared-system-prompt``; llm-d's "long-input"
profile uses 1000, see docs/workloads.md).

A user's questions must be launched in ``question_id`` order (checked).
The measured columns (ttft, generation_time, finish_time) are results, not workload, and are
not loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from traces.formats.common import assemble, require_columns, take_options
from traces.issues import IssueLog, RowValidator, check_float, check_int
from traces.prefix_ids import link_sessions, session_prefix_ids
from traces.readers import read_csv_raw
from traces.schema import Workload, normalize_frame

BLOCK_SIZE = 16


def sniff(header: list[str]) -> bool:
    return {"prompt_tokens", "generation_tokens", "launch_time"} <= set(header)


def load(path: Path, log: IssueLog, opts: dict) -> Workload:
    o = take_options("lmbench", opts, {"system_prompt_tokens": 0, "block_size": BLOCK_SIZE})
    raw, lines = read_csv_raw(path, log)
    require_columns(path, raw, ["prompt_tokens", "generation_tokens", "launch_time"], "LMBench")
    v = RowValidator(log, lines)
    t = check_float(v, raw["launch_time"], "launch_time", minimum=0)
    prompt = check_int(v, raw["prompt_tokens"], "prompt_tokens", minimum=1)
    output = check_int(v, raw["generation_tokens"], "generation_tokens", minimum=1)
    cols: dict = {"arrival_s": t, "prompt_tokens": prompt, "output_tokens": output}
    sessions = "user_id" in raw.columns and "question_id" in raw.columns
    if sessions:
        user = check_int(v, raw["user_id"], "user_id", minimum=0)
        q = check_int(v, raw["question_id"], "question_id", minimum=0)
        # within a user, launch order must follow question order
        order = np.lexsort((q, t))
        ok = ~v.bad_any[order]
        u_o, q_o, l_o = user[order][ok], q[order][ok], np.flatnonzero(ok)
        frame = pd.DataFrame({"u": u_o, "q": q_o})
        prev_q = frame.groupby("u", sort=False)["q"].shift(1).to_numpy()
        back = np.zeros(len(t), dtype=bool)
        back[order[l_o]] = ~np.isnan(prev_q) & (q_o <= np.nan_to_num(prev_q, nan=-1))
        v.check(back, "question_id", "question launched out of order within its user_id (order matters)", pd.Series(q))
        cols["session_id"] = pd.Series(user).astype("str")
        cols["turn"] = q
        cols["request_id"] = "u" + pd.Series(user).astype("str") + "q" + pd.Series(q).astype("str")
    w = assemble(path, log, v, cols, fmt="lmbench", sort=True)
    if sessions:
        bs = int(o["block_size"])
        ids = session_prefix_ids(w.df, bs, head_tokens=int(o["system_prompt_tokens"]))
        ids.index = w.df.index
        w.df["hash_ids"] = ids
        w.df = normalize_frame(link_sessions(w.df))
        w.hash_block_size = bs
        share = f", first {o['system_prompt_tokens']} tokens shared by all users" if o["system_prompt_tokens"] else ""
        w.notes.append(f"prefix identity reconstructed: each user's prompts are prefixes of one growing stream{share}")
    return w
