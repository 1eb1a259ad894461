"""The recoveries docs/errors.md promises, end to end on a real server.

- ``OffsetGone``: "start again from "beginning" (what is retained)". After a
  stream is trimmed, a subscription from an offset below the floor raises
  ``OffsetGone``, and the documented recovery, subscribing from the
  beginning, reads the retained events, over HTTP and WebSocket.
- ``NoProgress``: a reader whose every connection fails at one offset (here a
  server fault that answers 500 to every read from a real offset, as a server
  that cannot encode a record would) stops with a clear error naming the
  offset and the cause, instead of reconnecting forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from durable_client import (
    Author,
    NoProgress,
    OffsetGone,
    ReconnectPolicy,
    RetryPolicy,
    ServerError,
    Session,
    UserMessage,
)
from durable_client.streams import DurableStream
from mock_server.chaos import (
    AfterEvent,
    Drop,
    FaultPlan,
    HttpError,
    Match,
    OnResume,
    Rule,
    serve_chaos,
)
from mock_server.testing import RunningServer, serve

FAST_RETRY = RetryPolicy(initial_delay=0.01, max_delay=0.02, max_attempts=2)


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    async with serve() as running:
        yield running


async def first_event(session: Session, start: str) -> object:
    async with session.subscribe(start) as events, asyncio.timeout(10):
        return await anext(events)


async def read_and_cut_after(session: Session, n: int, offsets: list[str]) -> None:
    """Read from the beginning; after ``n`` events cut the connection, so the
    reader resumes (and every resume fails); record the position after each."""
    async with session.subscribe("beginning") as events, asyncio.timeout(20):
        async for _ in events:
            assert events.position is not None
            offsets.append(events.position.offset)
            if len(offsets) == n:
                session.drop_connections()


@pytest.mark.parametrize("transport", ["http", "websocket"])
async def test_after_a_trim_subscribing_from_the_beginning_reads_what_is_retained(
    server: RunningServer, transport: str
) -> None:
    async with Session(
        server.url, f"trimmed-{transport}", author=Author.user("ann"), transport=transport
    ) as session:
        await session.create()
        acks = [await session.send_message(f"message {i}") for i in range(10)]
        server.store.trim(f"/v1/stream/sessions/trimmed-{transport}", keep_last=3)
        # A reader that stood at message 2 lost events: it is told so.
        with pytest.raises(OffsetGone):
            await first_event(session, acks[2].offset or "")
        # The documented recovery: subscribe again from the beginning.
        texts = []
        async with session.subscribe("beginning") as events, asyncio.timeout(10):
            async for event in events:
                if isinstance(event, UserMessage):
                    texts.append(event.text)
                if events.caught_up.is_set():
                    break
        assert texts == ["message 7", "message 8", "message 9"]
        assert session.transport_name == ("websocket" if transport == "websocket" else "sse")
        # And it is live from there.
        async with session.subscribe("beginning") as events, asyncio.timeout(10):
            await session.send_message("message 10")
            seen = [getattr(await anext(events), "text", None) for _ in range(4)]
        assert seen == ["message 7", "message 8", "message 9", "message 10"]


@pytest.mark.parametrize("live", ["auto", "sse", "long-poll"])
async def test_following_a_trimmed_stream_from_the_beginning_reads_what_is_retained(
    server: RunningServer, live: str
) -> None:
    async with DurableStream(f"{server.url}/v1/stream/trimmed-log-{live}") as log:
        await log.create(content_type="text/plain")
        for i in range(10):
            await log.append(f"line {i}\n")
        server.store.trim(f"/v1/stream/trimmed-log-{live}", keep_last=3)
        await log.close()
        text = ""
        async with asyncio.timeout(10):
            async for batch in log.follow(live=live):  # type: ignore[arg-type]
                text += batch.text()
        assert text == "line 7\nline 8\nline 9\n"


async def test_a_reader_that_cannot_make_progress_fails_clearly() -> None:
    every_resume_fails = FaultPlan(
        rules=[
            Rule(
                trigger=OnResume(),
                fault=HttpError(status=500, retry_after=None, message="cannot encode record"),
                count=None,
                match=Match(method="GET"),
            )
        ]
    )
    async with (
        serve_chaos(every_resume_fails) as server,
        Session(
            server.url,
            "stuck",
            author=Author.user("ann"),
            transport="http",
            retry=FAST_RETRY,
            reconnect=ReconnectPolicy(initial_delay=0.01, max_delay=0.02, max_no_progress=5),
        ) as session,
    ):
        await session.create()
        for i in range(3):
            await session.send_message(f"message {i}")
        offsets: list[str] = []
        with pytest.raises(NoProgress) as raised:
            await read_and_cut_after(session, 3, offsets)
    error = raised.value
    assert len(offsets) == 3
    stuck_at = offsets[-1]
    assert error.offset == stuck_at
    assert error.attempts == 5
    assert stuck_at in str(error)
    assert "cannot encode record" in str(error)
    assert isinstance(error.__cause__, ServerError)
    # Bounded: five connections (each a request retried once), not a spin.
    assert server.faults.fired("http_error") <= 5 * FAST_RETRY.max_attempts


async def test_a_stream_follower_that_cannot_make_progress_fails_clearly() -> None:
    plan = FaultPlan(
        rules=[
            # The first SSE response ends cleanly after the third line ...
            Rule(trigger=AfterEvent(n=3), fault=Drop(how="end"), match=Match(live="sse")),
            # ... and every read from there fails, as at a record the server cannot encode.
            Rule(
                trigger=OnResume(),
                fault=HttpError(status=500, retry_after=None, message="cannot encode record"),
                count=None,
                match=Match(method="GET"),
            ),
        ]
    )
    policy = ReconnectPolicy(initial_delay=0.01, max_delay=0.02, max_no_progress=4)
    async with (
        serve_chaos(plan) as server,
        DurableStream(f"{server.url}/v1/stream/stuck-log", retry=FAST_RETRY) as log,
    ):
        await log.create(content_type="text/plain")
        for i in range(3):
            await log.append(f"line {i}\n")
        tail = (await log.head()).offset
        got: list[str] = []
        with pytest.raises(NoProgress) as raised:
            await follow_into(log, policy, got)
    assert "".join(got) == "line 0\nline 1\nline 2\n"
    error = raised.value
    assert error.attempts == 4
    assert error.offset == tail
    assert "cannot encode record" in str(error)


async def follow_into(log: DurableStream, policy: ReconnectPolicy, got: list[str]) -> None:
    async with asyncio.timeout(20):
        async for batch in log.follow(live="sse", reconnect=policy):
            if batch.data:
                got.append(batch.text())
