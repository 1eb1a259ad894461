"""The agents as session clients: the OpenAI-compatible one against a fake streaming endpoint,
the demo agent's determinism, and the launcher's detached processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from durable_client import Agent, Author, IncomingTurn, MemoryOffsetStore, Session
from mock_server.testing import RunningServer, serve
from tests._await import until
from tui_demo._index import announce
from tui_demo._launch import ensure_agents, ensure_server, healthy
from tui_demo.agents import demo
from tui_demo.agents.host import ASSISTANT, run_agent
from tui_demo.agents.openai import ModelConfig, ModelError, completion_tokens
from tui_demo.agents.openai import answer as model_answer

Scope = MutableMapping[str, Any]


class FakeModel:
    """An OpenAI-compatible chat-completions endpoint that streams scripted chunks."""

    def __init__(self, chunks: list[str], *, hang: bool = False, status: int = 200) -> None:
        self.chunks = chunks
        self.hang = hang  # after the chunks, stream nothing until the client goes away
        self.status = status
        self.requests: list[dict[str, Any]] = []
        self.disconnected = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.requests.append(
            {
                "path": scope["path"],
                "json": json.loads(body),
                "auth": dict(scope["headers"]).get(b"authorization"),
            }
        )
        if self.status != 200:
            await send({"type": "http.response.start", "status": self.status, "headers": []})
            await send({"type": "http.response.body", "body": b'{"error":"quota"}'})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for chunk in self.chunks:
            event = {"choices": [{"index": 0, "delta": {"content": chunk}}]}
            await send(
                {
                    "type": "http.response.body",
                    "body": f"data: {json.dumps(event)}\n\n".encode(),
                    "more_body": True,
                }
            )
        if self.hang:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnected.set()
            return
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


@contextlib.asynccontextmanager
async def fake_endpoint(model: FakeModel) -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(model, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:  # noqa: ASYNC110 - uvicorn offers no started event
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        await task
        sock.close()


async def test_completion_tokens_parse_the_stream() -> None:
    model = FakeModel(["Hel", "lo", " there"])
    async with fake_endpoint(model) as url, httpx.AsyncClient() as http:
        config = ModelConfig(url, "test-model", api_key="sk-test")
        got = [
            t async for t in completion_tokens(http, config, [{"role": "user", "content": "hi"}])
        ]
    assert got == ["Hel", "lo", " there"]
    request = model.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["json"]["stream"] is True
    assert request["json"]["model"] == "test-model"
    assert request["auth"] == b"Bearer sk-test"


async def test_an_endpoint_error_is_a_clear_message() -> None:
    async with fake_endpoint(FakeModel([], status=429)) as url, httpx.AsyncClient() as http:
        with pytest.raises(ModelError, match="answered 429"):
            async for _ in completion_tokens(http, ModelConfig(url, "m"), []):
                pass


async def session_events(server: RunningServer, session_id: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{server.url}/v1/stream/sessions/{session_id}")
        return list(response.json())


async def until_event(server: RunningServer, session_id: str, kind: str) -> None:
    """Long-poll the session until an event of ``kind`` is in it (bounded by the caller)."""
    async with httpx.AsyncClient(timeout=10) as http:
        offset = "-1"
        url = f"{server.url}/v1/stream/sessions/{session_id}"
        while True:
            response = await http.get(url, params={"offset": offset, "live": "long-poll"})
            offset = response.headers["Stream-Next-Offset"]
            if response.status_code == 200 and any(e["type"] == kind for e in response.json()):
                return


async def start_model_agent(server: RunningServer, url: str, session_id: str) -> asyncio.Task[None]:
    config = ModelConfig(url, "m")
    http = httpx.AsyncClient()

    async def answer(agent: Agent, turn: IncomingTurn) -> None:
        await model_answer(agent, turn, http, config)

    return asyncio.create_task(
        run_agent(
            server.url,
            session_id,
            Author.agent("gpt", "Model"),
            answer,
            MemoryOffsetStore(),
            holder="model-host",
        )
    )


async def test_the_model_agent_streams_a_reply_into_the_session() -> None:
    model = FakeModel(["The ", "answer ", "is 42."])
    async with serve() as server, fake_endpoint(model) as url:
        async with Session(server.url, "s1", author=Author.user("u", "U")) as user:
            await user.create()
            agent = await start_model_agent(server, url, "s1")
            await user.send_message("What is it?")
            async with asyncio.timeout(10):
                await until_event(server, "s1", "turn_end")
            agent.cancel()
        events = await session_events(server, "s1")
    text = "".join(e["text"] for e in events if e["type"] == "text_delta")
    assert text == "The answer is 42."
    assert [e["reason"] for e in events if e["type"] == "turn_end"] == ["complete"]
    sent = model.requests[0]["json"]["messages"]
    assert sent[-1] == {"role": "user", "content": "What is it?"}


async def test_a_cancel_closes_the_model_stream_and_ends_the_turn_cancelled() -> None:
    model = FakeModel(["partial ", "text"], hang=True)
    async with serve() as server, fake_endpoint(model) as url:
        async with Session(server.url, "s2", author=Author.user("u", "U")) as user:
            await user.create()
            agent = await start_model_agent(server, url, "s2")
            ack = await user.send_message("Go on forever")
            async with asyncio.timeout(10):
                await until_event(server, "s2", "text_delta")
            await user.cancel(ack.event.turn_id)
            async with asyncio.timeout(10):
                await model.disconnected.wait()  # the HTTP response to the model was closed
                await until_event(server, "s2", "turn_end")
            agent.cancel()
        events = await session_events(server, "s2")
    assert [e["reason"] for e in events if e["type"] == "turn_end"] == ["cancelled"]
    assert "".join(e["text"] for e in events if e["type"] == "text_delta") == "partial text"


def test_the_demo_reply_is_deterministic() -> None:
    assert demo.compose_reply("same question") == demo.compose_reply("same question")
    assert demo.compose_reply("one") != demo.compose_reply("another")


def test_the_launcher_starts_a_server_and_agents_that_outlive_the_terminal(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    try:
        assert ensure_server(url, tmp_path, default=url) is True
        assert healthy(url)
        assert ensure_server(url, tmp_path, default=url) is False  # a second terminal finds it
        assert ensure_agents(url, tmp_path, []) is True
        pid = int((tmp_path / f"agents-{port}.pid").read_text())
        assert ensure_agents(url, tmp_path, []) is False  # one agent host per server
        # Detached: not in this process's session, so a closing terminal's hangup misses them.
        assert os.getsid(pid) != os.getsid(0)
    finally:
        # Stop exactly what this test started, by the ids the launcher recorded.
        for name in (f"agents-{port}.pid", f"server-{port}.pid"):
            with contextlib.suppress(OSError, ValueError, ProcessLookupError):
                os.kill(int((tmp_path / name).read_text()), signal.SIGTERM)


# --- one reply per turn, across hosts and restarts --------------------------------------


def assistant_starts(events: list[dict[str, Any]], turn_id: str) -> int:
    """How many replies the assistant started in ``turn_id``."""
    return sum(
        1
        for e in events
        if e["type"] == "turn_start"
        and e["turn_id"] == turn_id
        and e["author"]["id"] == "assistant"
    )


async def until_turn_event(server_url: str, session_id: str, kind: str, turn_id: str) -> None:
    """Long-poll the session until an event of ``kind`` in ``turn_id`` is in it."""
    async with httpx.AsyncClient(timeout=10) as http:
        offset = "-1"
        url = f"{server_url}/v1/stream/sessions/{session_id}"
        while True:
            response = await http.get(url, params={"offset": offset, "live": "long-poll"})
            offset = response.headers["Stream-Next-Offset"]
            if response.status_code == 200 and any(
                e["type"] == kind and e.get("turn_id") == turn_id for e in response.json()
            ):
                return


async def test_two_hosts_racing_on_one_turn_reply_once() -> None:
    handled: dict[str, list[tuple[str, bool]]] = {"a": [], "b": []}

    async def answer(agent: Agent, turn: IncomingTurn) -> None:
        await demo.answer(agent, turn, token_rate=400.0)

    def host(name: str) -> asyncio.Task[None]:
        def record(turn_id: str, answered: bool) -> None:
            handled[name].append((turn_id, answered))

        return asyncio.create_task(
            run_agent(
                server.url,
                "race",
                ASSISTANT,
                answer,
                MemoryOffsetStore(),
                holder=f"host-{name}",
                on_turn=record,
            )
        )

    async with serve() as server:
        async with Session(server.url, "race", author=Author.user("u", "U")) as user:
            await user.create()
            hosts = [host("a"), host("b")]  # two hosts, both reading the session from the start
            try:
                turns = [(await user.send_message(f"question {i}")).event.turn_id for i in range(3)]
                # Every host has decided on every turn (answered it, or stood down).
                await until(lambda: all(len(h) == 3 for h in handled.values()), timeout=30)
            finally:
                for task in hosts:
                    task.cancel()
                await asyncio.gather(*hosts, return_exceptions=True)
        events = await session_events(server, "race")
    for turn_id in turns:
        assert assistant_starts(events, turn_id) == 1, turn_id
        # One host answered it, the other stood down.
        decisions = sorted(a for h in handled.values() for t, a in h if t == turn_id)
        assert decisions == [False, True]
    assert [e["reason"] for e in events if e["type"] == "turn_end"] == ["complete"] * 3


@contextlib.asynccontextmanager
async def host_process(
    server_url: str, state_dir: Path, token_rate: float
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m tui_demo.agents`` against ``server_url`` (killed on exit if still running)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tui_demo.agents",
        "--server",
        server_url,
        "--state-dir",
        str(state_dir),
        "--token-rate",
        str(token_rate),
        "--no-helper",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_restarted_host_without_read_positions_does_not_answer_old_turns(
    tmp_path: Path,
) -> None:
    async with serve() as server:
        async with Session(server.url, "again", author=Author.user("u", "U")) as user:
            await user.create()
            await announce(server.url, "again", title="again", created_by="u")
            # A host answers a turn and stops cleanly.
            async with host_process(server.url, tmp_path / "a", 400.0) as first:
                done = (await user.send_message("first question")).event.turn_id
                async with asyncio.timeout(30):
                    await until_turn_event(server.url, "again", "turn_end", done)
                first.send_signal(signal.SIGTERM)
                assert await first.wait() == 0
            # A slow host starts a reply and is killed mid-reply (kill -9: no turn_end).
            async with host_process(server.url, tmp_path / "b", 2.0) as second:
                torn = (await user.send_message("second question")).event.turn_id
                async with asyncio.timeout(30):
                    await until_turn_event(server.url, "again", "text_delta", torn)
                second.send_signal(signal.SIGKILL)
                await second.wait()
            # A new host with no saved read positions reads the whole session again.
            async with host_process(server.url, tmp_path / "c", 400.0):
                new = (await user.send_message("third question")).event.turn_id
                # Turns are taken in order: once the new one is answered, the host has
                # passed (and left alone) the two old ones.
                async with asyncio.timeout(30):
                    await until_turn_event(server.url, "again", "turn_end", new)
        events = await session_events(server, "again")
    assert [assistant_starts(events, t) for t in (done, torn, new)] == [1, 1, 1]
    ends = [(e["turn_id"], e["reason"]) for e in events if e["type"] == "turn_end"]
    # The torn reply is nobody's to finish: host c (another holder) leaves it to its
    # lease, whose readers end it as abandoned once it lapses (10 s, if the test ran so long).
    assert [end for end in ends if end[0] != torn] == [(done, "complete"), (new, "complete")]
    assert [reason for turn_id, reason in ends if turn_id == torn] in ([], ["abandoned"])
