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
    ``token_ids`` (list<int64>: the full prompt token ids, when the trace has them),
    ``parent_request_id`` (str) and ``think_time_s`` (float64): for multi-turn sessions, the
    request whose *completion* this one follows and the user's think time after it. The engine
    replays arrivals open-loop today; these two columns are what a closed-loop replay needs
    (release this request ``think_time_s`` after its parent finishes). A parent missing from
    the table (cut by a window) means "replay open-loop".

The engine never sees source-block ids directly: :func:`engine_block_hashes` turns either form of
prefix identity into vLLM-style chained hashes over ``block_size``-token engine blocks (16 by
default), deterministically, so that shared source blocks stay shared and the unshared tail of a
prompt stays unique to its request.

Storage (what the loaders in :mod:`traces.formats` produce, see :func:`normalize_frame`):
numeric columns are numpy-backed (``float64`` / ``int64``; ``turn`` and ``priority`` are the
nullable ``Int64``), text columns use pandas' Arrow-backed ``str`` dtype, and the list columns
use ``pd.ArrowDtype(pa.list_(pa.int64()))`` so a 10M-row trace holds no Python object per row.
A missing list entry is ``pd.NA``; element access gives a Python list, ``.to_numpy()`` gives
numpy arrays. :meth:`Workload.list_csr` exposes a list column as flat numpy ``(offsets, values)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

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
    "parent_request_id",
    "think_time_s",
)
STRING_COLUMNS = ("request_id", "session_id", "tenant", "slo_class", "model", "parent_request_id")
NULLABLE_INT_COLUMNS = ("turn", "priority")
FLOAT_COLUMNS = ("think_time_s",)
LIST_COLUMNS = ("hash_ids", "token_ids")
LIST_DTYPE = pd.ArrowDtype(pa.list_(pa.int64()))

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

    def list_csr(self, column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A list column as numpy ``(offsets, values, present)``; row i is
        ``values[offsets[i]:offsets[i+1]]`` (empty where ``present[i]`` is False)."""
        return list_column_csr(self.df[column])

    def block_hashes(self, i: int, block_size: int) -> list[int]:
        """Engine block hashes for request row ``i`` (see :func:`engine_block_hashes`)."""
        row = self.df.iloc[i]
        kwargs: dict = {}
        if "token_ids" in self.df.columns and _present(row["token_ids"]):
            kwargs["token_ids"] = row["token_ids"]
        elif "hash_ids" in self.df.columns and _present(row["hash_ids"]):
            kwargs["hash_ids"] = row["hash_ids"]
            kwargs["hash_block_size"] = self.hash_block_size
        return engine_block_hashes(int(row["prompt_tokens"]), block_size, unique_key=i, **kwargs)

    def block_hashes_csr(self, block_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Engine block hashes of every request as CSR ``(offsets, uint64 values)``, vectorised.

        Bit-identical to calling :meth:`block_hashes` per row, ~50x faster; what an engine
        should precompute once per run.
        """
        from traces import hashing

        kw: dict = {}
        if self.has("token_ids") and hashing.TUPLE_HASH_OK:
            off, val, present = self.list_csr("token_ids")
            if val.size and val.min() < 0:
                return self._block_hashes_csr_scalar(block_size)
            kw["token_ids"], kw["token_present"] = (off, val), present
        elif self.has("token_ids"):
            return self._block_hashes_csr_scalar(block_size)
        if self.has("hash_ids") and self.hash_block_size:
            off, val, present = self.list_csr("hash_ids")
            kw["hash_ids"], kw["hash_present"] = (off, val), present
            kw["hash_block_size"] = self.hash_block_size
        return hashing.engine_block_hashes_csr(self.df["prompt_tokens"].to_numpy(np.int64), block_size, **kw)

    def _block_hashes_csr_scalar(self, block_size: int) -> tuple[np.ndarray, np.ndarray]:
        lists = [self.block_hashes(i, block_size) for i in range(len(self.df))]
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in lists], out=offsets[1:])
        vals = np.array([v for x in lists for v in x], dtype=np.uint64)
        return offsets, vals

    def all_block_hashes(self, block_size: int) -> list[list[int]]:
        """Engine block hashes for every request (computed once per run, never per step)."""
        off, val = self.block_hashes_csr(block_size)
        flat = val.tolist()
        return [flat[off[i] : off[i + 1]] for i in range(len(off) - 1)]


def list_column_csr(col: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten a list column (Arrow-backed or object of arrays) into numpy CSR without a
    Python object per row when it is Arrow-backed."""
    n = len(col)
    if isinstance(col.dtype, pd.ArrowDtype):
        arr = pa.chunked_array(col.array._pa_array).combine_chunks()  # type: ignore[attr-defined]
        if isinstance(arr, pa.ChunkedArray):  # pragma: no cover - older pyarrow
            arr = arr.combine_chunks()
        present = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        lens = np.asarray(pa.compute.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
        flat = arr.flatten()  # skips null rows' (empty) slots, respects slicing offsets
        values = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.int64)
    else:
        items = col.to_numpy()
        present = np.array([_present(v) for v in items], dtype=bool)
        lens = np.array([len(v) if p else 0 for v, p in zip(items, present)], dtype=np.int64)
        values = (
            np.concatenate([np.asarray(v, dtype=np.int64) for v, p in zip(items, present) if p and len(v)])
            if lens.sum()
            else np.zeros(0, dtype=np.int64)
        )
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return offsets, values, present


def csr_to_list_array(offsets: np.ndarray, values: np.ndarray, present: np.ndarray | None = None) -> pd.arrays.ArrowExtensionArray:
    """numpy CSR -> Arrow-backed list column (no Python object per row)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    mask = None if present is None else pa.array(~np.asarray(present, dtype=bool))
    arr = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(np.asarray(values, dtype=np.int64)), mask=mask)
    arr = arr.cast(pa.list_(pa.int64()))
    return pd.arrays.ArrowExtensionArray(arr)


def normalize_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Cast the known columns to their storage dtypes (see module docstring) and order them.

    Unknown columns are kept after the known ones (loaders add none; users' Parquet may).
    """
    out = {}
    out["arrival_s"] = df["arrival_s"].astype("float64")
    out["prompt_tokens"] = df["prompt_tokens"].astype("int64")
    out["output_tokens"] = df["output_tokens"].astype("int64")
    for c in OPTIONAL_COLUMNS:
        if c not in df.columns:
            continue
        col = df[c]
        if c in STRING_COLUMNS:
            out[c] = col.astype("str") if col.dtype != "str" else col
            out[c] = out[c].where(col.notna(), np.nan)
        elif c in NULLABLE_INT_COLUMNS:
            out[c] = col.astype("Int64")
        elif c in FLOAT_COLUMNS:
            out[c] = col.astype("float64")
        else:
            out[c] = col if col.dtype == LIST_DTYPE else _to_list_series(col)
    for c in df.columns:
        if c not in out:
            out[c] = df[c]
    return pd.DataFrame(out, copy=False).reset_index(drop=True)


def _to_list_series(col: pd.Series) -> pd.Series:
    if isinstance(col.dtype, pd.ArrowDtype):
        return col.astype(LIST_DTYPE)
    items = [None if not _present(v) else np.asarray(v, dtype=np.int64) for v in col.to_numpy()]
    return pd.Series(pa.array(items, type=pa.list_(pa.int64())), dtype=LIST_DTYPE, index=col.index)


def _present(v) -> bool:
    return v is not None and v is not pd.NA and not _isnan(v)


def _isnan(v) -> bool:
    return (isinstance(v, float) and v != v) or v is pd.NA
