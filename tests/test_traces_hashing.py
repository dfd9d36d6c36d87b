"""Prefix identity -> engine block hashes: sharing semantics and the vectorised implementation."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sim  # noqa: F401  (import order: see traces/__init__.py)
from traces.hashing import TUPLE_HASH_OK, chain_ragged, engine_block_hashes_csr, tuple_hash_rows
from traces.schema import LIST_DTYPE, Workload, engine_block_hashes, list_column_csr, normalize_frame
from traces.stats import prefix_reuse, reusable_fraction


def test_mooncake_block_becomes_32_engine_blocks_and_shared_ids_share_hashes():
    a = engine_block_hashes(1024, 16, hash_ids=[7, 8], hash_block_size=512, unique_key=1)
    b = engine_block_hashes(1024, 16, hash_ids=[7, 9], hash_block_size=512, unique_key=2)
    assert len(a) == len(b) == 64
    assert a[:32] == b[:32]  # one shared 512-token block = 32 shared engine blocks
    assert not set(a[32:]) & set(b[32:])  # the rest diverges (chained)


def test_unshared_tail_stays_unique_and_deterministic():
    # both cover 512 tokens with the same id, but prompts are 600 tokens: the tail is unknown
    a = engine_block_hashes(600, 16, hash_ids=[7], hash_block_size=512, unique_key=1)
    b = engine_block_hashes(600, 16, hash_ids=[7], hash_block_size=512, unique_key=2)
    assert len(a) == 37  # only full blocks are hashed
    assert a[:32] == b[:32]
    assert not set(a[32:]) & set(b[32:])
    assert a == engine_block_hashes(600, 16, hash_ids=[7], hash_block_size=512, unique_key=1)


def test_token_ids_hash_like_vllm_blocks():
    toks = list(range(40))
    a = engine_block_hashes(40, 16, token_ids=toks, unique_key=1)
    b = engine_block_hashes(40, 16, token_ids=toks[:32] + [999] * 8, unique_key=2)
    assert len(a) == 2 and a == b  # 2 full blocks identical; the partial block is not hashed
    c = engine_block_hashes(40, 16, token_ids=[5] + toks[1:], unique_key=1)
    assert not set(a) & set(c)


def test_cpython_tuple_hash_replica():
    assert TUPLE_HASH_OK
    rows = np.random.default_rng(3).integers(0, 200_000, size=(50, 16))
    assert [int(x) for x in tuple_hash_rows(rows)] == [hash(tuple(r.tolist())) & (2**64 - 1) for r in rows]


def _workload(prompts, ids=None, hbs=None, toks=None):
    d = {"arrival_s": np.arange(len(prompts), dtype=float), "prompt_tokens": prompts, "output_tokens": [1] * len(prompts)}
    if ids is not None:
        d["hash_ids"] = pd.Series(pa.array(ids, type=pa.list_(pa.int64())), dtype=LIST_DTYPE)
    if toks is not None:
        d["token_ids"] = pd.Series(pa.array(toks, type=pa.list_(pa.int64())), dtype=LIST_DTYPE)
    return Workload(normalize_frame(pd.DataFrame(d)), hash_block_size=hbs)


@st.composite
def _hash_workloads(draw):
    hbs = draw(st.sampled_from([4, 16, 48, 512]))
    bs = draw(st.sampled_from([3, 16, 32, 100]))
    n = draw(st.integers(1, 8))
    base = draw(st.lists(st.integers(0, 5), min_size=0, max_size=6))
    prompts, ids = [], []
    for _ in range(n):
        k = draw(st.integers(0, len(base)))
        tail = draw(st.lists(st.integers(6, 50), max_size=4))
        row = base[:k] + tail
        present = draw(st.integers(0, 4)) > 0
        ids.append(row if present else None)
        prompts.append(draw(st.integers(1, (len(row) + 2) * hbs)))
    return prompts, ids, hbs, bs


@settings(max_examples=60, deadline=None)
@given(_hash_workloads())
def test_vectorised_equals_scalar_for_hash_ids(case):
    prompts, ids, hbs, bs = case
    w = _workload(prompts, ids=ids, hbs=hbs)
    off, val = w.block_hashes_csr(bs)
    for i, p in enumerate(prompts):
        ref = engine_block_hashes(p, bs, hash_ids=ids[i], hash_block_size=hbs, unique_key=i)
        assert val[off[i] : off[i + 1]].tolist() == ref
        assert w.block_hashes(i, bs) == ref
    assert w.all_block_hashes(bs) == [w.block_hashes(i, bs) for i in range(len(prompts))]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 80), st.integers(0, 80)), min_size=1, max_size=6), st.sampled_from([4, 16]))
def test_vectorised_equals_scalar_for_token_ids(rows, bs):
    rng = np.random.default_rng(len(rows))
    prompts = [p for p, _ in rows]
    toks = [rng.integers(0, 30, size=n).tolist() for _, n in rows]
    w = _workload(prompts, toks=toks)
    off, val = w.block_hashes_csr(bs)
    for i, p in enumerate(prompts):
        assert val[off[i] : off[i + 1]].tolist() == engine_block_hashes(p, bs, token_ids=toks[i], unique_key=i)


def test_missing_prefix_identity_rows_are_unique():
    w = _workload([64, 64], ids=[[1, 2, 3, 4], None], hbs=16)
    off, val = w.block_hashes_csr(16)
    assert val[:4].tolist() == engine_block_hashes(64, 16, hash_ids=[1, 2, 3, 4], hash_block_size=16, unique_key=0)
    assert val[4:].tolist() == engine_block_hashes(64, 16, unique_key=1)


def test_chain_ragged_matches_sequential_mix():
    from traces.schema import _mix

    off = np.array([0, 3, 3, 5])
    keys = np.array([5, 6, 7, 5, 6], dtype=np.uint64)
    out = chain_ragged(keys, off, 11)
    h = _mix(_mix(_mix(11, 5), 6), 7)
    assert int(out[2]) == h and int(out[4]) == _mix(_mix(11, 5), 6) == int(out[1])


def test_reuse_counts_only_prefixes_seen_in_earlier_requests():
    # r0: A B ; r1: A C ; r2: X B  (B after X is a different prefix: not reusable)
    w = _workload([32, 32, 32], ids=[[1, 2], [1, 3], [9, 2]], hbs=16)
    r = prefix_reuse(w)
    assert (r["blocks_reusable"], r["blocks_total"]) == (1, 6)
    assert reusable_fraction(np.array([0, 2, 4]), np.array([1, 2, 1, 2], dtype=np.uint64)) == (2, 4)


def test_list_csr_handles_missing_and_slices():
    w = _workload([16, 16, 16], ids=[[1], None, [2, 3]], hbs=16)
    off, val, present = list_column_csr(w.df["hash_ids"].iloc[1:])
    assert off.tolist() == [0, 0, 2] and val.tolist() == [2, 3] and present.tolist() == [False, True]


@pytest.mark.parametrize("bs", [16, 512])
def test_engine_hash_csr_shapes(bs):
    off, val = engine_block_hashes_csr(np.array([1000, 15, 16]), bs)
    assert np.diff(off).tolist() == [1000 // bs, 15 // bs, 16 // bs]


def test_chunked_key_computation_matches_scalar(monkeypatch):
    import traces.hashing as h

    monkeypatch.setattr(h, "_CHUNK", 7)  # force many chunks, including ones splitting nothing
    prompts = [100, 0 + 16, 600, 33, 1024, 5]
    ids = [[1, 2], [1], [1, 2, 3], None, [4, 5, 6, 7, 8, 9, 10, 11], [1]]
    w = _workload(prompts, ids=ids, hbs=64)
    off, val = w.block_hashes_csr(16)
    for i, p in enumerate(prompts):
        assert val[off[i] : off[i + 1]].tolist() == engine_block_hashes(p, 16, hash_ids=ids[i], hash_block_size=64, unique_key=i)
