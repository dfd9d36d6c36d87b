"""Cluster mode without vLLM: fleetsim's router objects driving fake OpenAI-compatible servers.

Two in-process fake servers stream tokens and export ``/metrics`` gauges of their own; the client
routes with ``policies.registry.make_router`` objects through :class:`RealReplicaView`s.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import numpy as np
import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

from policies.base import ReplicaView, RoutingRequest  # noqa: E402
from policies.registry import make_router  # noqa: E402
from validation.real_cluster import (ClusterPlan, RealReplicaView, ranking, replay_cluster,  # noqa: E402
                                     routing_requests)
from validation.replay import ReplayRequest  # noqa: E402


def _fake_app(running: float, seen: list) -> web.Application:
    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body["prompt"][:3])
        if body["prompt"][0] == 1:
            return web.json_response({"error": {"message": "boom"}}, status=500)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(body["max_tokens"]):
            chunk = {"choices": [{"index": 0, "text": "", "token_ids": [7], "finish_reason": None}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await asyncio.sleep(0.002)
        usage = {"choices": [], "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"],
                                          "prompt_tokens_details": {"cached_tokens": 0}}}
        await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=f'vllm:num_requests_running{{engine="0"}} {running}\n'
                                 f'vllm:num_requests_waiting{{engine="0"}} 2.0\n'
                                 f'vllm:kv_cache_usage_perc{{engine="0"}} 0.25\n')

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/metrics", metrics)
    return app


@pytest.fixture(scope="module")
def two_servers():
    loop = asyncio.new_event_loop()
    urls, seen, runners = [], [[], []], []
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    started = threading.Event()

    def serve():
        asyncio.set_event_loop(loop)
        for k, port in enumerate(ports):
            runner = web.AppRunner(_fake_app(3.0 + k, seen[k]))
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
            runners.append(runner)
        started.set()
        loop.run_forever()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    assert started.wait(10)
    yield [f"http://127.0.0.1:{p}" for p in ports], seen
    loop.call_soon_threadsafe(loop.stop)
    th.join(5)


def _views(urls):
    return [RealReplicaView(k, u, num_total_blocks=64, block_size=4) for k, u in enumerate(urls)]


def _requests(n: int, prefixes: list[list[int]]):
    reqs, routing = [], []
    for i in range(n):
        pre = prefixes[i % len(prefixes)]
        prompt = pre + [100 + i] * 3
        reqs.append(ReplayRequest(f"r{i}", 0.005 * i, prompt, 3))
        hashes = [hash(tuple(pre[: 4 * (b + 1)])) for b in range(len(pre) // 4)]
        routing.append(RoutingRequest(request_id=i, arrival_s=0.005 * i, prompt_tokens=len(prompt), output_tokens=3,
                                      block_hashes=hashes))
    return reqs, routing


def test_view_is_a_replica_view_and_tracks_what_was_sent():
    v = RealReplicaView(0, "http://x", num_total_blocks=3, block_size=16)
    assert isinstance(v, ReplicaView)
    v.update_metrics({"vllm:num_requests_running": 5.0, "vllm:kv_cache_usage_perc": 0.5}, 1.0)
    assert (v.num_running, v.num_waiting, v.kv_usage, v.num_free_blocks) == (5, 0, 0.5, 2)
    v.on_sent([11, 12], 100)
    assert v.cached_prefix_blocks([11, 12, 13]) == 2 and v.inflight_requests == 1 and v.inflight_tokens == 100
    v.on_sent([21, 22], 50)  # LRU of 3 blocks: the older chain's tail goes first
    assert v.cached_prefix_blocks([11, 12]) == 1 and v.cached_prefix_blocks([21, 22]) == 2
    v.on_done(100)
    v.on_done(50)
    assert v.inflight_requests == 0 and v.inflight_tokens == 0


def test_round_robin_alternates_and_every_request_has_a_row(two_servers):
    urls, seen = two_servers
    views = _views(urls)
    reqs, routing = _requests(6, [[5] * 8])
    reqs.append(ReplayRequest("bad", 0.04, [1, 2, 3], 2))  # the fake answers HTTP 500
    routing.append(RoutingRequest(request_id=6, arrival_s=0.04, prompt_tokens=3, output_tokens=2))
    r = replay_cluster(views, reqs, routing, make_router("round-robin"), model="m", scrape_period_s=0.05)
    df = r.requests
    assert df["replica"].tolist() == [0, 1, 0, 1, 0, 1, 0]
    assert (df["status"] == "ok").sum() == 6 and df.iloc[-1]["status"] == "error"
    assert all(v.inflight_requests == 0 and v.inflight_tokens == 0 for v in views)
    # gauges were scraped into the views (server k reports 3 + k running)
    assert [v.num_running for v in views] == [3, 4] and views[0].kv_usage == 0.25
    assert set(r.metrics["replica"]) == {0, 1} and r.overhead["scrape_errors"] == 0


def test_prefix_aware_keeps_a_prefix_on_one_server(two_servers):
    urls, _ = two_servers
    views = _views(urls)
    a, b = [5] * 8, [6] * 8
    reqs, routing = _requests(8, [a, b])
    router = make_router("prefix-aware")
    r = replay_cluster(views, reqs, routing, router, model="m", scrape_period_s=0.05)
    rep = r.requests["replica"].to_numpy()
    assert len(set(rep[0::2])) == 1 and len(set(rep[1::2])) == 1  # each prefix stays where it went first
    assert (r.requests["status"] == "ok").all()


def test_routing_requests_match_the_simulator_hashes():
    """The real cluster hands the router the same prompt hashes the simulator's cluster does."""
    plan = ClusterPlan.quick(2, ["round-robin"])
    plan.requests = 12
    w = plan.workload()
    rr = routing_requests(w, 32)
    assert len(rr) == 12
    assert all(len(r.block_hashes) == r.prompt_tokens // 32 for r in rr)
    # requests with the same system prompt share their leading 20 blocks (640 tokens / 32)
    by_first = {}
    for r in rr:
        by_first.setdefault(r.block_hashes[0], []).append(r)
    shared = [g for g in by_first.values() if len(g) > 1]
    assert shared and all(g[0].block_hashes[:20] == g[1].block_hashes[:20] for g in shared)
    from sim.kv_cache import PromptBlockHashes

    ph = PromptBlockHashes(w, 32)
    for i, r in enumerate(rr):
        assert list(ph(i)[0][: len(r.block_hashes)]) == list(r.block_hashes)


def test_ranking_orders_best_first():
    assert ranking({"a": 0.3, "b": 0.1}) == ["b", "a"]
    assert ranking({"a": 0.3, "b": 0.1}, higher_is_better=True) == ["a", "b"]
    assert np.isfinite(ClusterPlan.quick(2, ["round-robin"]).rate_per_s)
