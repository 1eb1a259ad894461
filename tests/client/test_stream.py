"""The stream client over real sockets, against our server and the Node reference."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from durable_client import (
    ReconnectPolicy,
    RetryPolicy,
    SequenceConflict,
    ServerError,
    StreamClosed,
    StreamConflict,
    StreamNotFound,
)
from durable_client.streams import DurableStream, IdempotentProducer, LiveMode, ReadBatch

FAST = RetryPolicy(initial_delay=0.01, max_delay=0.05, max_attempts=4)


class Counter:
    """Counts the requests an httpx client sends."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> None:
        self.requests.append(request)


@pytest.fixture
async def counted() -> AsyncIterator[tuple[httpx.AsyncClient, Counter]]:
    counter = Counter()
    async with httpx.AsyncClient(event_hooks={"request": [counter]}) as client:
        yield client, counter


def stream_at(base: str, name: str, **kwargs: object) -> DurableStream:
    return DurableStream(f"{base}/v1/stream/{name}", retry=FAST, **kwargs)  # type: ignore[arg-type]


async def collect(
    stream: DurableStream, offset: str = "-1", live: LiveMode = False
) -> list[ReadBatch]:
    batches = []
    async with contextlib.aclosing(stream.follow(offset, live=live)) as it:
        async for batch in it:
            batches.append(batch)
    return batches


async def test_create_is_idempotent_and_conflicts_on_other_config(
    server_url: str, stream_name: str
) -> None:
    async with stream_at(server_url, stream_name) as stream:
        first = await stream.create(content_type="text/plain")
        assert first.created
        assert first.status == 201
        again = await stream.create(content_type="text/plain")
        assert not again.created
        with pytest.raises(StreamConflict):
            await stream.create(content_type="application/json")


async def test_byte_stream_round_trip(server_url: str, stream_name: str) -> None:
    async with stream_at(server_url, stream_name) as stream:
        await stream.create(content_type="application/octet-stream")
        a = await stream.append(b"\x00\x01")
        b = await stream.append(b"\xff")
        assert a.offset is not None
        assert b.offset is not None
        assert a.offset < b.offset
        batch = await stream.read()
        assert batch.data == b"\x00\x01\xff"
        assert batch.items is None
        assert batch.up_to_date
        assert batch.offset == b.offset
        tail = await stream.read(a.offset)
        assert tail.data == b"\xff"
        head = await stream.head()
        assert head.offset == b.offset
        assert head.content_type == "application/octet-stream"
        assert not head.closed


async def test_json_stream_keeps_message_boundaries(server_url: str, stream_name: str) -> None:
    async with stream_at(server_url, stream_name) as stream:
        await stream.create(content_type="application/json")
        await stream.append_json({"a": 1}, [1, 2])  # one request, two messages
        await stream.append_json("x")
        batch = await stream.read()
        assert batch.items == ({"a": 1}, [1, 2], "x")


@pytest.mark.parametrize("live", ["sse", "long-poll", "auto"])
async def test_live_reads_deliver_appends_then_end_at_close(
    server_url: str, stream_name: str, live: LiveMode
) -> None:
    async with stream_at(server_url, stream_name) as stream:
        await stream.create(content_type="application/json")
        await stream.append_json({"n": 0})
        got: list[object] = []
        seen_first = asyncio.Event()

        async def read() -> list[ReadBatch]:
            batches = []
            async for batch in stream.follow(live=live):
                batches.append(batch)
                got.extend(batch.messages)
                if got:
                    seen_first.set()
            return batches

        reader = asyncio.create_task(read())
        await asyncio.wait_for(seen_first.wait(), 5)
        await stream.append_json({"n": 1})
        await stream.close()
        batches = await asyncio.wait_for(reader, 10)
        assert got == [{"n": 0}, {"n": 1}]
        assert batches[-1].closed
        assert all(not b.closed for b in batches[:-1])


@pytest.mark.parametrize("live", ["sse", "long-poll", "auto", False])
async def test_no_request_after_the_stream_is_known_closed(
    server_url: str,
    stream_name: str,
    live: LiveMode,
    counted: tuple[httpx.AsyncClient, Counter],
) -> None:
    client, counter = counted
    async with stream_at(server_url, stream_name, client=client) as stream:
        await stream.create(content_type="text/plain")
        await stream.append("hello")
        await stream.close()
        before = len(counter.requests)
        batches = await asyncio.wait_for(collect(stream, live=live), 5)
        reads = counter.requests[before:]
        assert b"".join(b.data for b in batches) == b"hello"
        assert batches[-1].closed
        # The upstream Python client spins here (thousands of requests a second).
        assert len(reads) <= 2, [str(r.url) for r in reads]
        # Reading again from the final offset: one request, EOF, done.
        before = len(counter.requests)
        again = await asyncio.wait_for(collect(stream, batches[-1].offset, live=live), 5)
        assert again[-1].closed
        assert not again[-1].data
        assert len(counter.requests) - before == 1


