"""The agent host: runs agents for every session listed in a server's index.

It is a session client like the chat app. It follows the sessions index and,
for each session, runs the main agent (demo or an OpenAI-compatible model)
and, with the demo agent, a helper sub-agent that publishes progress into
the session itself. Offsets are saved per session, so a restarted host
resumes where it stopped and answers messages that arrived while it was down.

Each turn is answered once per agent, whatever the number of hosts and
restarts: before replying, an agent *claims* the turn by creating a stream
named after (session, agent, turn) on the server. Creating a stream is
atomic, so of two hosts racing for one turn exactly one is told it created
the claim; the other stands down. A host that restarts without its read
positions finds the claims (and the replies) of the turns it answered before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import httpx

from durable_client import (
    Agent,
    Author,
    DurableError,
    FileOffsetStore,
    IncomingTurn,
    MemoryOffsetStore,
    OffsetStore,
    Session,
)
from durable_client.streams import DurableStream

from .._index import follow
from . import demo
from .openai import ModelConfig
from .openai import answer as model_answer

log = logging.getLogger("tui_demo.agents")

ASSISTANT = Author.agent("assistant", "Assistant")
HELPER = Author.agent("notes-helper", "Notes helper")


@dataclass(frozen=True)
class HostConfig:
    server: str
    agent: Literal["demo", "openai"] = "demo"
    token_rate: float = 25.0
    helper: bool = True
    model: ModelConfig | None = None
    state_dir: Path | None = None


Answer = Callable[[Agent, IncomingTurn], Awaitable[None]]


#: Where the turn claims live: one empty stream per (session, agent, turn).
CLAIMS_PATH = "/v1/stream/chat-claims/{session}/{agent}/{turn}"


def already_answered(agent: Agent, turn: IncomingTurn) -> bool:
    """Whether this agent has a reply to ``turn`` in the session already: finished or
    not (a reply still streaming belongs to a live host, or to one that crashed)."""
    known = agent.transcript.turn(turn.turn_id)
    return known is not None and known.reply_of(agent.author.id) is not None


async def claim_turn(server: str, session_id: str, agent_id: str, turn_id: str) -> bool:
    """Claim the right to answer ``turn_id`` as ``agent_id``; True for exactly one caller.

    The claim is a stream creation. The server creates a path once, so one caller
    gets "created" and every other (another host, or this agent after a restart)
    gets "existed". A create retried after its answer was lost carries the same
    Idempotency-Key and is still told "created".
    """
    path = CLAIMS_PATH.format(
        session=quote(session_id, safe=""),
        agent=quote(agent_id, safe=""),
        turn=quote(turn_id, safe=""),
    )
    async with DurableStream(server.rstrip("/") + path, content_type="text/plain") as claim:
        result = await claim.create()
    return result.created


OnTurn = Callable[[str, bool], None]
"""Told after each turn: its id, and whether this agent answered it (False: stood down)."""


async def run_agent(
    server: str,
    session_id: str,
    author: Author,
    answer: Answer,
    offsets: OffsetStore,
    *,
    on_turn: OnTurn | None = None,
) -> None:
    """Answer the turns of one session as ``author``, one at a time, until cancelled.

    A turn that already has a reply by ``author``, or that another host (or an
    earlier run) claimed, is left alone: each turn gets one reply per agent.
    """
    async with (
        Session(server, session_id, author=author) as session,
        Agent(session, start="beginning", offset_store=offsets) as agent,
    ):
        async for turn in agent.turns():
            answered = False
            try:
                if not already_answered(agent, turn) and await claim_turn(
                    server, session_id, author.id, turn.turn_id
                ):
                    answered = True
                    await answer(agent, turn)
                else:
                    log.info(
                        "session %s turn %s: already answered or claimed; not again",
                        session_id,
                        turn.turn_id,
                    )
            except DurableError as exc:  # the turn ended with an error; keep serving
                log.warning("session %s turn %s: %s", session_id, turn.turn_id, exc)
            if on_turn is not None:
                on_turn(turn.turn_id, answered)


class AgentHost:
    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.sessions: dict[str, list[asyncio.Task[None]]] = {}
        self._http = httpx.AsyncClient(timeout=config.model.timeout if config.model else 60.0)
        if config.state_dir is not None:
            config.state_dir.mkdir(parents=True, exist_ok=True)
            self.offsets: OffsetStore = FileOffsetStore(config.state_dir / "offsets.json")
        else:
            self.offsets = MemoryOffsetStore()

    def _main_answer(self) -> Answer:
        config = self.config
        if config.agent == "openai":
            assert config.model is not None
            model = config.model

            async def by_model(agent: Agent, turn: IncomingTurn) -> None:
                await model_answer(agent, turn, self._http, model)

            return by_model

        async def by_demo(agent: Agent, turn: IncomingTurn) -> None:
            await demo.answer(agent, turn, token_rate=config.token_rate)

        return by_demo

    def serve(self, session_id: str) -> None:
        if session_id in self.sessions:
            return
        log.info("serving session %s", session_id)
        tasks = [self._task(session_id, ASSISTANT, self._main_answer())]
        if self.config.helper and self.config.agent == "demo":

            async def research(agent: Agent, turn: IncomingTurn) -> None:
                await demo.research(agent, turn)

            tasks.append(self._task(session_id, HELPER, research))
        self.sessions[session_id] = tasks

    def _task(self, session_id: str, author: Author, answer: Answer) -> asyncio.Task[None]:
        async def guarded() -> None:
            try:
                await run_agent(self.config.server, session_id, author, answer, self.offsets)
            except DurableError as exc:
                log.warning("agent %s left session %s: %s", author.id, session_id, exc)

        return asyncio.create_task(guarded(), name=f"agent:{author.id}:{session_id}")

    async def run(self) -> None:
        """Follow the index and serve every session in it, until cancelled."""
        try:
            async for entry in follow(self.config.server):
                self.serve(entry.session_id)
        finally:
            tasks = [t for ts in self.sessions.values() for t in ts]
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._http.aclose()
