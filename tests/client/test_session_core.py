"""Session logic behind a scripted transport: no sockets, exact faults.

``ScriptedTransport`` implements the SessionTransport seam: each call to
``subscribe(offset)`` plays the next scripted "connection" (batches, then
maybe an error), and checks the offset the session asked for. This is also
what a second transport (WebSocket) plugs into.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest

from durable_client import (
    Author,
    ConnectionLost,
    ConnectionState,
    MemoryOffsetStore,
    OffsetGone,
    Position,
    ReconnectPolicy,
    ServerError,
    Session,
    UserMessage,
)
from durable_client.streams import AppendResult, DurableStream, ProducerStamp
from durable_client.transports import SessionTransport, TransportBatch

ANN = Author.user("ann")


def msg(text: str, event_id: str | None = None) -> dict[str, Any]:
    event = UserMessage(author=ANN, text=text, turn_id="t")
    data = event.to_json()
    if event_id is not None:
        data["event_id"] = event_id
    return data


def batch(
    start: str, end: str, *texts: str, up_to_date: bool = True, closed: bool = False
) -> TransportBatch:
    return TransportBatch(tuple(msg(t) for t in texts), start, end, up_to_date, closed)


class ScriptedTransport:
    url = "scripted://sessions/demo"

    def __init__(self, connections: list[tuple[str, list[TransportBatch | BaseException]]]) -> None:
        self.connections = connections
        self.requested: list[str] = []
        self.tail_offset = "o_000"

    async def create(self) -> bool:
        return True

    async def tail(self) -> str:
        return self.tail_offset

    async def subscribe(self, offset: str) -> AsyncIterator[TransportBatch]:
        self.requested.append(offset)
        if not self.connections:
            await asyncio.Event().wait()  # nothing more: stay connected, silent
        expected, script = self.connections.pop(0)
        assert offset == expected, f"resumed at {offset}, expected {expected}"
        for item in script:
            if isinstance(item, BaseException):
                raise item
            yield item
        if not self.connections:
            await asyncio.Event().wait()

    async def send_batch(
        self, items: Sequence[bytes], *, stamp: ProducerStamp | None, close: bool = False
    ) -> AppendResult:
        raise AssertionError("not used")

    async def aclose(self) -> None:
        pass


def session_over(transport: ScriptedTransport, **kwargs: Any) -> Session:
    policy = kwargs.pop("reconnect", ReconnectPolicy(initial_delay=0.001, max_delay=0.002))
    return Session(
        "http://unused",
        "demo",
        author=ANN,
        transport=transport,
        reconnect=policy,
        rng=random.Random(1),
        **kwargs,
    )


def texts(events: list[Any]) -> list[str]:
    return [e.text for e in events]


async def take(sub: Any, n: int) -> list[Any]:
    async with asyncio.timeout(5):
        return [await sub.__anext__() for _ in range(n)]


def test_the_http_transport_implements_the_seam() -> None:
    from durable_client.transports import HttpTransport

    stream = DurableStream("http://127.0.0.1:1/v1/stream/x")
    assert isinstance(HttpTransport(stream), SessionTransport)
    assert isinstance(ScriptedTransport([]), SessionTransport)


async def test_reconnects_resume_from_the_last_offset_exactly_once() -> None:
    transport = ScriptedTransport(
        [
            ("-1", [batch("-1", "o_002", "a", "b", up_to_date=False), ConnectionLost("cut")]),
            ("o_002", [batch("o_002", "o_003", "c"), ServerError("busy", status=503)]),
            ("o_003", [batch("o_003", "o_005", "d", "e")]),
        ]
    )
    async with session_over(transport) as session, session.subscribe() as sub:
        assert texts(await take(sub, 5)) == ["a", "b", "c", "d", "e"]
    assert transport.requested == ["-1", "o_002", "o_003"]


async def test_connection_states_follow_failures_and_recovery() -> None:
    transport = ScriptedTransport(
        [
            ("-1", [ConnectionLost("refused")]),
            ("-1", [ConnectionLost("refused")]),
            ("-1", [ConnectionLost("refused")]),
            ("-1", [batch("-1", "o_001", "a")]),
        ]
    )
    seen: list[tuple[ConnectionState, int]] = []
    async with session_over(
        transport, reconnect=ReconnectPolicy(initial_delay=0.001, max_delay=0.002, offline_after=3)
    ) as session:
        watching = asyncio.Event()

        async def watch() -> None:
            async for status in session.status_changes():
                seen.append((status.state, status.attempt))
                watching.set()

        watcher = asyncio.create_task(watch())
        await watching.wait()
        async with session.subscribe() as sub:
            assert texts(await take(sub, 1)) == ["a"]
    await asyncio.wait_for(watcher, 5)
    assert seen == [
        (ConnectionState.IDLE, 0),
        (ConnectionState.CONNECTING, 0),
        (ConnectionState.RECONNECTING, 1),
        (ConnectionState.RECONNECTING, 2),
        (ConnectionState.OFFLINE, 3),
        (ConnectionState.CONNECTED, 0),
        (ConnectionState.CLOSED, 0),
    ]


async def test_an_offset_that_is_gone_is_an_explicit_error_never_a_gap() -> None:
    transport = ScriptedTransport(
        [
            ("o_100", [batch("o_100", "o_101", "x", up_to_date=False), ConnectionLost("cut")]),
            ("o_101", [OffsetGone("retention dropped it", status=410)]),
        ]
    )
    async with session_over(transport) as session:
        async with session.subscribe(Position("o_100")) as sub:
            assert texts(await take(sub, 1)) == ["x"]
            with pytest.raises(OffsetGone):
                await take(sub, 1)
        assert session.status.state is ConnectionState.FAILED
    assert transport.requested == ["o_100", "o_101"]  # no retry of a fatal error


async def test_giving_up_reconnecting_fails_the_subscription() -> None:
    transport = ScriptedTransport([("-1", [ConnectionLost("down")]) for _ in range(3)])
    async with session_over(
        transport, reconnect=ReconnectPolicy(initial_delay=0.001, max_attempts=3)
    ) as session:
        async with session.subscribe() as sub:
            with pytest.raises(ConnectionLost):
                await take(sub, 1)
        assert session.status.state is ConnectionState.FAILED


async def test_duplicates_in_the_log_are_dropped_but_the_position_moves() -> None:
    first = msg("once", event_id="same")
    again = msg("once again", event_id="same")
    transport = ScriptedTransport(
        [("-1", [TransportBatch((first, again, msg("next")), "-1", "o_003", True, False)])]
    )
    store = MemoryOffsetStore()
    async with session_over(transport) as session:
        async with session.subscribe(offset_store=store, consumer="c") as sub:
            assert texts(await take(sub, 2)) == ["once", "next"]
        assert await store.load(sub.key) == Position("o_003")


async def test_start_now_is_pinned_before_the_first_connection() -> None:
    transport = ScriptedTransport([("o_042", [batch("o_042", "o_043", "fresh")])])
    transport.tail_offset = "o_042"
    async with session_over(transport) as session:
        sub = session.subscribe("now")
        assert await sub.start() == Position("o_042")
        assert texts(await take(sub, 1)) == ["fresh"]
        await sub.aclose()


async def test_a_closed_stream_ends_the_iteration() -> None:
    transport = ScriptedTransport([("-1", [batch("-1", "o_001", "bye", closed=True)])])
    async with session_over(transport) as session, session.subscribe() as sub:
        events = [e async for e in sub]
    assert texts(events) == ["bye"]
    assert transport.requested == ["-1"]


async def test_unknown_events_are_delivered_not_dropped() -> None:
    transport = ScriptedTransport(
        [
            (
                "-1",
                [
                    TransportBatch(
                        ({"type": "reaction", "event_id": "r1"},), "-1", "o_1", True, False
                    )
                ],
            )
        ]
    )
    async with session_over(transport) as session, session.subscribe() as sub:
        (event,) = await take(sub, 1)
    assert event.type == "reaction"


def test_http_410_maps_to_offset_gone_and_is_not_retried() -> None:
    calls: list[httpx.Request] = []

    def gone(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(410, text="offset below retention")

    async def run() -> None:
        client = httpx.AsyncClient(transport=httpx.MockTransport(gone))
        async with DurableStream(
            "http://test/v1/stream/x", client=client, content_type="text/plain"
        ) as stream:
            with pytest.raises(OffsetGone) as info:
                await stream.read("o_1")
            assert info.value.status == 410
            assert info.value.url == "http://test/v1/stream/x"
            with pytest.raises(OffsetGone):
                async for _ in stream.follow("o_1", live="sse"):
                    pass
        await client.aclose()

    asyncio.run(run())
    assert len(calls) == 2
