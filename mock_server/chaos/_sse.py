"""Re-reading the server's own SSE output, and writing shorter batches in its format.

To cut an SSE response right after event *N*, the middleware splits the body
chunks the application sends back into events, learns from each ``control``
event where the batch before it ends, and when a cut lands inside a batch
writes the shorter ``data`` event and the ``control`` event that would have
followed it. The format is the server's own (``mock_server._http``).
"""

from __future__ import annotations

import json

from durable_client import wire as P

from .._http import cursor_for, sse_control, sse_data

__all__ = ["control_event", "data_event", "event_kind", "events", "next_offset"]


def events(chunk: bytes) -> list[bytes]:
    """The events of a body chunk, without their blank-line terminators."""
    return [event for event in chunk.split(b"\n\n") if event]


def event_kind(event: bytes) -> bytes:
    """``b"data"`` or ``b"control"``."""
    return event.split(b"\n", 1)[0].removeprefix(b"event:").strip()


def next_offset(event: bytes) -> str | None:
    """The ``streamNextOffset`` of a control event; None for any other event."""
    lines = event.split(b"\n")
    if lines[0].removeprefix(b"event:").strip() != b"control":
        return None
    data = b"".join(line.removeprefix(b"data:") for line in lines[1:])
    try:
        return str(json.loads(data)[P.SSE_NEXT_OFFSET])
    except (ValueError, KeyError, TypeError):
        return None


def data_event(content_type: str, pieces: list[bytes]) -> bytes:
    """The ``data`` event of a batch of events (JSON messages or raw appends)."""
    if P.is_json(content_type):
        return sse_data(content_type, b"[" + b",".join(pieces) + b"]")
    return sse_data(content_type, b"".join(pieces))


def control_event(offset: str, *, at_tail: bool, closed: bool) -> bytes:
    """The ``control`` event after a batch that ends at ``offset``."""
    return sse_control(offset, up_to_date=at_tail, closed=closed, cursor=cursor_for(None))
