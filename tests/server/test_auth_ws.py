"""Access control over the WebSocket transport (``--auth``, docs/security.md).

The handshake refuses a bad token with its HTTP status before the upgrade; each
frame is checked against the token in force (a refused frame is an ``error``
frame and the socket keeps serving its other streams); an ``auth`` frame
replaces the token in force; the socket is closed with 4001 when it expires.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.server import test_fuzz as fuzz
from tests.server.conftest import capture_server_log
from tests.server.test_auth import CASES, HISTORY, TEAM_A, TEAM_AB, VICTIM, WATCHED, Case, seed
from tests.server.test_auth_common import (
    ADMIN,
    ORIGIN,
    AuthServer,
    admin_http,
    auth_server,
    claims,
    hs,
    snapshot,
)
from tests.server.test_websocket import Client

__all__ = ["admin_http", "auth_server"]  # fixtures, imported to be found

ANN = {"id": "ann", "kind": "user"}


class Socket(Client):
    """test_websocket's raw client, with longer waits (token lifetimes are seconds) and
    a request/answer helper."""

    async def next(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        return await super().next(match, timeout)

    async def reply(self, **frame: Any) -> dict[str, Any]:
        """Send a frame with ``req`` (or ``sub``) and await the answer that names it."""
        await self.send(**frame)
        key = "req" if "req" in frame else "sub"
        return await self.next(lambda f: f.get(key) == frame[key] and f["type"] != "data")


@asynccontextmanager
async def opened(server: AuthServer, token: str, **kwargs: Any) -> AsyncIterator[Socket]:
    async with connect(
        server.ws_url, additional_headers={"Authorization": f"Bearer {token}"}, **kwargs
    ) as ws:
        yield Socket(ws)


async def refused_handshake(server: AuthServer, token: str | None, origin: str | None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    with pytest.raises(InvalidStatus) as refused:
        async with connect(server.ws_url, additional_headers=headers, origin=origin):  # type: ignore[arg-type]
            pass
    return refused.value.response


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_the_handshake_refuses_a_bad_token_before_the_upgrade(
    auth_server: AuthServer, admin_http: httpx.AsyncClient, case: Case
) -> None:
    await seed(admin_http)
    if case.revoke:
        auth_server.revoke_ed_key()
    token = case.token(case.target, "read")
    if case.status == 403 and case.origin is None:
        # A token that verifies is let in; what it may not do is refused per frame.
        async with opened(auth_server, token or "") as sock:
            answer = await sock.reply(op="subscribe", sub="s", stream=case.target)
        assert answer["type"] == "error"
        assert (answer["status"], answer["code"]) == (403, "forbidden")
        assert case.message in answer["message"]
        return
    response = await refused_handshake(auth_server, token, case.origin)
    assert response.status_code == case.status
    error = json.loads(response.body)["error"]
    assert error["code"] == ("unauthorized" if case.status == 401 else "forbidden")
    assert case.message in error["message"]
    assert "www-authenticate" in response.headers


async def test_the_handshake_takes_access_token_in_the_url(
    auth_server: AuthServer, admin_http: httpx.AsyncClient
) -> None:
    await seed(admin_http)
    token = hs(claims("ann", [VICTIM], ["read"]))
    async with connect(f"{auth_server.ws_url}?access_token={token}", origin=ORIGIN) as ws:  # type: ignore[arg-type]
        sock = Socket(ws)
        assert (await sock.reply(op="subscribe", sub="s", stream=VICTIM))["type"] == "subscribed"
        data = await sock.next(lambda f: f["type"] == "data")
        assert data["messages"] == HISTORY


# ---------------------------------------------------------------- per frame


@dataclass(frozen=True)
class FrameCase:
    name: str
    can: tuple[str, ...]
    frame: dict[str, Any]
    message: str
    kind: str = "user"


def _append(stream: str, data: Any, **extra: Any) -> dict[str, Any]:
    return {"op": "append", "req": "r", "stream": stream, "data": data, **extra}


def _presence(stream: str, client_id: str = "ann", kind: str = "user") -> dict[str, Any]:
    return {"op": "presence", "stream": stream, "client_id": client_id, "kind": kind}


MINE = "sessions/mine"
OWN = {"type": "message", "author": ANN}
ALL = ("read", "append", "presence")
FRAME_CASES = [
    FrameCase(
        "subscribe, wrong session", ALL, {"op": "subscribe", "sub": "x", "stream": VICTIM}, "cover"
    ),
    FrameCase(
        "subscribe, prefix itself", ALL, {"op": "subscribe", "sub": "x", "stream": TEAM_A}, "cover"
    ),
    FrameCase(
        "subscribe, prefix escape", ALL, {"op": "subscribe", "sub": "x", "stream": TEAM_AB}, "cover"
    ),
    FrameCase(
        "subscribe, no read", ("append",), {"op": "subscribe", "sub": "x", "stream": MINE}, "'read'"
    ),
    FrameCase("append, wrong session", ALL, _append(VICTIM, OWN), "cover"),
    FrameCase("append, no append", ("read", "presence"), _append(MINE, OWN), "'append'"),
    FrameCase(
        "close, no delete",
        ALL,
        {"op": "append", "req": "r", "stream": MINE, "close": True},
        "'delete'",
    ),
    FrameCase(
        "append as another user",
        ALL,
        _append(MINE, {"author": {"id": "bob", "kind": "user"}}),
        "author.id",
    ),
    FrameCase(
        "append user as agent",
        ALL,
        _append(MINE, {"author": {"id": "ann", "kind": "agent"}}),
        "kind",
    ),
    FrameCase(
        "spoof in a batch",
        ALL,
        _append(MINE, [OWN, {"author": {"id": "bob", "kind": "user"}}]),
        "id",
    ),
    FrameCase(
        "cancel without cancel", ALL, _append(MINE, {"type": "cancel", "author": ANN}), "cancel"
    ),
    FrameCase("steer without steer", ALL, _append(MINE, {"type": "steer", "author": ANN}), "steer"),
    FrameCase("presence, wrong session", ALL, _presence(VICTIM), "cover"),
    FrameCase("presence, no presence", ("read", "append"), _presence(MINE), "'presence'"),
    FrameCase("presence as another client", ALL, _presence(MINE, "bob"), "client_id"),
    FrameCase("presence user as agent", ALL, _presence(MINE, "ann", "agent"), "kind"),
    FrameCase(
        "presence.leave of another",
        ALL,
        {"op": "presence.leave", "stream": MINE, "client_id": "bob"},
        "client_id",
    ),
]


@pytest.mark.parametrize("case", FRAME_CASES, ids=[c.name for c in FRAME_CASES])
async def test_a_refused_frame_is_an_error_and_the_socket_serves_on(
    auth_server: AuthServer, admin_http: httpx.AsyncClient, case: FrameCase
) -> None:
    await seed(admin_http)
    assert (await admin_http.put(f"/v1/stream/{MINE}", json=[])).status_code == 201
    before = await snapshot(admin_http, [*WATCHED, MINE])
    token = hs(claims("ann", [MINE], list(case.can), kind=case.kind))
    async with opened(auth_server, token) as sock:
        if "read" in case.can:
            assert (await sock.reply(op="subscribe", sub="mine", stream=MINE))[
                "type"
            ] == "subscribed"
            await sock.next(lambda f: f["type"] == "data" and f["sub"] == "mine")
        await sock.send(**case.frame)
        error = await sock.next(lambda f: f["type"] == "error")
        assert (error["status"], error["code"]) == (403, "forbidden"), error
        assert case.message in error["message"], error
        assert error.get("req") == case.frame.get("req")
        assert error.get("sub") == (case.frame["sub"] if case.frame["op"] == "subscribe" else None)
        assert await snapshot(admin_http, [*WATCHED, MINE]) == before
        # The socket stays up: its own stream still works.
        pong = await sock.reply(op="ping", req="p")
        assert pong["type"] == "pong"
        if {"read", "append"} <= set(case.can):
            ack = await sock.reply(op="append", req="ok", stream=MINE, data=OWN)
            assert ack["type"] == "ack", ack
            data = await sock.next(lambda f: f["type"] == "data" and f["sub"] == "mine")
            assert data["messages"] == [OWN]


async def test_an_agent_token_keeps_its_presence(
    auth_server: AuthServer, admin_http: httpx.AsyncClient
) -> None:
    """What the SDK's Session sends for an agent: client_id = author id, kind agent."""
    assert (await admin_http.put(f"/v1/stream/{MINE}", json=[])).status_code == 201
    token = hs(claims("bot", [MINE], ["read", "presence"], kind="agent"))
    async with opened(auth_server, token) as sock:
        await sock.send(op="presence", stream=MINE, client_id="bot", kind="agent", status="idle")
        event = await sock.next(lambda f: f["type"] == "presence" and f["event"] == "join")
        assert event["member"]["client_id"] == "bot"


