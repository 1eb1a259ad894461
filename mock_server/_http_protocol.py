"""uvicorn's httptools protocol: a bound on request heads (431 above it), and a
deadline for readers that stop reading.

llhttp, the parser under httptools, has no limit on a request's head, and
uvicorn sets none: 8 MiB of headers were read into memory, per request. (The
``h11_max_incomplete_event_size`` option bounds the h11 protocol only.) A bound
checked in the ASGI application comes too late, after the whole head is in
memory; this one counts the bytes as they arrive, so a head costs at most
``MAX_HEAD_BYTES`` plus one socket read (256 KiB) before it is refused.

A refused request gets ``431 Request Header Fields Too Large`` with a one-line
reason, and the connection is closed; the application never sees it.

Slow readers: uvicorn writes a response body into the transport and, once the
transport's buffer is above its high-water mark (``WRITE_HIGH_WATER``), makes
the next ``send`` wait for it to drain. So a client that stops reading holds at
most that mark plus one ``send`` of bytes, but forever: the waiting ``send``
never returns, and a finished response whose bytes are still buffered keeps the
connection open (``close()`` waits for the buffer to empty). Here a transport
that stays paused (or closed with bytes buffered) while the reader takes no byte
(the kernel's send queue does not shrink) for the slow-reader timeout is
aborted. The lifespan state ``SLOW_READER_STATE`` holds that timeout (the
application sets it; else ``SLOW_READER_TIMEOUT``). The buffer is dropped at
once, the connection is reset (linger 0: the kernel's send queue goes too, and
the client learns at once), and the application's waiting ``send`` returns with
the request marked disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import struct
import termios
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ._http import SLOW_READER_STATE, SLOW_READER_TIMEOUT
from ._reset import reset

__all__ = ["MAX_HEADERS", "MAX_HEAD_BYTES", "WRITE_HIGH_WATER", "BoundedHttpToolsProtocol"]

log = logging.getLogger("mock_server")

MAX_HEAD_BYTES = 32 * 1024
"""Request line plus headers: what browsers and proxies send fits in a few KiB."""

MAX_HEADERS = 100

WRITE_HIGH_WATER = 64 * 1024
"""The transport's write buffer above which a response's next ``send`` waits (the
low-water mark, where it resumes, is a quarter of it)."""

LINGER_SECONDS = 1.0

STALL_CHECKS = 10
"""How often a stalled reader's progress is looked at, per slow-reader timeout."""

_HEADERS = (
    b"access-control-allow-origin: *\r\n"
    b"x-content-type-options: nosniff\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\n"
)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol``, refusing a head over ``max_head_bytes`` or ``max_headers``
    and aborting a connection whose reader takes nothing for the slow-reader timeout."""

    max_head_bytes = MAX_HEAD_BYTES
    max_headers = MAX_HEADERS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # between a message's end (or the start) and its headers' end
        self._head_bytes = 0  # bytes received while in a head (an upper bound of its size)
        self._exact = 0  # the head's size as parsed so far
        self._count = 0
        self._refusal: str | None = None
        self._stall: asyncio.TimerHandle | None = None  # the slow-reader check, while paused
        self._stalled_size = 0  # bytes pending (``_pending``) at the last progress
        self._progress_at = 0.0  # loop time of the last progress (or the stall's start)

    # -------------------------------------------------------------- slow readers

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Explicit, so the documented bound does not depend on the event loop's default.
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall is None:
            self._arm()

    def resume_writing(self) -> None:
        self._disarm()
        super().resume_writing()

    def timeout_keep_alive_handler(self) -> None:
        super().timeout_keep_alive_handler()
        self._watch_closing()

    def shutdown(self) -> None:
        super().shutdown()
        self._watch_closing()

    def _watch_closing(self) -> None:
        """A closed transport flushes its buffer before the connection goes, however
        long that takes: watch it too (nothing is written to it any more, so its
        buffer only shrinks while the reader reads)."""
        if (
            self._stall is None
            and self.transport.is_closing()
            and self.transport.get_write_buffer_size()
        ):
            self._arm()

    def _slow_reader_timeout(self) -> float:
        timeout = self.app_state.get(SLOW_READER_STATE, SLOW_READER_TIMEOUT)
        return float(timeout) if isinstance(timeout, int | float) else SLOW_READER_TIMEOUT

    def _pending(self) -> int:
        """Bytes written and not yet taken by the reader: the transport's buffer and
        the kernel's send queue. While the transport is paused (or closed) nothing is
        added, so a smaller count means the reader took some; the buffer alone would
        not show it until the kernel's queue, megabytes, had room again."""
        pending = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
                pending += int(struct.unpack("i", raw)[0])
        return pending

    def _arm(self) -> None:
        self._stalled_size = self._pending()
        self._progress_at = self.loop.time()
        self._schedule_check()

    def _schedule_check(self) -> None:
        # Several checks per timeout: the reset comes at most a tenth of it late.
        interval = self._slow_reader_timeout() / STALL_CHECKS
        self._stall = self.loop.call_later(interval, self._check_stall)

    def _disarm(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _check_stall(self) -> None:
        self._stall = None
        if self.transport.get_protocol() is not self:
            return  # upgraded to a WebSocket: its protocol has its own deadline
        if not self.transport.get_write_buffer_size():
            return  # drained (a closed transport's connection goes now)
        size = self._pending()
        if size < self._stalled_size:  # the reader took something: slow, not stuck
            self._stalled_size, self._progress_at = size, self.loop.time()
        if self.loop.time() - self._progress_at < self._slow_reader_timeout():
            self._schedule_check()
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.warning(
            "%s read nothing of its response for %.1f s (%d bytes waiting): connection aborted",
            client,
            self._slow_reader_timeout(),
            size,
        )
        # A RST, not a FIN (which would wait behind megabytes the reader never takes).
        reset(self.transport)  # drops the buffer; connection_lost ends the response

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
        self._watch_closing()

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
