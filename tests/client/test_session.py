"""Sessions over real sockets, against our server and the Node reference server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from durable_client import (
    AnyEvent,
    Author,
    ConnectionState,
    ConnectionStatus,
    FileOffsetStore,
    MemoryOffsetStore,
    Position,
    ReconnectPolicy,
    RetryPolicy,
    Session,
    StreamNotFound,
    Subscription,
    UserMessage,
)
from durable_client.transports import HttpTransport
from mock_server.chaos import ChaosProxy as Proxy

pytestmark = pytest.mark.both_transports

FAST_RECONNECT = ReconnectPolicy(initial_delay=0.01, max_delay=0.05, offline_after=3)
FAST_RETRY = RetryPolicy(initial_delay=0.01, max_delay=0.05, max_attempts=3)
ANN = Author.user("ann")
BEN = Author.user("ben")


def session_at(base: str, session_id: str, author: Author = ANN, **kwargs: object) -> Session:
    return Session(
        base,
        session_id,
        author=author,
        retry=FAST_RETRY,
        reconnect=FAST_RECONNECT,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
def session_id(unique: Callable[[str], str]) -> str:
    return unique("session")


@pytest.fixture
async def ann(server_url: str, session_id: str) -> AsyncIterator[Session]:
    async with session_at(server_url, session_id) as session:
        await session.create()
        yield session


async def take(subscription: Subscription, n: int, timeout: float = 10.0) -> list[AnyEvent]:
    """The next ``n`` events (the timeout only bounds a failure)."""
    events: list[AnyEvent] = []
    async with asyncio.timeout(timeout):
        while len(events) < n:
            events.append(await subscription.__anext__())
    return events


def texts(events: list[AnyEvent]) -> list[str]:
    return [e.text for e in events if isinstance(e, UserMessage)]


async def test_history_then_live_without_gap_or_duplicate(ann: Session) -> None:
    for i in range(5):
        await ann.send_message(f"old {i}")
    async with ann.subscribe("beginning") as events:
        history = await take(events, 5)
        await asyncio.wait_for(events.caught_up.wait(), 5)
        for i in range(5):
            await ann.send_message(f"new {i}")
        live = await take(events, 5)
    got = texts(history + live)
    assert got == [f"old {i}" for i in range(5)] + [f"new {i}" for i in range(5)]
    assert len({e.event_id for e in history + live}) == 10


async def test_start_now_skips_history(ann: Session) -> None:
    await ann.send_message("before")
    async with ann.subscribe("now") as events:
        await ann.send_message("after")
        (event,) = await take(events, 1)
    assert texts([event]) == ["after"]


async def test_publish_returns_the_offset_it_landed_at(ann: Session) -> None:
    first = await ann.send_message("one")
    second = await ann.send_message("two")
    assert first.offset is not None
    assert second.offset is not None
    assert first.offset < second.offset
    assert not first.duplicate
    async with ann.subscribe(first.offset) as events:
        (event,) = await take(events, 1)
    assert event.event_id == second.event.event_id


async def test_a_second_client_sees_the_same_events(
    ann: Session, server_url: str, session_id: str
) -> None:
    async with (
        session_at(server_url, session_id, BEN) as ben,
        ann.subscribe() as a,
        ben.subscribe() as b,
    ):
        await ann.send_message("from ann")
        await ben.send_message("from ben")
        seen_by_a = await take(a, 2)
        seen_by_b = await take(b, 2)
    assert [e.event_id for e in seen_by_a] == [e.event_id for e in seen_by_b]
    assert {e.author.id for e in seen_by_a if isinstance(e, UserMessage)} == {"ann", "ben"}


async def test_a_restarted_process_resumes_from_the_file_store(
    ann: Session, server_url: str, session_id: str, tmp_path: Path
) -> None:
    store_dir = tmp_path / "offsets"
    for i in range(6):
        await ann.send_message(f"m{i}")
    # First "process": handles three events, then stops.
    async with (
        session_at(server_url, session_id) as first,
        first.subscribe(offset_store=FileOffsetStore(store_dir), consumer="tui") as sub,
    ):
        handled = texts(await take(sub, 3))
    assert handled == ["m0", "m1", "m2"]
    await ann.send_message("m6")
    # Second "process" (new objects, same directory): continues after m2.
    async with (
        session_at(server_url, session_id) as second,
        second.subscribe(
            "now",  # ignored: the store has a position for this consumer
            offset_store=FileOffsetStore(store_dir),
            consumer="tui",
        ) as sub,
    ):
        rest = texts(await take(sub, 4))
    assert rest == ["m3", "m4", "m5", "m6"]


async def test_resume_inside_a_batch_of_several_events(
    ann: Session, server_url: str, session_id: str
) -> None:
    # Three events in one request share one offset; stop after the second.
    futures = [ann.publish_nowait(UserMessage(author=ANN, text=f"b{i}")) for i in range(3)]
    acks = await asyncio.gather(*futures)
    assert len({a.offset for a in acks}) == 1
    store = MemoryOffsetStore()
    async with ann.subscribe(offset_store=store, consumer="c") as sub:
        assert texts(await take(sub, 2)) == ["b0", "b1"]
    saved = await store.load(sub.key)
    assert saved is not None
    assert saved.skip == 2
    async with ann.subscribe(offset_store=store, consumer="c") as sub:
        assert texts(await take(sub, 1)) == ["b2"]


async def test_start_from_a_saved_position(ann: Session) -> None:
    acks = [await ann.send_message(f"p{i}") for i in range(3)]
    assert acks[0].offset is not None
    async with ann.subscribe(Position(acks[0].offset)) as sub:
        assert texts(await take(sub, 2)) == ["p1", "p2"]


async def test_connection_states_for_a_ui(ann: Session) -> None:
    seen: list[ConnectionStatus] = []
    connected = asyncio.Event()

    async def watch() -> None:
        async for status in ann.status_changes():
            seen.append(status)
            if status.state is ConnectionState.CONNECTED:
                connected.set()

    watcher = asyncio.create_task(watch())
    async with ann.subscribe() as sub:
        await ann.send_message("hi")
        await take(sub, 1)
        await asyncio.wait_for(connected.wait(), 5)
        assert ann.status.state is ConnectionState.CONNECTED
    await ann.aclose()
    await asyncio.wait_for(watcher, 5)
    states = [s.state for s in seen]
    assert states[0] in (ConnectionState.IDLE, ConnectionState.CONNECTING)
    assert ConnectionState.CONNECTED in states
    assert states[-1] is ConnectionState.CLOSED


async def test_publish_is_queued_while_the_server_is_unreachable(
    proxy: Proxy, session_id: str
) -> None:
    async with session_at(proxy.url, session_id) as session:
        await session.create()
        offline = asyncio.Event()

        async def watch() -> None:
            async for status in session.status_changes():
                if status.state is ConnectionState.OFFLINE:
                    offline.set()

        watcher = asyncio.create_task(watch())
        await proxy.offline()
        publishing = asyncio.create_task(session.send_message("while offline"))
        await asyncio.wait_for(offline.wait(), 10)
        assert not publishing.done()
        assert session.status.attempt >= 3
        await proxy.online()
        ack = await asyncio.wait_for(publishing, 10)
        assert ack.offset is not None
        assert session.status.state is ConnectionState.CONNECTED
        async with session.subscribe() as sub:
            events = await take(sub, 1)
            await asyncio.wait_for(sub.caught_up.wait(), 5)
        assert texts(events) == ["while offline"]
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def test_a_closed_session_stream_ends_subscriptions(
    ann: Session, server_url: str, session_id: str
) -> None:
    from durable_client.streams import DurableStream

    await ann.send_message("last words")
    async with DurableStream(f"{server_url}/v1/stream/sessions/{session_id}") as raw:
        await raw.close()
    async with ann.subscribe() as sub:
        events = [event async for event in sub]
    assert texts(events) == ["last words"]
    assert ann.status.state is ConnectionState.CLOSED


async def test_subscribing_to_a_missing_session_fails(server_url: str, session_id: str) -> None:
    async with session_at(server_url, session_id) as session:
        async with session.subscribe() as sub:
            with pytest.raises(StreamNotFound):
                await take(sub, 1)
        assert session.status.state is ConnectionState.FAILED


async def test_publish_after_a_fatal_error_recovers(server_url: str, session_id: str) -> None:
    async with session_at(server_url, session_id) as session:
        with pytest.raises(StreamNotFound):
            await session.send_message("too early")
        await session.create()
        ack = await session.send_message("now it exists")
        assert ack.offset is not None


async def test_custom_path_template(server_url: str, session_id: str) -> None:
    async with session_at(
        server_url, session_id, path_template="/v1/stream/custom/{session_id}/events"
    ) as session:
        assert session.url.endswith(f"/v1/stream/custom/{session_id}/events")
        await session.create()
        await session.send_message("x")
        async with session.subscribe() as sub:
            assert texts(await take(sub, 1)) == ["x"]


async def test_long_poll_sessions(server_url: str, session_id: str) -> None:
    async with session_at(
        server_url, session_id, transport=HttpTransport(live="long-poll")
    ) as session:
        await session.create()
        async with session.subscribe() as sub:
            await session.send_message("one")
            await session.send_message("two")
            assert texts(await take(sub, 2)) == ["one", "two"]
