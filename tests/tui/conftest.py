"""Fixtures for the chat app: the real server in-process, the demo agent as a session client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from textual.pilot import Pilot
from textual.widgets import Input

from durable_client import Agent, Author, IncomingTurn, MemoryOffsetStore, Unfinished
from durable_client.streams import DurableStream
from mock_server.testing import RunningServer, serve
from tui_demo.agents import demo
from tui_demo.agents.host import ASSISTANT, run_agent
from tui_demo.app import ChatApp, ChatConfig

SESSION = "amber-otter-0042"


@dataclass
class Chat:
    server: RunningServer
    session_id: str
    token_rate: float
    agent_task: asyncio.Task[None] | None = None

    def app(
        self,
        name: str,
        *,
        server_url: str | None = None,
        new: bool = False,
        user_id: str | None = None,
        label: str = "",
    ) -> ChatApp:
        """A terminal of user ``name`` (id ``{name}-id`` unless ``user_id`` says)."""
        return ChatApp(
            ChatConfig(
                server=server_url or self.server.url,
                session_id=self.session_id,
                user=Author.user(user_id or f"{name}-id", name),
                new=new,
                launcher="python -m tui_demo",
                label=label,
            )
        )

    def start_agent(
        self,
        token_rate: float | None = None,
        *,
        holder: str = "test-host",
        lease_ttl: float = 10.0,
        resume: bool = False,
    ) -> None:
        """The demo agent as an agent host runs it, in this process. ``resume``: it
        continues the replies ``holder`` left unfinished (a restarted host)."""
        rate = token_rate if token_rate is not None else self.token_rate

        async def answer(agent: Agent, turn: IncomingTurn) -> None:
            await demo.answer(agent, turn, token_rate=rate)

        async def continue_reply(agent: Agent, left: Unfinished) -> None:
            await demo.resume(agent, left, token_rate=rate)

        self.agent_task = asyncio.create_task(
            run_agent(
                self.server.url,
                self.session_id,
                ASSISTANT,
                answer,
                MemoryOffsetStore(),
                holder=holder,
                lease_ttl=lease_ttl,
                resume=continue_reply if resume else None,
            )
        )

    async def events(self) -> list[dict[str, object]]:
        async with DurableStream(f"{self.server.url}/v1/stream/sessions/{self.session_id}") as s:
            batch = await s.read()
            return list(batch.messages)


@pytest.fixture
def update(request: pytest.FixtureRequest) -> bool:
    """Whether snapshots are to be rewritten (``--snapshot-update``)."""
    return bool(request.config.getoption("--snapshot-update"))


@pytest.fixture
async def chat() -> AsyncIterator[Chat]:
    async with serve(long_poll_timeout=1.0) as server:
        async with DurableStream(
            f"{server.url}/v1/stream/sessions/{SESSION}", content_type="application/json"
        ) as stream:
            await stream.create()
        state = Chat(server, SESSION, token_rate=400.0)
        try:
            yield state
        finally:
            if state.agent_task is not None:
                state.agent_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await state.agent_task


async def wait_for(
    pilot: Pilot[None], condition: Callable[[], bool], timeout: float = 10.0
) -> None:
    """Let the app run until ``condition()`` holds; the timeout only bounds a failure."""
    async with asyncio.timeout(timeout):
        while not condition():
            await pilot.pause(0.02)


async def send(pilot: Pilot[None], text: str) -> None:
    """Type ``text`` into the composer and press Enter."""
    composer = pilot.app.query_one("#composer", Input)
    composer.focus()
    composer.value = text
    await pilot.press("enter")