# ---------------------------------------------------------------- refresh and expiry


async def _closed(sock: Socket) -> tuple[int | None, float]:
    """The close code once the server closes the socket, and when (time.time())."""

    async def read_to_the_end() -> None:
        async with asyncio.timeout(10):
            while True:
                await sock.ws.recv()

    with pytest.raises(ConnectionClosed) as closed:
        await read_to_the_end()
    return closed.value.rcvd.code if closed.value.rcvd else None, time.time()


async def test_refresh_extends_the_socket_and_no_refresh_closes_it_with_4001(
    auth_server: AuthServer, admin_http: httpx.AsyncClient
) -> None:
    await seed(admin_http)
    short = claims("ann", [VICTIM], ["read"], ttl=2)
    async with (
        opened(auth_server, hs(short)) as refreshed,
        opened(auth_server, hs(short)) as left,
    ):
        for sock in (refreshed, left):
            assert (await sock.reply(op="subscribe", sub="s", stream=VICTIM))[
                "type"
            ] == "subscribed"
        longer = claims("ann", [VICTIM], ["read"], ttl=600)
        ok = await refreshed.reply(op="auth", token=hs(longer), req="a1")
        assert ok == {"type": "auth_ok", "req": "a1", "expires_at": longer["exp"]}
        code, when = await _closed(left)
        assert code == 4001
        assert when >= short["exp"] - 0.1  # not before the token expired
        assert left.ws.close_reason == "token expired"
        # The refreshed socket outlived the first token and still delivers.
        assert (await refreshed.reply(op="ping", req="p"))["type"] == "pong"
        await admin_http.post(f"/v1/stream/{VICTIM}", json={"n": 3})
        data = await refreshed.next(
            lambda f: f["type"] == "data" and f.get("messages") == [{"n": 3}]
        )
        assert data["sub"] == "s"


