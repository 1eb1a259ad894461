"""The chaos proxy's faults, each observed from a real client over loopback TCP."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from mock_server.chaos import (
    AfterBytes,
    Always,
    Bandwidth,
    ChaosProxy,
    Down,
    FaultPlan,
    Fin,
    HalfOpen,
    HttpFault,
    Latency,
    OnConnection,
    Probability,
    Reset,
    Rule,
    Slicer,
    WsFault,
    rng_for,
)

from .conftest import PAYLOAD, Upstream


def plan(*rules: Rule, seed: int = 0) -> FaultPlan:
    return FaultPlan(seed=seed, rules=list(rules))


async def read_all(reader: asyncio.StreamReader) -> tuple[bytes, str]:
    """Everything until EOF or an error; (data, how it ended: 'eof' or the error's name)."""
    data = bytearray()
    try:
        while chunk := await reader.read(65536):
            data.extend(chunk)
    except (ConnectionError, OSError) as exc:
        return bytes(data), type(exc).__name__
    return bytes(data), "eof"


_OPEN: list[asyncio.StreamWriter] = []


async def connect(proxy: ChaosProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*proxy.address)
    _OPEN.append(writer)
    return reader, writer


@pytest.fixture(autouse=True)
async def close_clients() -> AsyncIterator[None]:
    """Close every client connection a test opened."""
    yield
    while _OPEN:
        writer = _OPEN.pop()
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def test_without_faults_bytes_pass_both_ways_and_are_counted(upstream: Upstream) -> None:
    async with ChaosProxy(("127.0.0.1", upstream.port)) as proxy:
        reader, writer = await connect(proxy)
        assert await reader.readexactly(len(PAYLOAD)) == PAYLOAD
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
        await proxy.wait_for(lambda: proxy.active == 0)
        (conn,) = proxy.connections
        assert (conn.bytes_down, conn.bytes_up) == (len(PAYLOAD) + 4, 4)
        assert conn.ended_by == "client"
        assert proxy.log == []


@pytest.mark.parametrize("at", [0, 1, 1000, 12_345, len(PAYLOAD) - 1])
async def test_reset_after_exactly_b_bytes(upstream: Upstream, at: int) -> None:
    rule = Rule(trigger=AfterBytes(bytes=at), fault=Reset())
    async with ChaosProxy(("127.0.0.1", upstream.port), plan(rule)) as proxy:
        reader, _ = await connect(proxy)
        data, ended = await read_all(reader)
        assert data == PAYLOAD[:at]
        assert ended == "ConnectionResetError"
        assert [str(r) for r in proxy.log] == [f"rule 0: reset on connection 1 at byte {at} (down)"]


@pytest.mark.parametrize("at", [0, 7, 19_999])
async def test_fin_after_exactly_b_bytes(upstream: Upstream, at: int) -> None:
    rule = Rule(trigger=AfterBytes(bytes=at), fault=Fin())
    async with ChaosProxy(("127.0.0.1", upstream.port), plan(rule)) as proxy:
        reader, _ = await connect(proxy)
        assert await read_all(reader) == (PAYLOAD[:at], "eof")
        assert proxy.connections[0].ended_by == "fin"


async def test_cut_in_the_client_to_server_direction(upstream: Upstream) -> None:
    rule = Rule(trigger=AfterBytes(bytes=10, direction="up"), fault=Fin())
    async with ChaosProxy(("127.0.0.1", upstream.port), plan(rule)) as proxy:
        reader, writer = await connect(proxy)
        await reader.readexactly(len(PAYLOAD))
        writer.write(b"0123456789abcdef")
        await upstream.wait(lambda: proxy.connections[0].closed)
        assert bytes(upstream.received[0]) == b"0123456789"


async def test_half_open_forwards_nothing_but_keeps_the_socket(upstream: Upstream) -> None:
    rule = Rule(trigger=AfterBytes(bytes=100), fault=HalfOpen())
    async with ChaosProxy(("127.0.0.1", upstream.port), plan(rule)) as proxy:
        reader, writer = await connect(proxy)
        assert await reader.readexactly(100) == PAYLOAD[:100]
        writer.write(b"hello?")  # the client's writes still succeed ...
        await writer.drain()
        await proxy.wait_for(lambda: proxy.connections[0].ended_by == "half_open")
        # ... but nothing reaches the server, and nothing comes back.
        assert upstream.received[0] == b""
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.05)
        assert not proxy.connections[0].closed
        writer.close()  # the client gives up: the proxy lets go of both sides
        await proxy.wait_for(lambda: proxy.connections[0].closed)
        assert proxy.connections[0].ended_by == "client"


