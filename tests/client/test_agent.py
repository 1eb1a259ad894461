"""The agent side over real sockets: replies, coalescing, explicit cancel, many agents."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from durable_client import (
    Agent,
    AgentReply,
    AnyEvent,
    Author,
    EndReason,
    IncomingTurn,
    ReplyStatus,
    Session,
    Steer,
    TextDelta,
    Transcript,
    TurnCancelled,
    TurnEnd,
    UserMessage,
)
from tests._await import until
from tests.client._sessions import read_until, session_at

pytestmark = pytest.mark.both_transports

ANN = Author.user("ann")


async def tokens(delay: float = 0.002) -> AsyncIterator[str]:
    """A model that never stops talking (its pace, not a synchronisation)."""
    i = 0
    while True:
        yield f"t{i} "
        i += 1
        await asyncio.sleep(delay)


Handler = Callable[[Agent, IncomingTurn], Awaitable[None]]


@contextlib.asynccontextmanager
async def running_agent(
    base: str, session_id: str, handler: Handler, *, name: str = "bot", **kwargs: object
) -> AsyncIterator[Agent]:
    """An agent answering every turn with ``handler`` in its own task."""
    async with (
        session_at(base, session_id, Author.agent(name)) as session,
        Agent(session, **kwargs) as agent,  # type: ignore[arg-type]
    ):

        async def serve() -> None:
            async with asyncio.TaskGroup() as group:
                async for turn in agent.turns():
                    group.create_task(handler(agent, turn))

        server = asyncio.create_task(serve())
        try:
            yield agent
        finally:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server


def is_end(event: AnyEvent) -> bool:
    return isinstance(event, TurnEnd)


@pytest.fixture
async def user(server_url: str, unique: Callable[[str], str]) -> AsyncIterator[Session]:
    async with session_at(server_url, unique("chat"), ANN) as session:
        await session.create()
        yield session


async def test_a_reply_is_streamed_in_coalesced_deltas(user: Session, server_url: str) -> None:
    async def answer(agent: Agent, turn: IncomingTurn) -> None:
        async with agent.reply(turn) as reply:
            for i in range(30):
                await reply.write(f"w{i} ")

    async with (
        running_agent(server_url, user.session_id, answer),
        user.subscribe() as events,
    ):
        await user.send_message("hello")
        seen = await read_until(events, is_end)
    transcript = Transcript.fold(seen)
    (reply,) = transcript.replies
    assert reply.status is ReplyStatus.COMPLETE
    assert reply.text == "".join(f"w{i} " for i in range(30))
    deltas = [e for e in seen if isinstance(e, TextDelta)]
    assert len(deltas) < 30  # 30 tokens written within one rollup window
    assert [d.index for d in deltas] == list(range(len(deltas)))


async def test_without_a_rollup_window_every_write_is_a_delta(
    user: Session, server_url: str
) -> None:
    async def answer(agent: Agent, turn: IncomingTurn) -> None:
        async with agent.reply(turn) as reply:
            for word in ["a", "b", "c"]:
                await reply.write(word)

    async with (
        running_agent(server_url, user.session_id, answer, rollup_window=0),
        user.subscribe() as events,
    ):
        await user.send_message("hello")
        seen = await read_until(events, is_end)
    assert [e.text for e in seen if isinstance(e, TextDelta)] == ["a", "b", "c"]


async def test_cancel_mid_reply_ends_the_turn_cancelled_once_with_partial_text(
    user: Session, server_url: str
) -> None:
    written: dict[str, list[str]] = {}

    async def answer(agent: Agent, turn: IncomingTurn) -> None:
        async with agent.reply(turn) as reply:
            async for token in tokens():
                await reply.write(token)
                written.setdefault(turn.turn_id, []).append(token)

    async with (
        running_agent(server_url, user.session_id, answer),
        user.subscribe() as events,
    ):
        ack = await user.send_message("tell me everything")
        turn_id = ack.event.turn_id
        seen = await read_until(events, lambda e: isinstance(e, TextDelta))
        await user.cancel(turn_id)
        seen += await read_until(events, is_end)
        # Anything after the end would show up before this marker.
        marker = await user.send_message("marker")
        seen += await read_until(events, lambda e: e.event_id == marker.event.event_id)
    ends = [e for e in seen if isinstance(e, TurnEnd) and e.turn_id == turn_id]
    assert len(ends) == 1
    assert ends[0].reason is EndReason.CANCELLED
    assert ends[0].cancel_event_id is not None
    turn = Transcript.fold(seen).turn(turn_id)
    assert turn is not None
    reply = turn.replies["bot"]
    assert reply.status is ReplyStatus.CANCELLED
    assert reply.text  # the partial text is kept...
    assert reply.text == "".join(written[turn_id])  # ...exactly as written before the stop
    assert not [e for e in seen[seen.index(ends[0]) :] if isinstance(e, TextDelta)]


async def test_closing_or_losing_a_client_cancels_nothing(
    user: Session, server_url: str, unique: Callable[[str], str]
) -> None:
    async def answer(agent: Agent, turn: IncomingTurn) -> None:
        async with agent.reply(turn) as reply:
            for i in range(40):
                await reply.write(f"w{i} ")
                await asyncio.sleep(0.002)

    async with (
        running_agent(server_url, user.session_id, answer),
        session_at(server_url, user.session_id, Author.user("observer")) as observer,
        observer.subscribe() as watching,
    ):
        async with user.subscribe() as mine:
            await user.send_message("go")
            await read_until(mine, lambda e: isinstance(e, TextDelta))
        await user.aclose()  # the client goes away mid-reply
        seen = await read_until(watching, is_end)
    reply = Transcript.fold(seen).replies[0]
    assert reply.status is ReplyStatus.COMPLETE
    assert reply.text == "".join(f"w{i} " for i in range(40))


async def test_several_agents_answer_in_one_session_each_attributed(
    user: Session, server_url: str
) -> None:
    async def answer(agent: Agent, turn: IncomingTurn) -> None:
        async with agent.reply(turn) as reply:
            await reply.write(f"{agent.author.id} here")

    async with (
        running_agent(server_url, user.session_id, answer, name="alpha"),
        running_agent(server_url, user.session_id, answer, name="beta"),
        user.subscribe() as events,
    ):
        everyone = await user.send_message("anyone?")
        ends = 0

        def both_ended(event: AnyEvent) -> bool:
            nonlocal ends
            ends += isinstance(event, TurnEnd)
            return ends == 2

        seen = await read_until(events, both_ended)
        only_beta = await user.send_message("beta only", to=("beta",))
        seen += await read_until(events, is_end)
        marker = await user.send_message("marker")
        seen += await read_until(events, lambda e: e.event_id == marker.event.event_id)
    transcript = Transcript.fold(seen)
    first = transcript.turn(everyone.event.turn_id)
    second = transcript.turn(only_beta.event.turn_id)
    assert first is not None
    assert second is not None
    assert {a: r.text for a, r in first.replies.items()} == {
        "alpha": "alpha here",
        "beta": "beta here",
    }
    assert list(second.replies) == ["beta"]


async def test_cancel_of_one_author_stops_only_that_agent(user: Session, server_url: str) -> None:
    async def answer(agent: Agent, turn: IncomingTurn) -> None:
        async with agent.reply(turn) as reply:
            if agent.author.id == "slow":
                async for token in tokens():
                    await reply.write(token)
            else:
                await reply.write("quick answer")

    async with (
        running_agent(server_url, user.session_id, answer, name="slow"),
        running_agent(server_url, user.session_id, answer, name="quick"),
        user.subscribe() as events,
    ):
        ended: dict[str, EndReason] = {}

        def note(event: AnyEvent) -> None:
            if isinstance(event, TurnEnd):
                ended[event.author.id] = event.reason

        await user.send_message("both of you")
        for event in await read_until(
            events, lambda e: isinstance(e, TextDelta) and e.author.id == "slow"
        ):
            note(event)
        await user.cancel(author_id="slow")

        def both_ended(event: AnyEvent) -> bool:
            note(event)
            return len(ended) == 2

        await read_until(events, both_ended)
    assert ended == {"slow": EndReason.CANCELLED, "quick": EndReason.COMPLETE}


async def test_steering_reaches_the_running_reply(user: Session, server_url: str) -> None:
    received: list[Steer] = []

    async def answer(agent: Agent, turn: IncomingTurn) -> None:
        async with agent.reply(turn) as reply:
            await reply.write("working")
            steer_seen = asyncio.ensure_future(reply._steered.wait())
            await asyncio.wait_for(steer_seen, 10)
            received.extend(reply.take_steers())
            await reply.write(f" (steered: {received[0].text})")

    async with (
        running_agent(server_url, user.session_id, answer),
        user.subscribe() as events,
    ):
        ack = await user.send_message("start")
        await read_until(events, lambda e: isinstance(e, TextDelta))
        await user.steer(ack.event.turn_id, "be brief")
        seen = await read_until(events, is_end)
    assert [s.text for s in received] == ["be brief"]
    assert Transcript.fold(seen).replies[0].text.endswith("(steered: be brief)")


async def test_a_cancel_that_arrives_before_the_reply_starts(
    user: Session, server_url: str
) -> None:
    async with session_at(server_url, user.session_id, Author.agent("late")) as session:
        message = await user.send_message("never mind")
        await user.cancel(message.event.turn_id)
        async with Agent(session, start="beginning") as agent:
            turn = await anext(aiter(agent.turns()))
            await until(lambda: bool(agent.transcript.cancels))
            assert turn.cancelled
            async with agent.reply(turn) as reply:
                assert reply.cancelled
                with pytest.raises(TurnCancelled):
                    await reply.write("too late")
                raise TurnCancelled("stop")  # the context manager ends the turn
        async with user.subscribe() as events:
            seen = await read_until(events, is_end)
    assert Transcript.fold(seen).replies[0].status is ReplyStatus.CANCELLED


async def test_an_error_ends_the_turn_with_reason_error(user: Session, server_url: str) -> None:
    async with (
        session_at(server_url, user.session_id, Author.agent("buggy")) as session,
        Agent(session) as agent,
    ):
        message = await user.send_message("crash please")
        turn = await anext(aiter(agent.turns()))

        async def crash() -> None:
            async with agent.reply(turn) as reply:
                await reply.write("partial")
                raise RuntimeError("model exploded")

        with pytest.raises(RuntimeError, match="model exploded"):
            await crash()
    async with user.subscribe(message.offset or "-1") as events:
        seen = await read_until(events, is_end)
    end = seen[-1]
    assert isinstance(end, TurnEnd)
    assert end.reason is EndReason.ERROR
    assert end.error is not None
    assert "model exploded" in end.error
    assert Transcript.fold(seen).replies[0].text == "partial"


async def test_stream_helper_closes_the_token_source_promptly(
    user: Session, server_url: str
) -> None:
    closed = asyncio.Event()
    outcome: list[EndReason] = []

    async def slow_model() -> AsyncIterator[str]:
        try:
            yield "first "
            await asyncio.sleep(3600)  # a model stuck waiting for its next token
            yield "never"
        finally:
            closed.set()

    async def answer(agent: Agent, turn: IncomingTurn) -> None:
        async with agent.reply(turn) as reply:
            outcome.append(await reply.stream(slow_model()))

    async with (
        running_agent(server_url, user.session_id, answer),
        user.subscribe() as events,
    ):
        ack = await user.send_message("go")
        seen = await read_until(events, lambda e: isinstance(e, TextDelta))
        await user.cancel(ack.event.turn_id)
        seen += await read_until(events, is_end)
        await asyncio.wait_for(closed.wait(), 5)
    assert outcome == [EndReason.CANCELLED]
    reply = Transcript.fold(seen).replies[0]
    assert (reply.status, reply.text) == (ReplyStatus.CANCELLED, "first ")


async def test_user_messages_by_the_agent_itself_are_not_turns(
    user: Session, server_url: str
) -> None:
    async with (
        session_at(server_url, user.session_id, Author.agent("self")) as session,
        Agent(session) as agent,
    ):
        await session.publish(UserMessage(author=session.author, text="talking to myself"))
        await user.send_message("real")
        turn = await anext(aiter(agent.turns()))
        assert turn.text == "real"


async def test_a_reply_records_what_it_published_for_a_history_checker(
    user: Session, server_url: str
) -> None:
    from mock_server.chaos import HistoryRecorder

    replies: list[AgentReply] = []

    async def answer(agent: Agent, turn: IncomingTurn) -> None:
        async with agent.reply(turn) as reply:
            replies.append(reply)
            for i in range(20):
                await reply.write(f"w{i} ")  # no rollup window: one delta each
            await reply.progress("search", message="done")

    async with (
        running_agent(server_url, user.session_id, answer, rollup_window=0),
        user.subscribe() as events,
    ):
        await user.send_message("hello")
        seen: list[tuple[AnyEvent, str]] = []
        async with asyncio.timeout(10):
            async for event in events:
                assert events.position is not None
                seen.append((event, events.position.offset))
                if is_end(event):
                    break
    (reply,) = replies
    published = reply.published
    kinds = [type(ack.event).__name__ for ack in published]
    assert kinds[0] == "TurnStart"
    assert kinds[-1] == "TurnEnd"
    assert kinds.count("TextDelta") >= 2
    assert "Progress" in kinds
    assert all(ack.event_id and ack.offset for ack in published)
    offsets = [ack.offset for ack in published]
    assert offsets == sorted(offsets)  # type: ignore[type-var]
    history = HistoryRecorder()
    for ack in published:
        history.published(ack.event_id or "", offset=ack.offset)
    from_agent = [(e, offset) for e, offset in seen if e.author.id == "bot"]
    for event, _ in from_agent:
        history.seen("ann", event.event_id or "")
    report = history.assert_ok()
    assert report.published == len(published) == len(from_agent)
    # The acknowledged offset of the last event is where the subscriber stood after it.
    assert published[-1].offset == from_agent[-1][1]
