"""The chat app and the agent host against a server run with ``--auth`` (issue 13):
with a token everything works as before; without one the app says so in one line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest

from durable_client import Agent, Author, Forbidden, IncomingTurn, MemoryOffsetStore, Unauthorized
from durable_client.streams import DurableStream
from mock_server.testing import RunningServer, serve
from tui_demo import _token
from tui_demo.__main__ import parse_args, user_of
from tui_demo.agents import demo
from tui_demo.agents.host import ASSISTANT, HELPER, HostConfig, agents_for, run_agent
from tui_demo.app import ChatApp, ChatConfig
from tui_demo.widgets import ChatLog

from .conftest import send, wait_for

SECRET = secrets.token_bytes(32)
KID = "hs-" + hashlib.sha256(SECRET).hexdigest()[:8]
SESSION = "locked-otter-0001"


def mint(sub: str, *, kind: str = "user", can: list[str], ttl: int = 600) -> str:
    now = int(time.time())
    claims = {
        "sub": sub,
        "kind": kind,
        "name": sub.title(),
        "aud": "durable-sessions",
        "iat": now,
        "exp": now + ttl,
        "streams": ["sessions/*", "chat-index"],
        "can": can,
    }
    return jwt.encode(claims, SECRET, algorithm="HS256", headers={"kid": KID})


USER = ["read", "append", "create", "presence", "cancel", "steer"]


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    async with serve(auth=True, auth_secret=SECRET, long_poll_timeout=1.0) as running:
        admin = mint("root", can=["admin"])
        async with DurableStream(
            f"{running.url}/v1/stream/sessions/{SESSION}",
            content_type="application/json",
            token=admin,
        ) as stream:
            await stream.create()
        yield running


def notes(app: ChatApp) -> str:
    return " ".join(str(n.render()) for n in app.query_one(ChatLog).children)


async def test_with_a_token_the_chat_works_and_the_agent_answers(server: RunningServer) -> None:
    agent_token = mint("assistant", kind="agent", can=["read", "append", "presence"])

    async def answer(agent: Agent, turn: IncomingTurn) -> None:
        await demo.answer(agent, turn, token_rate=400.0)

    agent = asyncio.create_task(
        run_agent(
            server.url,
            SESSION,
            ASSISTANT,
            answer,
            MemoryOffsetStore(),
            holder="test-host",
            token=agent_token,
        )
    )
    token = mint("alice-id", can=USER)
    app = ChatApp(
        ChatConfig(
            server=server.url,
            session_id=SESSION,
            user=user_of("alice", token),
            new=False,
            launcher="python -m tui_demo",
            token=token,
        )
    )
    try:
        async with app.run_test(size=(100, 40)) as pilot:
            await send(pilot, "Are tokens refreshed?")
            await wait_for(
                pilot,
                lambda: any(
                    r.status == "complete"
                    for t in app.query_one(ChatLog).turns.values()
                    for r in t.replies.values()
                ),
            )
            assert app.unavailable is None
            assert app.transcript.turns[-1].message is not None
            assert app.transcript.turns[-1].message.author.id == "alice-id"
    finally:
        agent.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await agent


async def test_without_a_token_the_app_says_so_in_one_line(server: RunningServer) -> None:
    app = ChatApp(
        ChatConfig(
            server=server.url,
            session_id=SESSION,
            user=Author.user("bob-id", "bob"),
            new=False,
            launcher="python -m tui_demo",
        )
    )
    async with app.run_test(size=(100, 40)) as pilot:
        await wait_for(pilot, lambda: "needs an access token" in notes(app))
        assert app.unavailable is not None
        assert "\n" not in app.unavailable
        assert "--token" in app.unavailable
        assert "Traceback" not in notes(app)


def test_the_token_comes_from_the_flag_the_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(_token.TOKEN_ENV, "from-env")
    assert _token.token_from(parse_args([])) == "from-env"
    assert _token.token_from(parse_args(["--token", "from-flag"])) == "from-flag"
    monkeypatch.delenv(_token.TOKEN_ENV)
    assert _token.token_from(parse_args([])) is None
    token = mint("ann", can=USER)
    assert user_of("ann", token).id == "ann"  # the author is the token's subject
    assert user_of("ann", None).id.startswith("ann-")


async def test_a_token_file_is_read_again_on_every_refresh(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first\n")
    provider = _token.token_from(argparse.Namespace(token=None, token_file=path))
    assert callable(provider)
    assert await provider() == "first"
    path.write_text("second")  # rotated by an operator
    assert await provider() == "second"
    path.unlink()
    with pytest.raises(_token.TokenFileError, match="cannot read the token file"):
        await provider()


def test_refusals_read_as_one_line() -> None:
    body = '{"error": {"code": "forbidden", "message": "the token does not cover sessions/x"}}'
    forbidden = Forbidden(f"append failed: {body}", status=403)
    assert _token.refusal(forbidden, have_token=True) == (
        "access denied: the token does not cover sessions/x"
    )
    missing = Unauthorized('create failed: {"error": {"message": "no token"}}', status=401)
    line = _token.refusal(missing, have_token=False)
    assert line is not None
    assert line.startswith("the server needs an access token (no token)")
    frame = Unauthorized("subscribe failed: unauthorized: token expired", status=401)
    assert _token.refusal(frame, have_token=True) == (
        "the server refused the access token: token expired"
    )


def test_the_host_speaks_as_the_tokens_subject_unless_admin() -> None:
    admin = mint("ops", kind="agent", can=["admin"])
    plain = mint("helper-bot", kind="agent", can=["read", "append"])
    config = HostConfig(server="http://x", token=admin, identity=_token.identity_of(admin))
    assert agents_for(config) == (ASSISTANT, HELPER)
    config = HostConfig(server="http://x", token=plain, identity=_token.identity_of(plain))
    main, helper = agents_for(config)
    assert (main.id, helper) == ("helper-bot", None)
    assert agents_for(HostConfig(server="http://x")) == (ASSISTANT, HELPER)