async def test_half_open_from_the_start(upstream: Upstream) -> None:
    rule = Rule(trigger=Always(), fault=HalfOpen())
    async with ChaosProxy(("127.0.0.1", upstream.port), plan(rule)) as proxy:
        reader, writer = await connect(proxy)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.05)
        assert upstream.received == []  # never even connected upstream
        writer.close()
        await proxy.wait_for(lambda: proxy.active == 0)


async def test_latency_delays_each_chunk(upstream: Upstream) -> None:
    upstream.send_on_connect = b""
    rule = Rule(trigger=Always(), fault=Latency(ms=60, direction="both"))
    async with ChaosProxy(("127.0.0.1", upstream.port), plan(rule)) as proxy:
        reader, writer = await connect(proxy)
        started = time.monotonic()
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        assert time.monotonic() - started >= 0.12  # 60 ms up, 60 ms down


async def test_bandwidth_caps_throughput(upstream: Upstream) -> None:
    rule = Rule(trigger=Always(), fault=Bandwidth(bytes_per_second=100_000))
    async with ChaosProxy(("127.0.0.1", upstream.port), plan(rule)) as proxy:
        reader, _ = await connect(proxy)
        started = time.monotonic()
        assert await reader.readexactly(len(PAYLOAD)) == PAYLOAD
        assert time.monotonic() - started >= 0.18  # 20 kB at 100 kB/s


async def test_slicer_splits_into_small_writes(upstream: Upstream) -> None:
    rule = Rule(trigger=Always(), fault=Slicer(average_size=10, size_variation=5, delay_ms=1))
    async with ChaosProxy(("127.0.0.1", upstream.port), plan(rule)) as proxy:
        reader, _ = await connect(proxy)
        chunks: list[bytes] = []
        received = 0
        while received < 600:
            chunk = await reader.read(65536)
            chunks.append(chunk)
            received += len(chunk)
        assert b"".join(chunks) == PAYLOAD[:received]
        assert max(len(c) for c in chunks[:-1]) <= 15 * 2  # at most two slices coalesce
        assert len(chunks) >= 20


async def test_only_the_kth_connection(upstream: Upstream) -> None:
    rule = Rule(trigger=OnConnection(k=2), fault=Reset())
    async with ChaosProxy(("127.0.0.1", upstream.port), plan(rule)) as proxy:
        outcomes = []
        for _ in range(3):
            reader, writer = await connect(proxy)
            _, ended = await read_all_or_payload(reader)
            outcomes.append(ended)
            writer.close()
        assert outcomes == ["payload", "ConnectionResetError", "payload"]


async def read_all_or_payload(reader: asyncio.StreamReader) -> tuple[bytes, str]:
    try:
        return await reader.readexactly(len(PAYLOAD)), "payload"
    except asyncio.IncompleteReadError as exc:
        return exc.partial, "eof"
    except (ConnectionError, OSError) as exc:
        return b"", type(exc).__name__


async def test_kth_connection_with_a_count_hits_the_following_ones(upstream: Upstream) -> None:
    rule = Rule(trigger=OnConnection(k=2), fault=Fin(), count=2)
    async with ChaosProxy(("127.0.0.1", upstream.port), plan(rule)) as proxy:
        outcomes = []
        for _ in range(4):
            reader, writer = await connect(proxy)
            outcomes.append((await read_all_or_payload(reader))[1])
            writer.close()
        assert outcomes == ["payload", "eof", "eof", "payload"]


async def test_probability_is_replayed_from_the_seed(upstream: Upstream) -> None:
    rule = Rule(trigger=Probability(p=0.5), fault=Reset(), count=None)
    expected = [rng_for(11, "proxy", 0, "connection", n).random() < 0.5 for n in range(1, 13)]
    assert 0 < sum(expected) < 12
    for _ in range(2):  # the same on every run
        async with ChaosProxy(("127.0.0.1", upstream.port), plan(rule, seed=11)) as proxy:
            outcomes = []
            for _ in range(12):
                reader, writer = await connect(proxy)
                outcomes.append((await read_all_or_payload(reader))[1] != "payload")
                writer.close()
            assert outcomes == expected


