"""Fairness between sockets: a flooding socket is rate limited (429, then 4029)
and cannot starve the others. Behaviour only; how fast a bystander is served
under a flood is the ``flood`` benchmark's (bench/, docs/benchmarks.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from durable_client.wire import CLOSE_TOO_MANY_SUBSCRIPTIONS
from mock_server._ws import FRAME_BURST, FrameRate
from mock_server.testing import RunningServer
from tests.server.conftest import ServerLog

S = "/v1/stream"
FLOOD = 10_000
ROUND_TRIPS = 50


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_takes_a_burst_then_the_rate_and_names_the_wait() -> None:
    clock = Clock()
    rate = FrameRate(rate=100.0, burst=10, close_after=5, clock=clock)
    assert [rate.take() for _ in range(10)] == [None] * 10
    wait = rate.take()
    assert wait is not None
    assert abs(wait - 0.01) < 1e-9  # one token at 100 a second
    clock.now += wait
    assert rate.take() is None
    assert not rate.persistent


def test_a_client_that_keeps_sending_over_the_rate_is_persistent_one_that_backs_off_is_not() -> (
    None
):
    clock = Clock()
    rate = FrameRate(rate=100.0, burst=10, close_after=5, clock=clock)
    for _ in range(10):
        rate.take()
    for _ in range(5):  # five refusals: at the bound, not over it
        assert rate.take() is not None
    assert not rate.persistent
    clock.now += 1.0  # backed off: refusals drain, tokens refill
    assert rate.take() is None
    for _ in range(9):
        rate.take()
    for _ in range(6):
        rate.take()
    assert rate.persistent


async def _flood(ws: ClientConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        for i in range(FLOOD):
            await ws.send(json.dumps({"op": "ping", "req": f"f{i}"}))


async def _collect(ws: ClientConnection, into: list[Any]) -> int | None:
    """Frames until the socket closes; the close code."""
    try:
        while True:
            into.append(json.loads(await ws.recv()))
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None


async def test_a_flooding_socket_gets_429s_then_4029_and_a_bystander_is_served(
    server: RunningServer, http: httpx.AsyncClient, server_log: ServerLog
) -> None:
    headers = {"Content-Type": "application/json"}
    assert (await http.put(f"{S}/s", headers=headers, content=b"[]")).status_code == 201
    url = server.url.replace("http://", "ws://") + "/v1/ws"
    async with (
        connect(url, max_size=None, max_queue=None) as flooder,
        connect(url, max_size=None, max_queue=None) as bystander,
    ):
        flooded: list[Any] = []
        flooding = asyncio.create_task(_flood(flooder))
        closed = asyncio.create_task(_collect(flooder, flooded))
        await bystander.send(json.dumps({"op": "subscribe", "sub": "a", "stream": "s"}))
        acks: list[Any] = []
        messages: list[Any] = []
        for n in range(ROUND_TRIPS):
            frame = {"op": "append", "req": f"b{n}", "stream": "s", "data": [{"n": n}]}
            await bystander.send(json.dumps(frame))
            while True:
                answer = json.loads(await bystander.recv())
                if answer["type"] == "data":
                    messages += answer["messages"]
                elif answer["type"] in ("ack", "error"):
                    acks.append(answer)
                    break
        assert [a["type"] for a in acks] == ["ack"] * ROUND_TRIPS, acks[:3]
        await flooding
        code = await asyncio.wait_for(closed, 30)
        while len(messages) < ROUND_TRIPS:  # the bystander's own data, all of it, in order
            answer = json.loads(await bystander.recv())
            if answer["type"] == "data":
                messages += answer["messages"]
        assert messages == [{"n": n} for n in range(ROUND_TRIPS)]
        await bystander.send(json.dumps({"op": "ping", "req": "still"}))
        assert json.loads(await bystander.recv()) == {"type": "pong", "req": "still"}

    limited = [f for f in flooded if f["type"] == "error"]
    pongs = [f for f in flooded if f["type"] == "pong"]
    assert limited, f"no 429 among {len(flooded)} frames to the flooder"
    assert {(f["status"], f["code"]) for f in limited} == {(429, "rate_limited")}
    assert all(f["req"].startswith("f") for f in limited)  # each names the frame it refused
    assert all(float(f["headers"]["Retry-After"]) > 0 for f in limited)
    assert len(pongs) >= FRAME_BURST  # the burst was served
    assert len(pongs) + len(limited) < FLOOD  # and the rest never handled: closed first
    assert code == CLOSE_TOO_MANY_SUBSCRIPTIONS  # 4029
    assert (await http.get(f"{S}/s")).json() == [{"n": n} for n in range(ROUND_TRIPS)]
    assert server_log.problems() == []
