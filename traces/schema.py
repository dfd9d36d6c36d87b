"""The one request schema every workload is loaded into.

A :class:`Workload` is columnar: a pandas DataFrame with one row per request, sorted by arrival.

Required columns
    ``arrival_s`` (float64, seconds from trace start), ``prompt_tokens`` (int64 > 0),
    ``output_tokens`` (int64 >= 1).
Optional columns (absent or null = unknown)
    ``request_id`` (str), ``session_id`` (str), ``turn`` (int64), ``tenant`` (str),
    ``priority`` (int64, lower = more important, as in vLLM), ``slo_class`` (str), ``model`` (str),
    ``hash_ids`` (list<int64>: the prompt's prefix identity as a chain of source-block ids of
    ``Workload.hash_block_size`` tokens each; equal leading ids = equal leading tokens),
    ``token_ids`` (list<int64>: the full prompt token ids, when the trace has them).

The engine never sees source-block ids directly: :func:`engine_block_hashes` turns either form of
prefix identity into vLLM-style chained hashes over ``block_size``-token engine blocks (16 by
default), deterministically, so that shared source blocks stay shared and the unshared tail of a
prompt stays unique to its request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

REQUIRED_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")
OPTIONAL_COLUMNS = (
    "request_id",
    "session_id",
    "turn",
    "tenant",
    "priority",
    "slo_class",
    "model",
    "hash_ids",
    "token_ids",
)

# Seed of the hash chain (vLLM's NONE_HASH plays the same role).
_NONE_HASH = 0x5F3759DF
_MASK64 = (1 << 64) - 1


def _mix(parent: int, key: int) -> int:
    """Deterministic 64-bit chained hash (splitmix64 finaliser over parent xor key).

    Python's ``hash()`` of str is salted per process; this is not, so runs are reproducible.
    """
    z = (parent * 0x9E3779B97F4A7C15 + key + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def engine_block_hashes(
    prompt_tokens: int,
    block_size: int,
    *,
    hash_ids: "np.ndarray | list[int] | None" = None,
    hash_block_size: int | None = None,
    token_ids: "np.ndarray | list[int] | None" = None,
    unique_key: int = 0,
) -> list[int]:
    """Chained hashes of the *full* engine blocks of a prompt (vLLM hashes only full blocks).

    - With ``token_ids``: block i's key is its ``block_size`` token ids (exactly like vLLM).
    - With ``hash_ids`` of ``hash_block_size``-token source blocks: an engine block's key is the
      (source-block id, offset) pieces it spans, so a 512-token source block becomes 32 engine
      blocks and two prompts sharing the first k source ids share the first 32k engine hashes.
      Tokens beyond what ``hash_ids`` cover get keys unique to the request (``unique_key``).
    - With neither: every block is unique to the request (no reuse possible).
    """
    n_full = prompt_tokens // block_size
    out: list[int] = []
    parent = _NONE_HASH
    if token_ids is not None:
        toks = np.asarray(token_ids, dtype=np.int64)
        for i in range(min(n_full, len(toks) // block_size)):
            key = hash(tuple(toks[i * block_size : (i + 1) * block_size].tolist())) & _MASK64
            parent = _mix(parent, key)
            out.append(parent)
        start = len(out)
    elif hash_ids is not None and hash_block_size:
        ids = np.asarray(hash_ids, dtype=np.int64)
        covered = len(ids) * hash_block_size
        start = n_full
        for i in range(n_full):
            a = i * block_size
            b = a + block_size
            if b > covered:
                start = i
                break
            s0 = a // hash_block_size
            s1 = (b - 1) // hash_block_size
            key = _mix(int(ids[s0]) & _MASK64, a - s0 * hash_block_size)
            for s in range(s0 + 1, s1 + 1):
                key = _mix(key, int(ids[s]) & _MASK64)
            parent = _mix(parent, key)
            out.append(parent)
    else:
        start = 0
    # The unshared tail: unique to this request.
    ukey = _mix(0xA5A5A5A5, unique_key & _MASK64)
    for i in range(start, n_full):
        parent = _mix(parent, _mix(ukey, i))
        out.append(parent)
    return out


@dataclass
class Workload:
    """A request table plus the metadata needed to interpret it."""

    df: pd.DataFrame
    name: str = "workload"
    hash_block_size: int | None = None  # tokens per source block of ``hash_ids``
    source: str = ""  # file path or built-in name it came from
    notes: list[str] = field(default_factory=list)  # e.g. "capped 12 prompts to 131072 tokens"

    def __post_init__(self) -> None:
        missing = [c for c in REQUIRED_COLUMNS if c not in self.df.columns]
        if missing:
            from sim.errors import TraceError

            raise TraceError(f"{self.source or self.name}: workload is missing column(s) {missing}")

    def __len__(self) -> int:
        return len(self.df)

    @property
    def duration_s(self) -> float:
        if len(self.df) == 0:
            return 0.0
        return float(self.df["arrival_s"].iloc[-1] - self.df["arrival_s"].iloc[0])

    def has(self, column: str) -> bool:
        return column in self.df.columns and not self.df[column].isna().all()

    def block_hashes(self, i: int, block_size: int) -> list[int]:
        """Engine block hashes for request row ``i`` (see :func:`engine_block_hashes`)."""
        row = self.df.iloc[i]
        kwargs: dict = {}
        if "token_ids" in self.df.columns and row["token_ids"] is not None and not _isnan(row["token_ids"]):
            kwargs["token_ids"] = row["token_ids"]
        elif "hash_ids" in self.df.columns and row["hash_ids"] is not None and not _isnan(row["hash_ids"]):
            kwargs["hash_ids"] = row["hash_ids"]
            kwargs["hash_block_size"] = self.hash_block_size
        return engine_block_hashes(int(row["prompt_tokens"]), block_size, unique_key=i, **kwargs)

    def all_block_hashes(self, block_size: int) -> list[list[int]]:
        """Engine block hashes for every request (computed once per run, never per step)."""
        n = len(self.df)
        pt = self.df["prompt_tokens"].to_numpy()
        tok = self.df["token_ids"].to_numpy() if self.has("token_ids") else None
        hid = self.df["hash_ids"].to_numpy() if self.has("hash_ids") else None
        out = []
        for i in range(n):
            kw: dict = {}
            if tok is not None and _present(tok[i]):
                kw["token_ids"] = tok[i]
            elif hid is not None and _present(hid[i]):
                kw["hash_ids"] = hid[i]
                kw["hash_block_size"] = self.hash_block_size
            out.append(engine_block_hashes(int(pt[i]), block_size, unique_key=i, **kw))
        return out


def _present(v) -> bool:
    return v is not None and not _isnan(v)


def _isnan(v) -> bool:
    return isinstance(v, float) and v != v
