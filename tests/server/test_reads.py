"""GET in every mode: catch-up, long-poll, SSE; HEAD; caching; offsets."""

from __future__ import annotations

import asyncio
import base64
import time

import httpx
import pytest

from mock_server.testing import RunningServer
from tests._await import until

from .sse import controls, datas, read_sse

S = "/v1/stream"
TEXT = {"Content-Type": "text/plain"}
JSON = {"Content-Type": "application/json"}


async def make(
    http: httpx.AsyncClient, path: str, *parts: bytes, ctype: str = "text/plain"
) -> list[str]:
    """Create ``path`` and append ``parts``; returns the offset after each append."""
    await http.put(path, headers={"Content-Type": ctype})
    offsets = []
    for part in parts:
        response = await http.post(path, headers={"Content-Type": ctype}, content=part)
        assert response.status_code == 204
        offsets.append(response.headers["Stream-Next-Offset"])
    return offsets


# ---------------------------------------------------------------- catch-up


async def test_catch_up_from_start_and_from_an_offset(http: httpx.AsyncClient) -> None:
    offsets = await make(http, f"{S}/t", b"one", b"two", b"three")
    whole = await http.get(f"{S}/t", params={"offset": "-1"})
    assert whole.content == b"onetwothree"
    assert whole.headers["Stream-Up-To-Date"] == "true"
    assert whole.headers["Stream-Next-Offset"] == offsets[-1]
    rest = await http.get(f"{S}/t", params={"offset": offsets[0]})
    assert rest.content == b"twothree"
    at_tail = await http.get(f"{S}/t", params={"offset": offsets[-1]})
    assert at_tail.content == b""
    assert at_tail.headers["Stream-Up-To-Date"] == "true"


async def test_catch_up_is_chunked_and_only_the_last_chunk_is_up_to_date(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    server.store.max_read_bytes = 8
    await make(http, f"{S}/t", *(b"abcde" for _ in range(5)))
    offset, seen, flags = "-1", b"", []
    for _ in range(10):
        response = await http.get(f"{S}/t", params={"offset": offset})
        seen += response.content
        flags.append(response.headers.get("Stream-Up-To-Date"))
        offset = response.headers["Stream-Next-Offset"]
        if flags[-1] == "true":
            break
    assert seen == b"abcde" * 5
    assert flags == [None, None, "true"]


async def test_offset_now_returns_the_tail_without_data(http: httpx.AsyncClient) -> None:
    offsets = await make(http, f"{S}/j", b"[1,2]", ctype="application/json")
    response = await http.get(f"{S}/j", params={"offset": "now"})
    assert response.status_code == 200
    assert response.json() == []
    assert response.headers["Stream-Next-Offset"] == offsets[-1]
    assert response.headers["Cache-Control"] == "no-store"
    assert "ETag" not in response.headers


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"offset": "abc"}, "invalid offset"),
        ({"offset": "0,1"}, "invalid offset"),
        ({"offset": ""}, "empty offset"),
        ({"offset": "INCARNATION_0000000000099999"}, "beyond the end"),
        ({"live": "long-poll"}, "needs an offset"),
        ({"live": "sse"}, "needs an offset"),
        ({"offset": "-1", "live": "websocket"}, "live must be"),
    ],
)
async def test_bad_read_parameters_are_400(
    http: httpx.AsyncClient, params: dict[str, str], message: str
) -> None:
    await make(http, f"{S}/t", b"x")
    incarnation = (await http.head(f"{S}/t")).headers["Stream-Incarnation"]
    params = {k: v.replace("INCARNATION", incarnation) for k, v in params.items()}
    response = await http.get(f"{S}/t", params=params)
    assert response.status_code == 400
    assert message in response.text


async def test_repeated_offset_parameter_is_400(http: httpx.AsyncClient) -> None:
    await make(http, f"{S}/t", b"x")
    response = await http.get(f"{S}/t?offset=-1&offset=-1")
    assert response.status_code == 400


async def test_reading_a_missing_stream_is_404(http: httpx.AsyncClient) -> None:
    assert (await http.get(f"{S}/none")).status_code == 404
    assert (await http.get(f"{S}/none", params={"offset": "now", "live": "sse"})).status_code == 404


async def test_etag_and_if_none_match(http: httpx.AsyncClient) -> None:
    await make(http, f"{S}/t", b"abc")
    first = await http.get(f"{S}/t", params={"offset": "-1"})
    etag = first.headers["ETag"]
    cached = await http.get(f"{S}/t", params={"offset": "-1"}, headers={"If-None-Match": etag})
    assert cached.status_code == 304
    assert cached.content == b""
    await http.post(f"{S}/t", headers={"Stream-Closed": "true"})
    closed = await http.get(f"{S}/t", params={"offset": "-1"}, headers={"If-None-Match": etag})
    assert closed.status_code == 200
    assert closed.headers["ETag"] != etag


