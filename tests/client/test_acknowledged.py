"""Acknowledged means in the log: the cases where an acknowledged publish used to
go missing, or a resumed subscriber used to skip silently, each as a user would
meet it, over WebSocket and HTTP (and the Node reference server where the case
is the SDK's to get right).

- a process restarted with a stable producer id (its stamps were answered as
  "duplicate" and dropped);
- one producer id on two sessions;
- a session deleted and re-created, and a memory server restarted, under a
  subscriber that resumes from a saved position;
- an offset the stream never issued;
- a retried create that did create the stream;
- closing a subscription or session from another task while a consumer waits.
"""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from durable_client import (
    AnyEvent,
    Author,
    BadRequest,
    EpochReused,
    FileOffsetStore,
    Position,
    ReconnectPolicy,
    RetryPolicy,
    Session,
    StreamReplaced,
    Subscription,
    UserMessage,
)
from durable_client.streams import DurableStream, IdempotentProducer
from mock_server.chaos import ChaosProxy as Proxy
from mock_server.chaos import HistoryRecorder
from mock_server.chaos import HttpFault as Fault
from mock_server.testing import serve
from tests._await import until

pytestmark = pytest.mark.both_transports

FAST_RECONNECT = ReconnectPolicy(initial_delay=0.01, max_delay=0.05, offline_after=3)
FAST_RETRY = RetryPolicy(initial_delay=0.01, max_delay=0.05, max_attempts=4)
ADA = Author.user("ada")


def session_at(base: str, session_id: str, **kwargs: Any) -> Session:
    kwargs.setdefault("author", ADA)
    return Session(base, session_id, retry=FAST_RETRY, reconnect=FAST_RECONNECT, **kwargs)


async def read_all(base: str, session_id: str) -> list[AnyEvent]:
    """Every event in the session now (a fresh reader, from the beginning)."""
    events: list[AnyEvent] = []
    async with (
        session_at(base, session_id, transport="http") as reader,
        reader.subscribe("beginning") as subscription,
        asyncio.timeout(10),
    ):
        async for event in subscription:
            events.append(event)
            if subscription.caught_up.is_set():
                break
    return events


async def take(subscription: Subscription, n: int) -> list[AnyEvent]:
    events: list[AnyEvent] = []
    async with asyncio.timeout(10):
        while len(events) < n:
            events.append(await subscription.__anext__())
    return events


def texts(events: list[AnyEvent]) -> list[str]:
    return [e.text for e in events if isinstance(e, UserMessage)]


@pytest.fixture
def session_id(unique: Callable[[str], str]) -> str:
    return unique("ack")


# --- 1. a restarted process with a stable producer id ---------------------------------


async def test_a_rerun_with_a_stable_producer_id_keeps_every_publish(
    server_url: str, session_id: str
) -> None:
    history = HistoryRecorder()
    for run in range(3):
        async with session_at(server_url, session_id, producer_id="ada-laptop") as session:
            await session.create()
            for i in range(30):
                ack = await session.send_message(f"run {run} line {i}")
                assert not ack.duplicate, "a new event is never a duplicate"
                history.published(ack.event.event_id, offset=ack.offset)
    seen = await read_all(server_url, session_id)
    for event in seen:
        history.seen("reader", event.event_id)
    report = history.assert_ok()
    assert report.totals()["lost"] == 0
    assert len(texts(seen)) == 90


async def test_a_rerun_of_the_stream_producer_with_a_stable_id_loses_nothing_silently(
    server_url: str, unique: Callable[[str], str]
) -> None:
    url = f"{server_url}/v1/stream/{unique('log')}"
    async with DurableStream(url) as log:
        await log.create(content_type="text/plain")
        async with IdempotentProducer(log, "writer-1") as producer:
            for i in range(5):
                producer.append(f"line {i}\n")
        # The same program again: the same id and epoch, the same bytes.
        producer = IdempotentProducer(log, "writer-1")
        for i in range(5):
            producer.append(f"line {i}\n")
        with pytest.raises(EpochReused):
            await producer.flush()
        await producer.aclose()
        # With auto_claim (or epoch=previous + 1) the rerun lands.
        async with IdempotentProducer(log, "writer-1", auto_claim=True) as producer:
            for i in range(5):
                producer.append(f"line {i}\n")
        # And the default, a producer id of its own per object, always lands.
        async with IdempotentProducer(log) as producer:
            for i in range(5):
                producer.append(f"line {i}\n")
        text = (await log.read()).text()
    assert text == "".join(f"line {i}\n" for i in range(5)) * 3


