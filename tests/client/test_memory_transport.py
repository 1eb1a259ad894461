"""The public in-memory transport: sessions, an agent and the producer rules, no server.

What ``docs/sdk-quickstart.md`` promises ("test your agent without a server"):
a user and an agent share one ``MemoryTransport``; subscribe, publish, cancel,
resume and the producer's exactly-once rules behave as against a server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from durable_client import (
    Agent,
    AnyEvent,
    Author,
    BadRequest,
    ClientClosed,
    ConnectionState,
    EndReason,
    IncomingTurn,
    MemoryOffsetStore,
    PresenceUnavailable,
    ReconnectPolicy,
    ReplyStatus,
    RetryPolicy,
    SequenceGap,
    Session,
    StaleEpoch,
    StreamClosed,
    StreamNotFound,
    StreamReplaced,
    Transcript,
    TurnEnd,
    UserMessage,
)
from durable_client.streams import ProducerStamp
from durable_client.transports import (
    MemoryTransport,
    SessionDefaults,
    SessionTransport,
    UnboundTransport,
)
from tests.client._sessions import read_until

URL = "memory://test"
ANN = Author.user("ann")
BOT = Author.agent("bot")

FAST = ReconnectPolicy(initial_delay=0.001, max_delay=0.01)


def link_to(log: MemoryTransport, session_id: str = "s") -> SessionTransport:
    """What a session gets from the transport (the seam, used directly)."""
    url = f"{URL}/v1/stream/sessions/{session_id}"
    return log.bind(url, SessionDefaults(RetryPolicy(), FAST))


def session(log: MemoryTransport, author: Author = ANN, session_id: str = "s") -> Session:
    return Session(URL, session_id, author=author, transport=log, reconnect=FAST)


def texts(events: list[AnyEvent]) -> list[str]:
    return [e.text for e in events if isinstance(e, UserMessage)]


@contextlib.asynccontextmanager
async def echo_agent(log: MemoryTransport) -> AsyncIterator[Agent]:
    """An agent that echoes each turn in three words; "talk" it answers until cancelled."""
    async with session(log, BOT) as bot, Agent(bot, rollup_window=0) as agent:

        async def answer(turn: IncomingTurn) -> None:
            async with agent.reply(turn) as reply:
                if turn.text == "talk":  # one word, then hold the turn open
                    await reply.write("hmm ")
                    await reply.wait_cancelled()
                for i in range(3):
                    await reply.write(f"{turn.text}-{i} ")

        async def serve() -> None:
            async with asyncio.TaskGroup() as group:
                async for turn in agent.turns():
                    group.create_task(answer(turn))

        server = asyncio.create_task(serve())
        try:
            yield agent
        finally:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server


def test_it_is_a_transport_a_session_binds() -> None:
    log = MemoryTransport()
    assert isinstance(log, UnboundTransport)
    s = session(log)
    assert s.url == f"{URL}/v1/stream/sessions/s"
    assert s.transport_name == "memory"
    assert isinstance(link_to(log), SessionTransport)


async def test_an_agent_answers_and_is_cancelled_without_a_server() -> None:
    log = MemoryTransport()
    async with session(log) as user:
        await user.create()
        async with echo_agent(log), user.subscribe() as events:
            await user.send_message("hi")
            answered = await read_until(events, lambda e: isinstance(e, TurnEnd))
            ack = await user.send_message("talk")
            started = await read_until(events, lambda e: e.type == "turn_start")
            await user.cancel(ack.event.turn_id)
            stopped = await read_until(events, lambda e: isinstance(e, TurnEnd))
        assert user.status.state is ConnectionState.CONNECTED
    transcript = Transcript.fold([*answered, *started, *stopped])
    first, second = transcript.replies
    assert (first.status, first.text) == (ReplyStatus.COMPLETE, "hi-0 hi-1 hi-2 ")
    assert second.status is ReplyStatus.CANCELLED
    end = stopped[-1]
    assert isinstance(end, TurnEnd)
    assert end.reason is EndReason.CANCELLED
    assert [m["type"] for m in log.messages(user.url)].count("turn_end") == 2


async def test_a_cancel_stops_a_reply_that_would_never_end() -> None:
    log = MemoryTransport()
    async with session(log) as user:
        await user.create()
        async with echo_agent(log), user.subscribe() as events:
            ack = await user.send_message("talk")
            await read_until(events, lambda e: e.type == "text_delta")
            await user.cancel(ack.event.turn_id)
            end = (await read_until(events, lambda e: isinstance(e, TurnEnd)))[-1]
    assert isinstance(end, TurnEnd)
    assert end.reason is EndReason.CANCELLED


async def test_history_then_live_exactly_once_across_dropped_connections() -> None:
    log = MemoryTransport()
    async with session(log) as writer, session(log, Author.user("bob")) as reader:
        await writer.create()
        for i in range(3):
            await writer.send_message(f"old{i}")
        async with reader.subscribe() as events:
            got = texts(await read_until(events, lambda e: events.caught_up.is_set()))
            assert got == ["old0", "old1", "old2"]
            for i in range(6):
                if i % 2:
                    log.drop_connections()  # every live read, as a network failure
                else:
                    reader.drop_connections()
                await writer.send_message(f"new{i}")
            got += texts(await read_until(events, lambda e: getattr(e, "text", "") == "new5"))
    assert got == [*(f"old{i}" for i in range(3)), *(f"new{i}" for i in range(6))]
    assert len(log.messages(writer.url)) == 9


async def test_a_saved_position_resumes_after_a_restart() -> None:
    log, store = MemoryTransport(), MemoryOffsetStore()
    async with session(log) as first:
        await first.create()
        for i in range(4):
            await first.send_message(f"m{i}")
        async with first.subscribe(offset_store=store) as events:
            assert texts([await anext(events), await anext(events)]) == ["m0", "m1"]
    async with session(log) as second, second.subscribe(offset_store=store) as events:
        # Closing the first subscription saved the position after m1.
        got = texts(await read_until(events, lambda e: getattr(e, "text", "") == "m3"))
    assert got == ["m2", "m3"]


async def test_a_re_created_stream_is_a_new_incarnation() -> None:
    log, store = MemoryTransport(), MemoryOffsetStore()
    async with session(log) as user:
        await user.create()
        await user.send_message("before")
        async with user.subscribe(offset_store=store) as events:
            assert texts([await anext(events)]) == ["before"]
    assert log.delete(f"{URL}/v1/stream/sessions/s")
    assert not log.delete(f"{URL}/v1/stream/sessions/s")
    async with session(log) as user:
        await user.create()
        await user.send_message("after")
        with pytest.raises(StreamReplaced):
            async with user.subscribe(offset_store=store) as events:
                await read_until(events, lambda e: False)
        async with user.subscribe(offset_store=store, on_replaced="restart") as events:
            assert texts([await anext(events)]) == ["after"]
            assert events.replacements == 1


async def test_the_producer_rules_of_a_server() -> None:
    log = MemoryTransport()
    link = link_to(log)
    async with contextlib.aclosing(link):
        one = [b'{"n": 1}']
        with pytest.raises(StreamNotFound):
            await link.send_batch(one, stamp=None)
        with pytest.raises(StreamNotFound):
            await link.tail()
        assert await link.create()
        assert not await link.create()
        first = await link.send_batch(one, stamp=ProducerStamp("p", 0, 0))
        assert (first.duplicate, first.offset) == (False, await link.tail())
        retried = await link.send_batch(one, stamp=ProducerStamp("p", 0, 0))
        assert (retried.duplicate, retried.offset) == (True, first.offset)
        with pytest.raises(SequenceGap) as gap:
            await link.send_batch(one, stamp=ProducerStamp("p", 0, 2))
        assert (gap.value.expected_seq, gap.value.received_seq) == (1, 2)
        with pytest.raises(StaleEpoch) as reused:  # same stamp, other data: not a retry
            await link.send_batch([b'{"n": 2}'], stamp=ProducerStamp("p", 0, 0))
        assert reused.value.current_epoch == 0
        await link.send_batch(one, stamp=ProducerStamp("p", 1, 0))
        with pytest.raises(StaleEpoch) as stale:
            await link.send_batch(one, stamp=ProducerStamp("p", 0, 1))
        assert stale.value.current_epoch == 1
        with pytest.raises(BadRequest):
            await link.send_batch([b"not json"], stamp=None)
        with pytest.raises(BadRequest):
            async for _ in link.subscribe("0000000000000099"):
                pass
        closed = await link.send_batch([], stamp=ProducerStamp("p", 1, 1), close=True)
        assert closed.closed
        again = await link.send_batch([], stamp=ProducerStamp("p", 1, 1), close=True)
        assert again.duplicate
        with pytest.raises(StreamClosed) as refused:
            await link.send_batch(one, stamp=None)
        assert refused.value.final_offset == closed.offset
        batches = [batch async for batch in link.subscribe("-1")]
        assert [m["n"] for b in batches for m in b.messages] == [1, 1]
        assert batches[-1].closed
        assert log.messages(link.url) == [{"n": 1}, {"n": 1}]
    with pytest.raises(ClientClosed):
        await link.tail()


async def test_a_closed_stream_ends_every_subscription() -> None:
    log = MemoryTransport()
    async with session(log) as user:
        await user.create()
        await user.send_message("last")
        async with user.subscribe() as events:
            assert texts([await anext(events)]) == ["last"]
            await link_to(log).send_batch([], stamp=None, close=True)
            assert await anext(events, None) is None
        assert user.status.state is ConnectionState.CLOSED


async def test_sessions_share_only_the_transport_object_they_were_given() -> None:
    async with session(MemoryTransport()) as a, session(MemoryTransport()) as b:
        await a.create()
        await a.send_message("only in a")
        with pytest.raises(StreamNotFound):
            await b.send_message("nowhere")


async def test_there_is_no_presence_in_memory() -> None:
    async with session(MemoryTransport()) as user:
        assert user.presence_available is False
        with pytest.raises(PresenceUnavailable):
            await user.set_presence("idle")
