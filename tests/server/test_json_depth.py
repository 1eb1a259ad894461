"""Whatever the server stores, every reader can read: JSON nested too deep for a
reader's parser is refused on append (400, nothing written), over HTTP and WebSocket.

Before the limit, a record nested 300 deep was acknowledged over HTTP and then
could never be delivered to the SDK over WebSocket (pydantic's parser stops at 200).
"""

from __future__ import annotations

import json

import httpx
from websockets.asyncio.client import connect

from durable_client.wire import SERVER_FRAME
from mock_server._json_depth import MAX_JSON_DEPTH, nesting_exceeds
from mock_server.testing import RunningServer
from tests.server.conftest import ServerLog

S = "/v1/stream"
JSON = {"Content-Type": "application/json"}


def nested(depth: int) -> str:
    """A JSON value of exactly ``depth`` arrays/objects inside one another."""
    if depth == 0:
        return "1"
    return '{"a":' * (depth - 1) + "[1]" + "}" * (depth - 1)


def test_the_scan_counts_levels_outside_strings() -> None:
    for depth in (0, 1, 2, 63, 64, 65, 300):
        text = nested(depth)
        assert json.loads(text) is not None
        assert nesting_exceeds(text, 64) is (depth > 64), depth
        assert nesting_exceeds(text.encode(), 64) is (depth > 64), depth
    assert not nesting_exceeds('["[[[[[[[[[[[[[[", "{{{{{{{{{{{{{{{{{{{"]', 2)  # in strings
    assert not nesting_exceeds('["\\"[[[[[[[[[[[[[[[[[["]', 2)  # an escaped quote


async def test_too_deep_json_is_refused_over_http_and_nothing_is_written(
    server: RunningServer, http: httpx.AsyncClient, server_log: ServerLog
) -> None:
    assert (await http.put(f"{S}/deep", headers=JSON)).status_code == 201
    for body in (nested(MAX_JSON_DEPTH + 1), f"[{nested(MAX_JSON_DEPTH + 1)}]", nested(300)):
        refused = await http.post(f"{S}/deep", headers=JSON, content=body)
        assert refused.status_code == 400, (len(body), refused.text)
        assert f"deeper than {MAX_JSON_DEPTH}" in refused.text
    assert (await http.get(f"{S}/deep?offset=-1")).json() == []
    # At the limit it is stored, as one message or inside a top-level array.
    ok = nested(MAX_JSON_DEPTH)
    for body in (ok, f"[{ok}]"):
        assert (await http.post(f"{S}/deep", headers=JSON, content=body)).status_code == 204
    assert (await http.get(f"{S}/deep?offset=-1")).json() == [json.loads(ok)] * 2
    assert server_log.problems() == []


async def test_too_deep_json_is_refused_over_websocket(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    assert (await http.put(f"{S}/deep", headers=JSON)).status_code == 201
    async with connect("ws" + server.url.removeprefix("http") + "/v1/ws") as ws:
        data = json.loads(nested(MAX_JSON_DEPTH + 1))
        await ws.send(json.dumps({"op": "append", "req": "r1", "stream": "deep", "data": data}))
        answer = json.loads(await ws.recv())
        assert answer["type"] == "error", answer
        assert answer["status"] == 400, answer
        assert answer["req"] == "r1"
    assert (await http.get(f"{S}/deep?offset=-1")).json() == []


async def test_the_deepest_stored_message_parses_in_the_sdk_over_websocket(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    """The deepest message the server accepts reaches the SDK's frame parser whole."""
    assert (await http.put(f"{S}/deepest", headers=JSON)).status_code == 201
    deepest = nested(MAX_JSON_DEPTH)
    assert (await http.post(f"{S}/deepest", headers=JSON, content=deepest)).status_code == 204
    async with connect("ws" + server.url.removeprefix("http") + "/v1/ws") as ws:
        await ws.send(json.dumps({"op": "subscribe", "sub": "s", "stream": "deepest"}))
        while True:
            text = await ws.recv()
            frame = SERVER_FRAME.validate_json(text)  # what the SDK's socket does
            if frame.type == "data":
                break
    assert json.loads(text)["messages"] == [json.loads(deepest)]
