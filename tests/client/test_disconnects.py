"""Deterministic disconnects: faults at exact points, through the proxy, on both
servers and both transports.

Every test here cuts connections at a chosen point (after the N-th SSE event
or WebSocket frame, after N bytes, after the server applied a request but
before the client got the answer) and checks the guarantees: each event
delivered exactly once and in order; a retried publish never duplicates; a
cancel still ends its turn exactly once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from durable_client import (
    Agent,
    AnyEvent,
    Author,
    ConnectionState,
    EndReason,
    IncomingTurn,
    ReconnectPolicy,
    ReplyStatus,
    RetryPolicy,
    Session,
    Subscription,
    TextDelta,
    Transcript,
    TurnEnd,
    UserMessage,
)
from durable_client.streams import DurableStream
from durable_client.transports import HttpTransport
from mock_server.chaos import ChaosProxy as Proxy
from mock_server.chaos import HttpFault as Fault
from mock_server.chaos import WsFault

pytestmark = pytest.mark.both_transports

FAST_RECONNECT = ReconnectPolicy(initial_delay=0.005, max_delay=0.02)
FAST_RETRY = RetryPolicy(initial_delay=0.005, max_delay=0.02, max_attempts=5)
ANN = Author.user("ann")


def session_at(base: str, session_id: str, author: Author = ANN, **kwargs: object) -> Session:
    return Session(
        base,
        session_id,
        author=author,
        retry=FAST_RETRY,
        reconnect=FAST_RECONNECT,
        **kwargs,  # type: ignore[arg-type]
    )


async def next_event(subscription: Subscription, timeout: float = 10.0) -> AnyEvent:
    return await asyncio.wait_for(subscription.__anext__(), timeout)


async def publish_history(session: Session, batches: int, per_batch: int) -> list[str]:
    """Publish ``batches`` requests of ``per_batch`` events each; their texts."""
    texts = []
    for b in range(batches):
        futures = []
        for i in range(per_batch):
            text = f"h{b}.{i}"
            texts.append(text)
            futures.append(session.publish_nowait(UserMessage(author=ANN, text=text)))
        await asyncio.gather(*futures)
    return texts


def text_of(event: AnyEvent) -> str:
    assert isinstance(event, UserMessage), event
    return event.text


# The same fault, wherever the session's transport puts it.


def cut_after_events(transport: str, session_id: str, n: int) -> Fault | WsFault:
    """Cut the reader's connection after the n-th SSE event or WebSocket frame."""
    if transport == "websocket":
        return WsFault(after=n)
    return Fault(method="GET", sse=True, path_contains=session_id, after_events=n)


def lose_append_answer(transport: str, session_id: str, nth: int) -> Fault | WsFault:
    """The server applies the nth append; its answer never reaches the client."""
    if transport == "websocket":
        return WsFault(contains='"type":"ack"', before=nth)
    return Fault(method="POST", path_contains=session_id, nth=nth, lose_response=True)


def drop_append(transport: str, session_id: str) -> Fault | WsFault:
    """The first append never reaches the server."""
    if transport == "websocket":
        return WsFault(direction="up", contains='"op":"append"', before=1)
    return Fault(method="POST", path_contains=session_id, drop_request=True)


async def test_cut_after_event_n_loses_and_duplicates_nothing(
    server_url: str, transport: str, proxy: Proxy, unique: Callable[[str], str]
) -> None:
    fired = 0
    # Over WebSocket the reader gets "subscribed", a presence snapshot, one
    # frame of history and ten live frames: 13 cut points, then a few past them.
    cut_points = range(31) if transport == "http" else range(16)
    for n in cut_points:
        session_id = unique(f"cut{n}")
        async with (
            session_at(server_url, session_id) as writer,
            session_at(proxy.url, session_id, Author.user("reader")) as reader,
        ):
            await writer.create()
            expected = await publish_history(writer, batches=3, per_batch=2)
            fault = proxy.add(cut_after_events(transport, session_id, n))
            got: list[AnyEvent] = []
            async with reader.subscribe("beginning") as events:
                for _ in expected:
                    got.append(await next_event(events))
                # Live: one event at a time, each delivered before the next is sent,
                # so the SSE events on the wire are the same on every run.
                for i in range(10):
                    text = f"live{i}"
                    expected.append(text)
                    await writer.send_message(text)
                    got.append(await next_event(events))
            fired += fault.fired.is_set()
            assert [text_of(e) for e in got] == expected, f"cut after event {n}"
            assert len({e.event_id for e in got}) == len(got), f"cut after event {n}"
            if transport == "websocket":
                assert reader.transport_name == "websocket"
    # The cuts really happened (the last N may lie past the end).
    assert fired >= (20 if transport == "http" else 13)


