"""The replay client against a fake OpenAI-compatible streaming server (no vLLM needed).

The fake server behaves like vLLM with ``--skip-tokenizer-init`` (one SSE chunk per token, text
empty, ``token_ids`` when asked) and misbehaves on request: HTTP errors, a hang (timeout), a
connection cut mid-stream. Every request must come back as a row with a status; none dropped.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import numpy as np
import pandas as pd
import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

from validation.replay import ReplayRequest, replay  # noqa: E402

TOKEN_GAP_S = 0.002


async def _completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    assert body["stream"] is True and body["ignore_eos"] is True
    assert body["max_tokens"] == body["min_tokens"]
    mode = body["prompt"][0]
    n = body["max_tokens"]
    if mode == 1:
        return web.json_response({"error": {"message": "boom"}}, status=500)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    if mode == 2:  # hang: never send a token
        await asyncio.sleep(30)
    for i in range(n):
        if mode == 3 and i == 2:  # cut the connection after two tokens
            request.transport.close()
            return resp
        chunk = {"choices": [{"index": 0, "text": "", "token_ids": [7], "finish_reason": None}]}
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await asyncio.sleep(TOKEN_GAP_S)
    usage = {"choices": [], "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": n,
                                      "prompt_tokens_details": {"cached_tokens": 32}}}
    await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    return resp


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(text='vllm:num_requests_running{engine="0"} 1.0\nvllm:num_preemptions_total{engine="0"} 0.0\n')


@pytest.fixture(scope="module")
def fake_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/metrics", _metrics)
    runner = web.AppRunner(app)
    started = threading.Event()

    def serve():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        started.set()
        loop.run_forever()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    assert started.wait(10)
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    th.join(5)


def test_replay_records_every_request_with_status(fake_server):
    reqs = [
        ReplayRequest("ok-a", 0.00, [0] + [5] * 40, 5),
        ReplayRequest("http-500", 0.02, [1, 5, 5], 4),
        ReplayRequest("hang", 0.04, [2, 5], 3),
        ReplayRequest("cut", 0.06, [3, 5], 6),
        ReplayRequest("ok-b", 0.10, [0, 9], 8),
    ]
    t = time.monotonic()
    r = replay(fake_server, reqs, model="m", timeout_s=1.0, metrics_interval_s=0.1)
    assert time.monotonic() - t < 10
    df = r.requests.set_index("request_id")
    assert list(df.index) == [q.request_id for q in reqs]  # nothing dropped, order kept
    assert df.loc["ok-a", "status"] == "ok" and df.loc["ok-b", "status"] == "ok"
    assert df.loc["ok-b", "tokens_received"] == 8 and df.loc["ok-a", "cached_tokens"] == 32
    assert df.loc["http-500", "status"] == "error" and "HTTP 500" in df.loc["http-500", "reason"]
    assert df.loc["hang", "status"] == "timeout"
    assert df.loc["cut", "status"] in ("short", "error") and df.loc["cut", "tokens_received"] == 2
    # latencies only where measured; a failed request's TTFT is not invented
    assert np.isnan(df.loc["http-500", "ttft_s"]) and np.isnan(df.loc["hang", "e2e_s"])
    ok = df.loc["ok-b"]
    assert ok.ttft_s > 0 and ok.e2e_s >= ok.ttft_s
    assert ok.tpot_s == pytest.approx((ok.token_times[-1] - ok.token_times[0]) / 7)
    assert ok.tpot_s >= TOKEN_GAP_S * 0.8
    # open loop: sends follow the schedule, not the previous request's completion
    assert df.loc["ok-b", "send_s"] == pytest.approx(0.10, abs=0.05)
    assert r.overhead["send_lag_p99_s"] < 0.05
    s = r.summary()
    assert s["requests_total"] == 5 and s["requests_ok"] == 2 and s["requests_failed"] == 3
    assert len(r.metrics) >= 2 and "vllm:num_requests_running" in r.metrics.columns


def test_replay_connection_refused_is_an_error_row():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    r = replay(f"http://127.0.0.1:{port}", [ReplayRequest("x", 0.0, [5, 6], 2)], model="m", timeout_s=2.0,
               metrics_interval_s=0.1)
    row = r.requests.iloc[0]
    assert row.status == "error" and row.tokens_received == 0
    assert isinstance(r.requests, pd.DataFrame) and len(r.requests) == 1
