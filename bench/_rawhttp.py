"""A bare HTTP/1.1 keep-alive client for one kind of request: POST to a stream.

It costs the load generator almost nothing (one write, one read per request),
so a round trip through it is mostly the server's own time. The benchmarks use
it beside the SDK to tell the server's cost from the Python client's.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit


class RawHttpClient:
    """One connection; :meth:`post` sends a request and reads the whole answer."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = parts.path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> RawHttpClient:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._writer is not None:
            self._writer.close()

    async def post(self, body: bytes, content_type: str = "application/json") -> int:
        """POST ``body``; returns the status (the connection is kept alive)."""
        assert self._reader is not None
        assert self._writer is not None
        head = (
            f"POST {self.path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
            f"content-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        self._writer.write(head.encode("latin-1") + body)
        response = await self._reader.readuntil(b"\r\n\r\n")
        status_line, _, headers = response.partition(b"\r\n")
        length = 0
        for line in headers.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length:
            await self._reader.readexactly(length)
        return int(status_line.split()[1])
