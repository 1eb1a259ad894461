"""uvicorn's httptools protocol with a bound on request heads (431 above it).

llhttp, the parser under httptools, has no limit on a request's head, and
uvicorn sets none: 8 MiB of headers were read into memory, per request. (The
``h11_max_incomplete_event_size`` option bounds the h11 protocol only.) A bound
checked in the ASGI application comes too late, after the whole head is in
memory; this one counts the bytes as they arrive, so a head costs at most
``MAX_HEAD_BYTES`` plus one socket read (256 KiB) before it is refused.

A refused request gets ``431 Request Header Fields Too Large`` with a one-line
reason, and the connection is closed; the application never sees it.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["MAX_HEADERS", "MAX_HEAD_BYTES", "BoundedHttpToolsProtocol"]

MAX_HEAD_BYTES = 32 * 1024
"""Request line plus headers: what browsers and proxies send fits in a few KiB."""

MAX_HEADERS = 100

LINGER_SECONDS = 1.0

_HEADERS = (
    b"access-control-allow-origin: *\r\n"
    b"x-content-type-options: nosniff\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\n"
)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol``, refusing a head over ``max_head_bytes`` or ``max_headers``."""

    max_head_bytes = MAX_HEAD_BYTES
    max_headers = MAX_HEADERS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # between a message's end (or the start) and its headers' end
        self._head_bytes = 0  # bytes received while in a head (an upper bound of its size)
        self._exact = 0  # the head's size as parsed so far
        self._count = 0
        self._refusal: str | None = None

    # -------------------------------------------------------------- the bound

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return  # refused: the connection is closing
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._refusal is None and self._in_head and self._head_bytes > self.max_head_bytes:
            self._refusal = f"request head larger than {self.max_head_bytes} bytes"
        if self._refusal is not None:
            self._refuse(self._refusal)

    def _refuse(self, reason: str) -> None:
        if self.cycle is None or (self.cycle.response_complete and not self.pipeline):
            self._send_refusal(reason)
        else:  # answer the requests before this one first (on_response_complete)
            self.flow.pause_reading()

    def on_response_complete(self) -> None:
        if self._refusal is not None and not self.pipeline:
            self.server_state.total_requests += 1
            self._send_refusal(self._refusal)
            return
        super().on_response_complete()

    def _send_refusal(self, reason: str) -> None:
        if self.transport.is_closing():
            return
        body = (reason + "\n").encode()
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            + _HEADERS
            + b"content-length: %d\r\n\r\n" % len(body)
            + body
        )
        if self.transport.can_write_eof():
            # Lingering close: the client may still be sending the head; closing with
            # its bytes unread would reset the connection and lose the 431. Read (and
            # drop) for a moment; the client's own close ends it sooner.
            self.flow.resume_reading()
            self.transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()

    def _check(self) -> None:
        if self._count > self.max_headers:
            self._refusal = f"more than {self.max_headers} request headers"
        elif self._exact > self.max_head_bytes:
            self._refusal = f"request head larger than {self.max_head_bytes} bytes"

    # -------------------------------------------------------------- parser callbacks
    # After a refusal they do nothing: the parser may go on through the rest of
    # the bytes already received, and no request may start from them.

    def on_message_begin(self) -> None:
        if self._refusal is None:
            self._in_head = True
            self._exact = self._count = 0
            super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if self._refusal is None:
            self._exact += len(url)
            self._check()
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refusal is None:
            self._exact += len(name) + len(value) + 4
            self._count += 1
            self._check()
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refusal is None:
            self._in_head = False
            self._head_bytes = 0
            super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refusal is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refusal is None:
            self._in_head = True
            self._head_bytes = 0
            super().on_message_complete()

    def _should_upgrade(self) -> bool:
        return self._refusal is None and super()._should_upgrade()

    def _unsupported_upgrade_warning(self) -> None:
        if self._refusal is None:
            super()._unsupported_upgrade_warning()
