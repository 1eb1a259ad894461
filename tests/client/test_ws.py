"""Sessions over the WebSocket transport: the choice of transport and the
fallback, errors, presence, keepalive against a half-open connection, and
dropped connections. The delivery and publish guarantees themselves run over
both transports in test_session, test_agent and test_disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from durable_client import (
    Agent,
    Author,
    ClientClosed,
    ConnectionState,
    IncomingTurn,
    Member,
    PayloadTooLarge,
    PresenceChange,
    PresenceUnavailable,
    ReconnectPolicy,
    RetryPolicy,
    SequenceGap,
    Session,
    StaleEpoch,
    StreamClosed,
    StreamNotFound,
    Subscription,
    UnexpectedStatus,
    UsageError,
    UserMessage,
)
from durable_client.streams import DurableStream, ProducerStamp
from durable_client.transports import (
    AutoTransport,
    HttpTransport,
    WebSocketOptions,
    WebSocketTransport,
)
from mock_server.chaos import ChaosProxy as Proxy
from mock_server.testing import serve
from tests._await import until

FAST_RECONNECT = ReconnectPolicy(initial_delay=0.01, max_delay=0.05)
FAST_RETRY = RetryPolicy(initial_delay=0.01, max_delay=0.05, max_attempts=3)
ANN = Author.user("ann", "Ann")
BOB = Author.user("bob", "Bob")


def session_at(base: str, session_id: str, author: Author = ANN, **kwargs: Any) -> Session:
    return Session(
        base, session_id, author=author, retry=FAST_RETRY, reconnect=FAST_RECONNECT, **kwargs
    )


async def take(subscription: Subscription, n: int, timeout: float = 10.0) -> list[str]:
    texts: list[str] = []
    async with asyncio.timeout(timeout):
        while len(texts) < n:
            event = await anext(subscription)
            assert isinstance(event, UserMessage), event
            texts.append(event.text)
    return texts


async def change_where(
    changes: AsyncIterator[PresenceChange],
    match: Callable[[PresenceChange], bool],
    timeout: float = 10.0,
) -> PresenceChange:
    """The next presence change for which ``match`` holds."""
    async with asyncio.timeout(timeout):
        async for change in changes:
            if match(change):
                return change
    raise AssertionError("presence changes ended")


def ids(members: tuple[Member, ...]) -> set[str]:
    return {m.client_id for m in members}


# --- which transport ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "expected"),
    [("ours_url", "websocket"), ("ours_http_url", "sse"), ("reference_url", "sse")],
)
async def test_auto_uses_websocket_where_offered_and_http_elsewhere(
    server: str, expected: str, request: pytest.FixtureRequest, unique: Callable[[str], str]
) -> None:
    base = str(request.getfixturevalue(server))
    async with session_at(base, unique("auto")) as session:
        assert (session.transport_name, session.presence_available) == ("auto", None)
        await session.create()
        await session.send_message("hello")
        async with session.subscribe() as events:
            assert await take(events, 1) == ["hello"]
        assert session.transport_name == expected
        assert session.presence_available is (expected == "websocket")


async def test_a_transport_can_be_forced(ours_url: str, unique: Callable[[str], str]) -> None:
    session_id = unique("forced")
    choices: list[tuple[dict[str, Any], str]] = [
        ({"transport": "http"}, "sse"),
        ({"transport": HttpTransport(live="long-poll")}, "long-poll"),  # HTTP settings
        ({"transport": "websocket"}, "websocket"),
    ]
    for kwargs, expected in choices:
        async with session_at(ours_url, session_id, **kwargs) as session:
            await session.create()
            await session.send_message(expected)
            async with session.subscribe() as events:
                await take(events, 1)
            assert session.transport_name == expected


async def test_forcing_websocket_where_it_is_refused_fails_clearly(
    ours_http_url: str, unique: Callable[[str], str]
) -> None:
    async with session_at(ours_http_url, unique("refused"), transport="websocket") as session:
        await session.create()  # over HTTP: fine
        with pytest.raises(UnexpectedStatus) as refused:
            await session.send_message("hello")
        assert refused.value.status == 403
        async with session.subscribe() as events:
            with pytest.raises(UnexpectedStatus):
                await take(events, 1)
        assert session.status.state is ConnectionState.FAILED


async def test_a_server_that_stops_offering_websocket_turns_the_session_to_http(
    unique: Callable[[str], str],
) -> None:
    async with serve() as running, session_at(running.url, unique("redeploy")) as session:
        await session.create()
        async with session.subscribe() as events:
            await session.send_message("over websocket")
            assert await take(events, 1) == ["over websocket"]
            assert session.transport_name == "websocket"
            running.app.websocket_handler = None  # as if redeployed without it
            session.drop_connections()
            await session.send_message("over http")
            assert await take(events, 1) == ["over http"]
        assert session.transport_name == "sse"
        assert session.presence_available is False


def test_transport_choices_are_checked() -> None:
    with pytest.raises(UsageError):
        Session("http://127.0.0.1:1", "s", author=ANN, transport="pigeon")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        # The WebSocket protocol addresses streams under /v1/stream/ only.
        Session(
            "http://127.0.0.1:1",
            "s",
            author=ANN,
            transport="websocket",
            path_template="/{session_id}",
        )
    with pytest.raises(UsageError):
        WebSocketOptions(ping_interval=0)


def test_keepalive_defaults() -> None:
    options = WebSocketOptions()
    assert (options.ping_interval, options.ping_timeout, options.close_timeout) == (5.0, 5.0, 1.0)
    assert options.max_message_size is None or options.max_message_size >= 32 * 1024 * 1024


async def test_one_socket_carries_every_subscription_and_publish(
    ours_url: str, unique: Callable[[str], str]
) -> None:
    async with Proxy(ours_url) as proxy, session_at(proxy.url, unique("one")) as session:
        await session.create()
        async with session.subscribe() as first, session.subscribe() as second:
            for i in range(3):
                await session.send_message(f"m{i}")
            assert await take(first, 3) == await take(second, 3) == ["m0", "m1", "m2"]
        handshakes = [target for _, target in proxy.requests if target.startswith("/v1/ws")]
        assert handshakes == ["/v1/ws"]


# --- errors ------------------------------------------------------------------------


async def test_refusals_map_onto_the_same_errors_as_http(
    ours_url: str, unique: Callable[[str], str]
) -> None:
    stream = DurableStream(f"{ours_url}/v1/stream/sessions/{unique('errors')}")
    transport = WebSocketTransport(stream)
    try:
        one = [b'{"n":1}']
        with pytest.raises(StreamNotFound):
            await transport.send_batch(one, stamp=None)
        with pytest.raises(StreamNotFound):
            async for _ in transport.subscribe("-1"):
                pass
        assert await transport.create()
        await transport.send_batch(one, stamp=ProducerStamp("p", 0, 0))
        with pytest.raises(SequenceGap) as gap:
            await transport.send_batch(one, stamp=ProducerStamp("p", 0, 2))
        assert (gap.value.expected_seq, gap.value.received_seq) == (1, 2)
        duplicate = await transport.send_batch(one, stamp=ProducerStamp("p", 0, 0))
        assert duplicate.duplicate
        await transport.send_batch(one, stamp=ProducerStamp("p", 1, 0))
        with pytest.raises(StaleEpoch) as stale:
            await transport.send_batch(one, stamp=ProducerStamp("p", 0, 1))
        assert stale.value.current_epoch == 1
        closed = await transport.send_batch([], stamp=None, close=True)
        assert closed.closed
        with pytest.raises(StreamClosed):
            await transport.send_batch(one, stamp=None)
        batches = [batch async for batch in transport.subscribe("-1")]
        assert [m["n"] for b in batches for m in b.messages] == [1, 1]
        assert batches[-1].closed
    finally:
        await transport.aclose()
    with pytest.raises(ClientClosed):
        await transport.send_batch(one, stamp=None)


async def test_an_append_too_large_for_the_server(unique: Callable[[str], str]) -> None:
    async with serve(max_body_bytes=1000) as running:
        stream = DurableStream(f"{running.url}/v1/stream/sessions/{unique('big')}")
        async with contextlib.aclosing(WebSocketTransport(stream)) as transport:
            await transport.create()
            with pytest.raises(PayloadTooLarge):
                await transport.send_batch([b'"' + b"x" * 2000 + b'"'], stamp=None)


async def test_an_append_too_large_for_one_frame_goes_over_http(
    ours_url: str, unique: Callable[[str], str]
) -> None:
    options = WebSocketOptions(max_append_frame=1000)
    async with (
        Proxy(ours_url) as proxy,
        session_at(proxy.url, unique("http"), transport=WebSocketTransport(options=options)) as s,
    ):
        await s.create()
        small = await s.send_message("small")
        large = await s.send_message("x" * 2000)
        assert small.offset is not None
        assert large.offset is not None
        assert small.offset < large.offset
        posts = [target for method, target in proxy.requests if method == "POST"]
        assert len(posts) == 1  # the large one; the small one went on the socket


# --- presence ------------------------------------------------------------------------


async def test_two_clients_see_the_same_events_and_each_others_presence(
    ours_url: str, unique: Callable[[str], str]
) -> None:
    session_id = unique("two")
    async with (
        session_at(ours_url, session_id, ANN) as ann,
        session_at(ours_url, session_id, BOB) as bob,
    ):
        await ann.create()
        ann_changes = ann.presence_changes()
        async with ann.subscribe() as ann_events, bob.subscribe() as bob_events:
            await ann.set_presence("idle", label="laptop")
            await bob.set_presence("typing")
            heard: list[PresenceChange] = []

            def bob_joined(change: PresenceChange) -> bool:
                heard.append(change)
                return change.member.client_id == "bob"

            await change_where(ann_changes, bob_joined)
            # Each join once (ann hears her own join in a snapshot and as an event).
            assert [(c.event, c.member.client_id) for c in heard] == [
                ("join", "ann"),
                ("join", "bob"),
            ]
            assert ids(heard[-1].members) == {"ann", "bob"}
            await until(lambda: ids(bob.members) == {"ann", "bob"})
            await ann.send_message("from ann")
            await bob.send_message("from bob")
            seen_by_ann = await take(ann_events, 2)
            seen_by_bob = await take(bob_events, 2)
        assert seen_by_ann == seen_by_bob
        assert set(seen_by_ann) == {"from ann", "from bob"}
        (ann_member,) = [m for m in bob.members if m.client_id == "ann"]
        assert (ann_member.kind, ann_member.label, ann_member.status) == ("user", "laptop", "idle")
        await bob.aclose()  # a goodbye: ann sees the leave at once
        left = await change_where(ann_changes, lambda c: c.event == "leave")
        assert left.member.client_id == "bob"
        assert ids(left.members) == {"ann"}


async def test_presence_over_http_says_it_is_unavailable(
    ours_http_url: str, unique: Callable[[str], str]
) -> None:
    async with session_at(ours_http_url, unique("http")) as session:
        await session.create()
        with pytest.raises(PresenceUnavailable):
            await session.set_presence("idle")
        with pytest.raises(PresenceUnavailable):
            await anext(session.presence_changes())
        assert session.members == ()
        assert session.presence_available is False


KILLED_CLIENT = """
import asyncio, sys
from durable_client import Author, Session

