"""Hostile input: a clear 4xx (or error frame) that changes nothing; never a 5xx or a traceback.

Each test sends what an attacker (or a careless client) would, over a real
socket, and checks the answer, the stream and the server's log.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import sqlite3
import threading
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from websockets.asyncio.client import connect

from mock_server._http_protocol import MAX_HEAD_BYTES, MAX_HEADERS
from mock_server.testing import RunningServer, serve
from tests._await import until
from tests.server.conftest import ServerLog, capture_server_log
from tests.server.sse import controls, datas, read_sse

S = "/v1/stream"
TEXT = {"Content-Type": "text/plain"}
JSON = {"Content-Type": "application/json"}

UNICODE_NAMES = ["漢", "😀", "Łódź", "sessions/Łódź/a b?#"]


def port_of(server: RunningServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 5.0) -> bytes:
    """Send bytes as they are (no client library cleans them up); the whole answer.

    The request is sent from a thread while the answer is read, so a server that
    answers before reading everything (a 431) is heard, not reset.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:

        def send() -> None:
            with contextlib.suppress(OSError):  # the server answered and closed first
                sock.sendall(head + body)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        sender.join(timeout)
        return answer


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer[9:12])


def body_of(answer: bytes) -> bytes:
    return answer.partition(b"\r\n\r\n")[2]


async def raw(server: RunningServer, method: str, target: str, *headers: str, body: bytes = b""):
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
    lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return await asyncio.to_thread(raw_request, port_of(server), head, body)


# ---------------------------------------------------------------- item 1: stream names


@pytest.mark.parametrize("name", UNICODE_NAMES)
async def test_a_unicode_stream_name_works_on_every_transport(
    server: RunningServer, http: httpx.AsyncClient, server_log: ServerLog, name: str
) -> None:
    path = f"{S}/{quote(name, safe='/')}"
    created = await http.put(path, headers=TEXT)
    assert created.status_code == 201, created.text
    assert created.headers["location"] == server.url + path  # ASCII, percent-encoded
    assert server.store.paths() == [f"{S}/{name}"]
    appended = await http.post(path, content="héllo ✓".encode(), headers=TEXT)
    assert appended.status_code == 204, appended.text
    read = await http.get(path, params={"offset": "-1"})
    assert (read.status_code, read.text) == (200, "héllo ✓")
    assert read.headers["stream-next-offset"] == appended.headers["stream-next-offset"]
    assert (await http.head(path)).status_code == 200

    _, events = await read_sse(
        http, f"{path}?offset=-1&live=sse", until=lambda ev: any(k == "control" for k, _ in ev)
    )
    assert datas(events) == ["héllo ✓"]

    ws_url = server.url.replace("http://", "ws://") + "/v1/ws"
    async with connect(ws_url) as ws:
        await ws.send(json.dumps({"op": "subscribe", "sub": "s", "stream": name, "offset": "-1"}))
        await ws.send(json.dumps({"op": "append", "req": "r", "stream": name, "data": "!"}))
        frames = []
        while not any(f["type"] == "ack" for f in frames) or not any(
            f["type"] == "data" and "!" in f["text"] for f in frames
        ):
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
    subscribed = next(f for f in frames if f["type"] == "subscribed")
    assert subscribed["stream"] == f"{S}/{name}"
    assert "".join(f["text"] for f in frames if f["type"] == "data") == "héllo ✓!"

    fork = await http.put(f"{path}-fork", headers={**TEXT, "Stream-Forked-From": path})
    assert fork.status_code == 201, fork.text
    assert (await http.get(f"{path}-fork", params={"offset": "-1"})).text == "héllo ✓!"
    assert server_log.problems() == []


async def test_a_unicode_stream_name_survives_a_restart(tmp_path: Path) -> None:
    async with serve(data_dir=tmp_path) as server, httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.put(f"{S}/Łódź", headers=TEXT, content=b"a")).status_code == 201
    async with serve(data_dir=tmp_path) as server, httpx.AsyncClient(base_url=server.url) as http:
        read = await http.get(f"{S}/Łódź", params={"offset": "-1"})
        assert (read.status_code, read.text) == (200, "a")


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (f"{S}/%ff%fe", b"not UTF-8"),
        (f"{S}/ok%C5", b"not UTF-8"),  # a character cut short
        (f"{S}/a%00b", b"control character"),
        (f"{S}/a%0d%0aSet-Cookie:%20x", b"control character"),
        (f"{S}/a%7f", b"control character"),
    ],
)
@pytest.mark.parametrize("method", ["PUT", "POST", "GET", "HEAD", "DELETE"])
async def test_a_name_that_is_not_text_is_a_400_and_creates_nothing(
    server: RunningServer, server_log: ServerLog, target: str, reason: bytes, method: str
) -> None:
    answer = await raw(server, method, target, "Content-Type: text/plain", body=b"x")
    assert status_of(answer) == 400, answer
    if method != "HEAD":
        assert reason in body_of(answer), answer
    assert server.store.paths() == []
    assert server_log.problems() == []