@pytest.mark.parametrize(
    ("token", "status", "code", "message"),
    [
        (lambda: "garbage", 401, "unauthorized", "not a JWT"),
        (lambda: hs(claims("ann", [VICTIM], ["read"], ttl=-100)), 401, "unauthorized", "expired"),
        (lambda: hs(claims("bob", [VICTIM], ["read"])), 403, "forbidden", "same sub and kind"),
        (lambda: hs(claims("ann", [VICTIM], ["read"], kind="agent")), 403, "forbidden", "kind"),
    ],
    ids=["malformed", "expired", "other sub", "other kind"],
)
async def test_a_refused_refresh_keeps_the_token_in_force(
    auth_server: AuthServer,
    admin_http: httpx.AsyncClient,
    token: Callable[[], str],
    status: int,
    code: str,
    message: str,
) -> None:
    await seed(admin_http)
    first = claims("ann", [VICTIM], ["read"], ttl=2)
    async with opened(auth_server, hs(first)) as sock:
        error = await sock.reply(op="auth", token=token(), req="a1")
        assert (error["type"], error["status"], error["code"]) == ("error", status, code)
        assert message in error["message"]
        assert (await sock.reply(op="subscribe", sub="s", stream=VICTIM))["type"] == "subscribed"
        closed, _ = await _closed(sock)  # the first token still ends it
        assert closed == 4001


