"""The error tree: its drawing matches the classes, and HTTP answers map onto it."""

from __future__ import annotations

import re

import httpx
import pytest

import durable_client
from durable_client import (
    BadRequest,
    ConnectError,
    ConnectionLost,
    DurableError,
    FatalError,
    Forbidden,
    OffsetGone,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    RetryableError,
    SequenceConflict,
    SequenceGap,
    ServerError,
    StaleEpoch,
    StreamClosed,
    StreamConflict,
    StreamNotFound,
    Unauthorized,
    UnexpectedStatus,
    _errors,
)
from durable_client._errors import parse_retry_after
from durable_client._http_errors import error_from_httpx, error_from_response

URL = "http://127.0.0.1:1/v1/stream/x"


def tree_edges() -> list[tuple[str, str]]:
    """(parent, child) pairs read off the ASCII tree in the module docstring."""
    doc = _errors.__doc__ or ""
    edges: list[tuple[str, str]] = []
    stack: list[tuple[int, str]] = []
    for line in doc.splitlines():
        match = re.match(r"^(\s*)((?:[│ ]   )*)(?:[├└]── )?([A-Z][A-Za-z]+)\s", line + " ")
        if not match or not re.search(r"[├└]── |^    DurableError", line):
            continue
        depth = len(match.group(2)) // 4 + (1 if "── " in line else 0)
        name = match.group(3)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            edges.append((stack[-1][1], name))
        stack.append((depth, name))
    return edges


def test_the_drawn_tree_is_the_class_tree() -> None:
    edges = tree_edges()
    assert len(edges) >= 25
    drawn = {child for _, child in edges}
    for parent, child in edges:
        parent_cls = getattr(durable_client, parent)
        child_cls = getattr(durable_client, child)
        assert child_cls.__bases__[0] is parent_cls, (parent, child)
    # Every exported error class is in the drawing.
    errors = {
        name
        for name in durable_client.__all__
        if isinstance(getattr(durable_client, name), type)
        and issubclass(getattr(durable_client, name), DurableError)
        and name != "DurableError"
    }
    assert errors == drawn


def response(status: int, headers: dict[str, str] | None = None, text: str = "") -> httpx.Response:
    return httpx.Response(status, headers=headers or {}, text=text)


@pytest.mark.parametrize(
    ("status", "headers", "text", "cls"),
    [
        (400, {}, "bad offset", BadRequest),
        (401, {}, "", Unauthorized),
        (403, {}, "", Forbidden),
        (403, {"Producer-Epoch": "7"}, "", StaleEpoch),
        (404, {}, "", StreamNotFound),
        (409, {}, "content type mismatch", StreamConflict),
        (409, {"Stream-Closed": "true", "Stream-Next-Offset": "o_9"}, "", StreamClosed),
        (409, {}, "Stream-Seq regression", SequenceConflict),
        (409, {"Producer-Expected-Seq": "2", "Producer-Received-Seq": "4"}, "", SequenceGap),
        (410, {}, "", OffsetGone),
        (413, {}, "", PayloadTooLarge),
        (418, {}, "", UnexpectedStatus),
        (429, {"Retry-After": "3"}, "", RateLimited),
        (500, {}, "", ServerError),
        (503, {"Retry-After": "1"}, "", ServerError),
    ],
)
def test_statuses_map_onto_the_tree(
    status: int, headers: dict[str, str], text: str, cls: type[DurableError]
) -> None:
    error = error_from_response(response(status, headers, text), url=URL, operation="append")
    assert type(error) is cls
    assert error.url == URL
    assert error.status == status
    assert URL in str(error)
    assert error.retryable == issubclass(cls, RetryableError)
    assert issubclass(cls, RetryableError) != issubclass(cls, FatalError)


def test_error_details_are_parsed() -> None:
    gap = error_from_response(
        response(409, {"Producer-Expected-Seq": "2", "Producer-Received-Seq": "4"}),
        url=URL,
        operation="append",
    )
    assert isinstance(gap, SequenceGap)
    assert (gap.expected_seq, gap.received_seq) == (2, 4)
    stale = error_from_response(response(403, {"Producer-Epoch": "7"}), url=URL, operation="x")
    assert isinstance(stale, StaleEpoch)
    assert stale.current_epoch == 7
    closed = error_from_response(
        response(409, {"Stream-Closed": "TRUE", "Stream-Next-Offset": "o_9"}),
        url=URL,
        operation="x",
    )
    assert isinstance(closed, StreamClosed)
    assert closed.final_offset == "o_9"
    busy = error_from_response(response(429, {"Retry-After": "3"}), url=URL, operation="x")
    assert busy.retry_after == 3.0


def test_a_closed_flag_other_than_true_is_ignored() -> None:
    error = error_from_response(response(409, {"Stream-Closed": "yes"}), url=URL, operation="x")
    assert type(error) is StreamConflict


@pytest.mark.parametrize(
    ("exc", "cls"),
    [
        (httpx.ConnectError("refused"), ConnectError),
        (httpx.ConnectTimeout("slow"), RequestTimeout),
        (httpx.ReadTimeout("slow"), RequestTimeout),
        (httpx.ReadError("reset"), ConnectionLost),
        (httpx.RemoteProtocolError("peer closed"), ConnectionLost),
    ],
)
def test_httpx_errors_map_onto_the_tree(exc: httpx.HTTPError, cls: type[DurableError]) -> None:
    error = error_from_httpx(exc, url=URL, operation="read")
    assert type(error) is cls
    assert error.retryable
    assert error.url == URL


def test_retry_after_forms() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("nonsense") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


def test_the_tree_knows_no_http_library() -> None:
    """The tree maps statuses and headers; httpx is mapped on the HTTP side only."""
    import ast
    from pathlib import Path

    source = Path(_errors.__file__).read_text(encoding="utf-8")
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not {name for name in imported if name.split(".")[0] in ("httpx", "websockets")}
