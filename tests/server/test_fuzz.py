"""A seeded fuzz of the server's HTTP and WebSocket front ends.

Random (but reproducible: ``random.Random(seed)``, the seed is in every failure
message) paths, methods, query strings, headers and bodies over raw sockets,
and random frames over a WebSocket. Whatever arrives, the server must answer
below 500 (or close a WebSocket with a code that is not 1011), log no error or
traceback, and leave the victim streams (closed, so no valid request may change
them) exactly as they were. And no stream may end up holding data SSE cannot
deliver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from durable_client.wire import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOO_MANY_SUBSCRIPTIONS,
)
from mock_server.testing import RunningServer, serve
from tests.server.conftest import capture_server_log

S = "/v1/stream"
SEEDS = (1, 2, 3)
HTTP_CASES = 200  # per seed
WS_FRAMES = 150  # per seed
VICTIMS = {
    "victim": ("text/plain; charset=utf-8", "victim ✓ data\nline two".encode()),
    "victim-json": ("application/json", b'[{"a":1},"two"]'),
}
TARGETS = {
    "fz/text": "text/plain",
    "fz/json": "application/json",
    "fz/bin": "application/octet-stream",
}
WS_MAX_FRAME = 64 * 1024
# Clean closes: normal, going away, protocol error, bad UTF-8, policy, too big, and ours.
# Never 1011 (internal error) or 1006 (no close frame: the handler crashed).
ALLOWED_WS_CLOSE = {
    1000,
    1001,
    1002,
    1007,
    1008,
    1009,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOO_MANY_SUBSCRIPTIONS,
}


@pytest.fixture(params=["memory", "sqlite"])
async def fuzz_server(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[RunningServer]:
    data_dir = tmp_path / "data" if request.param == "sqlite" else None
    async with serve(
        data_dir=data_dir,
        long_poll_timeout=0.05,
        sse_max_duration=0.2,
        max_body_bytes=16 * 1024,
        ws_max_frame_bytes=WS_MAX_FRAME,
    ) as server:
        yield server


async def snapshot(http: httpx.AsyncClient, name: str) -> tuple[Any, ...]:
    read = await http.get(f"{S}/{name}", params={"offset": "-1"})
    head = await http.head(f"{S}/{name}")
    return (
        read.status_code,
        read.content,
        read.headers.get("stream-next-offset"),
        head.headers.get("stream-closed"),
        head.headers.get("content-type"),
        head.headers.get("stream-incarnation"),
    )


# ---------------------------------------------------------------- generators


def _junk_text(rng: random.Random, size: int) -> str:
    alphabet = "abc/._-~%?#&=+ 0123456789漢Łó😀\u00e9\ufffd\\\"'"
    return "".join(rng.choice(alphabet) for _ in range(size))


def _pct_bytes(rng: random.Random) -> str:
    return "".join(f"%{rng.randrange(256):02x}" for _ in range(rng.randint(1, 4)))


def gen_name(rng: random.Random, *, victims: bool) -> str:
    choices = [
        lambda: rng.choice(list(TARGETS)),
        lambda: f"fz/new{rng.randrange(20)}",
        lambda: quote(_junk_text(rng, rng.randint(1, 12)), safe="/"),
        lambda: _pct_bytes(rng),
        lambda: "a" + _pct_bytes(rng) + "b",
        lambda: rng.choice(["%00", "%0d%0a", "%7f", "%c2%85", "%ed%a0%80", "%E6%BC%A2", "..", "."]),
        lambda: rng.choice(["__ds", "__ds/x", "", "/", "//x", "x" * rng.choice([1, 300, 5000])]),
    ]
    if victims:
        choices += [
            lambda: rng.choice(list(VICTIMS)),
            lambda: rng.choice(["vict%69m", "victim/", "victim%2F", "./victim", "victim%00"]),
        ] * 2
    if not victims:  # a DELETE: never of a victim or a target, whatever its spelling
        return rng.choice([f"fz/new{rng.randrange(20)}", _pct_bytes(rng), "a%00b", "__ds"])
    if rng.random() < 0.5:  # half the time a stream that exists: deeper than a 404
        return rng.choice(list(TARGETS) + list(VICTIMS))
    return rng.choice(choices)()


def gen_offset(rng: random.Random, known: list[str]) -> str:
    if rng.random() < 0.4:
        return rng.choice(["-1", "now", *known])
    return rng.choice(
        [
            "-1",
            "now",
            "",
            "-2",
            rng.choice(known) if known else "-1",
            "0000000000000000_0000000000000000",
            f"{rng.randrange(10**16):016d}_{rng.randrange(10**16):016d}",
            "9" * rng.choice([20, 21, 40]) + "_1",
            _junk_text(rng, rng.randint(1, 20)),
            _pct_bytes(rng),
        ]
    )


def gen_header_value(rng: random.Random) -> bytes:
    return rng.choice(
        [
            lambda: b"",
            lambda: b"true",
            lambda: str(rng.choice([0, 1, 2**53, 2**53 - 1, -1, 10**30])).encode(),
            lambda: b"2030-01-01T00:00:00Z",
            lambda: b"not a date",
            lambda: _junk_text(rng, rng.randint(1, 30)).encode("utf-8"),
            lambda: bytes(rng.randrange(0x80, 0x100) for _ in range(rng.randint(1, 8))),
            lambda: f"{S}/{gen_name(rng, victims=True)}".encode("latin-1", "replace"),
            lambda: b"x" * rng.choice([10, 300, 3000]),
            lambda: bytes([rng.choice([0, 1, 0x0B, 0x1B, 0x7F])]),  # the parser refuses these
        ]
    )()


HEADER_NAMES = [
    "Content-Type",
    "Stream-TTL",
    "Stream-Expires-At",
    "Stream-Closed",
    "Stream-Seq",
    "Stream-Forked-From",
    "Stream-Fork-Offset",
    "Stream-Fork-Sub-Offset",
    "Producer-Id",
    "Producer-Epoch",
    "Producer-Seq",
    "Idempotency-Key",
    "If-None-Match",
    "Last-Event-ID",
    "Origin",
    "X-Junk",
]
CONTENT_TYPES = [
    b"text/plain",
    b"application/json",
    b"application/octet-stream",
    b"text/markdown; charset=utf-8",
    b"TEXT/PLAIN",
    b"bogus",
    b"text/plain; charset=\xe9",
    b"",
]


def gen_body(rng: random.Random) -> bytes:
    return rng.choice(
        [
            lambda: b"",
            lambda: _junk_text(rng, rng.randint(1, 40)).encode(),
            lambda: bytes(rng.randrange(256) for _ in range(rng.randint(1, 40))),
            lambda: rng.choice([b"\xff\xfe", b"ok\xe2\x9c", b"\xed\xa0\x80", b"\xc0\xaf"]),
            lambda: json.dumps(rng.choice([[], [1, "a"], {"k": [None, True]}, "s", 1.5])).encode(),
            lambda: rng.choice([b'"\\ud800"', b'["\\udfff"]', b"NaN", b"1e999", b"[1,", b"{"]),
            lambda: b"[" * rng.choice([50, 5000]),
            lambda: b"x" * rng.choice([16 * 1024, 16 * 1024 + 1]),
        ]
    )()


def gen_request(rng: random.Random, known: list[str]) -> bytes:
    method = rng.choice(["GET"] * 4 + ["PUT"] * 3 + ["POST"] * 4 + ["HEAD", "DELETE", "OPTIONS"])
    method = rng.choice([method] * 20 + ["PATCH", "get", "G\x01T"])
    prefix = rng.choice([f"{S}/"] * 12 + [S, "/", "/v1/", "/health", "/v1/ws", "//v1/stream/"])
    path = prefix + gen_name(rng, victims=method != "DELETE")
    params: list[tuple[str, str]] = []
    if method == "GET" and rng.random() < 0.8:
        params.append(("offset", gen_offset(rng, known)))
    if method == "GET" and rng.random() < 0.15:
        params.append(("live", rng.choice(["sse", "long-poll", "sse", "nope", ""])))
    if rng.random() < 0.1:
        params.append((rng.choice(["offset", "live", "cursor", "x"]), _junk_text(rng, 5)))
    query = "&".join(f"{k}={quote(v, safe='%')}" for k, v in params)
    target = path + (f"?{query}" if query else "")
    headers = [b"Host: 127.0.0.1", b"Connection: close"]
    if method in ("PUT", "POST") or rng.random() < 0.2:
        headers.append(b"Content-Type: " + rng.choice(CONTENT_TYPES))
    for _ in range(rng.choice([0, 1, 2, 3, 5])):
        headers.append(rng.choice(HEADER_NAMES).encode() + b": " + gen_header_value(rng))
    if rng.random() < 0.05:
        headers.append(b"X-Many: " + b"y" * rng.choice([8000, 40000]))
    body = gen_body(rng) if method in ("PUT", "POST") or rng.random() < 0.05 else b""
    if body and rng.random() < 0.2:
        headers.append(b"Transfer-Encoding: chunked")
        cut = rng.randint(0, len(body))
        parts = [p for p in (body[:cut], body[cut:]) if p]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    else:
        headers.append(b"Content-Length: %d" % len(body))
    head = method.encode() + b" " + target.encode("utf-8") + b" HTTP/1.1\r\n"
    return head + b"\r\n".join(headers) + b"\r\n\r\n" + body


def exchange(port: int, request: bytes) -> bytes:
    """Send ``request``; the answer until the server closes (or an SSE's first control)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with contextlib.suppress(OSError):  # answered (and closed) before it was all read
            sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if b"text/event-stream" in answer and b"event: control" in answer:
                    break
        except ConnectionResetError:
            pass
        return answer


# ---------------------------------------------------------------- the fuzz


async def _setup(http: httpx.AsyncClient) -> None:
    for name, (content_type, body) in VICTIMS.items():
        created = await http.put(
            f"{S}/{name}",
            headers={"Content-Type": content_type, "Stream-Closed": "true"},
            content=body,
        )
        assert created.status_code == 201, created.text
    for name, content_type in TARGETS.items():
        assert (
            await http.put(f"{S}/{name}", headers={"Content-Type": content_type})
        ).status_code == 201


async def _check_sse_everywhere(server: RunningServer, seed: int) -> None:
    """No stream holds data SSE cannot deliver: every text and JSON stream reads from -1."""
    port = int(server.url.rsplit(":", 1)[1])
    for path in server.store.paths():
        state = server.store.peek(path)
        if (
            state is None
            or state.soft_deleted
            or not state.content_type.lower().startswith(("text/", "application/json"))
        ):
            continue
        request = (
            f"GET {quote(path)}?offset=-1&live=sse HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        ).encode()
        answer = await asyncio.to_thread(exchange, port, request)
        assert answer.startswith(b"HTTP/1.1 200 "), (
            f"seed {seed}: SSE of {path!r} ({state.content_type}) -> {answer[:300]!r}"
        )


@pytest.mark.parametrize("seed", SEEDS)
async def test_http_fuzz_never_5xx_never_a_traceback_victims_unchanged(
    fuzz_server: RunningServer, seed: int
) -> None:
    server = fuzz_server
    port = int(server.url.rsplit(":", 1)[1])
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        await _setup(http)
        before = {name: await snapshot(http, name) for name in VICTIMS}
        known = [str(snap[2]) for snap in before.values()]
        rng = random.Random(seed)
        for log in capture_server_log():
            for case in range(HTTP_CASES):
                request = gen_request(rng, known)
                answer = await asyncio.to_thread(exchange, port, request)
                where = f"seed {seed} case {case}: {request[:400]!r}"
                assert answer.startswith(b"HTTP/1.1 "), f"{where}\n-> {answer[:300]!r}"
                status = int(answer[9:12])
                assert status < 500, f"{where}\n-> {answer[:500]!r}"
                assert log.problems() == [], where
            await _check_sse_everywhere(server, seed)
            assert log.problems() == [], f"seed {seed}"
        after = {name: await snapshot(http, name) for name in VICTIMS}
        assert after == before, f"seed {seed}: a victim stream changed"


def gen_frame(rng: random.Random, known: list[str]) -> str | bytes:
    def stream() -> Any:
        return rng.choice(
            [
                rng.choice(list(VICTIMS) + list(TARGETS)),
                f"{S}/victim",
                gen_name(rng, victims=True),
                "a\x00b",
                "\ud800x",
                "",
                "/abs",
                1,
                None,
                "x" * 2000,
            ]
        )

    def text() -> Any:
        return rng.choice(
            ["hi", "\ud800", "漢😀", "", 1, None, [1, {"a": "\udfff"}], {"k": "v"}, "x" * 70000]
        )

    ops = [
        lambda: {
            "op": "subscribe",
            "sub": rng.choice(["s1", "s2", "", "x" * 200]),
            "stream": stream(),
            "offset": gen_offset(rng, known),
        },
        lambda: {"op": "unsubscribe", "sub": rng.choice(["s1", "s2", "nope", 5])},
        lambda: {
            "op": "append",
            "req": rng.choice(["r", "\ud800", "", "r" * 200]),
            "stream": stream(),
            rng.choice(["data", "data_base64"]): rng.choice([text(), "//79", "@@", "IlxkODAwIg=="]),
            "close": rng.choice([False, False, True, "yes"]),
            "producer": rng.choice(
                [
                    None,
                    {"id": "p", "epoch": 0, "seq": rng.randrange(3)},
                    {"id": "", "epoch": -1, "seq": 2**60},
                ]
            ),
        },
        lambda: {
            "op": "presence",
            "stream": stream(),
            "client_id": rng.choice(["c", "\ud800", ""]),
            "kind": rng.choice(["user", "agent", "robot"]),
            "label": text(),
        },
        lambda: {"op": "presence.leave", "stream": stream(), "client_id": "c"},
        lambda: {"op": "ping", "req": rng.choice(["p", None, 7])},
        lambda: {"op": rng.choice(["nope", "", None, 3]), "req": "\ud800"},
        lambda: rng.choice([[], "op", 1, None, {"op": "ping", "op2": {"deep": [[[[]]]]}}]),
    ]
    choice = rng.random()
    if choice < 0.08:
        return rng.choice(["{", "not json", '{"op": "ping"', "\u0000", "[" * 3000])
    if choice < 0.12:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 20)))  # a binary frame
    encoded = json.dumps(rng.choice(ops)(), ensure_ascii=rng.random() < 0.8)
    try:
        encoded.encode()
    except UnicodeEncodeError:  # a raw lone surrogate: no text frame can carry it
        encoded = encoded.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return encoded


