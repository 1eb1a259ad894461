"""Durable Streams wire vocabulary: header names, query parameters, sentinels.

This is the one definition of the HTTP wire format shared by the SDK and the
bundled server (``mock_server`` imports it; it imports nothing of theirs).
The protocol itself is the open Durable Streams protocol; see
``docs/protocol.md`` for the summary we implement.
"""

from __future__ import annotations

from typing import Final

STREAM_PATH_PREFIX: Final = "/v1/stream/"

# Response / request headers (names are case-insensitive on the wire).
STREAM_NEXT_OFFSET: Final = "Stream-Next-Offset"
STREAM_UP_TO_DATE: Final = "Stream-Up-To-Date"
STREAM_CLOSED: Final = "Stream-Closed"
STREAM_CURSOR: Final = "Stream-Cursor"
STREAM_TTL: Final = "Stream-TTL"
STREAM_EXPIRES_AT: Final = "Stream-Expires-At"
STREAM_SEQ: Final = "Stream-Seq"
STREAM_FORKED_FROM: Final = "Stream-Forked-From"
STREAM_FORK_OFFSET: Final = "Stream-Fork-Offset"
STREAM_FORK_SUB_OFFSET: Final = "Stream-Fork-Sub-Offset"
STREAM_SSE_DATA_ENCODING: Final = "Stream-SSE-Data-Encoding"
# Our extension: which incarnation of the path answered (a stream deleted and
# re-created at the same path, or recreated by a server that lost its data, is
# a new incarnation; its offsets are not the old one's). Opaque, compared for
# equality only. Sent on every response about an existing stream.
STREAM_INCARNATION: Final = "Stream-Incarnation"
# A client's key for one logical request, kept by the server so a retried
# create learns that its own earlier attempt created the stream (answered 201
# again, not 200). The IETF idempotency-key draft's header.
IDEMPOTENCY_KEY: Final = "Idempotency-Key"

PRODUCER_ID: Final = "Producer-Id"
PRODUCER_EPOCH: Final = "Producer-Epoch"
PRODUCER_SEQ: Final = "Producer-Seq"
PRODUCER_EXPECTED_SEQ: Final = "Producer-Expected-Seq"
PRODUCER_RECEIVED_SEQ: Final = "Producer-Received-Seq"

# Query parameters.
OFFSET_PARAM: Final = "offset"
LIVE_PARAM: Final = "live"
CURSOR_PARAM: Final = "cursor"

LIVE_LONG_POLL: Final = "long-poll"
LIVE_SSE: Final = "sse"

# Paths under the stream prefix that the protocol reserves (subscriptions,
# key discovery): never an ordinary stream.
RESERVED_PREFIX: Final = "__ds"

# Offset sentinels a server never hands out as real offsets.
OFFSET_BEGINNING: Final = "-1"
OFFSET_NOW: Final = "now"

# SSE control-event fields (camelCase on the wire).
SSE_NEXT_OFFSET: Final = "streamNextOffset"
SSE_CURSOR: Final = "streamCursor"
SSE_UP_TO_DATE: Final = "upToDate"
SSE_CLOSED: Final = "streamClosed"

JSON_CONTENT_TYPE: Final = "application/json"
DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"

# Producer epoch / seq are integers in [0, 2**53 - 1].
MAX_PRODUCER_NUMBER: Final = 2**53 - 1


def media_type(content_type: str | None) -> str:
    """The lower-cased media type of a Content-Type value, without parameters."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def is_json(content_type: str | None) -> bool:
    """Whether a stream of this content type is in JSON mode (message boundaries kept)."""
    return media_type(content_type) == JSON_CONTENT_TYPE


def is_text_compatible(content_type: str | None) -> bool:
    """Whether SSE carries this content type as UTF-8 (otherwise base64)."""
    mt = media_type(content_type)
    return mt.startswith("text/") or mt == JSON_CONTENT_TYPE


def header_true(value: str | None) -> bool:
    """``Stream-Closed``-style flags: only ``true`` (any case) counts; anything else is ignored."""
    return value is not None and value.strip().lower() == "true"
