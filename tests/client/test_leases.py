"""Reply leases over real sockets: no reply stuck streaming, one end, no late text.

The promise (docs/guarantees.md, "No stuck turn"): a reply whose agent stops
renewing its lease is ended as ``abandoned`` by the session's readers within
the lease, exactly once however many readers race; the text so far is kept;
whatever the old owner sends afterwards is refused. A restarted agent can
adopt the reply instead and continue it after exactly the text in the log.

A dead agent is played by writing what an agent had written before it died
(``turn_start`` with a lease, some text, then nothing), with the same
producer the SDK uses (``reply_producer_id``): the log is then exactly what a
``kill -9`` leaves. tests/chaos/test_agent_crash.py kills real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from durable_client import (
    Agent,
    AnyEvent,
    Approval,
    ApprovalRequest,
    ApprovalStatus,
    Author,
    EndReason,
    IncomingTurn,
    ReplyStatus,
    Session,
    TextDelta,
    Transcript,
    TurnAdopt,
    TurnEnd,
    TurnFenced,
    TurnStart,
    UserMessage,
)
from durable_client._core.leases import reply_producer_id
from durable_client._leases import end_reply
from tests._await import until
from tests.client._sessions import read_until, session_at

pytestmark = pytest.mark.both_transports

ANN = Author.user("ann")
BOB = Author.user("bob")
BOT = Author.agent("bot", "Bot")
TTL = 0.4


@pytest.fixture
async def user(server_url: str, unique: Callable[[str], str]) -> AsyncIterator[Session]:
    async with session_at(server_url, unique("lease"), ANN) as session:
        await session.create()
        yield session


async def raw_append(url: str, turn_id: str, epoch: int, seq: int, *events: AnyEvent) -> int:
    """Append as the bot's reply producer would, over plain HTTP; the status."""
    headers = {
        "Producer-Id": reply_producer_id(turn_id, BOT.id),
        "Producer-Epoch": str(epoch),
        "Producer-Seq": str(seq),
    }
    async with httpx.AsyncClient() as http:
        answer = await http.post(url, json=[e.to_json() for e in events], headers=headers)
    return answer.status_code


async def dead_agent_reply(user: Session, *, text: str = "half a rep") -> str:
    """The log a killed agent leaves: a message, a leased start, some text, silence."""
    ack = await user.send_message("hello")
    turn_id = ack.event.turn_id
    start = TurnStart(author=BOT, turn_id=turn_id, lease_ttl=TTL, holder="dead-host")
    assert await raw_append(user.url, turn_id, 0, 0, start) == 200
    delta = TextDelta(author=BOT, turn_id=turn_id, text=text)
    assert await raw_append(user.url, turn_id, 0, 1, delta) == 200
    return turn_id


async def whole_log(session: Session) -> list[AnyEvent]:
    """Every event in the session now (a fresh reader, no watchdog)."""
    events: list[AnyEvent] = []
    async with session.subscribe("beginning", leases="off") as sub:
        tail = await session._transport.tail()
        async with asyncio.timeout(10):
            while sub.position is None or sub.position.offset != tail:
                events.append(await anext(sub))
    return events


def ends_of(events: list[AnyEvent], turn_id: str) -> list[TurnEnd]:
    return [e for e in events if isinstance(e, TurnEnd) and e.turn_id == turn_id]


async def test_a_reply_whose_agent_died_is_ended_abandoned_with_its_text(
    user: Session, server_url: str
) -> None:
    turn_id = await dead_agent_reply(user)
    loop = asyncio.get_running_loop()
    joined_at = loop.time()
    async with session_at(server_url, user.session_id, BOB) as bob, bob.subscribe() as events:
        seen = await read_until(events, lambda e: isinstance(e, TurnEnd))
        ended_at = loop.time()
        watch = events.leases
        assert watch is not None
        await until(lambda: watch.ended == 1, timeout=5)  # its own end may be read before its ack
    (end,) = ends_of(seen, turn_id)
    assert end.reason is EndReason.ABANDONED
    assert end.reply_author == BOT.id
    assert end.author.id == BOB.id
    assert end.generation == 1
    assert "stopped responding" in (end.error or "")
    reply = Transcript.fold(seen).turn(turn_id).reply_of(BOT.id)  # type: ignore[union-attr]
    assert reply is not None
    assert reply.status is ReplyStatus.ABANDONED
    assert reply.text == "half a rep"
    # Within the bound: the lease (from when bob read the reply) plus round trips,
    # loosely (a loaded machine must not fail this; never waiting forever is the point).
    assert ended_at - joined_at < TTL + 5.0


