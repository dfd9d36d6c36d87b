"""Building and re-mapping prefix identity (``hash_ids``) for traces that do not ship it.

Conventions (the same as Mooncake's): a prompt of ``n`` tokens gets ``ceil(n / block_size)``
source-block ids; block ``j`` covers tokens ``[j*bs, (j+1)*bs)``; two prompts whose first ``k``
ids are equal have equal first ``k*bs`` tokens. Ids are *prefix* identities: the same content
after a different prefix gets a different id, so equal ids never appear at different depths.

Why a module: synthetic shared system prompts, multi-turn sessions (LMBench, ShareGPT, the
synthetic generator, ``session_prefix``), merging workloads and changing block sizes all need
the same careful bookkeeping of which blocks are shared and which straddle a boundary.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from traces.schema import Workload, csr_to_list_array, list_column_csr


def n_blocks(tokens: int, block_size: int) -> int:
    return -(-int(tokens) // int(block_size))


class BlockIdAllocator:
    """Hands out source-block ids; shared prefixes are remembered by key, the rest is fresh."""

    def __init__(self, block_size: int, start: int = 0):
        self.block_size = int(block_size)
        self.next_id = int(start)
        self._prefix: dict = {}

    def fresh(self, n: int) -> np.ndarray:
        ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
        self.next_id += n
        return ids

    def shared_prefix(self, key, tokens: int, parent: tuple | None = None) -> np.ndarray:
        """Ids of the blocks lying *fully* inside a shared prefix of ``tokens`` tokens.

        ``parent=(parent_key, parent_tokens)`` nests prefixes (tenant prefix -> system prompt):
        the blocks fully inside the parent are the parent's ids, the rest are new for ``key``.
        A block straddling the end of the prefix is not shared (its content depends on what
        follows) and is therefore not returned.
        """
        if key in self._prefix:
            return self._prefix[key]
        full = int(tokens) // self.block_size
        if parent is not None:
            head = self.shared_prefix(parent[0], parent[1])[:full]
        else:
            head = np.zeros(0, dtype=np.int64)
        ids = np.concatenate([head, self.fresh(full - len(head))])
        self._prefix[key] = ids
        return ids


class SessionStreams:
    """Per-session append-only token streams: turn k's prompt is a prefix of its session's stream.

    In a chat, turn k's prompt = turn k-1's prompt + its answer + the new user message, so every
    prompt of a session is a prefix of one growing stream; block ``j`` of the stream has one id
    for the whole session. Blocks inside the session's shared head (e.g. a system prompt shared
    across sessions) use the head's ids.
    """

    def __init__(self, alloc: BlockIdAllocator):
        self.alloc = alloc
        self._streams: dict = {}

    def prompt_ids(self, session, prompt_tokens: int, head: np.ndarray | None = None) -> np.ndarray:
        ids = self._streams.get(session)
        if ids is None:
            ids = head.copy() if head is not None else np.zeros(0, dtype=np.int64)
        need = n_blocks(prompt_tokens, self.alloc.block_size)
        if need > len(ids):
            ids = np.concatenate([ids, self.alloc.fresh(need - len(ids))])
        self._streams[session] = ids
        return ids[:need]


def unique_prompt_ids(alloc: BlockIdAllocator, prompt_tokens: int, head: np.ndarray | None = None) -> np.ndarray:
    """Ids of a prompt = shared head (if any) + fresh ids for everything after it."""
    need = n_blocks(prompt_tokens, alloc.block_size)
    h = head[:need] if head is not None else np.zeros(0, dtype=np.int64)
    return np.concatenate([h, alloc.fresh(need - len(h))])


def ids_to_column(per_request: list[np.ndarray]) -> pd.Series:
    """A list of per-request id arrays -> Arrow-backed ``hash_ids`` column."""
    lens = np.array([len(x) for x in per_request], dtype=np.int64)
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    values = np.concatenate(per_request) if len(per_request) and lens.sum() else np.zeros(0, dtype=np.int64)
    return pd.Series(csr_to_list_array(offsets, values))


def session_prefix_ids(
    df: pd.DataFrame, block_size: int, *, head_tokens: int = 0, start_id: int = 0
) -> pd.Series:
    """``hash_ids`` for a sessioned table whose prompts grow turn by turn (see SessionStreams).

    ``df`` must be in arrival order with ``session_id`` and ``prompt_tokens``; rows without a
    session get unique ids. ``head_tokens`` tokens at the start of every session are shared by
    all sessions (a common system prompt).
    """
    alloc = BlockIdAllocator(block_size, start=start_id)
    streams = SessionStreams(alloc)
    head = alloc.shared_prefix("head", head_tokens) if head_tokens else None
    sess = df["session_id"].to_numpy() if "session_id" in df.columns else np.full(len(df), None)
    prompts = df["prompt_tokens"].to_numpy(np.int64)
    out = []
    for s, p in zip(sess, prompts):
        if s is None or (isinstance(s, float) and s != s) or s is pd.NA:
            out.append(unique_prompt_ids(alloc, int(p), head))
        else:
            out.append(streams.prompt_ids(s, int(p), head))
    return ids_to_column(out)


def reblock(w: Workload, new_block_size: int) -> Workload:
    """Express ``hash_ids`` in smaller blocks: a ``B``-token block id ``x`` becomes the ``B/b``
    ids ``x*(B/b) + i``; exact, because equal big blocks have equal sub-blocks.

    The last (partial) big block contributes only the sub-blocks the prompt reaches.
    """
    old = w.hash_block_size
    if not w.has("hash_ids") or old == new_block_size:
        return w
    if old % new_block_size:
        raise ValueError(f"cannot re-block {old}-token hash blocks into {new_block_size}-token blocks")
    f = old // new_block_size
    off, val, present = list_column_csr(w.df["hash_ids"])
    lens = np.diff(off)
    prompts = w.df["prompt_tokens"].to_numpy(np.int64)
    new_lens = np.where(present, np.minimum(lens * f, -(-prompts // new_block_size)), 0)
    new_off = np.zeros(len(new_lens) + 1, dtype=np.int64)
    np.cumsum(new_lens, out=new_off[1:])
    rows = np.repeat(np.arange(len(new_lens)), new_lens)
    pos = np.arange(new_off[-1]) - new_off[rows]
    src = val[off[:-1][rows] + pos // f]
    new_val = src * f + pos % f
    df = w.df.copy()
    df["hash_ids"] = pd.Series(csr_to_list_array(new_off, new_val, present), index=df.index)
    out = Workload(df, name=w.name, hash_block_size=new_block_size, source=w.source, notes=list(w.notes))
    return out


def offset_ids(w: Workload, offset: int) -> Workload:
    """Shift all ``hash_ids`` by ``offset`` (to keep id spaces of merged workloads disjoint)."""
    if not w.has("hash_ids") or offset == 0:
        return w
    off, val, present = list_column_csr(w.df["hash_ids"])
    df = w.df.copy()
    df["hash_ids"] = pd.Series(csr_to_list_array(off, val + offset, present), index=df.index)
    return Workload(df, name=w.name, hash_block_size=w.hash_block_size, source=w.source, notes=list(w.notes))


def max_id(w: Workload) -> int:
    if not w.has("hash_ids"):
        return -1
    _, val, _ = list_column_csr(w.df["hash_ids"])
    return int(val.max()) if val.size else -1


def densify_ids(w: Workload) -> Workload:
    """Renumber ``hash_ids`` to 0..K-1 (order of first appearance is not kept; identity is).

    Real traces may carry 64-bit hash values; dense ids make offsets and re-blocking safe.
    """
    if not w.has("hash_ids"):
        return w
    off, val, present = list_column_csr(w.df["hash_ids"])
    _, inv = np.unique(val, return_inverse=True)
    df = w.df.copy()
    df["hash_ids"] = pd.Series(csr_to_list_array(off, inv.astype(np.int64), present), index=df.index)
    return Workload(df, name=w.name, hash_block_size=w.hash_block_size, source=w.source, notes=list(w.notes))


def link_sessions(df: pd.DataFrame) -> pd.DataFrame:
    """Set ``parent_request_id`` = the previous request of the same session (arrival order).

    Creates ``request_id`` (``"<row>"``) when the table has none. Rows outside sessions and
    first turns get no parent. Returns a new frame.
    """
    out = df.copy()
    if "request_id" not in out.columns:
        out["request_id"] = pd.Series(np.arange(len(out)).astype(str), index=out.index, dtype="str")
    if "session_id" in out.columns:
        prev = out.groupby("session_id", sort=False, dropna=True)["request_id"].shift(1)
        out["parent_request_id"] = prev.where(out["session_id"].notna(), np.nan)
    return out


def token_ids_to_hash_ids(w: Workload, block_size: int = 16) -> Workload:
    """Replace ``token_ids`` by content ``hash_ids`` of ``block_size``-token blocks.

    Block j's id identifies the prefix up to and including block j (chained hash of the token
    blocks, then renumbered densely), so sharing is exactly what the token ids imply. A
    trailing partial block, and blocks beyond the given token ids, get ids of their own.
    Used when merging workloads, so the result carries one kind of prefix identity.
    """
    from traces.hashing import chain_ragged, tuple_hash_rows

    if not w.has("token_ids"):
        return w
    off, val, present = list_column_csr(w.df["token_ids"])
    prompts = w.df["prompt_tokens"].to_numpy(np.int64)
    n = len(prompts)
    full = np.where(present, np.minimum(np.diff(off), prompts) // block_size, 0)
    total_blocks = -(-prompts // block_size)
    f_off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(full, out=f_off[1:])
    rows = np.repeat(np.arange(n), full)
    pos = np.arange(f_off[-1]) - f_off[rows]
    gather = (off[:-1][rows] + pos * block_size)[:, None] + np.arange(block_size)[None, :]
    keys = tuple_hash_rows(val[gather]) if len(rows) else np.zeros(0, dtype=np.uint64)
    chained = chain_ragged(keys, f_off, 0x3C6EF372FE94F82B)
    _, dense = np.unique(chained, return_inverse=True)
    next_id = int(dense.max()) + 1 if dense.size else 0
    per = []
    for i in range(n):
        known = dense[f_off[i] : f_off[i + 1]].astype(np.int64)
        extra = int(total_blocks[i] - len(known))
        per.append(np.concatenate([known, np.arange(next_id, next_id + extra, dtype=np.int64)]))
        next_id += extra
    df = w.df.drop(columns=["token_ids"])
    col = ids_to_column(per)
    col.index = df.index
    df["hash_ids"] = col
    return Workload(df, name=w.name, hash_block_size=block_size, source=w.source,
                    notes=[*w.notes, f"token ids converted to {block_size}-token hash_ids"])
