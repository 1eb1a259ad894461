"""uvicorn's sans-I/O WebSocket protocol, with a close that cannot hang on a reader that stopped.

Two things in uvicorn's ``WebSocketsSansIOProtocol`` let a client that never
reads hold a socket, and the server memory behind it, forever:

- ``send()`` waits for the transport to be writable before anything, a
  ``websocket.close`` too. A socket whose peer stopped reading never becomes
  writable again, so the application cannot even say 4008.
- Every way a connection ends calls ``transport.close()``, which asyncio
  carries out only once the write buffer has drained: for a peer that never
  reads, never. The socket stays ESTABLISHED with the buffer held.

This protocol writes a close frame at once (it is a few bytes, queued behind
whatever the buffer holds), and gives a closing socket ``CLOSE_LINGER``
seconds to drain its write buffer; one still holding bytes then is aborted
(an RST: the kernel's send queue is dropped too), so the memory is released
at once. glibc keeps freed heap memory for reuse rather than return it (a
hundred aborted readers left ~90 MiB of RSS behind), so after an abort the
process asks it to give back what it can (``malloc_trim``, a few ms; at most
once per ``TRIM_INTERVAL``). A peer that is still reading gets the close frame within the linger;
one that is not learns of the end from the reset, and resumes from its offset.

While the connection is open, bytes handed to the transport are bounded by
asyncio's flow control: ``send()`` writes a frame only below the high-water
mark (``WRITE_BUFFER_HIGH``), so the buffer holds at most that plus one frame.

Named by import string in ``uvicorn.Config(ws=...)`` (``_server._uvicorn_config``).
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from ._reset import reset

__all__ = ["CLOSE_LINGER", "WRITE_BUFFER_HIGH", "BoundedWebSocketProtocol"]

CLOSE_LINGER = 1.0
"""Seconds a closing socket has to drain its write buffer before it is aborted."""

WRITE_BUFFER_HIGH = 64 * 1024
"""The transport's high-water mark: above it ``send()`` waits (set on every socket)."""

WRITE_BUFFER_LOW = 16 * 1024

FEED_BYTES = 16 * 1024
"""Received bytes parsed per loop turn: a flood of small frames takes turns with other sockets."""


class _LingeringTransport(asyncio.Transport):
    """The connection's transport, whose ``close()`` turns into an abort after a linger.

    Only the protocol's own calls go through it; asyncio calls the protocol directly.
    """

    def __init__(self, transport: asyncio.Transport, linger: float) -> None:
        super().__init__()
        self._inner = transport
        self._linger = linger
        self._timer: asyncio.TimerHandle | None = None
        self.lost = False  # the protocol's connection_lost has run
        self.held = False  # reading stays paused: the protocol has received bytes to feed

    def start_linger(self) -> None:
        """From now, the peer has the linger to drain the write buffer, or the socket is reset."""
        if self._timer is None and not self.lost:
            self._timer = asyncio.get_running_loop().call_later(self._linger, self._expire)

    def cancel_linger(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self.lost or self._inner.get_write_buffer_size() == 0:
            return  # drained: close() finishes by itself (or the close handshake does)
        self.abort()

    # -------------------------------------------------------------- asyncio.Transport

    def close(self) -> None:
        self._inner.close()
        self.start_linger()

    def abort(self) -> None:
        self.cancel_linger()
        reset(self._inner)

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._inner.get_protocol()

    def is_reading(self) -> bool:
        return self._inner.is_reading()

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        if not self.held:  # else the protocol resumes once it has fed what it holds
            self._inner.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._inner.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._inner.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._inner.get_write_buffer_limits()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._inner.write(data)

    def write_eof(self) -> None:
        self._inner.write_eof()

    def can_write_eof(self) -> bool:
        return self._inner.can_write_eof()


class BoundedWebSocketProtocol(WebSocketsSansIOProtocol):
    """``WebSocketsSansIOProtocol`` whose closes end the socket within ``close_linger``."""

    close_linger = CLOSE_LINGER
    _unfed: bytearray | None = None  # received bytes not yet parsed (data_received)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # asyncio's or uvloop's
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW)
        self._lingering = _LingeringTransport(transport, self.close_linger)
        super().connection_made(self._lingering)

    def data_received(self, data: bytes) -> None:
        """Parse what one read brought a slice at a time, a loop turn each.

        uvicorn parses a whole read (up to 256 KiB: thousands of small frames) in
        one call and queues every frame before any other socket is served; fed in
        ``FEED_BYTES`` slices, a flooding socket takes turns with the others. Reading
        stays paused until the slices are fed, so held bytes never exceed one read.
        """
        if len(data) <= FEED_BYTES and self._unfed is None:
            super().data_received(data)
            return
        if self._unfed is None:
            self._unfed = bytearray(data)
            self._feed()
        else:
            self._unfed += data
        if self._unfed is not None and not self._lingering.held:
            self._lingering.held = True
            self._lingering.pause_reading()

    def _feed(self) -> None:
        unfed = self._unfed
        if unfed is None:
            return
        if self._lingering.lost or self.transport.is_closing():
            self._unfed = None
            return
        chunk = bytes(unfed[:FEED_BYTES])
        del unfed[:FEED_BYTES]
        super().data_received(chunk)
        if unfed:
            self.loop.call_soon(self._feed)
            return
        self._unfed = None
        if self._lingering.held:
            self._lingering.held = False
            if not self.read_paused:  # uvicorn's own pause (the app's queue) still applies
                self._lingering.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._unfed = None
        self._lingering.lost = True
        self._lingering.cancel_linger()
        super().connection_lost(exc)

    async def send(self, message: ASGISendEvent) -> None:
        if (
            message["type"] == "websocket.close"
            and not self.writable.is_set()
            and self.handshake_complete
            and self.initial_response is None
            and not self.close_sent
            and not self.disconnected
        ):
            self._close_now(message.get("code", 1000), message.get("reason", "") or "")
            return
        await super().send(message)
        if message["type"] == "websocket.close":
            self._lingering.start_linger()

    def _close_now(self, code: int, reason: str) -> None:
        """``websocket.close`` without waiting for the buffer to drain (it may never)."""
        if self.transport.is_closing():
            return
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.conn.send_close(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)
        self._lingering.start_linger()
