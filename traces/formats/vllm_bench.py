"""vLLM-benchmark style datasets: ShareGPT conversation dumps and ``custom`` prompt files.

Both come as a JSON array or as JSONL. fleetsim has no tokenizer, so token counts must come from
the file, or be estimated from text only when the user says how (option ``chars_per_token``);
the estimate is then recorded in the workload notes.

ShareGPT (``{"id", "conversations": [{"from": "human"|"gpt", "value": text}, ...]}``):
- ``turns: first`` (default, what ``vllm bench serve --dataset-name sharegpt`` does): one request
  per conversation, prompt = first message, output = second; conversations with fewer than two
  messages are ignored (counted in the notes).
- ``turns: all``: one session per conversation; request k's prompt is the whole conversation up to
  the k-th human message, its output the k-th reply; prefixes shared turn to turn (hash_ids).
A message may carry its own token count in ``num_tokens`` / ``tokens`` / ``token_count``.

custom (``{"prompt": text, "output_len": n}`` lines and friends): prompt length from
``prompt_len | input_len | prompt_tokens | input_tokens | input_length``, else from
``prompt_token_ids`` (kept as token_ids), else estimated from ``prompt``; output from
``output_len | output_tokens | output_length | max_tokens``, else option ``output_tokens``.
Arrival from ``arrival_s | timestamp`` (seconds) when present.

Files without timestamps: every request arrives at t=0 (``vllm bench serve --request-rate inf``);
use ``workload.retime`` to impose an arrival process. This is stated in the notes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sim.errors import ConfigError
from traces.formats.common import assemble, list_column, pick, take_options
from traces.issues import IssueLog, RowValidator, check_float, check_int
from traces.prefix_ids import link_sessions, session_prefix_ids
from traces.readers import head_text, read_json_records, read_jsonl, records_to_frame
from traces.schema import Workload, normalize_frame

PROMPT_LEN = ("prompt_len", "input_len", "prompt_tokens", "input_tokens", "input_length")
OUTPUT_LEN = ("output_len", "output_tokens", "output_length", "max_tokens")
TIME = ("arrival_s", "timestamp")
TURN_COUNT = ("num_tokens", "tokens", "token_count")
NO_TIME_NOTE = "no timestamps in file: all requests arrive at t=0 (set workload.retime for an arrival process)"


def sniff_sharegpt(keys: set[str]) -> bool:
    return "conversations" in keys


def sniff_custom(keys: set[str]) -> bool:
    return bool(keys & {"prompt", "prompt_token_ids", *PROMPT_LEN}) and bool(keys & {*OUTPUT_LEN, "completion", "prompt"})


def _records(path: Path, log: IssueLog) -> tuple[list[dict] | pd.DataFrame, np.ndarray, bool]:
    """(records, lines, is_frame): JSON arrays give dicts, JSONL gives a DataFrame."""
    if head_text(path, 4096).lstrip().startswith("["):
        recs, lines = read_json_records(path, log)
        return recs, lines, False
    df, lines = read_jsonl(path, log)
    return df, lines, True


def _est(chars: int, cpt: float | None) -> int:
    return max(1, int(round(chars / cpt)))


def load_sharegpt(path: Path, log: IssueLog, opts: dict) -> Workload:
    o = take_options("sharegpt", opts, {"chars_per_token": None, "turns": "first", "block_size": 16})
    if o["turns"] not in ("first", "all"):
        raise ConfigError(f"workload.options.turns: must be 'first' or 'all', got {o['turns']!r}")
    cpt = o["chars_per_token"]
    if cpt is not None and not (isinstance(cpt, (int, float)) and cpt > 0):
        raise ConfigError(f"workload.options.chars_per_token: must be a positive number, got {cpt!r}")
    recs, lines, is_frame = _records(path, log)
    if is_frame:
        recs = recs.to_dict("records")
    rows: list[tuple] = []  # (line, session, turn, prompt, output)
    short = 0
    estimated = False
    for rec, line in zip(recs, lines):
        conv = rec.get("conversations") if isinstance(rec, dict) else None
        if not isinstance(conv, list):
            log.bad(int(line), "conversations", "missing or not a list")
            continue
        toks: list[int] = []
        bad = False
        for k, m in enumerate(conv):
            if not isinstance(m, dict) or not isinstance(m.get("value", ""), str):
                log.bad(int(line), f"conversations[{k}]", "not a message object with a text 'value'")
                bad = True
                break
            cnt = next((m[f] for f in TURN_COUNT if f in m), None)
            if cnt is not None:
                if not isinstance(cnt, (int, np.integer)) or isinstance(cnt, bool) or cnt < 0:
                    log.bad(int(line), f"conversations[{k}].{next(f for f in TURN_COUNT if f in m)}", "must be an integer >= 0", repr(cnt))
                    bad = True
                    break
                toks.append(int(cnt))
            else:
                if cpt is None:
                    raise ConfigError(
                        f"{path}:{line}: field 'conversations[{k}]': ShareGPT messages carry text, not token counts, and fleetsim "
                        "has no tokenizer; set workload.options.chars_per_token (e.g. 4.0) to estimate lengths from text"
                    )
                toks.append(_est(len(m.get("value", "")), cpt))
                estimated = True
        if bad:
            continue
        if len(conv) < 2:
            short += 1
            continue
        sid = str(rec.get("id", f"conv-{line}"))
        if o["turns"] == "first":
            rows.append((line, None, None, toks[0], toks[1]))
        else:
            ctx = 0
            for k in range(0, len(toks) - 1, 2):
                rows.append((line, sid, k // 2 + 1, ctx + toks[k], toks[k + 1]))
                ctx += toks[k] + toks[k + 1]
    if not rows:
        from traces.issues import trace_error

        raise trace_error(str(path), None, None, "no usable conversations")
    ln = np.array([r[0] for r in rows], dtype=np.int64)
    v = RowValidator(log, ln)
    prompt = check_int(v, pd.Series([r[3] for r in rows]), "conversations", minimum=1)
    output = check_int(v, pd.Series([r[4] for r in rows]), "conversations", minimum=1)
    cols: dict = {"arrival_s": np.zeros(len(rows)), "prompt_tokens": prompt, "output_tokens": output}
    notes = [NO_TIME_NOTE]
    if short:
        notes.append(f"ignored {short} conversation(s) with fewer than 2 messages (as vllm bench does)")
    if estimated:
        notes.append(f"token counts estimated from text at {cpt} chars/token (no tokenizer)")
    if o["turns"] == "all":
        cols["session_id"] = pd.Series([r[1] for r in rows], dtype="str")
        cols["turn"] = np.array([r[2] for r in rows], dtype=np.int64)
    w = assemble(path, log, v, cols, fmt="sharegpt", notes=notes)
    if o["turns"] == "all":
        bs = int(o["block_size"])
        ids = session_prefix_ids(w.df, bs)
        ids.index = w.df.index
        w.df["hash_ids"] = ids
        w.df["request_id"] = w.df["session_id"] + "/" + w.df["turn"].astype("str")
        w.df = normalize_frame(link_sessions(w.df))
        w.hash_block_size = bs
    return w


def load_custom(path: Path, log: IssueLog, opts: dict) -> Workload:
    o = take_options("custom", opts, {"chars_per_token": None, "output_tokens": None})
    cpt = o["chars_per_token"]
    recs, lines, is_frame = _records(path, log)
    df = recs if is_frame else records_to_frame([r if isinstance(r, dict) else {} for r in recs])
    v = RowValidator(log, lines)
    if not is_frame:
        v.check(np.array([not isinstance(r, dict) for r in recs]), "record", "not a JSON object")
    notes = []
    cols: dict = {}
    pcol = pick(df, PROMPT_LEN)
    if pcol is not None:
        prompt = check_int(v, df[pcol], pcol, minimum=1)
    elif "prompt_token_ids" in df.columns:
        ids = list_column(v, df["prompt_token_ids"], "prompt_token_ids")
        cols["token_ids"] = ids
        prompt = ids.list.len().fillna(0).to_numpy(np.int64)
        v.check(prompt < 1, "prompt_token_ids", "must not be empty")
    elif "prompt" in df.columns:
        if cpt is None:
            raise ConfigError(
                f"{path}: field 'prompt': the file has prompt text but no token count ({'/'.join(PROMPT_LEN)}) and fleetsim has "
                "no tokenizer; add counts or set workload.options.chars_per_token (e.g. 4.0)"
            )
        text = df["prompt"]
        v.check(~text.map(lambda x: isinstance(x, str)).to_numpy(), "prompt", "must be text", text)
        prompt = np.array([_est(len(x), cpt) if isinstance(x, str) else 1 for x in text], dtype=np.int64)
        notes.append(f"prompt lengths estimated from text at {cpt} chars/token (no tokenizer)")
    else:
        from traces.issues import trace_error

        raise trace_error(str(path), int(lines[0]) if len(lines) else None, "prompt", "no prompt length field found")
    ocol = pick(df, OUTPUT_LEN)
    if ocol is not None:
        output = check_int(v, df[ocol], ocol, minimum=1)
    elif "completion" in df.columns and cpt is not None:
        output = np.array([_est(len(x), cpt) if isinstance(x, str) else 0 for x in df["completion"]], dtype=np.int64)
        v.check(output < 1, "completion", "must be non-empty text", df["completion"])
        notes.append(f"output lengths estimated from completion text at {cpt} chars/token (no tokenizer)")
    elif o["output_tokens"] is not None:
        output = np.full(len(df), int(o["output_tokens"]), dtype=np.int64)
        notes.append(f"output length fixed at {int(o['output_tokens'])} tokens (options.output_tokens)")
    else:
        raise ConfigError(
            f"{path}: field 'output_len': no output length in the file ({'/'.join(OUTPUT_LEN)}); "
            "set workload.options.output_tokens (vllm bench's --custom-output-len) to give one"
        )
    tcol = pick(df, TIME)
    if tcol is not None:
        t = check_float(v, df[tcol], tcol, minimum=0)
    else:
        t = np.zeros(len(df))
        notes.append(NO_TIME_NOTE)
    cols = {"arrival_s": t, "prompt_tokens": prompt, "output_tokens": output, **cols}
    return assemble(path, log, v, cols, fmt="custom", notes=notes, sort=tcol is not None)