async def test_two_invalid_names_do_not_alias_one_stream(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    # ASGI servers decode %ff as U+FFFD: %ff and %fe would both have named "\ufffd".
    assert status_of(await raw(server, "PUT", f"{S}/%ff")) == 400
    assert (await http.put(f"{S}/%EF%BF%BD")).status_code == 201  # U+FFFD itself is fine
    answer = await raw(
        server, "POST", f"{S}/%fe", "Content-Type: application/octet-stream", body=b"x"
    )
    assert status_of(answer) == 400
    assert (await http.get(f"{S}/%EF%BF%BD", params={"offset": "-1"})).content == b""


async def test_a_fork_source_that_is_not_utf8_is_a_400(
    server: RunningServer, server_log: ServerLog
) -> None:
    answer = await raw(server, "PUT", f"{S}/fork", f"Stream-Forked-From: {S}/%ff")
    assert status_of(answer) == 400, answer
    assert server.store.paths() == []
    assert server_log.problems() == []


async def test_a_host_header_the_server_cannot_echo_still_creates_with_a_location(
    server: RunningServer, server_log: ServerLog
) -> None:
    answer = await raw(server, "PUT", f"{S}/h", "Host: exa\xe9mple")
    assert status_of(answer) == 201, answer
    assert f"location: {S}/h\r\n".encode() in answer.lower()  # relative: the host is no host
    assert server_log.problems() == []


# ---------------------------------------------------------------- item 2: bodies and headers


@pytest.mark.parametrize(
    "body",
    [b'"\\ud800"', b'["ok", "\\udfff"]', b'{"k\\ud83d": 1}', b'[{"a": ["\\ud800x"]}]'],
)
async def test_a_json_lone_surrogate_is_a_400_and_writes_nothing(
    server: RunningServer, http: httpx.AsyncClient, server_log: ServerLog, body: bytes
) -> None:
    assert (await http.put(f"{S}/j", headers=JSON, content=b'["first"]')).status_code == 201
    tail = server.store.require(f"{S}/j").tail_offset
    answer = await http.post(f"{S}/j", headers=JSON, content=body)
    assert answer.status_code == 400, answer.text
    assert "lone surrogate" in answer.text
    created = await http.put(f"{S}/j2", headers=JSON, content=body)
    assert created.status_code == 400
    assert f"{S}/j2" not in server.store.paths()
    assert server.store.require(f"{S}/j").tail_offset == tail
    assert (await http.get(f"{S}/j", params={"offset": "-1"})).json() == ["first"]
    # A surrogate pair is one character, and fine.
    assert (await http.post(f"{S}/j", headers=JSON, content=b'"\\ud83d\\ude00"')).status_code == 204
    assert server_log.problems() == []


@pytest.mark.parametrize(
    "content_type", ["text/plain; charset=\x01", "text/plain;\x7f", "text/plain; a=b\x1bc"]
)
async def test_a_content_type_with_a_control_character_is_a_400(
    server: RunningServer, server_log: ServerLog, content_type: str
) -> None:
    answer = await raw(server, "PUT", f"{S}/c", f"Content-Type: {content_type}")
    # The parser may refuse it itself (400); the app must never echo it (500).
    assert status_of(answer) == 400, answer
    assert server.store.paths() == []
    assert server_log.problems() == []


async def test_websocket_refusals_of_text_that_is_no_unicode_are_frames(
    server: RunningServer, http: httpx.AsyncClient, server_log: ServerLog
) -> None:
    assert (await http.put(f"{S}/j", headers=JSON, content=b"[1]")).status_code == 201
    assert (await http.put(f"{S}/t", headers=TEXT, content=b"a")).status_code == 201
    ws_url = server.url.replace("http://", "ws://") + "/v1/ws"
    bad_json = base64.b64encode(b'"\\ud800"').decode()
    bad_text = base64.b64encode(b"\xff").decode()
    async with connect(ws_url) as ws:
        # json.loads takes a lone surrogate as a req id; no frame can carry it back.
        await ws.send('{"op": "nonsense", "req": "\\ud800"}')
        bad = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert (bad["type"], bad.get("req")) == ("error", None)
        for req, stream, data in (("1", "j", bad_json), ("2", "t", bad_text)):
            await ws.send(
                json.dumps({"op": "append", "req": req, "stream": stream, "data_base64": data})
            )
            frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert (frame["type"], frame["req"], frame["status"]) == ("error", req, 400), frame
        await ws.send(json.dumps({"op": "subscribe", "sub": "x", "stream": "a\x00b"}))
        frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert (frame["type"], frame["status"]) == ("error", 400), frame
        assert "control character" in frame["message"]
    assert (await http.get(f"{S}/j", params={"offset": "-1"})).json() == [1]
    assert (await http.get(f"{S}/t", params={"offset": "-1"})).content == b"a"
    assert sorted(server.store.paths()) == [f"{S}/j", f"{S}/t"]
    assert server_log.problems() == []


# ---------------------------------------------------------------- item 3: poisoned streams


@pytest.mark.parametrize("content_type", ["text/plain", "text/markdown; charset=utf-8"])
async def test_invalid_utf8_on_a_text_stream_is_a_400_and_writes_nothing(
    server: RunningServer, http: httpx.AsyncClient, server_log: ServerLog, content_type: str
) -> None:
    headers = {"Content-Type": content_type}
    assert (await http.put(f"{S}/t", headers=headers, content="ok ✓".encode())).status_code == 201
    tail = server.store.require(f"{S}/t").tail_offset
    for body in (
        b"\xff\xfe",
        b"ok \xe2\x9c",
        b"\xed\xa0\x80",
        b"\xc0\xaf",
    ):  # cut, surrogate, overlong
        answer = await http.post(f"{S}/t", headers=headers, content=body)
        assert answer.status_code == 400, (body, answer.text)
        assert "not valid UTF-8" in answer.text
    assert (await http.put(f"{S}/t2", headers=headers, content=b"\xff")).status_code == 400
    assert f"{S}/t2" not in server.store.paths()
    assert server.store.require(f"{S}/t").tail_offset == tail
    # Bytes belong in a binary stream, where they are fine.
    assert (await http.put(f"{S}/b", content=b"\xff\xfe")).status_code == 201

    response, events = await read_sse(
        http, f"{S}/t?offset=-1&live=sse", until=lambda ev: any(k == "control" for k, _ in ev)
    )
    assert response.status_code == 200
    assert datas(events) == ["ok ✓"]
    assert server_log.problems() == []


async def test_a_fork_cannot_cut_a_text_stream_inside_a_character(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    assert (await http.put(f"{S}/t", headers=TEXT, content="ł".encode())).status_code == 201
    fork = await http.put(
        f"{S}/f",
        headers={
            **TEXT,
            "Stream-Forked-From": f"{S}/t",
            "Stream-Fork-Offset": "0000000000000000_0000000000000000",
            "Stream-Fork-Sub-Offset": "1",
        },
    )
    assert fork.status_code == 400, fork.text
    assert "inside a UTF-8 character" in fork.text
    assert f"{S}/f" not in server.store.paths()


async def test_stored_text_sse_cannot_carry_is_a_clear_409_not_a_traceback_per_reader(
    tmp_path: Path,
) -> None:
    """Data an older server let in (no check on append) is refused once per reader."""
    async with serve(data_dir=tmp_path) as server, httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.put(f"{S}/t", headers=TEXT, content=b"good")).status_code == 201
        good = server.store.require(f"{S}/t").tail_offset
    # Append bytes behind the server's back, as an older server that did not check did.
    database = tmp_path / "streams.sqlite3"
    assert database.is_file()
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.execute(
            "INSERT INTO records (path, end_pos, data, count) VALUES (?, ?, ?, 1)",
            (f"{S}/t", 6, b"\xff\xfe"),
        )
        db.commit()
    async with serve(data_dir=tmp_path) as server, httpx.AsyncClient(base_url=server.url) as http:
        for log in capture_server_log():
            for _ in range(3):
                response, events = await read_sse(
                    http, f"{S}/t?offset=-1&live=sse", until=lambda e: True
                )
                assert response.status_code == 409, (response.status_code, events)
                assert "not valid UTF-8" in response.text
                assert "catch-up GET" in response.text
            # From the last good offset, or from one past the bad data, SSE works.
            response, events = await read_sse(
                http, f"{S}/t?offset={good}&live=sse", until=lambda e: True
            )
            assert response.status_code == 409
            ws_url = server.url.replace("http://", "ws://") + "/v1/ws"
            async with connect(ws_url) as ws:  # the WebSocket refuses it too, as a frame
                await ws.send(json.dumps({"op": "subscribe", "sub": "s", "stream": "t"}))
                frames = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(3)]
            error = next(f for f in frames if f["type"] == "error")
            assert (error["sub"], error["status"]) == ("s", 409), frames
            assert "not valid UTF-8" in error["message"]
            assert not any(f["type"] == "data" and "\ufffd" in f.get("text", "") for f in frames)
            catch_up = await http.get(f"{S}/t", params={"offset": "-1"})
            assert (catch_up.status_code, catch_up.content) == (200, b"good\xff\xfe")
            assert log.problems() == []