async def main() -> None:
    async with Session(sys.argv[1], sys.argv[2], author=Author.agent("doomed")) as session:
        await session.set_presence("thinking")
        await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_killed_client_leaves_presence_within_the_grace_period(
    unique: Callable[[str], str],
) -> None:
    grace = 0.3
    session_id = unique("killed")
    async with serve(presence_grace=grace) as running, session_at(running.url, session_id) as me:
        await me.create()
        changes = me.presence_changes()
        await me.set_presence()  # hearing the session's presence
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            KILLED_CLIENT,
            running.url,
            session_id,
            stdout=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        try:
            joined = await change_where(changes, lambda c: c.member.client_id == "doomed")
            assert (joined.event, joined.member.kind) == ("join", "agent")
        finally:
            child.kill()  # no goodbye
            await child.wait()
        killed_at = time.monotonic()
        left = await change_where(changes, lambda c: c.event == "leave")
        assert left.member.client_id == "doomed"
        assert ids(me.members) == {"ann"}
        assert time.monotonic() - killed_at < grace + 2.0


async def test_a_reconnect_does_not_show_as_leave_and_join(unique: Callable[[str], str]) -> None:
    session_id = unique("flap")
    async with (
        serve(presence_grace=30.0) as running,
        session_at(running.url, session_id, ANN) as ann,
        session_at(running.url, session_id, BOB) as bob,
    ):
        await ann.create()
        await ann.set_presence("idle")
        bob_changes = bob.presence_changes()
        async with bob.subscribe():
            await change_where(bob_changes, lambda c: c.member.client_id == "ann")
            hub: Any = running.app.websocket_handler.hub  # type: ignore[union-attr]
            holding = hub._members[f"/v1/stream/sessions/{session_id}"]["ann"]
            first_socket = set(holding.holders)
            ann.drop_connections()
            # Nothing asks ann's session to reconnect but its presence: it comes
            # back on a new socket, and the server has no leave pending for it.
            await until(
                lambda: (
                    bool(holding.holders)
                    and not holding.holders & first_socket
                    and holding.leave_timer is None
                )
            )
            await ann.set_presence("typing")
            change = await anext(bob_changes)
        assert (change.event, change.member.client_id, change.member.status) == (
            "update",
            "ann",
            "typing",
        )