async def test_many_readers_racing_write_one_end(user: Session, server_url: str) -> None:
    turn_id = await dead_agent_reply(user)
    readers = [Author.user(f"reader-{i}") for i in range(6)]
    async with contextlib.AsyncExitStack() as stack:
        subs = []
        for author in readers:
            session = await stack.enter_async_context(
                session_at(server_url, user.session_id, author)
            )
            subs.append(await stack.enter_async_context(session.subscribe()))
        results = await asyncio.gather(
            *(read_until(s, lambda e: isinstance(e, TurnEnd)) for s in subs)
        )

        def ended() -> int:
            return sum(s.leases.ended for s in subs if s.leases is not None)

        await until(lambda: all(s.leases is None or s.leases._check is None for s in subs))
        assert ended() == 1
    firsts = {ends_of(seen, turn_id)[0].event_id for seen in results}
    assert len(firsts) == 1, "every reader saw the same end"
    assert len(ends_of(await whole_log(user), turn_id)) == 1


async def test_the_dead_owner_cannot_write_after_the_end(user: Session, server_url: str) -> None:
    turn_id = await dead_agent_reply(user)
    async with session_at(server_url, user.session_id, BOB) as bob, bob.subscribe() as events:
        await read_until(events, lambda e: isinstance(e, TurnEnd))
    late = TextDelta(author=BOT, turn_id=turn_id, text="LATE")
    assert await raw_append(user.url, turn_id, 0, 2, late) == 403  # a stale epoch: fenced
    its_end = TurnEnd(author=BOT, turn_id=turn_id, reason=EndReason.COMPLETE, generation=1)
    # The slot is taken: ours refuses other data there (403); a server that does
    # not compare answers "duplicate" (204) and writes nothing either.
    assert await raw_append(user.url, turn_id, 1, 0, its_end) in (403, 204)
    log = await whole_log(user)
    assert not any(isinstance(e, TextDelta) and e.text == "LATE" for e in log)
    assert len(ends_of(log, turn_id)) == 1


async def test_a_live_agent_renews_its_lease_while_it_waits(user: Session, server_url: str) -> None:
    """Silence in the text is not death: the heartbeat keeps the reply open."""
    release = asyncio.Event()

    async def slow(agent: Agent, turn: IncomingTurn) -> None:
        async with agent.reply(turn) as reply:
            await reply.write("thinking")
            await release.wait()  # three leases long, nothing written
            await reply.write(" done")

    async with (
        session_at(server_url, user.session_id, BOT) as bot_session,
        Agent(bot_session, lease_ttl=TTL) as agent,
        session_at(server_url, user.session_id, BOB) as bob,
        bob.subscribe() as events,
    ):

        async def serve() -> None:
            async for turn in agent.turns():
                await slow(agent, turn)

        task = asyncio.create_task(serve())
        await user.send_message("hello")
        beats: list[AnyEvent] = []
        async with asyncio.timeout(10):
            async for event in events:
                beats.append(event)
                if sum(1 for e in beats if e.type == "turn_lease") >= 6:  # 2 leases' worth
                    break
        release.set()
        seen = beats + await read_until(events, lambda e: isinstance(e, TurnEnd))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    (end,) = [e for e in seen if isinstance(e, TurnEnd)]
    assert end.reason is EndReason.COMPLETE
    assert end.author.id == BOT.id
    assert events.leases is not None
    assert events.leases.ended == 0


async def test_two_processes_of_one_agent_answer_a_turn_once(
    user: Session, server_url: str
) -> None:
    ack = await user.send_message("hello")
    message = ack.event
    assert isinstance(message, UserMessage)
    outcomes: list[str] = []

    async def answer(session: Session) -> None:
        agent = Agent(session, lease_ttl=TTL)
        try:
            async with agent.reply(message) as reply:
                await reply.write(f"from {session.author.id}")
            outcomes.append("answered")
        except TurnFenced:
            outcomes.append("fenced")
        finally:
            await agent.aclose()

    async with (
        session_at(server_url, user.session_id, BOT) as one,
        session_at(server_url, user.session_id, BOT) as two,
    ):
        await asyncio.gather(answer(one), answer(two))
    assert sorted(outcomes) == ["answered", "fenced"]
    log = await whole_log(user)
    assert len([e for e in log if isinstance(e, TurnStart)]) == 1
    assert len(ends_of(log, message.turn_id)) == 1


