"""Offsets carry the stream's incarnation, and only offsets the stream issued are read from.

A saved offset of a stream that was deleted and re-created (or lost by a
memory server's restart) must be refused, never silently read into the new
stream; so must an offset inside a record. Every read path is checked.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from mock_server.testing import RunningServer, serve

from .sse import controls, datas, read_sse

S = "/v1/stream"
TEXT = {"Content-Type": "text/plain"}
MODES = ["catch-up", "long-poll", "sse", "websocket"]


async def read_from(
    server: RunningServer, http: httpx.AsyncClient, path: str, offset: str, mode: str
) -> tuple[int, str]:
    """One read of a text stream in ``mode``: (status, what it delivered or the refusal)."""
    if mode == "websocket":
        async with connect(server.url.replace("http", "ws") + "/v1/ws") as ws:
            await ws.send(
                json.dumps({"op": "subscribe", "sub": "s", "stream": path, "offset": offset})
            )
            while True:
                frame = json.loads(await ws.recv())
                if frame["type"] == "error":
                    # Nothing is delivered for a refused subscription; the socket stays up.
                    await ws.send(json.dumps({"op": "ping", "req": "after"}))
                    while (later := json.loads(await ws.recv()))["type"] != "pong":
                        assert later["type"] != "data", later
                    return frame["status"], frame["message"]
                if frame["type"] == "data":
                    return 200, frame["text"]
    if mode == "sse":
        response, events = await read_sse(
            http, f"{path}?offset={offset}&live=sse", lambda e: bool(controls(e))
        )
        if response.status_code != 200:
            return response.status_code, response.text
        return 200, "".join(datas(events))
    params = {"offset": offset}
    if mode == "long-poll":
        params["live"] = "long-poll"
    response = await http.get(path, params=params)
    return response.status_code, response.text


@asynccontextmanager
async def running(data_dir: Path | None) -> AsyncIterator[tuple[RunningServer, httpx.AsyncClient]]:
    async with (
        serve(data_dir=data_dir, long_poll_timeout=0.5) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as http,
    ):
        yield server, http


async def put_and_append(http: httpx.AsyncClient, path: str, *parts: bytes) -> list[str]:
    """Create a text stream with ``parts``; the offset after each part."""
    created = await http.put(path, headers=TEXT, content=parts[0])
    assert created.status_code == 201
    offsets = [created.headers["Stream-Next-Offset"]]
    for part in parts[1:]:
        offsets.append(
            (await http.post(path, headers=TEXT, content=part)).headers["Stream-Next-Offset"]
        )
    return offsets


# ---------------------------------------------------------------- the header


async def test_every_response_about_a_stream_carries_its_incarnation(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    p = f"{S}/inc"
    created = await http.put(p, headers=TEXT, content=b"ab")
    incarnation = created.headers["Stream-Incarnation"]
    assert len(incarnation) == 16
    assert incarnation.isdigit()
    assert created.headers["Stream-Next-Offset"].startswith(f"{incarnation}_")
    producer = {**TEXT, "Producer-Id": "w", "Producer-Epoch": "0", "Producer-Seq": "0"}
    responses = [
        created,
        await http.put(p, headers=TEXT),  # 200, same config
        await http.post(p, headers=TEXT, content=b"c"),
        await http.post(p, headers=producer, content=b"d"),
        await http.post(p, headers=producer, content=b"d"),  # 204 duplicate
        await http.head(p),
    ]
    catch_up = await http.get(p, params={"offset": "-1"})
    etag = {"If-None-Match": catch_up.headers["ETag"]}
    sse, _ = await read_sse(http, f"{p}?offset=-1&live=sse", lambda e: bool(controls(e)))
    responses += [
        catch_up,
        await http.get(p, params={"offset": "-1"}, headers=etag),  # 304
        await http.get(p, params={"offset": "now"}),
        await http.get(p, params={"offset": "-1", "live": "long-poll"}),
        await http.get(p, params={"offset": "now", "live": "long-poll"}),  # 204 timeout
        sse,
        # refusals about this stream say which one refused
        await http.get(p, params={"offset": "garbage"}),
        await http.put(p, headers={"Content-Type": "application/json"}),
        await http.post(p, headers={"Content-Type": "application/json"}, content=b"1"),
        await http.post(p, headers={**producer, "Producer-Seq": "9"}, content=b"x"),
    ]
    statuses = [r.status_code for r in responses]
    assert statuses == [
        201,
        200,
        204,
        200,
        204,
        200,
        200,
        304,
        200,
        200,
        204,
        200,
        400,
        409,
        409,
        409,
    ]
    assert [r.headers.get("Stream-Incarnation") for r in responses] == [incarnation] * len(
        responses
    )
    await http.post(p, headers={"Stream-Closed": "true"})
    long_poll_closed = await http.get(p, params={"offset": "now", "live": "long-poll"})
    assert (long_poll_closed.status_code, long_poll_closed.headers["Stream-Incarnation"]) == (
        204,
        incarnation,
    )
    exposed = created.headers["Access-Control-Expose-Headers"].lower()
    assert "stream-incarnation" in exposed
    # Nothing to say for a stream that does not exist.
    assert "Stream-Incarnation" not in (await http.get(f"{S}/none")).headers

    assert (await http.delete(p)).status_code == 204
    again = await http.put(p, headers=TEXT, content=b"ab")
    assert again.headers["Stream-Incarnation"] != incarnation
    assert again.headers["Stream-Next-Offset"] != created.headers["Stream-Next-Offset"]


async def test_a_soft_deleted_stream_still_names_its_incarnation(http: httpx.AsyncClient) -> None:
    source = await http.put(f"{S}/src", headers=TEXT, content=b"ab")
    await http.put(f"{S}/fork", headers={"Stream-Forked-From": f"{S}/src"})
    await http.delete(f"{S}/src")
    gone = await http.get(f"{S}/src")
    assert gone.status_code == 410
    assert gone.headers["Stream-Incarnation"] == source.headers["Stream-Incarnation"]


# ---------------------------------------------------------------- earlier streams


@pytest.mark.parametrize("mode", MODES)
async def test_an_offset_of_a_deleted_and_recreated_stream_is_400(
    server: RunningServer, http: httpx.AsyncClient, mode: str
) -> None:
    p = f"{S}/again"
    saved = (await put_and_append(http, p, b"ab", b"cd"))[0]  # after "ab"
    await http.delete(p)
    await put_and_append(http, p, b"new stream", b"!")  # longer: the old position exists
    status, message = await read_from(server, http, p, saved, mode)
    assert status == 400
    assert "issued by an earlier stream at this path" in message
    assert "read from -1" in message


@pytest.mark.parametrize("mode", MODES)
async def test_offsets_survive_an_sqlite_restart_but_not_a_memory_one(
    backend: str, tmp_path: Path, mode: str
) -> None:
    p = f"{S}/restart"
    data_dir = tmp_path / "data" if backend == "sqlite" else None
    async with running(data_dir) as (_, http):
        saved = (await put_and_append(http, p, b"ab", b"cd"))[0]
        incarnation = (await http.head(p)).headers["Stream-Incarnation"]
    async with running(data_dir) as (server, http):
        if backend == "memory":  # the stream is gone: a writer creates it afresh
            await put_and_append(http, p, b"abcd", b"ef")
        status, delivered = await read_from(server, http, p, saved, mode)
        if backend == "sqlite":
            assert (status, delivered) == (200, "cd")
            assert (await http.head(p)).headers["Stream-Incarnation"] == incarnation
        else:
            assert status == 400
            assert "earlier stream" in delivered


async def test_a_stream_from_before_incarnations_keeps_its_offsets(tmp_path: Path) -> None:
    """An SQLite row without an incarnation is incarnation 0: its saved offsets still work."""
    data_dir = tmp_path / "data"
    p = f"{S}/old"
    async with running(data_dir) as (_, http):
        await put_and_append(http, p, b"ab", b"cd")
    db = sqlite3.connect(data_dir / "streams.sqlite3")
    (meta_text,) = db.execute("SELECT meta FROM streams WHERE path = ?", (p,)).fetchone()
    meta = json.loads(meta_text)
    del meta["incarnation"], meta["idempotency_key"]
    db.execute("UPDATE streams SET meta = ? WHERE path = ?", (json.dumps(meta), p))
    db.commit()
    db.close()
    async with running(data_dir) as (_, http):
        head = await http.head(p)
        assert head.headers["Stream-Incarnation"] == "0000000000000000"
        assert head.headers["Stream-Next-Offset"] == "0000000000000000_0000000000000004"
        response = await http.get(p, params={"offset": "0000000000000000_0000000000000002"})
        assert (response.status_code, response.text) == (200, "cd")


# ---------------------------------------------------------------- offsets never issued


@pytest.mark.parametrize("mode", MODES)
async def test_an_offset_inside_a_record_is_400_and_delivers_nothing(
    server: RunningServer, http: httpx.AsyncClient, mode: str
) -> None:
    p = f"{S}/inside"
    offsets = await put_and_append(http, p, b"abc", b"def")
    inside = offsets[0][:-1] + "1"  # position 1, inside "abc"
    status, message = await read_from(server, http, p, inside, mode)
    assert status == 400
    assert "not a position this stream ever issued" in message
    status, delivered = await read_from(server, http, p, offsets[0], mode)  # a real boundary
    assert (status, delivered) == (200, "def")


@pytest.mark.parametrize("mode", MODES)
async def test_an_offset_past_the_tail_is_400(
    server: RunningServer, http: httpx.AsyncClient, mode: str
) -> None:
    p = f"{S}/past"
    offsets = await put_and_append(http, p, b"abc")
    status, message = await read_from(server, http, p, offsets[0][:-2] + "99", mode)
    assert status == 400
    assert "beyond the end" in message


async def test_the_zero_offset_is_the_start_of_every_stream(http: httpx.AsyncClient) -> None:
    await put_and_append(http, f"{S}/z", b"abc")
    response = await http.get(f"{S}/z", params={"offset": "0000000000000000_0000000000000000"})
    assert (response.status_code, response.text) == (200, "abc")
    # ...but no other position of incarnation 0 was issued by a new stream
    response = await http.get(f"{S}/z", params={"offset": "0000000000000000_0000000000000003"})
    assert response.status_code == 400


async def test_below_the_retention_floor_is_still_410(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    p = f"{S}/trimmed"
    offsets = await put_and_append(http, p, b"a", b"b", b"c")
    floor = server.store.trim(p, keep_last=1)
    response = await http.get(p, params={"offset": offsets[0]})
    assert response.status_code == 410
    assert response.headers["Stream-Next-Offset"] == offsets[1]
    assert floor == 2
    assert (await http.get(p, params={"offset": offsets[1]})).text == "c"


# ---------------------------------------------------------------- forks


async def test_a_fork_reads_with_its_sources_offsets_up_to_the_fork_point(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    src, fork = f"{S}/src", f"{S}/fork"
    source_offsets = await put_and_append(http, src, b"ab", b"cd")
    created = await http.put(fork, headers={"Stream-Forked-From": src})
    assert created.status_code == 201
    own = created.headers["Stream-Incarnation"]
    assert own != (await http.head(src)).headers["Stream-Incarnation"]
    assert created.headers["Stream-Next-Offset"] == f"{own}_0000000000000004"
    after_source = (await http.post(src, headers=TEXT, content=b"gh")).headers["Stream-Next-Offset"]
    await http.post(fork, headers=TEXT, content=b"ef")

    for offset, expected in [(source_offsets[0], "cdef"), (source_offsets[1], "ef")]:
        response = await http.get(fork, params={"offset": offset})
        assert (response.status_code, response.text) == (200, expected)
        assert response.headers["Stream-Next-Offset"] == f"{own}_0000000000000006"
    # A source offset past the fork point is not the fork's; nor is the fork's own on the source.
    assert (await http.get(fork, params={"offset": after_source})).status_code == 400
    assert (
        await http.get(src, params={"offset": created.headers["Stream-Next-Offset"]})
    ).status_code == 400

    # The fork's own offsets below its fork point (a chunked read of the inherited data).
    server.store.max_read_bytes = 1
    offset, seen = "-1", ""
    for _ in range(5):
        response = await http.get(fork, params={"offset": offset})
        assert response.status_code == 200
        seen += response.text
        offset = response.headers["Stream-Next-Offset"]
        assert offset.startswith(f"{own}_")
        if response.headers.get("Stream-Up-To-Date") == "true":
            break
    assert seen == "abcdef"


async def test_a_fork_of_a_fork_accepts_every_ancestors_offsets(http: httpx.AsyncClient) -> None:
    a, b, c = f"{S}/a", f"{S}/b", f"{S}/c"
    after_a = (await put_and_append(http, a, b"1", b"2"))[0]
    await http.put(b, headers={"Stream-Forked-From": a})
    after_b = (await http.post(b, headers=TEXT, content=b"3")).headers["Stream-Next-Offset"]
    await http.put(c, headers={"Stream-Forked-From": b})
    await http.post(c, headers=TEXT, content=b"4")
    assert (await http.get(c, params={"offset": after_a})).text == "234"
    assert (await http.get(c, params={"offset": after_b})).text == "4"


async def test_a_fork_offset_inside_a_record_or_of_another_stream_is_400(
    http: httpx.AsyncClient,
) -> None:
    src = f"{S}/src"
    offsets = await put_and_append(http, src, b"abc", b"def")
    other = (await put_and_append(http, f"{S}/other", b"abc"))[0]
    for fork_offset in (offsets[0][:-1] + "2", other):
        response = await http.put(
            f"{S}/fork", headers={"Stream-Forked-From": src, "Stream-Fork-Offset": fork_offset}
        )
        assert response.status_code == 400
        assert "Stream-Fork-Offset" in response.text
    fork = await http.put(
        f"{S}/fork", headers={"Stream-Forked-From": src, "Stream-Fork-Offset": offsets[0]}
    )
    assert fork.status_code == 201
    # The same PUT again is the same config.
    again = await http.put(
        f"{S}/fork", headers={"Stream-Forked-From": src, "Stream-Fork-Offset": offsets[0]}
    )
    assert again.status_code == 200