async def test_cut_after_n_bytes_of_an_answer(
    server_url: str, transport: str, proxy: Proxy, unique: Callable[[str], str]
) -> None:
    """Cuts mid-answer: a long-poll response over HTTP, mid-frame over WebSocket."""
    for n in [0, 1, 5, 17, 40, 90, 150, 300, 600, 1200]:
        session_id = unique(f"bytes{n}")
        live: dict[str, object] = (
            {"transport": HttpTransport(live="long-poll")} if transport == "http" else {}
        )
        async with (
            session_at(server_url, session_id) as writer,
            session_at(proxy.url, session_id, Author.user("reader"), **live) as reader,
        ):
            await writer.create()
            expected = await publish_history(writer, batches=4, per_batch=3)
            if transport == "websocket":
                proxy.add(WsFault(after_bytes=n))
            else:
                proxy.add(Fault(method="GET", path_contains=session_id, after_bytes=n))
            async with reader.subscribe("beginning") as events:
                got = [text_of(await next_event(events)) for _ in expected]
                await writer.send_message("after")
                got.append(text_of(await next_event(events)))
            assert got == [*expected, "after"], f"cut after {n} bytes"


@pytest.mark.parametrize("lost", [1, 2, 3])
async def test_a_publish_whose_answer_is_lost_is_not_duplicated(
    server_url: str, transport: str, proxy: Proxy, unique: Callable[[str], str], lost: int
) -> None:
    session_id = unique("lost")
    async with session_at(server_url, session_id) as direct:
        await direct.create()
    async with session_at(proxy.url, session_id) as session:
        fault = proxy.add(lose_append_answer(transport, session_id, lost))
        acks = [await session.send_message(f"m{i}") for i in range(4)]
        assert fault.fired.is_set()
        assert acks[lost - 1].duplicate  # the retry was recognised by the server
        assert acks[lost - 1].offset is None  # where it landed is unknown, not guessed
        assert all(a.offset for a in acks if not a.duplicate)
        assert [a.duplicate for a in acks].count(True) == 1
    async with session_at(server_url, session_id) as direct, direct.subscribe() as events:
        got = [text_of(await next_event(events)) for _ in range(4)]
        await asyncio.wait_for(events.caught_up.wait(), 5)
    assert got == ["m0", "m1", "m2", "m3"]
    async with DurableStream(f"{server_url}/v1/stream/sessions/{session_id}") as raw:
        assert len((await raw.read()).messages) == 4  # exactly once in the log


async def test_a_publish_dropped_before_the_server_is_resent(
    server_url: str, transport: str, proxy: Proxy, unique: Callable[[str], str]
) -> None:
    session_id = unique("drop")
    async with session_at(proxy.url, session_id) as session:
        await session.create()
        fault = proxy.add(drop_append(transport, session_id))
        ack = await session.send_message("once")
        assert not ack.duplicate
        assert fault.fired.is_set()
    async with DurableStream(f"{server_url}/v1/stream/sessions/{session_id}") as raw:
        (message,) = (await raw.read()).messages
    assert message["text"] == "once"


async def test_offline_then_online_resumes_without_gap(
    server_url: str, proxy: Proxy, unique: Callable[[str], str]
) -> None:
    session_id = unique("offline")
    states: list[ConnectionState] = []
    async with (
        session_at(server_url, session_id) as writer,
        session_at(proxy.url, session_id, Author.user("reader")) as reader,
    ):
        await writer.create()
        offline = asyncio.Event()

        async def watch() -> None:
            async for status in reader.status_changes():
                states.append(status.state)
                if status.state is ConnectionState.OFFLINE:
                    offline.set()

        watcher = asyncio.create_task(watch())
        async with reader.subscribe() as events:
            await writer.send_message("before")
            assert text_of(await next_event(events)) == "before"
            await proxy.offline()
            await writer.send_message("during 1")
            await writer.send_message("during 2")
            await asyncio.wait_for(offline.wait(), 10)
            await proxy.online()
            got = [text_of(await next_event(events)) for _ in range(2)]
            await writer.send_message("after")
            got.append(text_of(await next_event(events)))
        assert got == ["during 1", "during 2", "after"]
        await reader.aclose()
        await asyncio.wait_for(watcher, 5)
    # connecting -> connected -> reconnecting/offline -> connected -> closed
    assert ConnectionState.RECONNECTING in states
    assert ConnectionState.OFFLINE in states
    assert states[states.index(ConnectionState.OFFLINE) + 1] is ConnectionState.CONNECTED
    assert states[-1] is ConnectionState.CLOSED


