"""Access tokens in the SDK (issue 13): the token source, and sessions against a
server run with ``--auth`` (in-process, an HMAC secret made here, tokens minted
with PyJWT).

- ``TokenSource`` alone: refresh at 80% of a token's lifetime, one refresh in
  flight, invalidate after a 401, a failing provider, nothing readable.
- Over HTTP and WebSocket: every request carries a current token, a 401 is
  retried once with a fresh one, tokens of 2 s expire mid-stream with nothing
  lost or duplicated and no subscription dropped (WS: refreshed in-band on the
  same socket; a provider too slow for the token's lifetime: 4001, reconnect,
  resume).
- Refresh under load: 100 sessions, mixed transports.
- The token never shows in an error, a repr or a log line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import httpx
import jwt
import pytest

from durable_client import (
    Author,
    ConnectError,
    ConnectionState,
    ConnectionStatus,
    Session,
    Unauthorized,
    UsageError,
    UserMessage,
)
from durable_client._auth import TokenSource, read_claims
from durable_client.streams import DurableStream
from durable_client.transports import HttpTransport, WebSocketTransport
from mock_server.chaos.checker import HistoryRecorder
from mock_server.testing import RunningServer, serve

pytestmark = pytest.mark.ours_only

SECRET = secrets.token_bytes(32)
KID = "hs-" + hashlib.sha256(SECRET).hexdigest()[:8]
AUDIENCE = "durable-sessions"
EVERYTHING = ["read", "append", "create", "presence", "cancel", "steer"]

Transport = Literal["http", "websocket"]


def mint(
    sub: str = "ann",
    *,
    ttl: float = 60.0,
    kind: str = "user",
    can: list[str] | None = None,
    streams: list[str] | None = None,
    secret: bytes = SECRET,
) -> str:
    now = int(time.time())
    claims = {
        "sub": sub,
        "kind": kind,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + int(ttl),
        "streams": streams or ["*"],
        "can": can or EVERYTHING,
    }
    return jwt.encode(claims, secret, algorithm="HS256", headers={"kid": KID})


class Minter:
    """A token provider that mints a fresh token per call (and remembers them all)."""

    def __init__(
        self,
        sub: str = "ann",
        *,
        ttl: float = 60.0,
        delay: Callable[[int], float] = lambda _: 0.0,
        first: str | None = None,
    ) -> None:
        self.sub = sub
        self.ttl = ttl
        self.delay = delay
        self.first = first  # what the first call returns (e.g. a bad token)
        self.calls = 0
        self.tokens: list[str] = []

    async def __call__(self) -> str:
        self.calls += 1
        wait = self.delay(self.calls)
        if wait:
            await asyncio.sleep(wait)  # a slow identity provider
        token = (
            self.first
            if self.calls == 1 and self.first is not None
            else mint(self.sub, ttl=self.ttl)
        )
        self.tokens.append(token)
        return token


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    async with serve(auth=True, auth_secret=SECRET, long_poll_timeout=0.5) as running:
        yield running


# --- the token source, alone ----------------------------------------------------------


def fake_jwt(payload: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256'})}.{part(payload)}.c2ln"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_claims_are_read_without_verification() -> None:
    claims = read_claims(fake_jwt({"exp": 1100, "iat": 1000, "sub": "ann", "kind": "agent"}))
    assert (claims.exp, claims.iat, claims.sub, claims.kind) == (1100.0, 1000.0, "ann", "agent")
    for junk in ("opaque", "a.b.c", "a.bm90IGpzb24.c", fake_jwt({"exp": "soon"})):
        assert read_claims(junk).exp is None


async def test_a_token_is_refreshed_at_80_percent_of_its_lifetime() -> None:
    clock = Clock()
    issued: list[str] = []

    async def provider() -> str:
        issued.append(fake_jwt({"iat": clock.now, "exp": clock.now + 100, "n": len(issued)}))
        return issued[-1]

    source = TokenSource(provider, clock=clock)
    first = await source.get()
    clock.now += 79
    assert await source.get() == first
    assert source.refresh_due() == 1080.0
    clock.now += 1
    second = await source.get()
    assert second != first
    assert len(issued) == 2


async def test_concurrent_callers_share_one_refresh() -> None:
    release = asyncio.Event()
    calls = 0

    async def provider() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return fake_jwt({"exp": time.time() + 100, "n": calls})

    source = TokenSource(provider)
    waiters = [asyncio.create_task(source.get()) for _ in range(20)]
    await asyncio.sleep(0)
    release.set()
    tokens = await asyncio.gather(*waiters)
    assert calls == 1
    assert len(set(tokens)) == 1
    source.invalidate(tokens[0])
    again = await asyncio.gather(*(source.get() for _ in range(5)))
    assert calls == 2
    assert len(set(again)) == 1
    assert again[0] != tokens[0]
    source.invalidate(tokens[0])  # an old token refused late: the current one stays
    assert await source.get() == again[0]
    assert calls == 2


async def test_a_failing_provider_keeps_a_valid_token_and_raises_once_it_expired() -> None:
    clock = Clock()
    fail = False

    async def provider() -> str:
        if fail:
            raise OSError("identity provider down: secret-ish detail")
        return fake_jwt({"iat": clock.now, "exp": clock.now + 10})

    source = TokenSource(provider, clock=clock)
    token = await source.get()
    fail = True
    clock.now += 9  # due, still valid: the old token is kept
    assert await source.get() == token
    clock.now += 2  # expired
    with pytest.raises(ConnectError) as caught:
        await source.get()
    assert "secret-ish" not in str(caught.value)
    assert caught.value.retryable


async def test_a_static_token_is_never_refreshed_and_never_shown() -> None:
    token = fake_jwt({"exp": time.time() - 10})
    source = TokenSource(token)
    source.invalidate()
    assert await source.get() == token
    assert not source.refreshes
    assert source.refresh_due() is None
    assert token not in repr(source)
    with pytest.raises(UsageError):
        TokenSource("")


# --- sessions against a server with --auth ------------------------------------------------


def author(sub: str) -> Author:
    return Author.user(sub, sub.title())


async def pump(
    session: Session, count: int, *, pace: float, history: HistoryRecorder, name: str = "reader"
) -> None:
    """Publish ``count`` numbered messages every ``pace`` seconds while a subscription of
    the same session reads them all; the subscription must never raise."""

    async def read() -> None:
        seen = 0
        async with session.subscribe(start="beginning") as events:
            async for event in events:
                assert event.event_id is not None
                history.seen(name, event.event_id)
                seen += 1
                if seen == count:
                    return

    reader = asyncio.create_task(read())
    for n in range(count):
        ack = await session.send_message(f"message {n}")
        assert ack.event_id is not None
        history.published(ack.event_id, offset=ack.offset)
        await asyncio.sleep(pace)
    async with asyncio.timeout(30):
        await reader


def recording_client(seen: list[str]) -> httpx.AsyncClient:
    async def record(request: httpx.Request) -> None:
        seen.append(request.headers.get("authorization", ""))

    return httpx.AsyncClient(event_hooks={"request": [record]}, timeout=30)


def tokens_of(headers: list[str]) -> list[str]:
    return [h.removeprefix("Bearer ") for h in headers]


async def test_http_every_request_carries_a_current_token(server: RunningServer) -> None:
    minter = Minter("ann", ttl=2)
    seen: list[str] = []
    async with recording_client(seen) as client:
        transport = HttpTransport(client=client)
        async with Session(
            server.url, "http-ttl", author=author("ann"), transport=transport, token=minter
        ) as session:
            await session.create()
            history = HistoryRecorder()
            await pump(session, 40, pace=0.1, history=history)
            history.assert_ok()
    assert minter.calls >= 2  # refreshed mid-stream
    sent = tokens_of(seen)
    assert sent
    assert all(token in minter.tokens for token in sent)
    # Each request carried the newest token minted before it.
    assert sent[-1] in minter.tokens[-2:]


async def test_a_401_is_retried_once_with_a_fresh_token(server: RunningServer) -> None:
    bad = mint("ann", secret=secrets.token_bytes(32))  # signed with another key
    minter = Minter("ann", first=bad)
    async with DurableStream(f"{server.url}/v1/stream/sessions/retry-401", token=minter) as stream:
        await stream.create(content_type="application/json")
        await stream.append_json({"n": 1})
        batch = await stream.read()
    assert batch.messages == ({"n": 1},)
    assert minter.calls == 2


async def test_without_a_token_the_refusal_is_unauthorized(server: RunningServer) -> None:
    async with DurableStream(f"{server.url}/v1/stream/sessions/no-token") as stream:
        with pytest.raises(Unauthorized) as caught:
            await stream.create(content_type="application/json")
    assert caught.value.status == 401


async def test_websocket_refreshes_in_band_on_the_same_socket(server: RunningServer) -> None:
    minter = Minter("bob", ttl=2)
    async with Session(
        server.url, "ws-ttl", author=author("bob"), transport="websocket", token=minter
    ) as session:
        await session.create()
        transport = session._transport
        assert isinstance(transport, WebSocketTransport)
        await transport.connect()
        socket = transport._socket
        assert socket is not None
        history = HistoryRecorder()
        await pump(session, 40, pace=0.1, history=history)
        history.assert_ok()
        assert transport._socket is socket  # never reconnected
        assert socket.token_refreshes >= 1
        assert session.status.state is ConnectionState.CONNECTED


async def test_websocket_token_lapsing_reconnects_and_resumes(server: RunningServer) -> None:
    # The second token takes longer to come than the first one lives: the server
    # closes the socket (4001); the session reconnects with it and resumes.
    minter = Minter("cy", ttl=2, delay=lambda call: 2.5 if call == 2 else 0.0)
    statuses: list[ConnectionStatus] = []
    async with Session(
        server.url, "ws-lapse", author=author("cy"), transport="websocket", token=minter
    ) as session:

        async def watch() -> None:
            async for status in session.status_changes():
                statuses.append(status)

        watcher = asyncio.create_task(watch())
        await session.create()
        history = HistoryRecorder()
        await pump(session, 50, pace=0.1, history=history)
        history.assert_ok()
        watcher.cancel()
    errors = [str(s.error) for s in statuses if s.error is not None]
    assert any("4001" in e and "access token expired" in e for e in errors), errors


async def test_refresh_under_load(server: RunningServer) -> None:
    """100 sessions (half WebSocket, half HTTP), tokens living 2 or 3 s, a writer
    and a reader each for about 10 s: nothing lost, duplicated or dropped."""
    count, pace = 25, 0.4
    histories = [HistoryRecorder() for _ in range(100)]
    minters = [Minter(f"user-{i}", ttl=2 + i % 2) for i in range(100)]

    async def one(i: int) -> None:
        transport: Transport = "websocket" if i % 2 == 0 else "http"
        async with Session(
            server.url,
            f"load-{i}",
            author=author(f"user-{i}"),
            transport=transport,
            token=minters[i],
        ) as session:
            await session.create()
            await pump(session, count, pace=pace, history=histories[i])

    started = time.monotonic()
    async with asyncio.timeout(40):
        await asyncio.gather(*(one(i) for i in range(100)))
    assert time.monotonic() - started < 40
    for history in histories:
        report = history.assert_ok()
        assert report.subscribers[0].unique == count
    assert sum(m.calls for m in minters) >= 300  # every session refreshed several times


async def test_the_token_never_shows(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bad = mint("dee", secret=secrets.token_bytes(32))
    minters: list[Minter] = []
    errors: list[BaseException] = []
    reprs: list[str] = []
    for transport in ("http", "websocket"):
        minter = Minter("dee", ttl=2, first=bad)  # starts with a token the server refuses
        minters.append(minter)
        async with Session(
            server.url,
            f"quiet-{transport}",
            author=author("dee"),
            transport=transport,
            token=minter,
        ) as session:
            reprs += [repr(session), repr(session._transport)]
            await session.create()
            history = HistoryRecorder()
            await pump(session, 25, pace=0.1, history=history)
            history.assert_ok()
    # A refusal's message, with a static token that cannot be refreshed.
    for transport in ("http", "websocket"):
        async with Session(
            server.url, "quiet-refused", author=author("dee"), transport=transport, token=bad
        ) as session:
            with contextlib.suppress(Exception):
                await session.create()
            try:
                await session.publish(UserMessage(author=author("dee"), text="x"))
            except Exception as exc:
                errors.append(exc)
    assert errors
    assert all(isinstance(e, Unauthorized) for e in errors), errors
    secrets_seen = [token for m in minters for token in m.tokens]
    assert all(m.calls >= 3 for m in minters)  # the 401, then refreshes
    texts = [caplog.text, *reprs, *(str(e) for e in errors), *(repr(e) for e in errors)]
    assert "DEBUG" in caplog.text  # the websockets protocol log was captured
    for text in texts:
        for token in secrets_seen:
            signature = token.rsplit(".", 1)[1]
            assert signature not in text


async def test_one_token_per_client() -> None:
    url = "http://127.0.0.1:9/v1/stream/sessions/x"
    with pytest.raises(UsageError, match="not both"):
        Session(
            "http://127.0.0.1:9",
            "x",
            author=author("a"),
            token="t",
            transport=HttpTransport(token="u"),
        )
    async with DurableStream(url) as stream:
        with pytest.raises(UsageError, match="carries its own token"):
            Session(
                "http://127.0.0.1:9",
                "x",
                author=author("a"),
                token="t",
                transport=HttpTransport(stream),
            )
    with pytest.raises(UsageError, match="not both"):
        DurableStream(url, token="t", headers={"Authorization": "Bearer u"})