async def test_the_subject_cap_refuses_a_fifth_socket_with_429(
    auth_server: AuthServer, admin_http: httpx.AsyncClient
) -> None:
    token = hs(claims("ann", [VICTIM], ["read"]))
    async with (
        opened(auth_server, token),
        opened(auth_server, token),
        opened(auth_server, token),
        opened(auth_server, token),
    ):
        response = await refused_handshake(auth_server, token, None)
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
        async with opened(auth_server, ADMIN) as other:  # another subject is not counted
            assert (await other.reply(op="ping", req="p"))["type"] == "pong"
    async with opened(auth_server, token) as again:  # the slots were given back
        assert (await again.reply(op="ping", req="p"))["type"] == "pong"


# ---------------------------------------------------------------- fuzz, with auth on


async def test_websocket_fuzz_with_auth_on_never_an_internal_error(
    auth_server: AuthServer, admin_http: httpx.AsyncClient
) -> None:
    """test_fuzz's random frames, and random ``auth`` frames, on sockets of a user
    token and of an admin one: only refusals (< 500) and clean closes; victims unchanged."""
    await fuzz._setup(admin_http)
    before = {name: await fuzz.snapshot(admin_http, name) for name in fuzz.VICTIMS}
    known = [str(snap[2]) for snap in before.values()]
    user = claims("fz", ["fz/*", "victim"], ["read", "append", "presence", "delete"])
    tokens = [hs(user), ADMIN]
    refreshes = [hs(user), "garbage", hs(claims("other")), hs({**user, "exp": 1})]
    for seed_ in fuzz.SEEDS:
        rng = random.Random(seed_)
        for log in capture_server_log():
            sent = 0
            while sent < fuzz.WS_FRAMES:
                async with opened(auth_server, rng.choice(tokens), max_size=None) as sock:
                    try:
                        while sent < fuzz.WS_FRAMES:
                            sent += 1
                            if rng.random() < 0.1:
                                frame: str | bytes = json.dumps(
                                    {"op": "auth", "token": rng.choice(refreshes), "req": "a"}
                                )
                            else:
                                frame = fuzz.gen_frame(rng, known)
                            if len(frame) > fuzz.WS_MAX_FRAME:
                                continue  # the size limit is test_fuzz's; here: auth
                            await sock.ws.send(frame)
                            if sent % 10 == 0:
                                pong = await sock.reply(op="ping", req=f"p{sent}")
                                assert pong["type"] == "pong", (seed_, sent)
                                errors = [f for f in sock.frames if f.get("status", 0) >= 500]
                                assert errors == [], (seed_, sent, errors)
                    except ConnectionClosed as closed:
                        code = closed.rcvd.code if closed.rcvd else None
                        assert code in {*fuzz.ALLOWED_WS_CLOSE, 4001}, (seed_, sent, code)
                assert log.problems() == [], (seed_, sent)
    after = {name: await fuzz.snapshot(admin_http, name) for name in fuzz.VICTIMS}
    assert after == before


async def test_a_token_in_the_handshake_url_never_reaches_the_log(
    auth_server: AuthServer, admin_http: httpx.AsyncClient
) -> None:
    await seed(admin_http)
    token = hs(claims("ann", [VICTIM], ["read"]))
    uvicorn_log = logging.getLogger("uvicorn.error")
    level = uvicorn_log.level
    uvicorn_log.setLevel(logging.INFO)  # where uvicorn logs each handshake's path and query
    try:
        for log in capture_server_log():
            async with connect(f"{auth_server.ws_url}?x=1&access_token={token}") as ws:
                await Socket(ws).reply(op="ping", req="p")
            with pytest.raises(InvalidStatus):
                async with connect(f"{auth_server.ws_url}?access_token=bad.{token}"):
                    pass
            lines = [r.getMessage() for r in log.records]
            assert sum("access_token=***" in line for line in lines) == 2, lines
            assert not any(token.split(".")[2] in line for line in lines), lines
    finally:
        uvicorn_log.setLevel(level)