@pytest.mark.parametrize("seed", SEEDS)
async def test_websocket_fuzz_never_an_internal_error_victims_unchanged(
    fuzz_server: RunningServer, seed: int
) -> None:
    server = fuzz_server
    ws_url = server.url.replace("http://", "ws://") + "/v1/ws"
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        await _setup(http)
        before = {name: await snapshot(http, name) for name in VICTIMS}
        known = [str(snap[2]) for snap in before.values()]
        rng = random.Random(seed)
        for log in capture_server_log():
            sent = 0
            recent: deque[str] = deque(maxlen=10)
            while sent < WS_FRAMES:
                try:
                    async with connect(ws_url, max_size=None, max_queue=None) as ws:
                        while sent < WS_FRAMES:
                            frame = gen_frame(rng, known)
                            sent += 1
                            recent.append(f"{sent}: {frame[:200]!r}")
                            where = f"seed {seed}, frames up to {sent}:\n" + "\n".join(recent)
                            try:
                                await ws.send(frame)
                                if len(frame) > WS_MAX_FRAME:  # closed with 1009: hear it
                                    async with asyncio.timeout(5):
                                        while True:
                                            await ws.recv()
                                if sent % 10 == 0:  # the server is still answering
                                    await ws.send(json.dumps({"op": "ping", "req": f"p{sent}"}))
                                    async with asyncio.timeout(5):
                                        while True:
                                            reply = json.loads(await ws.recv())
                                            assert reply.get("status", 0) < 500, (where, reply)
                                            if reply == {"type": "pong", "req": f"p{sent}"}:
                                                break
                            except ConnectionClosed as closed:
                                await ws.wait_closed()
                                code = closed.rcvd.code if closed.rcvd else ws.close_code
                                assert code in ALLOWED_WS_CLOSE, f"{where}: closed with {code}"
                                break
                            assert log.problems() == [], where
                except InvalidStatus as refused:  # pragma: no cover - the handshake must work
                    raise AssertionError(f"seed {seed}: handshake refused {refused}") from None
            await _check_sse_everywhere(server, seed)
            assert log.problems() == [], f"seed {seed}"
        after = {name: await snapshot(http, name) for name in VICTIMS}
        assert after == before, f"seed {seed}: a victim stream changed"