# --- 2. one producer id on two sessions -------------------------------------------------


async def test_one_producer_id_on_two_sessions_scopes_its_state_per_session(
    server_url: str, unique: Callable[[str], str]
) -> None:
    first, second = unique("a"), unique("b")
    history = {first: HistoryRecorder(), second: HistoryRecorder()}
    # One after the other, then both at once: each session's log gets its own.
    for name in (first, second):
        async with session_at(server_url, name, producer_id="shared") as session:
            await session.create()
            for i in range(100):
                ack = await session.send_message(f"{name} {i}")
                history[name].published(ack.event.event_id, offset=ack.offset)
    async with (
        session_at(server_url, first, producer_id="shared") as a,
        session_at(server_url, second, producer_id="shared") as b,
    ):
        acks = await asyncio.gather(
            *[s.send_message(f"both {i}") for i in range(100) for s in (a, b)]
        )
        for ack, session in zip(acks, [a, b] * 100, strict=True):
            assert not ack.duplicate
            history[session.session_id].published(ack.event.event_id, offset=ack.offset)
    for name in (first, second):
        for event in await read_all(server_url, name):
            history[name].seen("reader", event.event_id)
        assert history[name].assert_ok().totals()["lost"] == 0


# --- 3. a session deleted and re-created under a subscriber that resumes ----------------


# The Node reference server does not tell one incarnation of a stream from
# another, nor keep idempotency keys: those tests run against ours only.
ours_only = pytest.mark.ours_only


async def _recreate(base: str, session_id: str, count: int) -> list[str]:
    async with session_at(base, session_id, transport="http") as session:
        async with DurableStream(session.url) as stream:
            await stream.delete()
        await session.create()
        return [(await session.send_message(f"new {i}")).event.event_id for i in range(count)]


async def _read_some_and_save(base: str, session_id: str, store: FileOffsetStore) -> Position:
    """60 events in the session; a reader takes 10 and saves its position."""
    async with session_at(base, session_id) as session:
        await session.create()
        for i in range(60):
            await session.send_message(f"old {i}")
        async with session.subscribe("beginning", offset_store=store) as events:
            await take(events, 10)
        saved = await store.load(events.key)
    assert saved is not None
    return saved


@ours_only
async def test_a_subscriber_resuming_into_a_recreated_session_is_told(
    server_url: str, session_id: str, tmp_path: Path
) -> None:
    store = FileOffsetStore(tmp_path / "offsets")
    saved = await _read_some_and_save(server_url, session_id, store)
    assert saved.incarnation is not None
    await _recreate(server_url, session_id, 60)
    # The same program again (a new process would do exactly this).
    async with (
        session_at(server_url, session_id) as session,
        session.subscribe("beginning", offset_store=store) as events,
    ):
        with pytest.raises(StreamReplaced) as caught:
            await take(events, 1)
    assert caught.value.expected == saved.incarnation
    assert caught.value.actual not in (None, saved.incarnation)


@ours_only
async def test_on_replaced_restart_reads_the_new_session_from_its_beginning(
    server_url: str, session_id: str, tmp_path: Path
) -> None:
    store = FileOffsetStore(tmp_path / "offsets")
    await _read_some_and_save(server_url, session_id, store)
    fresh = await _recreate(server_url, session_id, 49)
    history = HistoryRecorder()
    for event_id in fresh:
        history.published(event_id)
    async with (
        session_at(server_url, session_id) as session,
        session.subscribe("beginning", offset_store=store, on_replaced="restart") as events,
    ):
        for event in await take(events, 49):
            history.seen("resumed", event.event_id)
        assert events.replacements == 1
    history.assert_ok()
    saved = await store.load(events.key)
    assert saved is not None
    assert saved.incarnation == (await _incarnation(server_url, session_id))


async def _incarnation(base: str, session_id: str) -> str | None:
    async with (
        session_at(base, session_id, transport="http") as session,
        DurableStream(session.url) as stream,
    ):
        return (await stream.head()).incarnation


@ours_only
async def test_a_subscriber_offline_across_a_recreate_sees_replaced_not_a_gap(
    server_url: str, session_id: str, proxy: Proxy
) -> None:
    async with session_at(proxy.url, session_id) as session:
        await session.create()
        for i in range(5):
            await session.send_message(f"old {i}")
        async with session.subscribe("beginning") as events:
            await take(events, 5)
            await proxy.offline()  # the train enters the tunnel
            await _recreate(server_url, session_id, 50)
            await proxy.online()  # the reader reconnects with its old offset
            with pytest.raises(StreamReplaced):
                await take(events, 1)