async def answer_forever(agent: Agent, turn: IncomingTurn) -> None:
    async with agent.reply(turn) as reply:
        i = 0
        while True:
            await reply.write(f"t{i} ")
            i += 1
            await asyncio.sleep(0.002)  # the model's pace


@pytest.fixture
async def agent_behind_proxy(
    server_url: str, proxy: Proxy, unique: Callable[[str], str]
) -> AsyncIterator[tuple[Session, Agent]]:
    """A user session direct to the server and an agent whose every request
    goes through the proxy."""
    session_id = unique("agent")
    async with session_at(server_url, session_id) as creator:
        await creator.create()
    async with (
        session_at(server_url, session_id) as user,
        session_at(proxy.url, session_id, Author.agent("bot")) as agent_session,
        Agent(agent_session) as agent,
    ):

        async def serve() -> None:
            async with asyncio.TaskGroup() as group:
                async for turn in agent.turns():
                    group.create_task(answer_forever(agent, turn))

        task = asyncio.create_task(serve())
        try:
            yield user, agent
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def read_until_end(subscription: Subscription, turn_id: str) -> list[AnyEvent]:
    events: list[AnyEvent] = []
    async with asyncio.timeout(10):
        async for event in subscription:
            events.append(event)
            if isinstance(event, TurnEnd) and event.turn_id == turn_id:
                return events
    return events


async def test_cancel_survives_the_agent_losing_its_connections(
    agent_behind_proxy: tuple[Session, Agent], proxy: Proxy
) -> None:
    user, _agent = agent_behind_proxy
    async with user.subscribe() as events:
        ack = await user.send_message("go on")
        seen: list[AnyEvent] = []
        while not any(isinstance(e, TextDelta) for e in seen):
            seen.append(await next_event(events))
        await user.cancel(ack.event.turn_id)
        proxy.cut_all()  # the agent may not have seen the cancel yet
        seen += await read_until_end(events, ack.event.turn_id)
        marker = await user.send_message("marker")
        while seen[-1].event_id != marker.event.event_id:
            seen.append(await next_event(events))
    ends = [e for e in seen if isinstance(e, TurnEnd) and e.turn_id == ack.event.turn_id]
    assert [e.reason for e in ends] == [EndReason.CANCELLED]
    turn = Transcript.fold(seen).turn(ack.event.turn_id)
    assert turn is not None
    assert turn.replies["bot"].status is ReplyStatus.CANCELLED
    assert turn.replies["bot"].text


async def test_lost_answers_during_a_reply_duplicate_no_text(
    server_url: str, transport: str, proxy: Proxy, unique: Callable[[str], str]
) -> None:
    session_id = unique("reply")
    written: list[str] = []

    async def answer(agent: Agent, turn: IncomingTurn) -> None:
        async with agent.reply(turn) as reply:
            for i in range(30):
                await reply.write(f"w{i} ")
                written.append(f"w{i} ")
                await asyncio.sleep(0.003)  # the model's pace

    async with (
        session_at(server_url, session_id) as user,
        session_at(proxy.url, session_id, Author.agent("bot"), publish_linger=0.0) as agent_session,
    ):
        await user.create()
        for k in (2, 4, 6, 8):
            proxy.add(lose_append_answer(transport, session_id, k))
        async with Agent(agent_session, rollup_window=0.005) as agent, user.subscribe() as events:
            ack = await user.send_message("count")
            turn = await anext(aiter(agent.turns()))
            await answer(agent, turn)
            seen = await read_until_end(events, ack.event.turn_id)
    assert sum(f.fired.is_set() for f in proxy.faults) >= 3
    reply = Transcript.fold(seen).turn(ack.event.turn_id)
    assert reply is not None
    assert reply.replies["bot"].text == "".join(written)
    deltas = [e for e in seen if isinstance(e, TextDelta)]
    assert [d.index for d in deltas] == list(range(len(deltas)))