async def test_an_agent_shows_what_it_is_doing(ours_url: str, unique: Callable[[str], str]) -> None:
    session_id = unique("agent")
    seen = {status: asyncio.Event() for status in ("thinking", "streaming")}

    async def answer(agent: Agent, turn: IncomingTurn) -> None:
        # Each step waits until the user saw the status before: status updates
        # are coalesced, so a reply faster than a round trip shows only its end.
        await seen["thinking"].wait()
        async with agent.reply(turn) as reply:
            await reply.write("hello")
            await seen["streaming"].wait()

    async with session_at(ours_url, session_id) as user:
        await user.create()
        changes = user.presence_changes()
        statuses: list[str] = []
        async with (
            user.subscribe(),
            session_at(ours_url, session_id, Author.agent("bot")) as bot_session,
            Agent(bot_session) as agent,
        ):

            async def serve_turns() -> None:
                async for turn in agent.turns():
                    await answer(agent, turn)

            server = asyncio.create_task(serve_turns())
            try:
                await user.send_message("hi")

                def record(change: PresenceChange) -> bool:
                    if change.member.client_id != "bot":
                        return False
                    statuses.append(change.member.status)
                    if change.member.status in seen:
                        seen[change.member.status].set()
                    return statuses[-2:] == ["streaming", "idle"]

                await change_where(changes, record)
            finally:
                server.cancel()
                await asyncio.gather(server, return_exceptions=True)
    assert statuses[0] == "idle"
    assert statuses[1:] == ["thinking", "streaming", "idle"]