async def test_down_refuses_connections_then_listens_again(upstream: Upstream) -> None:
    rule = Rule(trigger=OnConnection(k=2), fault=Down(duration_ms=200))
    async with ChaosProxy(("127.0.0.1", upstream.port), plan(rule)) as proxy:
        first_reader, _ = await connect(proxy)
        await first_reader.readexactly(100)
        second_reader, _ = await connect(proxy)
        assert (await read_all_or_payload(second_reader))[1] == "ConnectionResetError"
        assert not proxy.is_up
        # The open connection was reset too, and new ones are refused.
        assert (await read_all(first_reader))[1] == "ConnectionResetError"
        with pytest.raises(ConnectionRefusedError):
            await connect(proxy)
        await proxy.wait_up()
        reader, _ = await connect(proxy)
        assert await reader.readexactly(len(PAYLOAD)) == PAYLOAD


async def test_down_and_up_by_hand(upstream: Upstream) -> None:
    async with ChaosProxy(("127.0.0.1", upstream.port)) as proxy:
        port = proxy.port
        await proxy.down()
        with pytest.raises(ConnectionRefusedError):
            await connect(proxy)
        await proxy.up()
        assert proxy.port == port
        reader, _ = await connect(proxy)
        assert await reader.readexactly(10) == PAYLOAD[:10]


async def test_reset_all_cuts_every_open_connection(upstream: Upstream) -> None:
    async with ChaosProxy(("127.0.0.1", upstream.port)) as proxy:
        readers = []
        for _ in range(3):
            reader, _ = await connect(proxy)
            await reader.readexactly(len(PAYLOAD))
            readers.append(reader)
        assert proxy.reset_all() == 3
        for reader in readers:
            assert (await read_all(reader))[1] == "ConnectionResetError"
        assert proxy.active == 0


async def test_plan_changes_live_and_counters_restart(upstream: Upstream) -> None:
    async with ChaosProxy(("127.0.0.1", upstream.port)) as proxy:
        reader, writer = await connect(proxy)
        assert (await read_all_or_payload(reader))[1] == "payload"
        writer.close()
        proxy.set_plan(plan(Rule(trigger=AfterBytes(bytes=5), fault=Fin())))
        reader, writer = await connect(proxy)
        assert await read_all(reader) == (PAYLOAD[:5], "eof")
        reader, writer = await connect(proxy)  # count 1: spent
        assert (await read_all_or_payload(reader))[1] == "payload"
        writer.close()


async def test_upstream_that_refuses_looks_like_a_reset() -> None:
    async with ChaosProxy(("127.0.0.1", 1)) as proxy:
        reader, _ = await connect(proxy)
        assert (await read_all(reader))[1] in ("ConnectionResetError", "eof")


def test_url_keeps_the_upstream_scheme_and_path() -> None:
    proxy = ChaosProxy("http://127.0.0.1:4437/base")
    assert proxy.upstream == ("127.0.0.1", 4437)
    proxy.port = 5555
    assert proxy.url == "http://127.0.0.1:5555/base"
    assert ChaosProxy("localhost:81").upstream == ("localhost", 81)


# ---------------------------------------------------------------- scripted faults


async def test_a_client_that_does_not_speak_http_gets_plain_bytes(upstream: Upstream) -> None:
    upstream.send_on_connect = b""
    async with ChaosProxy(("127.0.0.1", upstream.port)) as proxy:
        reader, writer = await connect(proxy)
        sent = b"HELLO WORLD\r\n\r\nnot http"  # a method-like word, then no request line
        writer.write(sent)
        assert await reader.readexactly(len(sent)) == sent
        assert proxy.requests == []


