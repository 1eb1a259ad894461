"""The WebSocket transport at /v1/ws, driven by a plain websockets client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from mock_server.testing import RunningServer, serve
from tests._await import until

S = "/v1/stream"
JSON = {"Content-Type": "application/json"}


class Client:
    """A raw WebSocket client that buffers frames and waits for the ones a test asks for."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self._seen = 0

    async def send(self, **frame: Any) -> None:
        await self.ws.send(json.dumps(frame))

    async def next(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> dict[str, Any]:
        """The next unseen frame for which ``match`` holds (earlier unmatched ones are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                while self._seen < len(self.frames):
                    frame = self.frames[self._seen]
                    self._seen += 1
                    if match(frame):
                        return frame
                self.frames.append(json.loads(await self.ws.recv()))

    async def type(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        return await self.next(lambda f: f["type"] == kind, timeout)

    async def messages(self, sub: str, count: int) -> list[Any]:
        """Messages of subscription ``sub`` until ``count`` have arrived."""
        received: list[Any] = []
        while len(received) < count:
            frame = await self.next(lambda f: f["type"] == "data" and f["sub"] == sub)
            received.extend(frame.get("messages") or [])
        return received


async def drain(client: Client) -> None:
    """Read frames into ``client.frames`` until the connection closes (raises ConnectionClosed)."""
    while True:
        client.frames.append(json.loads(await client.ws.recv()))


@asynccontextmanager
async def ws_client(server: RunningServer) -> AsyncIterator[Client]:
    async with connect(server.url.replace("http", "ws") + "/v1/ws", max_size=None) as ws:
        yield Client(ws)


async def make_stream(http: httpx.AsyncClient, name: str, body: bytes = b"[]") -> None:
    assert (await http.put(f"{S}/{name}", headers=JSON, content=body)).status_code == 201


async def test_subscribe_delivers_history_then_live(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    await make_stream(http, "s", b"[1,2]")
    async with ws_client(server) as client:
        await client.send(op="subscribe", sub="a", stream="s", offset="-1")
        subscribed = await client.type("subscribed")
        assert subscribed["stream"] == f"{S}/s"
        assert subscribed["content_type"] == "application/json"
        snapshot = await client.type("presence")
        assert (snapshot["event"], snapshot["members"]) == ("snapshot", [])
        history = await client.type("data")
        assert history["messages"] == [1, 2]
        assert history["up_to_date"] is True
        await http.post(f"{S}/s", headers=JSON, content=b"[3,4]")
        live = await client.type("data")
        assert live["messages"] == [3, 4]
        head = await http.head(f"{S}/s")
        assert live["offset"] == head.headers["Stream-Next-Offset"]


async def test_resume_from_an_offset_and_from_now(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    await make_stream(http, "s", b"[1]")
    middle = (await http.post(f"{S}/s", headers=JSON, content=b"2")).headers["Stream-Next-Offset"]
    await http.post(f"{S}/s", headers=JSON, content=b"3")
    async with ws_client(server) as client:
        await client.send(op="subscribe", sub="from-middle", stream="s", offset=middle)
        await client.send(op="subscribe", sub="from-now", stream="s", offset="now")
        assert await client.messages("from-middle", 1) == [3]
        now = await client.next(lambda f: f["type"] == "data" and f["sub"] == "from-now")
        assert now["messages"] == []
        assert now["up_to_date"] is True


async def test_append_acks_with_the_offset_and_dedupes_producers(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    await make_stream(http, "s")
    async with ws_client(server) as client:
        producer = {"id": "p", "epoch": 0, "seq": 0}
        await client.send(op="append", req="r1", stream="s", data=[{"n": 1}], producer=producer)
        ack = await client.type("ack")
        assert ack["req"] == "r1"
        assert ack["duplicate"] is False
        assert ack["producer_seq"] == 0
        await client.send(op="append", req="r2", stream="s", data=[{"n": 1}], producer=producer)
        duplicate = await client.type("ack")
        assert duplicate["duplicate"] is True
        gap = {"id": "p", "epoch": 0, "seq": 5}
        await client.send(op="append", req="r3", stream="s", data=1, producer=gap)
        error = await client.type("error")
        assert (error["req"], error["status"], error["code"]) == ("r3", 409, "sequence_gap")
        assert error["headers"]["Producer-Expected-Seq"] == "1"
        stale = {"id": "p", "epoch": 0, "seq": 1}
        await client.send(
            op="append", req="r4", stream="s", data=2, producer={**stale, "epoch": 1, "seq": 0}
        )
        await client.type("ack")
        await client.send(op="append", req="r5", stream="s", data=3, producer=stale)
        fenced = await client.type("error")
        assert (fenced["status"], fenced["code"]) == (403, "stale_epoch")
    assert (await http.get(f"{S}/s")).json() == [{"n": 1}, 2]


@pytest.mark.parametrize(
    ("frame", "status", "code"),
    [
        ({"stream": "missing", "data": 1}, 404, "not_found"),
        ({"stream": "s", "data": None}, 400, "bad_request"),
        ({"stream": "s", "data_base64": "!!"}, 400, "bad_request"),
        ({"stream": "/etc/passwd", "data": 1}, 400, "bad_request"),
    ],
)
async def test_append_refusals_mirror_http(
    server: RunningServer, http: httpx.AsyncClient, frame: dict[str, Any], status: int, code: str
) -> None:
    await make_stream(http, "s")
    async with ws_client(server) as client:
        await client.send(op="append", req="x", **frame)
        error = await client.type("error")
        assert (error["req"], error["status"], error["code"]) == ("x", status, code)
    assert (await http.get(f"{S}/s")).json() == []


async def test_append_to_a_closed_stream(server: RunningServer, http: httpx.AsyncClient) -> None:
    await make_stream(http, "s")
    async with ws_client(server) as client:
        await client.send(op="append", req="c", stream="s", data=[1], close=True)
        assert (await client.type("ack"))["closed"] is True
        await client.send(op="append", req="d", stream="s", data=[2])
        error = await client.type("error")
        assert (error["status"], error["code"]) == (409, "stream_closed")
        assert error["headers"]["Stream-Closed"] == "true"


async def test_text_and_binary_streams(server: RunningServer, http: httpx.AsyncClient) -> None:
    await http.put(f"{S}/t", headers={"Content-Type": "text/plain"}, content=b"hi ")
    await http.put(f"{S}/b", headers={"Content-Type": "application/octet-stream"})
    async with ws_client(server) as client:
        await client.send(op="append", req="1", stream="t", data="there")
        await client.send(op="append", req="2", stream="b", data_base64="AAEC")
        await client.send(op="subscribe", sub="t", stream="t")
        await client.send(op="subscribe", sub="b", stream="b")
        text = await client.next(lambda f: f["type"] == "data" and f["sub"] == "t")
        binary = await client.next(lambda f: f["type"] == "data" and f["sub"] == "b")
    assert text["text"] == "hi there"
    assert binary["data_base64"] == "AAEC"


async def test_closed_stream_ends_the_subscription(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    await make_stream(http, "s", b"[1]")
    async with ws_client(server) as client:
        await client.send(op="subscribe", sub="a", stream="s")
        await client.type("data")
        await http.post(f"{S}/s", headers={**JSON, "Stream-Closed": "true"}, content=b"2")
        last = await client.type("data")
        assert (last["messages"], last["closed"]) == ([2], True)


async def test_unsubscribe_stops_delivery(server: RunningServer, http: httpx.AsyncClient) -> None:
    await make_stream(http, "s")
    await make_stream(http, "other")
    async with ws_client(server) as client:
        await client.send(op="subscribe", sub="a", stream="s")
        await client.send(op="subscribe", sub="b", stream="other")
        await client.next(lambda f: f["type"] == "data" and f["sub"] == "a")
        await client.next(lambda f: f["type"] == "data" and f["sub"] == "b")
        await client.send(op="unsubscribe", sub="a")
        await client.send(op="ping", req="sync")
        await client.next(lambda f: f["type"] == "pong")
        await http.post(f"{S}/s", headers=JSON, content=b"1")
        await http.post(f"{S}/other", headers=JSON, content=b"2")
        frame = await client.type("data")
        assert (frame["sub"], frame["messages"]) == ("b", [2])


async def test_malformed_frames_get_errors_then_a_close(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    await make_stream(http, "s")
    async with ws_client(server) as client:
        await client.ws.send("not json")
        assert (await client.type("error"))["code"] == "bad_frame"
        await client.send(op="append", req="q", stream="s", data=1, surprise=True)
        error = await client.type("error")
        assert (error["code"], error["req"]) == ("bad_frame", "q")
        await client.ws.send(b"\x00binary")
        assert (await client.type("error"))["message"] == "frames must be JSON text"
        for _ in range(10):
            await client.send(op="nonsense")
        with pytest.raises(ConnectionClosed) as closed:
            await drain(client)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4002
    assert (await http.get(f"{S}/s")).json() == []


async def test_oversized_frame_closes_with_1009(tmp_path: object) -> None:
    async with serve(ws_max_frame_bytes=1024) as running, ws_client(running) as client:
        await client.ws.send(json.dumps({"op": "ping", "req": "x" * 2000}))
        with pytest.raises(ConnectionClosed) as closed:
            await client.ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009


async def test_http_only_server_refuses_the_handshake() -> None:
    async with serve(websocket=False) as running:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(running.url.replace("http", "ws") + "/v1/ws"):
                pass
        assert refused.value.response.status_code == 403
        async with httpx.AsyncClient(base_url=running.url) as http:
            assert "websocket" not in (await http.get("/health")).json()["transports"]


async def test_live_append_reaches_a_subscriber_within_milliseconds(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    """Not a benchmark: a sanity bound far above the expected ~1 ms, to catch a lost wake-up."""
    await make_stream(http, "s")
    async with ws_client(server) as reader, ws_client(server) as writer:
        await reader.send(op="subscribe", sub="a", stream="s", offset="now")
        await reader.type("data")
        started = time.perf_counter()
        await writer.send(op="append", req="1", stream="s", data=1)
        await reader.type("data")
        assert time.perf_counter() - started < 1.0


# ---------------------------------------------------------------- presence


async def test_presence_join_update_leave(server: RunningServer, http: httpx.AsyncClient) -> None:
    await make_stream(http, "room")
    async with ws_client(server) as alice, ws_client(server) as agent:
        await alice.send(
            op="presence", stream="room", client_id="alice", kind="user", label="laptop"
        )
        joined = await alice.next(lambda f: f["type"] == "presence" and f["event"] == "join")
        assert joined["member"] == {
            "client_id": "alice",
            "kind": "user",
            "label": "laptop",
            "status": "idle",
        }
        await agent.send(op="subscribe", sub="s", stream="room")
        snapshot = await agent.next(lambda f: f["type"] == "presence")
        assert [m["client_id"] for m in snapshot["members"]] == ["alice"]
        await agent.send(
            op="presence", stream="room", client_id="bot", kind="agent", status="thinking"
        )
        seen = await alice.next(lambda f: f["type"] == "presence" and f["event"] == "join")
        assert seen["member"]["status"] == "thinking"
        await agent.send(
            op="presence", stream="room", client_id="bot", kind="agent", status="streaming"
        )
        update = await alice.next(lambda f: f["type"] == "presence" and f["event"] == "update")
        assert update["member"]["status"] == "streaming"
        await agent.send(op="presence.leave", stream="room", client_id="bot")
        left = await alice.next(lambda f: f["type"] == "presence" and f["event"] == "leave")
        assert left["member"]["client_id"] == "bot"
        assert [m["client_id"] for m in left["members"]] == ["alice"]


async def test_a_vanished_client_leaves_after_the_grace_period() -> None:
    async with (
        serve(presence_grace=0.2) as running,
        httpx.AsyncClient(base_url=running.url) as http,
    ):
        await make_stream(http, "room")
        async with ws_client(running) as watcher:
            await watcher.send(op="subscribe", sub="s", stream="room")
            async with ws_client(running) as ghost:
                await ghost.send(op="presence", stream="room", client_id="ghost", kind="agent")
                await watcher.next(lambda f: f.get("event") == "join")
                ghost.ws.transport.abort()  # gone without a goodbye
            left = await watcher.next(lambda f: f.get("event") == "leave")
            assert left["member"]["client_id"] == "ghost"
            assert left["members"] == []


async def test_a_client_that_returns_within_the_grace_period_does_not_flap() -> None:
    async with (
        serve(presence_grace=5.0) as running,
        httpx.AsyncClient(base_url=running.url) as http,
    ):
        await make_stream(http, "room")
        async with ws_client(running) as watcher:
            await watcher.send(op="subscribe", sub="s", stream="room")
            async with ws_client(running) as first:
                await first.send(op="presence", stream="room", client_id="me", status="idle")
                await watcher.next(lambda f: f.get("event") == "join")
                first.ws.transport.abort()
            async with ws_client(running) as again:
                await again.send(op="presence", stream="room", client_id="me", status="typing")
                update = await watcher.next(lambda f: f["type"] == "presence")
                assert (update["event"], update["member"]["status"]) == ("update", "typing")


async def test_a_half_open_client_is_detected_by_keepalive() -> None:
    async with (
        serve(ws_ping_interval=0.2, ws_ping_timeout=0.2, presence_grace=0.0) as running,
        httpx.AsyncClient(base_url=running.url) as http,
    ):
        await make_stream(http, "room")
        async with ws_client(running) as watcher, ws_client(running) as silent:
            await watcher.send(op="subscribe", sub="s", stream="room")
            await silent.send(op="presence", stream="room", client_id="silent", kind="user")
            await watcher.next(lambda f: f.get("event") == "join")
            silent.ws.transport.pause_reading()  # alive, but answers no pings
            started = time.monotonic()
            left = await watcher.next(lambda f: f.get("event") == "leave", timeout=5)
            assert left["member"]["client_id"] == "silent"
            assert time.monotonic() - started < 2.0  # interval + timeout + slack, not ~50 s
            silent.ws.transport.abort()  # a paused reader would wait out the close handshake


# ---------------------------------------------------------------- backpressure


async def test_a_slow_consumer_is_dropped_and_does_not_slow_the_others() -> None:
    async with (
        serve(ws_max_queued_frames=8, ws_slow_consumer_timeout=0.3, ws_ping_interval=0) as running,
        httpx.AsyncClient(base_url=running.url) as http,
    ):
        endpoint = running.app.websocket_handler
        await make_stream(http, "s")
        async with ws_client(running) as fast, ws_client(running) as slow:
            for client in (fast, slow):
                await client.send(op="subscribe", sub="a", stream="s")
                await client.type("data")
            slow.ws.transport.pause_reading()
            reading = asyncio.create_task(fast.messages("a", 200))
            big = json.dumps(["x" * 60_000])
            for _ in range(200):  # ~12 MB: more than the socket buffers hold
                await http.post(f"{S}/s", headers=JSON, content=big)
            assert len(await reading) == 200
            await until(lambda: len(endpoint.connections) == 1)  # type: ignore[union-attr]
            slow.ws.transport.resume_reading()
            with pytest.raises(ConnectionClosed):
                await drain(slow)
            delivered = [f for f in slow.frames if f["type"] == "data"]
            seen = sum(len(f["messages"]) for f in delivered)
            resume_at = delivered[-1]["offset"]
        async with ws_client(running) as again:
            await again.send(op="subscribe", sub="a", stream="s", offset=resume_at)
            rest = await again.messages("a", 200 - seen)
            assert seen + len(rest) == 200  # nothing lost, nothing twice


async def test_a_live_subscriber_learns_of_a_close_without_data(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    await make_stream(http, "s", b"[1]")
    async with ws_client(server) as client:
        await client.send(op="subscribe", sub="a", stream="s")
        await client.type("data")
        await until(lambda: server.store.waiting(f"{S}/s") == 1)
        await http.post(f"{S}/s", headers={"Stream-Closed": "true"})
        last = await client.type("data")
        assert last["closed"] is True
        assert last["messages"] == []


async def test_subscribed_and_errors_name_the_streams_incarnation(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    await make_stream(http, "s", b"[1]")
    head = await http.head(f"{S}/s")
    incarnation = head.headers["Stream-Incarnation"]
    async with ws_client(server) as client:
        await client.send(op="subscribe", sub="a", stream="s", offset="-1")
        subscribed = await client.type("subscribed")
        assert subscribed["incarnation"] == incarnation
        assert subscribed["offset"] == f"{incarnation}_0000000000000000"
        await client.send(op="subscribe", sub="b", stream="s", offset="garbage")
        refused = await client.next(lambda f: f["type"] == "error" and f.get("sub") == "b")
        assert refused["headers"]["Stream-Incarnation"] == incarnation
        await client.send(op="append", req="r", stream="s", data="text", content_type="text/plain")
        conflict = await client.next(lambda f: f["type"] == "error" and f.get("req") == "r")
        assert (conflict["status"], conflict["headers"]["Stream-Incarnation"]) == (409, incarnation)
        await client.send(op="subscribe", sub="c", stream="missing")
        missing = await client.next(lambda f: f["type"] == "error" and f.get("sub") == "c")
        assert "Stream-Incarnation" not in missing["headers"]


async def test_a_reused_producer_seq_with_other_data_is_refused_over_the_socket(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    await make_stream(http, "s")
    async with ws_client(server) as client:
        producer = {"id": "p", "epoch": 0, "seq": 0}
        await client.send(op="append", req="r1", stream="s", data=[1], producer=producer)
        assert (await client.type("ack"))["duplicate"] is False
        await client.send(op="append", req="r2", stream="s", data=[1], producer=producer)
        assert (await client.type("ack"))["duplicate"] is True
        await client.send(op="append", req="r3", stream="s", data=[2], producer=producer)
        error = await client.type("error")
        assert (error["req"], error["status"], error["code"]) == ("r3", 403, "stale_epoch")
        assert error["headers"]["Producer-Epoch"] == "0"
        assert "already used for different data" in error["message"]
    assert (await http.get(f"{S}/s")).json() == [1]


@pytest.mark.parametrize("name", ["__ds", "__ds/subscriptions/x", f"{S}/__ds/jwks.json"])
async def test_the_reserved_prefix_is_refused_and_the_socket_stays_up(
    server: RunningServer, http: httpx.AsyncClient, name: str
) -> None:
    streams = (await http.get("/health")).json()["streams"]
    async with ws_client(server) as client:
        await client.send(op="subscribe", sub="a", stream=name)
        await client.send(op="append", req="r", stream=name, data=[1])
        await client.send(op="presence", stream=name, client_id="me")
        errors = [await client.type("error") for _ in range(3)]
        assert [e["status"] for e in errors] == [400, 400, 400]
        assert all("reserved by the protocol" in e["message"] for e in errors)
        await client.send(op="ping", req="still-up")
        assert (await client.type("pong"))["req"] == "still-up"
    assert (await http.get("/health")).json()["streams"] == streams