async def test_sse_on_a_binary_stream_is_base64_decoded(server_url: str, stream_name: str) -> None:
    payload = bytes(range(256)) * 4
    async with stream_at(server_url, stream_name) as stream:
        await stream.create(content_type="application/octet-stream")
        await stream.append(payload)
        await stream.append(b"\n\r\x00")
        await stream.close()
        batches = await asyncio.wait_for(collect(stream, live="sse"), 5)
        assert b"".join(b.data for b in batches) == payload + b"\n\r\x00"


async def test_sse_on_a_text_stream(server_url: str, stream_name: str) -> None:
    async with stream_at(server_url, stream_name) as stream:
        await stream.create(content_type="text/plain; charset=utf-8")
        await stream.append("line one\nline two\n")
        await stream.append("héllo")
        await stream.close()
        batches = await asyncio.wait_for(collect(stream, live="sse"), 5)
        assert b"".join(b.data for b in batches).decode() == "line one\nline two\nhéllo"


async def test_offset_now_skips_history(server_url: str, stream_name: str) -> None:
    async with stream_at(server_url, stream_name) as stream:
        await stream.create(content_type="text/plain")
        await stream.append("old")
        now = await stream.read("now")
        assert now.data == b""
        assert now.up_to_date
        await stream.append("new")
        assert (await stream.read(now.offset)).data == b"new"


async def test_long_poll_times_out_with_204_then_sees_data(
    server_url: str, stream_name: str
) -> None:
    async with stream_at(server_url, stream_name) as stream:
        await stream.create(content_type="text/plain")
        tail = (await stream.head()).offset
        assert tail is not None
        empty = await stream.read(tail, live="long-poll")
        assert empty.status == 204
        assert empty.up_to_date
        assert empty.data == b""
        # Whether the append lands before or during the long-poll, it returns the data.
        waiting = asyncio.create_task(stream.read(tail, live="long-poll"))
        await stream.append("now")
        batch = await asyncio.wait_for(waiting, 5)
        assert batch.data == b"now"


async def test_missing_stream_raises_not_found(server_url: str, stream_name: str) -> None:
    async with stream_at(server_url, stream_name) as stream:
        with pytest.raises(StreamNotFound) as info:
            await stream.read()
        assert info.value.url == stream.url
        with pytest.raises(StreamNotFound):
            await stream.head()
        assert not await stream.exists()
        with pytest.raises(StreamNotFound):
            await stream.append(b"x")
        with pytest.raises(StreamNotFound):
            async for _ in stream.follow(live="sse"):
                pass


async def test_delete(server_url: str, stream_name: str) -> None:
    async with stream_at(server_url, stream_name) as stream:
        await stream.create()
        assert await stream.exists()
        await stream.delete()
        assert not await stream.exists()
        with pytest.raises(StreamNotFound):
            await stream.delete()


async def test_appending_to_a_closed_stream_raises_stream_closed(
    server_url: str, stream_name: str
) -> None:
    async with stream_at(server_url, stream_name) as stream:
        await stream.create(content_type="text/plain")
        await stream.append("last", close=True)
        closed = await stream.close()  # closing again is fine
        assert closed.final_offset is not None
        with pytest.raises(StreamClosed) as info:
            await stream.append("more")
        assert info.value.final_offset == closed.final_offset
        assert (await stream.head()).closed


async def test_stream_seq_must_increase(server_url: str, stream_name: str) -> None:
    async with stream_at(server_url, stream_name) as stream:
        await stream.create(content_type="text/plain")
        await stream.append("a", seq="0002")
        with pytest.raises(SequenceConflict):
            await stream.append("b", seq="0001")


async def test_create_closed_with_a_body_and_ttl(server_url: str, stream_name: str) -> None:
    async with stream_at(server_url, stream_name) as stream:
        result = await stream.create(
            content_type="text/plain", data="all of it", closed=True, ttl_seconds=3600
        )
        assert result.closed
        head = await stream.head()
        assert head.closed
        assert head.ttl_seconds is not None
        batches = await collect(stream, live="long-poll")
        assert b"".join(b.data for b in batches) == b"all of it"


