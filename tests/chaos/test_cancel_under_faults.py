"""Cancel under faults: the agent's connections are cut at seeded points while it streams;
a user's explicit cancel still stops it, and the turn ends as cancelled exactly once.

Each seed gives a plan: the server cuts the agent's reads right after a random
event, and the proxy in front of the server resets the agent's connections after
a random number of bytes. The seed is in the test id (and the chaos report on
failure), so a failure replays.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from durable_client import Agent, Author, EndReason, Session, TextDelta, TurnEnd
from mock_server.chaos import AfterBytes, AfterEvent, Drop, FaultPlan, Match, Reset, Rule
from mock_server.chaos.pytest_plugin import ProxyFactory, ServerFactory

SEEDS = range(12)


async def endless_tokens() -> AsyncIterator[str]:
    """A model that never stops by itself: only a cancel can end this reply."""
    n = 0
    while True:
        n += 1
        yield f"token{n} "
        await asyncio.sleep(0.004)


async def run_agent(session: Session) -> None:
    async with Agent(session, start="beginning") as agent:
        async for turn in agent.turns():
            async with agent.reply(turn) as reply:
                await reply.stream(endless_tokens())


async def read_log(url: str, session_id: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{url}/v1/stream/sessions/{session_id}")
        return list(response.json())


async def wait_for_log(url: str, session_id: str, predicate: Any, timeout: float = 20.0) -> None:
    """Long-poll the session until ``predicate(events)`` holds (bounded)."""
    async with httpx.AsyncClient(timeout=10) as http, asyncio.timeout(timeout):
        offset, events = "-1", []
        while not predicate(events):
            response = await http.get(
                f"{url}/v1/stream/sessions/{session_id}",
                params={"offset": offset, "live": "long-poll"},
            )
            offset = response.headers["Stream-Next-Offset"]
            if response.status_code == 200:
                events.extend(response.json())


@pytest.mark.parametrize("seed", SEEDS)
async def test_cancel_under_faults_ends_the_turn_cancelled_exactly_once(
    seed: int, chaos_server_factory: ServerFactory, chaos_proxy: ProxyFactory
) -> None:
    rng = random.Random(seed)
    transport = "websocket" if seed % 2 else "http"
    # Only the agent's reads (SSE, or its socket) are cut; the test observes by long-poll.
    agents_reads = Match(method="WEBSOCKET") if transport == "websocket" else Match(live="sse")
    server = await chaos_server_factory(
        plan=FaultPlan(
            seed=seed,
            rules=[
                Rule(
                    trigger=AfterEvent(n=rng.randint(1, 20)),
                    fault=Drop(how="reset"),
                    match=agents_reads,
                ),
                Rule(
                    trigger=AfterEvent(n=rng.randint(1, 20)),
                    fault=Drop(how="fin"),
                    match=agents_reads,
                ),
            ],
        )
    )
    proxy = await chaos_proxy(
        server.url,
        FaultPlan(
            seed=seed,
            rules=[Rule(trigger=AfterBytes(bytes=rng.randint(500, 6000)), fault=Reset(), count=2)],
        ),
    )
    session_id = f"cancel-{seed}"
    async with (
        Session(server.url, session_id, author=Author.user("ann"), transport="http") as user,
        Session(proxy.url, session_id, author=Author.agent("bot"), transport=transport) as bot,
    ):
        await user.create()
        agent = asyncio.create_task(run_agent(bot))
        try:
            ack = await user.send_message("write forever")
            turn = ack.event.turn_id
            wanted = rng.randint(3, 15)  # cancel after this many deltas, faults or not
            await wait_for_log(
                server.url,
                session_id,
                lambda events: sum(e["type"] == "text_delta" for e in events) >= wanted,
            )
            await user.cancel(turn, reason=f"seed {seed}")
            await wait_for_log(
                server.url, session_id, lambda events: any(e["type"] == "turn_end" for e in events)
            )
            # Let the agent flush anything in flight, then stop it.
            await bot.flush()
        finally:
            agent.cancel()
            await asyncio.gather(agent, return_exceptions=True)
    events = await read_log(server.url, session_id)
    ends = [i for i, e in enumerate(events) if e["type"] == "turn_end"]
    assert len(ends) == 1, f"seed {seed}: {len(ends)} turn ends"
    end = TurnEnd.model_validate(events[ends[0]])
    assert end.reason is EndReason.CANCELLED
    cancel_at = next(i for i, e in enumerate(events) if e["type"] == "cancel")
    deltas = [i for i, e in enumerate(events) if e["type"] == "text_delta"]
    assert deltas, "the partial text is kept"
    assert max(deltas) < ends[0], "nothing written after the turn ended"
    assert end.cancel_event_id == events[cancel_at]["event_id"]
    texts = [TextDelta.model_validate(events[i]) for i in deltas]
    assert [t.index for t in texts] == list(range(len(texts))), "no delta lost or repeated"
    # The faults did land: the run was not a quiet one.
    assert len(server.faults.log) + len(proxy.log) >= 1, f"seed {seed}: no fault fired"