async def test_a_restarted_agent_adopts_and_continues_after_the_logged_text(
    user: Session, server_url: str
) -> None:
    turn_id = await dead_agent_reply(user, text="Hello, wor")
    async with (
        session_at(server_url, user.session_id, BOT) as bot_session,
        Agent(bot_session, lease_ttl=5.0, holder="dead-host") as agent,
    ):
        (left,) = await agent.unfinished()
        assert left.turn_id == turn_id
        assert left.holder == "dead-host"
        assert left.reply.text == "Hello, wor"
        async with await agent.adopt(left) as reply:
            assert reply.text == "Hello, wor"
            assert reply.generation == 1
            await reply.write("ld!")
    late = TextDelta(author=BOT, turn_id=turn_id, text="LATE")
    assert await raw_append(user.url, turn_id, 0, 2, late) == 403
    log = await whole_log(user)
    reply_state = Transcript.fold(log).turn(turn_id).reply_of(BOT.id)  # type: ignore[union-attr]
    assert reply_state is not None
    assert reply_state.text == "Hello, world!"
    assert reply_state.status is ReplyStatus.COMPLETE
    assert reply_state.adoptions == 1
    assert len([e for e in log if isinstance(e, TurnAdopt)]) == 1
    assert len(ends_of(log, turn_id)) == 1


async def test_adoption_and_abandonment_racing_give_one_outcome(
    user: Session, server_url: str
) -> None:
    turn_id = await dead_agent_reply(user)
    async with (
        session_at(server_url, user.session_id, BOT) as bot_session,
        Agent(bot_session, lease_ttl=5.0) as agent,
    ):
        (left,) = await agent.unfinished()
        async with session_at(server_url, user.session_id, BOB) as bob:
            adopted, ended = await asyncio.gather(
                agent.adopt(left), end_reply(bob, turn_id, BOT.id, 0), return_exceptions=True
            )
        if isinstance(adopted, TurnFenced):
            assert ended is True
        else:
            assert ended is False
            assert not isinstance(adopted, BaseException)
            async with adopted as reply:
                await reply.write(" and more")
    log = await whole_log(user)
    assert len(ends_of(log, turn_id)) == 1
    kinds = [e.type for e in log if e.type in ("turn_adopt", "turn_end")]
    assert kinds in (["turn_end"], ["turn_adopt", "turn_end"])


async def test_an_agent_fenced_mid_reply_learns_it_and_writes_nothing_more(
    user: Session, server_url: str
) -> None:
    """The old owner is alive but cut off: another reader ended its reply."""
    wrote_first = asyncio.Event()
    proceed = asyncio.Event()
    outcome: list[BaseException | str] = []

    async def answer(agent: Agent, turn: IncomingTurn) -> None:
        try:
            async with agent.reply(turn) as reply:
                await reply.write("before ")
                wrote_first.set()
                await proceed.wait()
                await reply.write("after")
                await until(lambda: reply.fenced is not None, timeout=5)
                await reply.write("never")
        except BaseException as exc:
            outcome.append(exc)
            raise
        else:
            outcome.append("context manager swallowed TurnFenced")

    async with (
        session_at(server_url, user.session_id, BOT) as bot_session,
        Agent(bot_session, lease_ttl=5.0) as agent,
    ):

        async def serve() -> None:
            async for turn in agent.turns():
                await answer(agent, turn)

        task = asyncio.create_task(serve())
        ack = await user.send_message("hello")
        await asyncio.wait_for(wrote_first.wait(), 10)
        assert await end_reply(user, ack.event.turn_id, BOT.id, 0, error="taken away")
        proceed.set()
        await until(lambda: bool(outcome), timeout=10)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert outcome == ["context manager swallowed TurnFenced"]
    log = await whole_log(user)
    texts = "".join(e.text for e in log if isinstance(e, TextDelta))
    assert "never" not in texts
    (end,) = ends_of(log, ack.event.turn_id)
    assert end.author.id == ANN.id
    assert end.error == "taken away"


