"""Strict client frames on /v1/ws: limits checked before parsing, strict types, and
an ``error`` frame for every refused frame, with the socket still usable after it.

The fuzz is seeded (``random.Random(seed)``; the seed and the frame are in every
failure message): valid frames of every op, each broken in one way that must be
refused. Nothing it sends may change a stream.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from mock_server._ws import MAX_FRAME_DEPTH
from mock_server.testing import RunningServer
from tests.server.conftest import ServerLog

S = "/v1/stream"
JSON = {"Content-Type": "application/json"}
SEEDS = (1, 2, 3)
CASES = 150  # per seed


@asynccontextmanager
async def raw_socket(server: RunningServer) -> AsyncIterator[ClientConnection]:
    url = server.url.replace("http://", "ws://") + "/v1/ws"
    async with connect(url, max_size=None, max_queue=None) as ws:
        yield ws


async def answers_then_pong(ws: ClientConnection, text: str | bytes, probe: str) -> list[Any]:
    """Send ``text`` then a ping; every frame that arrives before its pong."""
    await ws.send(text)
    await ws.send(json.dumps({"op": "ping", "req": probe}))
    seen: list[Any] = []
    while True:
        frame = json.loads(await ws.recv(decode=True))
        if frame == {"type": "pong", "req": probe}:
            return seen
        seen.append(frame)


async def refused_once(ws: ClientConnection, text: str | bytes, probe: str, where: str) -> Any:
    """The one ``error`` frame ``text`` gets; the ping after it is answered."""
    seen = await answers_then_pong(ws, text, probe)
    errors = [f for f in seen if f.get("type") == "error"]
    others = [f for f in seen if f.get("type") not in ("error", "presence")]
    assert len(errors) == 1, f"{where}\n-> {seen}"
    assert not others, f"{where}\n-> {seen}"
    assert errors[0]["status"] < 500, f"{where}\n-> {errors[0]}"
    return errors[0]


async def streams_of(http: httpx.AsyncClient) -> dict[str, Any]:
    """What every stream holds and where it ends: a refused frame changes none."""
    found = {}
    for name in ("json", "text", "victim"):
        read = await http.get(f"{S}/{name}", params={"offset": "-1"})
        found[name] = (read.status_code, read.content, read.headers.get("stream-next-offset"))
    return found


async def make_streams(http: httpx.AsyncClient) -> None:
    for name, content_type, body, closed in (
        ("json", "application/json", b"[1]", False),
        ("text", "text/plain", b"t", False),
        ("victim", "application/json", b'[{"a":1}]', True),
    ):
        headers = {"Content-Type": content_type, **({"Stream-Closed": "true"} if closed else {})}
        assert (await http.put(f"{S}/{name}", headers=headers, content=body)).status_code == 201


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


PRODUCER = '{"id":"p","epoch":0,"seq":0}'
SPECIFIC = [
    # strict types: none of these is what the models say
    (
        '{"op":"append","req":"r","stream":"json","data":1,"producer":{"id":"p","epoch":0,"seq":true}}',
        "producer.seq",
    ),
    (
        '{"op":"append","req":"r","stream":"json","data":1,"producer":{"id":"p","epoch":1.0,"seq":0}}',
        "producer.epoch",
    ),
    (
        '{"op":"append","req":"r","stream":"json","data":1,"producer":{"id":"p","epoch":false,"seq":0}}',
        "producer.epoch",
    ),
    (
        '{"op":"append","req":"r","stream":"json","data":1,"producer":{"id":"p","epoch":0,"seq":"0"}}',
        "producer.seq",
    ),
    ('{"op":"append","req":"r","stream":"json","data":1,"close":1}', "close"),
    ('{"op":"append","req":"r","stream":"json","data":1,"close":"true"}', "close"),
    (
        '{"op":"append","req":"r","stream":"json","data":1,"producer":{"id":"p","epoch":0,"seq":1e400}}',
        "producer.seq",
    ),
    (
        '{"op":"append","req":"r","stream":"json","data":1,"producer":{"id":"p","epoch":0,"seq":9007199254740992}}',
        "producer.seq",
    ),
    # depth, checked before parsing; the req is still echoed when it comes first
    ('{"op":"append","req":"r","stream":"json","data":' + nested(MAX_FRAME_DEPTH) + "}", "nested"),
    ('{"op":"append","req":"r","stream":"json","data":' + nested(5000) + "}", "nested"),
    ('{"op":"ping","req":"r","x":' + "[" * 100_000 + "}", "nested"),
    # numbers JSON cannot hold, surrogates no text can, fields and ops the models do not know
    ('{"op":"append","req":"r","stream":"json","data":[1e400]}', "out of range"),
    ('{"op":"append","req":"r","stream":"json","data":' + "9" * 5000 + "}", "number"),
    ('{"op":"append","req":"r","stream":"json","data":"\\ud800"}', "hex escape"),
    ('{"op":"append","req":"r","stream":"json","data":1,"surprise":true}', "surprise"),
    ('{"op":"launch","req":"r"}', "op"),
    # a refusal that used to be silent: presence.leave of a name the protocol reserves
    ('{"op":"presence.leave","stream":"__ds/x","client_id":"c"}', "reserved"),
]


@pytest.mark.parametrize(("frame", "mentions"), SPECIFIC)
async def test_each_refused_frame_gets_one_error_and_changes_nothing(
    server: RunningServer, http: httpx.AsyncClient, server_log: ServerLog, frame: str, mentions: str
) -> None:
    await make_streams(http)
    before = await streams_of(http)
    async with raw_socket(server) as ws:
        error = await refused_once(ws, frame, "after", frame[:200])
        assert mentions in error["message"], error
        if frame.startswith('{"op":"append","req":"r"') or frame.startswith('{"op":"ping"'):
            assert error["req"] == "r", error
        await ws.send(json.dumps({"op": "append", "req": "ok", "stream": "json", "data": [2]}))
        assert json.loads(await ws.recv())["type"] == "ack"  # the socket is still good
    after = await streams_of(http)
    assert after["victim"] == before["victim"]
    assert after["text"] == before["text"]
    assert (await http.get(f"{S}/json")).json() == [1, 2]
    assert server_log.problems() == []


async def test_the_deepest_frame_allowed_is_handled(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    await make_streams(http)
    data = nested(MAX_FRAME_DEPTH - 2)  # the frame's object and the append's array around it
    frame = f'{{"op":"append","req":"r","stream":"json","data":[{data}]}}'
    async with raw_socket(server) as ws:
        seen = await answers_then_pong(ws, frame, "after")
        assert [f["type"] for f in seen] == ["ack"], seen
    assert (await http.get(f"{S}/json")).json() == [1, json.loads(data)]


async def test_a_bool_for_an_int_is_refused_where_it_used_to_be_acked(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    """The issue's case: ``seq: true`` was taken as 1."""
    await make_streams(http)
    async with raw_socket(server) as ws:
        good = {"op": "append", "req": "0", "stream": "json", "data": 0}
        await ws.send(json.dumps({**good, "producer": {"id": "p", "epoch": 0, "seq": 0}}))
        assert json.loads(await ws.recv())["type"] == "ack"
        bad = {**good, "req": "1", "producer": {"id": "p", "epoch": True, "seq": True}}
        error = await refused_once(ws, json.dumps(bad), "after", "bool for int")
        assert (error["status"], error["code"], error["req"]) == (400, "bad_frame", "1")
    assert (await http.get(f"{S}/json")).json() == [1, 0]


