"""The WebSocket ``data`` frame fast path says exactly what the ``Data`` model says."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from durable_client.wire import Data
from mock_server import StreamStore
from mock_server._store import AppendRequest, CreateRequest, ReadResult
from mock_server._ws import DataFrames

SUBS = ["a", 'quote " and back\\slash', "line\nbreak\ttab", "ünï\u2028cödé 🎉", "\x00\x1f"]
JSON_APPENDS = [
    b'{"id":1}',
    b'[{"text":"caf\\u00e9 \\"quoted\\" \\\\ back"},{"emoji":"\xf0\x9f\x8e\x89"}]',
    b'["line\\nbreak","\\u2028","\\u0000",null,true,1.5e3,-0,{"nested":[[]]}]',
    '"ünïcödé"'.encode(),
]
TEXTS = [b"plain", b'"quoted" \\ back\nnew line\r\n', "ünï 🎉 \u2028 \x00".encode()]
BINARY = [bytes(range(256)), b"\xff\xfe\x00", b""]


def stream(content_type: str, appends: list[bytes]) -> tuple[StreamStore, ReadResult, ReadResult]:
    """A stream of ``appends``: (store, a read of everything, a read of the empty tail)."""
    store = StreamStore()
    state, _ = store.create("/v1/stream/s", CreateRequest(content_type=content_type))
    for body in appends:
        if body:
            store.append("/v1/stream/s", AppendRequest(body=body, content_type=content_type))
    return store, store.read(state, 0), store.read(state, state.tail)


def model(sub: str, result: ReadResult, **payload: Any) -> Any:
    frame = Data(
        sub=sub,
        offset=result.next_offset,
        up_to_date=result.up_to_date,
        closed=result.closed,
        **payload,
    )
    return json.loads(frame.model_dump_json(exclude_none=True))


def reads(content_type: str, appends: list[bytes]) -> list[ReadResult]:
    """Reads of every kind: everything, the empty tail, a batch short of the tail, and
    the closing reads of a closed stream (with records and without)."""
    store, whole, empty = stream(content_type, appends)
    state = store.require("/v1/stream/s")
    partial = store.read(state, 0, max_bytes=1)
    store.append("/v1/stream/s", AppendRequest(body=b"", close=True))
    closing, closed_tail = store.read(state, 0), store.read(state, state.tail)
    assert (bool(partial.records), partial.up_to_date) == (True, False)
    assert (closing.closed, closed_tail.closed, closed_tail.records) == (True, True, [])
    return [whole, empty, partial, closing, closed_tail]


@pytest.mark.parametrize("sub", SUBS)
def test_json_frames(sub: str) -> None:
    for result in reads("application/json", JSON_APPENDS):
        fast = json.loads(DataFrames(sub, "application/json").encode(result))
        messages = [m for r in result.records for m in json.loads(b"[" + r.data + b"]")]
        assert fast == model(sub, result, messages=messages)


@pytest.mark.parametrize("sub", SUBS)
def test_text_frames(sub: str) -> None:
    for content_type in ("text/plain", "text/plain; charset=utf-8"):
        for result in reads(content_type, TEXTS):
            fast = json.loads(DataFrames(sub, content_type).encode(result))
            text = b"".join(r.data for r in result.records).decode()
            assert fast == model(sub, result, text=text)


@pytest.mark.parametrize("sub", SUBS)
def test_binary_frames(sub: str) -> None:
    for result in reads("application/octet-stream", BINARY):
        fast = json.loads(DataFrames(sub, "application/octet-stream").encode(result))
        data = base64.b64encode(b"".join(r.data for r in result.records)).decode()
        assert fast == model(sub, result, data_base64=data)


def test_the_flags_take_every_value() -> None:
    """The reads above cover up_to_date and closed both ways (else the test proves less)."""
    results = reads("application/json", JSON_APPENDS)
    assert {(r.up_to_date, r.closed) for r in results} == {
        (True, False),
        (False, False),
        (True, True),
    }