# --- approvals ------------------------------------------------------------------------


async def serve_turns(
    agent: Agent, handler: Callable[[IncomingTurn], object]
) -> asyncio.Task[None]:
    async def serve() -> None:
        async for turn in agent.turns():
            await handler(turn)  # type: ignore[misc]

    return asyncio.create_task(serve())


async def test_an_agent_asks_approval_and_the_first_answer_in_the_log_decides(
    user: Session, server_url: str
) -> None:
    decisions: list[Approval] = []

    async def handler(turn: IncomingTurn) -> None:
        async with agent.reply(turn) as reply:
            decision = await reply.request_approval(
                "save_note", arguments={"text": turn.text}, description="save it"
            )
            decisions.append(decision)
            await reply.write("saved" if decision.approved else "not saved")

    async with (
        session_at(server_url, user.session_id, BOT) as bot_session,
        Agent(bot_session, lease_ttl=TTL) as agent,
        session_at(server_url, user.session_id, BOB) as bob,
        user.subscribe() as events,
    ):
        task = await serve_turns(agent, handler)
        await user.send_message("save this")
        seen = await read_until(events, lambda e: isinstance(e, ApprovalRequest))
        request = seen[-1]
        assert isinstance(request, ApprovalRequest)
        assert (request.tool, request.arguments) == ("save_note", {"text": "save this"})
        # Two people answer at once; the log orders them and the first decides.
        await asyncio.gather(
            user.approve(request.turn_id, request.request_id, True),
            bob.approve(request.turn_id, request.request_id, False),
        )
        await read_until(events, lambda e: isinstance(e, TurnEnd))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # Both answers were acknowledged, so both are in the log; the second may land
    # after the reply ended (the agent went on with the first).
    log = await whole_log(user)
    answers = [e for e in log if isinstance(e, Approval)]
    assert len(answers) == 2
    (decision,) = decisions
    assert decision == answers[0], "the agent took the first answer in the log"
    transcript = Transcript.fold(log)
    state = transcript.approval(request.request_id)
    assert state is not None
    assert state.decision == answers[0]
    reply = transcript.replies[0]
    assert reply.text == ("saved" if answers[0].approved else "not saved")
    assert reply.status is ReplyStatus.COMPLETE


async def test_a_cancel_while_waiting_for_approval_ends_the_reply_and_voids_the_request(
    user: Session, server_url: str
) -> None:
    async def handler(turn: IncomingTurn) -> None:
        async with agent.reply(turn) as reply:
            await reply.request_approval("save_note")
            await reply.write("should not happen")

    async with (
        session_at(server_url, user.session_id, BOT) as bot_session,
        Agent(bot_session, lease_ttl=TTL) as agent,
        user.subscribe() as events,
    ):
        task = await serve_turns(agent, handler)
        ack = await user.send_message("save this")
        await read_until(events, lambda e: isinstance(e, ApprovalRequest))
        await user.cancel(ack.event.turn_id)
        await read_until(events, lambda e: isinstance(e, TurnEnd))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    transcript = Transcript.fold(await whole_log(user))
    turn = transcript.turn(ack.event.turn_id)
    assert turn is not None
    (state,) = turn.approvals.values()
    assert state.status is ApprovalStatus.EXPIRED
    assert turn.replies["bot"].status is ReplyStatus.CANCELLED


async def test_a_pending_approval_of_a_dead_agent_ends_with_its_lease(
    user: Session, server_url: str
) -> None:
    turn_id = await dead_agent_reply(user)
    request = ApprovalRequest(author=BOT, turn_id=turn_id, tool="save_note")
    assert await raw_append(user.url, turn_id, 0, 2, request) == 200
    async with session_at(server_url, user.session_id, BOB) as bob, bob.subscribe() as events:
        seen = await read_until(events, lambda e: isinstance(e, TurnEnd))
    turn = Transcript.fold(seen).turn(turn_id)
    assert turn is not None
    assert turn.approvals[request.request_id].status is ApprovalStatus.EXPIRED
    assert turn.replies["bot"].status is ReplyStatus.ABANDONED