# --- keepalive and dropped connections ----------------------------------------------


async def test_a_half_open_connection_is_detected_and_resumed(
    ours_url: str, unique: Callable[[str], str]
) -> None:
    keepalive = WebSocketOptions(ping_interval=0.2, ping_timeout=0.2, close_timeout=0.2)
    bound = 0.2 + 0.2 + 0.2 + 1.5  # interval + timeout + close, and slack for a loaded machine
    session_id = unique("halfopen")
    async with (
        Proxy(ours_url) as proxy,
        session_at(ours_url, session_id) as writer,
        session_at(
            proxy.url, session_id, Author.user("reader"), transport=AutoTransport(options=keepalive)
        ) as reader,
    ):
        await writer.create()
        async with reader.subscribe() as events:
            await writer.send_message("before")
            assert await take(events, 1) == ["before"]
            assert reader.status.state is ConnectionState.CONNECTED
            proxy.freeze_all()  # the peer stops answering; no socket is closed
            frozen_at = time.monotonic()
            await writer.send_message("during 1")
            await writer.send_message("during 2")
            got = await take(events, 2)
            resumed_after = time.monotonic() - frozen_at
            await writer.send_message("after")
            got += await take(events, 1)
        assert got == ["during 1", "during 2", "after"]
        assert resumed_after < bound, resumed_after
        handshakes = [t for _, t in proxy.requests if t.startswith("/v1/ws")]
        assert len(handshakes) == 2  # detected, then one new socket


