"""The sessions index: one JSON stream listing the chat sessions of a server.

Each entry is ``{"session_id", "title", "created_by", "ts"}``. The chat app
appends one when it starts a session; the agent host follows the index to
know which sessions to serve, and the app's "recent sessions" list reads it.
Against a server run with ``--auth`` each function takes the access token
(``token=``: a string or a provider) its caller was given.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

from pydantic import BaseModel

from durable_client import StreamNotFound
from durable_client.streams import DurableStream, ReadBatch, TokenProvider

INDEX_PATH = "/v1/stream/chat-index"


class IndexEntry(BaseModel):
    session_id: str
    title: str = ""
    created_by: str = ""
    ts: float = 0.0


def index_stream(server: str, token: str | TokenProvider | None = None) -> DurableStream:
    return DurableStream(
        server.rstrip("/") + INDEX_PATH, content_type="application/json", token=token
    )


async def announce(
    server: str,
    session_id: str,
    *,
    title: str,
    created_by: str,
    token: str | TokenProvider | None = None,
) -> None:
    """Add a session to the index (creating the index if needed)."""
    entry = IndexEntry(session_id=session_id, title=title, created_by=created_by, ts=time.time())
    async with index_stream(server, token) as stream:
        await stream.create()
        await stream.append_json(entry.model_dump())


async def recent(
    server: str, limit: int = 20, *, token: str | TokenProvider | None = None
) -> list[IndexEntry]:
    """The newest sessions first (at most ``limit``, one entry per session)."""
    entries: dict[str, IndexEntry] = {}
    async with index_stream(server, token) as stream:
        try:
            batches = cast(AsyncGenerator[ReadBatch, None], stream.follow(live=False))
            async with contextlib.aclosing(batches):
                async for batch in batches:
                    for item in batch.messages:
                        entry = _entry(item)
                        if entry is not None:
                            entries.setdefault(entry.session_id, entry)
        except StreamNotFound:
            return []
    return sorted(entries.values(), key=lambda e: e.ts, reverse=True)[:limit]


async def follow(
    server: str, *, token: str | TokenProvider | None = None
) -> AsyncIterator[IndexEntry]:
    """Every entry of the index, then new ones as they are announced."""
    async with index_stream(server, token) as stream:
        await stream.create()
        batches = cast(AsyncGenerator[ReadBatch, None], stream.follow(live="auto"))
        async with contextlib.aclosing(batches):
            async for batch in batches:
                for item in batch.messages:
                    entry = _entry(item)
                    if entry is not None:
                        yield entry


def _entry(item: Any) -> IndexEntry | None:
    try:
        return IndexEntry.model_validate(item)
    except ValueError:
        return None  # not ours; the index is an open stream