# ---------------------------------------------------------------- the fuzz


def valid_frame(rng: random.Random, n: int) -> dict[str, Any]:
    """A frame that would be handled (an append, subscribe, presence or ping)."""
    makers: list[Callable[[], dict[str, Any]]] = [
        lambda: {
            "op": "append",
            "req": f"r{n}",
            "stream": "json",
            "data": {"n": n, "text": "hi"},
            "producer": {"id": "fz", "epoch": 0, "seq": n},
        },
        lambda: {"op": "append", "req": f"r{n}", "stream": "text", "data": "x", "close": False},
        lambda: {"op": "subscribe", "sub": f"s{n}", "stream": "json", "offset": "-1"},
        lambda: {"op": "presence", "stream": "json", "client_id": f"c{n}", "kind": "user"},
        lambda: {"op": "ping", "req": f"r{n}"},
    ]
    return rng.choice(makers)()


INT_FIELDS = ("epoch", "seq")


def break_frame(rng: random.Random, frame: dict[str, Any]) -> tuple[str, str]:
    """``frame`` broken in one way that must be refused: (text, what was done)."""
    fields = [k for k in frame if k != "op"]
    field = rng.choice(fields)
    kind = rng.choice(
        [
            "deep",
            "huge",
            "wrong type",
            "bool or float for int",
            "surrogate",
            "unknown field",
            "unknown op",
            "not an object",
        ]
    )
    text: str
    if kind == "deep":
        depth = rng.choice([MAX_FRAME_DEPTH, MAX_FRAME_DEPTH + 1, 300, 20_000])
        inner = json.dumps({**frame, field: "@@"})
        text = inner.replace('"@@"', "[" * depth + "]" * depth, 1)
    elif kind == "huge":
        if "producer" in frame:
            number = rng.choice(["9007199254740992", "1" + "0" * 400, "1e400", "-1"])
            text = json.dumps(frame).replace(
                f'"seq": {frame["producer"]["seq"]}', f'"seq": {number}'
            )
        else:
            text = json.dumps({**frame, field: "@@"}).replace(
                '"@@"', rng.choice(["1e400", "9" * 5000])
            )
    elif kind == "wrong type":
        if field == "data":  # any JSON is data: break the stream name instead
            field = "stream"
        # (no None: a ping's req may be null)
        text = json.dumps({**frame, field: rng.choice([7, [field], {"x": 1}, 1.5])})
    elif kind == "bool or float for int":
        if "producer" in frame:
            wrong = rng.choice([True, False, 0.0, 1.0])
            producer = {**frame["producer"], rng.choice(INT_FIELDS): wrong}
            text = json.dumps({**frame, "producer": producer})
        else:  # no int in this op: a bool where a string belongs
            strings = [k for k in fields if isinstance(frame[k], str) and k != "data"]
            text = json.dumps({**frame, rng.choice(strings): rng.choice([True, False])})
    elif kind == "surrogate":
        escape = rng.choice(["\\ud800", "\\udfff", "x\\ud83d", "\\ude00x"])
        target = field if field != "data" else "stream"
        text = json.dumps({**frame, target: "@@"}).replace('"@@"', f'"{escape}"')
    elif kind == "unknown field":
        text = json.dumps({**frame, rng.choice(["surprise", "Req", "x" * 500, "op2"]): 1})
    elif kind == "unknown op":
        text = json.dumps({**frame, "op": rng.choice(["nope", "", "APPEND", "append "])})
    else:
        text = rng.choice([json.dumps([frame]), json.dumps(json.dumps(frame)), "null", "1", "{"])
    return text, kind


@pytest.mark.parametrize("seed", SEEDS)
async def test_fuzzed_frames_each_get_an_error_and_change_nothing(
    server: RunningServer, http: httpx.AsyncClient, server_log: ServerLog, seed: int
) -> None:
    await make_streams(http)
    before = await streams_of(http)
    rng = random.Random(seed)
    async with raw_socket(server) as ws:
        for n in range(CASES):
            frame = valid_frame(rng, n)
            text, kind = break_frame(rng, frame)
            where = f"seed {seed} case {n} ({kind}): {text[:300]!r}"
            error = await refused_once(ws, text, f"probe{n}", where)
            if "req" in frame and error.get("req") is not None:
                assert error["req"] == frame["req"], f"{where}\n-> {error}"
            assert server_log.problems() == [], where
    assert await streams_of(http) == before, f"seed {seed}: a stream changed"
    assert server_log.problems() == [], f"seed {seed}"