@pytest.mark.parametrize("transport", ["websocket", "http"])
async def test_drop_connections_loses_and_duplicates_nothing(
    ours_url: str, unique: Callable[[str], str], transport: str
) -> None:
    session_id = unique("drop")
    async with (
        session_at(ours_url, session_id, transport=transport) as reader,
        session_at(ours_url, session_id, BOB) as writer,
    ):
        await reader.create()
        states: list[ConnectionState] = []

        async def watch() -> None:
            async for status in reader.status_changes():
                states.append(status.state)

        watcher = asyncio.create_task(watch())
        async with reader.subscribe() as events:
            for i in range(3):
                await writer.send_message(f"w{i}")
            got = await take(events, 2)
            # Publishes in flight while the connections drop are retried, never
            # duplicated: the drop comes from inside the first append's request.
            transport_of_reader: Any = reader._transport
            send_batch = transport_of_reader.send_batch
            drops: list[int] = []

            async def send_and_drop(*args: Any, **kwargs: Any) -> Any:
                if not drops:
                    drops.append(len(reader._links))  # the live read and this append
                    reader.drop_connections()
                return await send_batch(*args, **kwargs)

            transport_of_reader.send_batch = send_and_drop
            pending = [
                reader.publish_nowait(UserMessage(author=ANN, text=f"r{i}")) for i in range(5)
            ]
            await asyncio.gather(*pending)
            assert drops == [2]
            await writer.send_message("after")
            got += await take(events, 7)
        assert reader.transport_name == ("websocket" if transport == "websocket" else "sse")
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    assert ConnectionState.RECONNECTING in states[states.index(ConnectionState.CONNECTED) :]
    assert got[:3] == ["w0", "w1", "w2"]
    assert sorted(got[3:]) == sorted([*(f"r{i}" for i in range(5)), "after"])
    assert got.index("r0") < got.index("r4")
    async with DurableStream(f"{ours_url}/v1/stream/sessions/{session_id}") as raw:
        assert len((await raw.read()).messages) == 9  # each exactly once in the log


async def test_a_subscriber_that_falls_behind_resumes_without_loss(
    ours_url: str, unique: Callable[[str], str]
) -> None:
    """A consumer that stops reading ends its subscription on the client (the
    socket stays useful for the rest) and resumes where it was."""
    options = WebSocketOptions(max_queued_frames=2)
    session_id = unique("behind")
    async with (
        session_at(ours_url, session_id, transport=AutoTransport(options=options)) as reader,
        session_at(ours_url, session_id, BOB) as writer,
    ):
        await reader.create()
        async with reader.subscribe(queue_size=1) as events:
            await writer.send_message("first")
            assert await take(events, 1) == ["first"]
            for i in range(10):  # one frame each, while nobody reads
                await writer.send_message(f"m{i}")
            ack = await reader.send_message("the socket still works")
            assert ack.offset is not None
            got = await take(events, 11)
    assert got == [*(f"m{i}" for i in range(10)), "the socket still works"]