async def test_cut_all_freeze_all_offline_online(upstream: Upstream) -> None:
    async with ChaosProxy(("127.0.0.1", upstream.port)) as proxy:
        reader, writer = await connect(proxy)
        await reader.readexactly(len(PAYLOAD))
        assert proxy.cut_all() == 1
        assert (await read_all(reader))[1] in ("eof", "ConnectionResetError")
        reader, writer = await connect(proxy)
        await reader.readexactly(len(PAYLOAD))
        assert proxy.freeze_all() == 1
        writer.write(b"lost")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.05)
        assert upstream.received[1] == b""
        port = proxy.port
        await proxy.offline()
        with pytest.raises(ConnectionRefusedError):
            await connect(proxy)
        await proxy.online()
        assert proxy.port == port
        reader, _ = await connect(proxy)
        assert await reader.readexactly(10) == PAYLOAD[:10]


@pytest.fixture
async def ours() -> AsyncIterator[str]:
    from mock_server.testing import serve

    async with serve() as running:
        yield running.url


async def test_scripted_faults_hit_one_http_message(ours: str) -> None:
    import httpx

    stream = "/v1/stream/scripted"
    text = {"Content-Type": "text/plain"}
    async with (
        ChaosProxy(ours) as proxy,
        httpx.AsyncClient(base_url=proxy.url, timeout=5) as client,
        httpx.AsyncClient(base_url=ours, timeout=5) as direct,
    ):
        assert (await client.put(stream, headers=text)).status_code == 201
        lost = proxy.add(HttpFault(method="POST", nth=2, lose_response=True))
        # Counts its own matches, but not the one the fault before it took.
        dropped = proxy.add(HttpFault(path_contains="scripted", nth=2, drop_request=True))
        assert (await client.post(stream, headers=text, content=b"a")).status_code == 204
        with pytest.raises(httpx.TransportError):
            await client.post(stream, headers=text, content=b"b")  # applied, answer lost
        assert lost.fired.is_set()
        with pytest.raises(httpx.TransportError):
            await client.post(stream, headers=text, content=b"c")  # never reaches the server
        assert dropped.fired.is_set()
        assert (await direct.get(stream, params={"offset": "-1"})).content == b"ab"
        assert proxy.requests == [("PUT", stream), *[("POST", stream)] * 3]

        # The SSE response is cut right after its first two events (data, control).
        cut = proxy.add(HttpFault(sse=True, after_events=2))
        lines: list[str] = []

        async def read_sse() -> None:
            async with client.stream("GET", f"{stream}?offset=-1&live=sse") as response:
                async for line in response.aiter_lines():
                    lines.append(line)

        with pytest.raises(httpx.TransportError):
            await read_sse()
        assert cut.fired.is_set()
        assert [line.split(":")[0] for line in lines if line] == ["event", "data"] * 2


async def test_scripted_faults_hit_one_websocket_frame(ours: str) -> None:
    import httpx
    from websockets.asyncio.client import connect as ws_connect
    from websockets.exceptions import ConnectionClosed

    async with ChaosProxy(ours) as proxy, httpx.AsyncClient(base_url=ours) as direct:
        await direct.put("/v1/stream/frames", headers={"Content-Type": "application/json"})
        ping = proxy.add(WsFault(direction="up", contains='"op":"ping"', before=2))
        async with ws_connect(proxy.url.replace("http", "ws") + "/v1/ws") as ws:
            await ws.send('{"op":"ping","req":"1"}')
            assert '"pong"' in str(await ws.recv())
            await ws.send('{"op":"ping","req":"2"}')  # cut before the server sees it
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        assert ping.fired.is_set()
        assert ("GET", "/v1/ws") in proxy.requests


async def test_scripted_faults_and_a_plan_work_together(ours: str) -> None:
    import httpx

    rule = Rule(trigger=Always(), fault=Slicer(average_size=7, size_variation=3))
    async with (
        ChaosProxy(ours, plan(rule)) as proxy,
        httpx.AsyncClient(base_url=proxy.url, timeout=5) as client,
    ):
        stream = "/v1/stream/sliced"
        await client.put(stream, headers={"Content-Type": "text/plain"}, content=b"x" * 300)
        cut = proxy.add(HttpFault(method="GET", after_bytes=100))
        with pytest.raises(httpx.TransportError):
            await client.get(stream, params={"offset": "-1"})
        assert cut.fired.is_set()
        assert (await client.get(stream, params={"offset": "-1"})).content == b"x" * 300