async def test_a_live_sse_reader_meeting_undeliverable_data_ends_then_gets_a_409(
    server: RunningServer, http: httpx.AsyncClient, server_log: ServerLog
) -> None:
    assert (await http.put(f"{S}/t", headers=TEXT, content=b"a")).status_code == 201
    state = server.store.require(f"{S}/t")
    url = f"{S}/t?offset=-1&live=sse"

    async def inject_once_reading() -> None:
        await until(lambda: server.store.waiting(f"{S}/t") > 0)
        # What an older server stored without checking (the store's own commit path).
        server.store._commit(state, [state.next_record(b"\xff")])
        server.store._notify(f"{S}/t")

    injector = asyncio.create_task(inject_once_reading())
    response, events = await read_sse(http, url, until=lambda e: False)  # until the server ends it
    await injector
    assert response.status_code == 200
    assert datas(events) == ["a"]
    assert controls(events)[-1]["streamNextOffset"] == state.offset(1)  # after "a", not past
    again = await http.get(url)
    assert again.status_code == 409, again.text
    assert server_log.problems() == []


# ---------------------------------------------------------------- item 4: request heads


async def test_8_mib_of_headers_is_a_431_before_the_head_ends(
    server: RunningServer, http: httpx.AsyncClient, server_log: ServerLog
) -> None:
    port = port_of(server)
    # A head that never ends: a server that reads it all before deciding never answers.
    endless = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (8 << 20)
    answer = await asyncio.to_thread(raw_request, port, endless)
    assert status_of(answer) == 431, answer[:300]
    assert f"larger than {MAX_HEAD_BYTES} bytes".encode() in body_of(answer)
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADERS + 1))
    answer = await asyncio.to_thread(
        raw_request, port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n"
    )
    assert status_of(answer) == 431, answer[:300]
    assert f"more than {MAX_HEADERS} request headers".encode() in body_of(answer)
    # Many small headers in one head, over the size: also refused.
    wide = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 600) for i in range(60))
    answer = await asyncio.to_thread(
        raw_request, port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + wide + b"\r\n"
    )
    assert status_of(answer) == 431, answer[:300]
    # A WebSocket handshake is a request head too.
    upgrade = (
        b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        + wide
        + b"\r\n"
    )
    assert status_of(await asyncio.to_thread(raw_request, port, upgrade)) == 431
    # Under the bound everything works, and the server is none the worse.
    fine = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 200) for i in range(MAX_HEADERS - 10))
    answer = await asyncio.to_thread(
        raw_request,
        port,
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + fine + b"\r\n",
    )
    assert status_of(answer) == 200, answer[:300]
    assert (await http.get("/health")).status_code == 200
    assert server_log.problems() == []


async def test_a_huge_head_after_a_good_request_on_one_connection_is_refused(
    server: RunningServer, server_log: ServerLog
) -> None:
    good = b"PUT /v1/stream/k HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    huge = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 1) + b"\r\n\r\n"
    answer = await asyncio.to_thread(raw_request, port_of(server), good + huge)
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:300]
    assert b"HTTP/1.1 431 " in answer, answer[:600]
    assert server.store.paths() == [f"{S}/k"]
    assert server_log.problems() == []
