"""The agent host after a crash: it takes back its own unfinished replies (the demo
continues the text where the log stops, a model agent ends them cleanly) and
leaves another host's alone."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from durable_client import (
    Agent,
    Author,
    EndReason,
    IncomingTurn,
    MemoryOffsetStore,
    ReplyStatus,
    Session,
    TextDelta,
    Transcript,
    TurnEnd,
    TurnStart,
    parse_event,
)
from durable_client._core.leases import reply_producer_id
from mock_server.testing import RunningServer, serve
from tui_demo.agents import demo
from tui_demo.agents.host import ASSISTANT, run_agent

USER = Author.user("u", "U")


async def log_of(server: RunningServer, session_id: str) -> Transcript:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{server.url}/v1/stream/sessions/{session_id}")
    return Transcript.fold(parse_event(e) for e in response.json())


async def left_by_a_dead_host(
    server: RunningServer, user: Session, prompt: str, holder: str, text: str
) -> str:
    """What a host killed mid-reply leaves: a leased start by ``holder`` and some text."""
    turn_id = (await user.send_message(prompt)).event.turn_id
    headers = {"Producer-Id": reply_producer_id(turn_id, ASSISTANT.id), "Producer-Epoch": "0"}
    start = TurnStart(author=ASSISTANT, turn_id=turn_id, lease_ttl=30.0, holder=holder)
    delta = TextDelta(author=ASSISTANT, turn_id=turn_id, text=text)
    async with httpx.AsyncClient() as http:
        for seq, event in enumerate([start, delta]):
            answer = await http.post(
                user.url, json=[event.to_json()], headers={**headers, "Producer-Seq": str(seq)}
            )
            assert answer.status_code == 200
    return turn_id


async def until_ended(user: Session, turn_id: str) -> None:
    """Read the session (without ending anything itself) until ``turn_id`` has an end."""
    async with user.subscribe(leases="off") as events, asyncio.timeout(30):
        async for event in events:
            if isinstance(event, TurnEnd) and event.turn_id == turn_id:
                return


async def run_host(
    server: RunningServer, session_id: str, holder: str, *, demo_resume: bool
) -> Any:
    async def answer(agent: Agent, turn: IncomingTurn) -> None:
        await demo.answer(agent, turn, token_rate=1000.0)

    async def resume(agent: Agent, left: Any) -> None:
        await demo.resume(agent, left, token_rate=1000.0)

    return asyncio.create_task(
        run_agent(
            server.url,
            session_id,
            ASSISTANT,
            answer,
            MemoryOffsetStore(),
            holder=holder,
            lease_ttl=30.0,
            resume=resume if demo_resume else None,
        )
    )


async def test_a_restarted_demo_host_continues_its_reply_after_the_logged_text() -> None:
    prompt = "tell me about offsets"
    full = demo.compose_reply(prompt)
    async with serve() as server, Session(server.url, "resume", author=USER) as user:
        await user.create()
        torn = await left_by_a_dead_host(server, user, prompt, "host-1", full[:37])
        host = await run_host(server, "resume", "host-1", demo_resume=True)
        try:
            await until_ended(user, torn)
        finally:
            host.cancel()
            await asyncio.gather(host, return_exceptions=True)
        transcript = await log_of(server, "resume")
    reply = transcript.turn(torn).reply_of(ASSISTANT.id)  # type: ignore[union-attr]
    assert reply is not None
    assert reply.status is ReplyStatus.COMPLETE
    assert reply.text == full, "the text continues exactly after what the log held"
    assert reply.adoptions == 1
    assert reply.holder == "host-1"


async def test_a_restarted_model_host_ends_its_reply_and_another_hosts_is_left_alone() -> None:
    async with serve() as server, Session(server.url, "drop", author=USER) as user:
        await user.create()
        mine = await left_by_a_dead_host(server, user, "first", "host-1", "partial")
        theirs = await left_by_a_dead_host(server, user, "second", "host-2", "theirs")
        host = await run_host(server, "drop", "host-1", demo_resume=False)
        try:
            await until_ended(user, mine)
        finally:
            host.cancel()
            await asyncio.gather(host, return_exceptions=True)
        transcript = await log_of(server, "drop")
    ended = transcript.turn(mine).reply_of(ASSISTANT.id)  # type: ignore[union-attr]
    assert ended is not None
    assert (ended.status, ended.text) == (ReplyStatus.ABANDONED, "partial")
    assert ended.end is not None
    assert ended.end.reason is EndReason.ABANDONED
    assert "restarted" in (ended.end.error or "")
    other = transcript.turn(theirs).reply_of(ASSISTANT.id)  # type: ignore[union-attr]
    assert other is not None
    assert other.status is ReplyStatus.STREAMING, "another host's reply waits for its own lease"