async def test_idempotent_producer_over_http(server_url: str, stream_name: str) -> None:
    async with stream_at(server_url, stream_name) as stream:
        await stream.create(content_type="application/json")
        async with IdempotentProducer(
            stream, "writer", linger=0, max_batch_items=4, max_in_flight=4
        ) as producer:
            futures = [producer.append_json({"i": i}) for i in range(25)]
        results = [f.result() for f in futures]
        assert {r.status for r in results} == {200}
        batch = await stream.read()
        assert batch.items == tuple({"i": i} for i in range(25))
        # A restarted owner with a higher epoch fences the old one.
        async with IdempotentProducer(stream, "writer", epoch=1, linger=0) as restarted:
            await restarted.append_json("after restart")
        final = await IdempotentProducer(stream, "writer", epoch=2).close()
        assert final.closed


async def test_dynamic_headers_are_evaluated_per_request(
    server_url: str, stream_name: str, counted: tuple[httpx.AsyncClient, Counter]
) -> None:
    client, counter = counted
    tokens = iter(["t1", "t2", "t3"])

    async def token() -> str:
        return f"Bearer {next(tokens)}"

    async with stream_at(
        server_url, stream_name, client=client, headers={"Authorization": token}
    ) as stream:
        await stream.create(content_type="text/plain")
        await stream.append("x")
        await stream.read()
    assert [r.headers["authorization"] for r in counter.requests] == [
        "Bearer t1",
        "Bearer t2",
        "Bearer t3",
    ]


async def test_query_parameters_are_sorted(
    server_url: str, stream_name: str, counted: tuple[httpx.AsyncClient, Counter]
) -> None:
    client, counter = counted
    async with stream_at(server_url, stream_name, client=client, params={"a": "1"}) as stream:
        await stream.create(content_type="text/plain")
        await stream.read("-1", live="long-poll", cursor="5")
    query = counter.requests[-1].url.query.decode()
    keys = [part.split("=")[0] for part in query.split("&")]
    assert keys == sorted(keys)


async def test_reconnect_policy_is_used_by_follow(server_url: str, stream_name: str) -> None:
    # A stream that does not exist is fatal: follow raises at once, no retries.
    retries: list[int] = []
    async with stream_at(server_url, stream_name) as stream:
        with pytest.raises(StreamNotFound):
            async for _ in stream.follow(
                live="sse",
                reconnect=ReconnectPolicy(initial_delay=0.01),
                on_retry=lambda n, d, e: retries.append(n),
            ):
                pass
    assert retries == []


def test_base64_helper_sanity() -> None:
    # The encoding our SSE decoder expects (RFC 4648, standard alphabet).
    assert base64.b64encode(b"\xff\xfe") == b"//4="


async def inject(reference: str, **fault: object) -> None:
    """Schedule a fault on the Node reference server (its test endpoint)."""
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{reference}/_test/inject-error", json=fault)
        response.raise_for_status()


async def test_retry_after_is_honoured(reference_url: str, stream_name: str) -> None:
    async with stream_at(reference_url, stream_name) as stream:
        await stream.create(content_type="text/plain")
        await stream.append("ok")
        await inject(
            reference_url, path=f"/v1/stream/{stream_name}", status=503, retryAfter=0.3, count=1
        )
        started = time.monotonic()
        batch = await stream.read()
        assert batch.data == b"ok"
        # FAST's own delays are at most 0.05 s: the wait came from Retry-After.
        assert time.monotonic() - started >= 0.3


async def test_rate_limit_and_dropped_connections_are_retried(
    reference_url: str, stream_name: str
) -> None:
    async with stream_at(reference_url, stream_name) as stream:
        await stream.create(content_type="text/plain")
        path = f"/v1/stream/{stream_name}"
        await inject(reference_url, path=path, status=429, count=1, method="POST")
        await stream.append("after 429")  # a plain append: 429 proves nothing was written
        await inject(reference_url, path=path, dropConnection=True, count=2, method="GET")
        assert (await stream.read()).data == b"after 429"
        await inject(reference_url, path=path, status=500, count=20, method="GET")
        with pytest.raises(ServerError):
            await stream.read()  # retries are capped: the error surfaces
        async with httpx.AsyncClient() as client:
            await client.delete(f"{reference_url}/_test/inject-error")
