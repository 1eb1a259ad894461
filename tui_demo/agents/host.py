"""The agent host: runs agents for every session listed in a server's index.

It is a session client like the chat app. It follows the sessions index and,
for each session, runs the main agent (demo or an OpenAI-compatible model)
and, with the demo agent, a helper sub-agent that publishes progress into
the session itself. Offsets are saved per session, so a restarted host
resumes where it stopped and answers messages that arrived while it was down.

Each turn is answered once per agent, whatever the number of hosts and
restarts. Every reply is leased (``durable_client._core.leases``): an agent
starting a reply claims it, and of two hosts racing for one turn exactly
one gets it; the other is told so (:class:`~durable_client.TurnFenced`) and
stands down. A host that dies mid-reply stops renewing the lease, and the
session's readers end the reply as ``abandoned`` once it lapses. A host
restarted with the same ``--state-dir`` keeps its name (the lease holder) and
takes its unfinished replies back: the demo agent continues the text where
the log stops; a model agent ends them cleanly (a chat-completions stream
cannot be resumed).

Against a server run with ``--auth`` the host uses one token (``--token``,
``--token-file`` or ``$DURABLE_TOKEN``) for the index and every agent. The
server wants every event's author to be the token's subject, so a token with
``admin`` lets the host speak as both of its agents; any other token makes the
main agent speak as the token's ``sub`` (kind ``agent``) and leaves the helper
out, which needs a second identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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
    TurnFenced,
    Unfinished,
    new_id,
)
from durable_client.streams import TokenProvider

from .._index import follow
from .._token import Identity
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
    #: Seconds a reply may go without a word before readers end it as abandoned.
    lease_ttl: float = 10.0
    #: The access token for a server run with --auth (a string or a provider).
    token: str | TokenProvider | None = None
    #: Who the token speaks for (its unverified payload), to pick the agents' ids.
    identity: Identity = field(default_factory=Identity)


Answer = Callable[[Agent, IncomingTurn], Awaitable[None]]
#: What to do with a reply a previous run of this host left open.
Resume = Callable[[Agent, Unfinished], Awaitable[None]]


def already_answered(agent: Agent, turn: IncomingTurn) -> bool:
    """Whether this agent has a reply to ``turn`` in the session already: finished or
    not (a reply still streaming belongs to a live host, or to one that crashed)."""
    known = agent.transcript.turn(turn.turn_id)
    return known is not None and known.reply_of(agent.author.id) is not None


OnTurn = Callable[[str, bool], None]
"""Told after each turn: its id, and whether this agent answered it (False: stood down)."""


async def run_agent(
    server: str,
    session_id: str,
    author: Author,
    answer: Answer,
    offsets: OffsetStore,
    *,
    holder: str,
    lease_ttl: float = 10.0,
    resume: Resume | None = None,
    on_turn: OnTurn | None = None,
    token: str | TokenProvider | None = None,
) -> None:
    """Answer the turns of one session as ``author``, one at a time, until cancelled.

    First, replies that ``holder`` (this host, in an earlier run) left open are
    handed to ``resume`` (default: ended as abandoned). Then each turn gets
    one reply per agent: a turn that already has one, or that another host
    claims first, is left alone.
    """
    async with (
        Session(server, session_id, author=author, token=token) as session,
        Agent(
            session,
            start="beginning",
            offset_store=offsets,
            lease_ttl=lease_ttl,
            holder=holder,
        ) as agent,
    ):
        for left in await agent.unfinished():
            if left.holder != holder:
                continue  # another host's: its lease decides
            try:
                if resume is not None:
                    await resume(agent, left)
                else:
                    await agent.abandon(left)
            except TurnFenced as exc:
                log.info("session %s turn %s: %s", session_id, left.turn_id, exc)
            except DurableError as exc:
                log.warning("session %s turn %s: %s", session_id, left.turn_id, exc)
        async for turn in agent.turns():
            answered = False
            try:
                if already_answered(agent, turn):
                    log.info("session %s turn %s: already answered", session_id, turn.turn_id)
                else:
                    answered = True
                    await answer(agent, turn)
            except TurnFenced:  # another host claimed it first
                answered = False
                log.info("session %s turn %s: claimed by another host", session_id, turn.turn_id)
            except DurableError as exc:  # the turn ended with an error; keep serving
                log.warning("session %s turn %s: %s", session_id, turn.turn_id, exc)
            if on_turn is not None:
                on_turn(turn.turn_id, answered)


def host_name(state_dir: Path | None) -> str:
    """This host's lease holder name: kept in ``state_dir`` so a restart is
    recognised as the same host; random without one."""
    if state_dir is None:
        return f"host-{new_id()[:12]}"
    path = state_dir / "holder"
    try:
        name = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        name = ""
    if not name:
        name = f"host-{new_id()[:12]}"
        path.write_text(name + "\n", encoding="utf-8")
    return name


def agents_for(config: HostConfig) -> tuple[Author, Author | None]:
    """The main agent and the helper (``None``: left out) for the host's token."""
    identity = config.identity
    if config.token is None or identity.admin or identity.sub is None:
        return ASSISTANT, HELPER
    name = identity.name or ASSISTANT.name
    if identity.sub != ASSISTANT.id and config.helper:
        log.info("the token speaks as %s only: the helper agent needs an admin token", identity.sub)
    return Author.agent(identity.sub, name), None


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
        self.holder = host_name(config.state_dir)
        self.assistant, self.helper = agents_for(config)

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

    def _resume(self) -> Resume | None:
        if self.config.agent != "demo":
            return None  # a model's stream cannot be picked up again: end the reply
        rate = self.config.token_rate

        async def continue_demo(agent: Agent, left: Unfinished) -> None:
            await demo.resume(agent, left, token_rate=rate)

        return continue_demo

    def serve(self, session_id: str) -> None:
        if session_id in self.sessions:
            return
        log.info("serving session %s", session_id)
        tasks = [self._task(session_id, self.assistant, self._main_answer(), self._resume())]
        if self.helper is not None and self.config.helper and self.config.agent == "demo":

            async def research(agent: Agent, turn: IncomingTurn) -> None:
                await demo.research(agent, turn)

            tasks.append(self._task(session_id, self.helper, research, None))
        self.sessions[session_id] = tasks

    def _task(
        self, session_id: str, author: Author, answer: Answer, resume: Resume | None
    ) -> asyncio.Task[None]:
        async def guarded() -> None:
            try:
                await run_agent(
                    self.config.server,
                    session_id,
                    author,
                    answer,
                    self.offsets,
                    holder=self.holder,
                    lease_ttl=self.config.lease_ttl,
                    resume=resume,
                    token=self.config.token,
                )
            except DurableError as exc:
                log.warning("agent %s left session %s: %s", author.id, session_id, exc)

        return asyncio.create_task(guarded(), name=f"agent:{author.id}:{session_id}")

    async def run(self) -> None:
        """Follow the index and serve every session in it, until cancelled."""
        try:
            async for entry in follow(self.config.server, token=self.config.token):
                self.serve(entry.session_id)
        finally:
            tasks = [t for ts in self.sessions.values() for t in ts]
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._http.aclose()