@ours_only
async def test_a_memory_server_restart_is_a_new_incarnation(
    transport: str, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    name = unique("restart")
    store = FileOffsetStore(tmp_path / "offsets")
    async with serve(websocket=transport == "websocket") as first:
        port = int(first.url.rsplit(":", 1)[1])
        async with session_at(first.url, name) as session:
            await session.create()
            for i in range(30):
                await session.send_message(f"before {i}")
            async with session.subscribe("beginning", offset_store=store) as events:
                await take(events, 20)
    async with (
        serve(port=port, websocket=transport == "websocket") as second,
        session_at(second.url, name) as session,
    ):
        await session.create()
        for i in range(50):
            await session.send_message(f"after {i}")
        async with session.subscribe("beginning", offset_store=store) as events:
            with pytest.raises(StreamReplaced):
                await take(events, 1)


# --- 4. offsets never issued -------------------------------------------------------------


@ours_only
async def test_an_offset_inside_a_record_is_refused_not_read(
    server_url: str, session_id: str
) -> None:
    async with session_at(server_url, session_id) as session:
        await session.create()
        ack = await session.send_message("a message long enough to have an inside")
        assert ack.offset is not None
        prefix, position = ack.offset.split("_")
        inside = f"{prefix}_{int(position) - 5:016d}"
        async with session.subscribe(Position(inside)) as events:
            with pytest.raises(BadRequest):
                await take(events, 1)


# --- create() says what happened ----------------------------------------------------------


@ours_only
async def test_a_retried_create_that_created_the_stream_says_so(
    server_url: str, proxy: Proxy, session_id: str
) -> None:
    proxy.add(Fault(method="PUT", lose_response=True))
    async with session_at(proxy.url, session_id, transport="http") as session:
        assert await session.create() is True  # its first PUT created it; the answer was lost
        assert await session.create() is False  # now it existed
    assert len([r for r in proxy.requests if r[0] == "PUT"]) == 3


# --- closing from another task ends iteration -------------------------------------------


@pytest.mark.parametrize("close", ["subscription", "session"])
async def test_closing_from_another_task_ends_a_waiting_iteration(
    server_url: str, session_id: str, close: str
) -> None:
    async with session_at(server_url, session_id) as session:
        await session.create()
        await session.send_message("one")
        subscription = session.subscribe("beginning")
        await subscription.start()
        seen: list[AnyEvent] = []

        async def consume() -> None:
            async for event in subscription:
                seen.append(event)

        consumer = asyncio.create_task(consume())
        async with asyncio.timeout(10):
            await subscription.caught_up.wait()
        await until(lambda: bool(seen))  # the consumer, another task, took "one"
        if close == "subscription":
            await subscription.aclose()
        else:
            await session.aclose()
        await asyncio.wait_for(consumer, 5)  # ends, does not hang
        assert texts(seen) == ["one"]


# --- no future left unretrieved ---------------------------------------------------------


@ours_only
async def test_server_stops_and_dropped_connections_leave_no_unretrieved_future(
    transport: str, unique: Callable[[str], str]
) -> None:
    loop = asyncio.get_running_loop()
    reports: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reports.append(context))
    name, port, websocket = unique("stops"), 0, transport == "websocket"
    try:
        for round_ in range(4):
            # Publishes and a subscription in flight when the server stops.
            async with serve(port=port, websocket=websocket) as running:
                port = int(running.url.rsplit(":", 1)[1])
                session = session_at(running.url, name)
                await session.create()
                subscription = session.subscribe("beginning")
                await subscription.start()
                pending = [session.publish_nowait(_msg(round_, i)) for i in range(30)]
                # A moment for the first requests to leave, so the server stops with
                # them on the wire. (Awaiting an ack instead lets them all land, and
                # the test no longer fails without the fix; a late stop can only make
                # it pass, never fail wrongly.)
                await asyncio.sleep(0.002)
                session.drop_connections()
            async with serve(port=port, websocket=websocket):
                await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 10)
                await subscription.aclose()
                await session.aclose()
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert [c.get("message") for c in reports] == []


def _msg(round_: int, i: int) -> UserMessage:
    return UserMessage(author=ADA, text=f"{round_}.{i}", turn_id=uuid.uuid4().hex)