async def test_cache_control_distinguishes_full_chunks_from_the_tail(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    server.store.max_read_bytes = 2
    await make(http, f"{S}/t", b"ab", b"cd")
    chunk = await http.get(f"{S}/t", params={"offset": "-1"})
    assert chunk.headers["Cache-Control"].startswith("public, max-age=60")
    last = await http.get(f"{S}/t", params={"offset": chunk.headers["Stream-Next-Offset"]})
    assert last.headers["Cache-Control"] == "no-cache"


async def test_closed_stream_signals_eof_at_the_tail(http: httpx.AsyncClient) -> None:
    offsets = await make(http, f"{S}/t", b"a", b"b")
    await http.post(f"{S}/t", headers={"Stream-Closed": "true"})
    partial = await http.get(f"{S}/t", params={"offset": "-1"})
    assert partial.headers["Stream-Closed"] == "true"
    eof = await http.get(f"{S}/t", params={"offset": offsets[-1]})
    assert eof.status_code == 200
    assert eof.content == b""
    assert eof.headers["Stream-Closed"] == "true"


# ---------------------------------------------------------------- HEAD


async def test_head_reports_metadata_without_a_body(http: httpx.AsyncClient) -> None:
    await http.put(f"{S}/h", headers={**TEXT, "Stream-TTL": "300"}, content=b"abc")
    response = await http.head(f"{S}/h")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain"
    assert response.headers["Stream-TTL"] == "300"
    assert response.headers["Cache-Control"] == "no-store"
    incarnation = response.headers["Stream-Incarnation"]
    assert response.headers["Stream-Next-Offset"] == f"{incarnation}_0000000000000003"
    assert response.content == b""
    assert (await http.head(f"{S}/missing")).status_code == 404


# ---------------------------------------------------------------- long-poll


async def test_long_poll_wakes_on_append(server: RunningServer, http: httpx.AsyncClient) -> None:
    offsets = await make(http, f"{S}/t", b"a")
    poll = asyncio.create_task(
        http.get(f"{S}/t", params={"offset": offsets[-1], "live": "long-poll"})
    )
    await until(lambda: server.store.waiting(f"{S}/t") == 1)
    await http.post(f"{S}/t", headers=TEXT, content=b"b")
    response = await poll
    assert response.status_code == 200
    assert response.content == b"b"
    assert response.headers["Stream-Cursor"].isdigit()


async def test_long_poll_times_out_with_204_and_cursor(http: httpx.AsyncClient) -> None:
    offsets = await make(http, f"{S}/t", b"a")
    response = await http.get(f"{S}/t", params={"offset": offsets[-1], "live": "long-poll"})
    assert response.status_code == 204
    assert response.headers["Stream-Up-To-Date"] == "true"
    assert response.headers["Stream-Next-Offset"] == offsets[-1]
    cursor = response.headers["Stream-Cursor"]
    again = await http.get(
        f"{S}/t", params={"offset": offsets[-1], "live": "long-poll", "cursor": cursor}
    )
    assert int(again.headers["Stream-Cursor"]) > int(cursor)


async def test_long_poll_returns_existing_data_at_once(http: httpx.AsyncClient) -> None:
    await make(http, f"{S}/t", b"a", b"b")
    response = await http.get(f"{S}/t", params={"offset": "-1", "live": "long-poll"})
    assert response.status_code == 200
    assert response.content == b"ab"


async def test_long_poll_on_a_closed_stream_ends_at_once(http: httpx.AsyncClient) -> None:
    offsets = await make(http, f"{S}/t", b"a")
    await http.post(f"{S}/t", headers={"Stream-Closed": "true"})
    response = await http.get(f"{S}/t", params={"offset": offsets[-1], "live": "long-poll"})
    assert response.status_code == 204
    assert response.headers["Stream-Closed"] == "true"


async def test_long_poll_wakes_when_the_stream_closes(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    offsets = await make(http, f"{S}/t", b"a")
    poll = asyncio.create_task(
        http.get(f"{S}/t", params={"offset": offsets[-1], "live": "long-poll"})
    )
    await until(lambda: server.store.waiting(f"{S}/t") == 1)
    await http.post(f"{S}/t", headers={"Stream-Closed": "true"})
    response = await poll
    assert response.status_code == 204
    assert response.headers["Stream-Closed"] == "true"


# ---------------------------------------------------------------- SSE


async def test_sse_sends_history_then_live_then_closes(http: httpx.AsyncClient) -> None:
    await make(http, f"{S}/j", b"[1,2]", ctype="application/json")

    async def writer() -> None:
        await http.post(f"{S}/j", headers=JSON, content=b"3")
        await http.post(f"{S}/j", headers={**JSON, "Stream-Closed": "true"}, content=b"4")

    started = False

    def until(events: list[tuple[str, str]]) -> bool:
        nonlocal started
        if not started:
            started = True
            asyncio.get_running_loop().create_task(writer())
        return bool(controls(events)) and controls(events)[-1].get("streamClosed", False)

    response, events = await read_sse(http, f"{S}/j?offset=-1&live=sse", until)
    assert response.headers["content-type"].startswith("text/event-stream")
    received = [value for data in datas(events) for value in __import__("json").loads(data)]
    assert received == [1, 2, 3, 4]
    kinds = [kind for kind, _ in events]
    # every data event is followed by a control event
    assert all(kinds[i + 1] == "control" for i, k in enumerate(kinds) if k == "data")
    last = controls(events)[-1]
    assert last["streamClosed"] is True
    assert "streamCursor" not in last


async def test_sse_on_binary_streams_is_base64(http: httpx.AsyncClient) -> None:
    payload = bytes(range(256))
    await make(http, f"{S}/b", payload, ctype="application/octet-stream")
    response, events = await read_sse(
        http, f"{S}/b?offset=-1&live=sse", lambda e: bool(controls(e))
    )
    assert response.headers["stream-sse-data-encoding"] == "base64"
    assert base64.b64decode("".join(datas(events))) == payload
    assert controls(events)[0]["upToDate"] is True


async def test_sse_text_lines_cannot_inject_events(http: httpx.AsyncClient) -> None:
    await make(http, f"{S}/t", b"a\r\n\r\nevent: control\rdata: {}\n\n b")
    _, events = await read_sse(http, f"{S}/t?offset=-1&live=sse", lambda e: bool(controls(e)))
    assert [kind for kind, _ in events] == ["data", "control"]
    assert datas(events)[0] == "a\n\nevent: control\ndata: {}\n\n b"


async def test_sse_from_now_starts_at_the_tail(http: httpx.AsyncClient) -> None:
    offsets = await make(http, f"{S}/t", b"old")
    _, events = await read_sse(http, f"{S}/t?offset=now&live=sse", lambda e: bool(controls(e)))
    assert datas(events) == []
    assert controls(events)[0]["streamNextOffset"] == offsets[-1]
    assert controls(events)[0]["upToDate"] is True


async def test_sse_keepalive_control_event_while_idle(http: httpx.AsyncClient) -> None:
    await make(http, f"{S}/t", b"x")
    _, events = await read_sse(http, f"{S}/t?offset=-1&live=sse", lambda e: len(controls(e)) >= 2)
    assert controls(events)[1]["upToDate"] is True
    assert datas(events) == ["x"]


async def test_sse_response_ends_after_the_max_duration(tmp_path: object) -> None:
    from mock_server.testing import serve

    async with (
        serve(long_poll_timeout=0.05, sse_max_duration=0.2) as running,
        httpx.AsyncClient(base_url=running.url) as http,
    ):
        await make(http, f"{S}/t", b"x")
        response, events = await read_sse(http, f"{S}/t?offset=-1&live=sse", lambda e: False)
        assert response.status_code == 200
        assert datas(events) == ["x"]


async def test_sse_reader_at_the_tail_learns_of_a_close_without_data(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    await make(http, f"{S}/t", b"x")

    def until_closed(events: list[tuple[str, str]]) -> bool:
        if len(controls(events)) == 1:  # caught up and parked: now close, with no data
            asyncio.get_running_loop().create_task(
                http.post(f"{S}/t", headers={"Stream-Closed": "true"})
            )
        return bool(controls(events)) and controls(events)[-1].get("streamClosed", False)

    _, events = await read_sse(http, f"{S}/t?offset=-1&live=sse", until_closed)
    assert datas(events) == ["x"]
    assert controls(events)[-1]["streamClosed"] is True


def test_trimming_every_record_keeps_the_tail_where_it_was() -> None:
    from mock_server import StreamStore
    from mock_server._store import AppendRequest, CreateRequest

    store = StreamStore()
    store.create("/v1/stream/t", CreateRequest(content_type="text/plain", body=b"abc"))
    before = store.require("/v1/stream/t").tail_offset
    store.trim("/v1/stream/t", keep_last=0)
    after = store.append("/v1/stream/t", AppendRequest(body=b"d", content_type="text/plain"))
    assert after.next_offset > before


async def test_an_append_right_after_a_live_read_finds_nothing_still_wakes_it() -> None:
    """The append lands in the first moment the reader yields, between its read and its wait."""
    from mock_server import StreamStore
    from mock_server._store import AppendRequest, CreateRequest

    store = StreamStore()
    path = "/v1/stream/race"
    state, _ = store.create(path, CreateRequest(content_type="text/plain"))
    tail = store.tail(state, state.tail, idle=5.0)
    assert not (await anext(tail)).records

    reader = asyncio.ensure_future(anext(tail))
    await asyncio.sleep(0)  # the reader runs up to its first yield, inside the wait
    store.append(path, AppendRequest(body=b"x", content_type="text/plain"))
    async with asyncio.timeout(1.0):  # not the 5 s timeout: the append woke it
        assert [r.data for r in (await reader).records] == [b"x"]
    await tail.aclose()


async def test_an_append_while_the_caller_holds_a_result_still_wakes_the_tail() -> None:
    """The tail watches before it yields: a change made while the caller sends is not missed."""
    from mock_server import StreamStore
    from mock_server._store import AppendRequest, CreateRequest

    store = StreamStore()
    path = "/v1/stream/held"
    state, _ = store.create(path, CreateRequest(content_type="text/plain"))
    tail = store.tail(state, state.tail, idle=5.0)
    assert not (await anext(tail)).records
    store.append(path, AppendRequest(body=b"y", content_type="text/plain"))  # before it waits
    async with asyncio.timeout(1.0):
        assert [r.data for r in (await anext(tail)).records] == [b"y"]
    assert store.waiting(path) == 0
    await tail.aclose()


async def test_the_tail_ends_on_close_stop_deadline_and_deletion() -> None:
    from mock_server import ProtocolError, StreamStore
    from mock_server._store import AppendRequest, CreateRequest

    store = StreamStore()
    text = "text/plain"
    state, _ = store.create("/v1/stream/a", CreateRequest(content_type=text, body=b"1"))
    closing = store.tail(state, 0, idle=5.0)
    assert [r.data for r in (await anext(closing)).records] == [b"1"]
    waiting = asyncio.ensure_future(anext(closing))
    await until(lambda: store.waiting("/v1/stream/a") == 1)
    store.append("/v1/stream/a", AppendRequest(body=b"", close=True))
    last = await waiting
    assert (last.records, last.closed) == ([], True)
    with pytest.raises(StopAsyncIteration):
        await anext(closing)

    stop = asyncio.Event()
    state, _ = store.create("/v1/stream/b", CreateRequest(content_type=text))
    stopped = store.tail(state, 0, idle=5.0, stop=[stop])
    await anext(stopped)
    ended = asyncio.ensure_future(anext(stopped))
    await until(lambda: store.waiting("/v1/stream/b") == 1)
    stop.set()
    with pytest.raises(StopAsyncIteration):
        await ended
    assert store.waiting("/v1/stream/b") == 0

    # Past the deadline: one last heartbeat (nothing new, up to date), then the end.
    timed = store.tail(state, 0, until=time.monotonic(), idle=5.0)
    assert [(r.records, r.up_to_date) for r in [r async for r in timed]] == [([], True)]
    heartbeats = store.tail(state, 0, idle=0.01)
    assert [(await anext(heartbeats)).records for _ in range(3)] == [[], [], []]
    await heartbeats.aclose()

    deleted = store.tail(state, 0, idle=5.0)
    await anext(deleted)
    gone = asyncio.ensure_future(anext(deleted))
    await until(lambda: store.waiting("/v1/stream/b") == 1)
    store.delete("/v1/stream/b")
    with pytest.raises(ProtocolError) as refused:
        await gone
    assert refused.value.status == 404

    # A source its forks still read from is soft-deleted: 410, naming the incarnation.
    source, _ = store.create("/v1/stream/c", CreateRequest(content_type=text))
    store.create("/v1/stream/c-fork", CreateRequest(forked_from="/v1/stream/c"))
    soft = store.tail(source, 0, idle=5.0)
    await anext(soft)
    gone = asyncio.ensure_future(anext(soft))
    await until(lambda: store.waiting("/v1/stream/c") == 1)
    store.delete("/v1/stream/c")
    with pytest.raises(ProtocolError) as refused:
        await gone
    assert refused.value.status == 410
    assert refused.value.headers == {"Stream-Incarnation": source.incarnation_text}
