"""Socket tricks: cutting a connection with a RST or a FIN after what was sent has
arrived, finding the socket under an ASGI server, and killing the process.

Used by the proxy (its own sockets) and by the server faults (the socket under
uvicorn's ``send``). Nothing here knows about fault plans.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import struct
import termios
import time
from typing import Any, Literal

from .._asgi import Receive, Send

__all__ = [
    "ClientConnection",
    "ConnectionDropped",
    "crash",
    "reset",
    "unsent_bytes",
    "wait_flushed",
]

_FLUSH_TIMEOUT = 2.0


def unsent_bytes(sock: socket.socket | None) -> int:
    """Bytes the kernel has not yet had acknowledged by the peer (Linux); 0 elsewhere."""
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    value: int = struct.unpack("i", raw)[0]
    return value


async def wait_flushed(transport: asyncio.WriteTransport) -> None:
    """Until what was written has left the process and reached the peer, bounded:
    a RST discards data the kernel has not sent yet."""
    sock = transport.get_extra_info("socket")
    deadline = time.monotonic() + _FLUSH_TIMEOUT
    # No event says "the kernel's send queue is empty"; poll it, bounded.
    while (  # noqa: ASYNC110 - kernel state; nothing to await
        not transport.is_closing()
        and (transport.get_write_buffer_size() or unsent_bytes(sock))
        and time.monotonic() < deadline
    ):
        await asyncio.sleep(0.001)


def reset(transport: asyncio.WriteTransport) -> None:
    """Close with a TCP RST: linger on with a timeout of 0, then abort."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def crash() -> None:
    """``kill -9`` this process: no cleanup, no flush, like a power cut for the process."""
    os.kill(os.getpid(), signal.SIGKILL)


class ConnectionDropped(Exception):
    """Raised to the ASGI server when the middleware cannot reach the socket itself."""


def transport_of(send: Send) -> Any:
    """The asyncio transport under uvicorn's ``send`` (a bound method of its
    request cycle, which holds the transport), or None under another server."""
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is not None and hasattr(transport, "abort"):
        return transport
    return None


class ClientConnection:
    """The client connection of one ASGI request, for cutting it."""

    def __init__(self, send: Send, receive: Receive, shutting_down: asyncio.Event) -> None:
        self.send = send
        self.receive = receive
        self.shutting_down = shutting_down
        self.transport = transport_of(send)
        self.cut = False  # nothing more may be sent

    async def flush(self) -> None:
        """Wait until what was sent has reached the peer (a RST discards unsent bytes)."""
        if self.transport is not None:
            await wait_flushed(self.transport)

    async def drop(self, how: Literal["reset", "fin"]) -> None:
        """Close the socket under the request, after what was sent has arrived.

        Raises ``ConnectionDropped`` under an ASGI server whose socket it cannot reach.
        """
        self.cut = True
        if self.transport is None:
            raise ConnectionDropped(how)
        await self.flush()
        if how == "reset":
            reset(self.transport)
        else:
            self.transport.close()

    async def crash(self) -> None:
        """Kill the process once what was sent has arrived."""
        await self.flush()
        crash()

    async def wait_gone(self) -> None:
        """Until the client is gone (or the server stops), so uvicorn sees the
        disconnect before the application returns and adds nothing of its own."""
        stop = asyncio.ensure_future(self.shutting_down.wait())
        try:
            while True:
                message = asyncio.ensure_future(self.receive())
                done, _ = await asyncio.wait({message, stop}, return_when=asyncio.FIRST_COMPLETED)
                if message not in done:
                    message.cancel()
                    if self.cut and self.transport is not None:
                        # Stopping with a stalled response: close it ourselves, so the
                        # ASGI server does not report an unfinished response.
                        self.transport.abort()
                        with contextlib.suppress(Exception):
                            async with asyncio.timeout(1):
                                await self.receive()
                    return
                if message.result()["type"] in ("http.disconnect", "websocket.disconnect"):
                    return
        finally:
            stop.cancel()
