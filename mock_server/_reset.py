"""Resetting a connection whose peer stopped reading, and giving its memory back.

Both protocol subclasses (``_http_protocol``, ``_ws_protocol``) end such a
connection the same way: ``SO_LINGER`` 0, then ``abort()``, so the peer gets a
reset and the kernel drops its send queue too, rather than keep an orphan
socket trickling out megabytes behind a FIN. glibc keeps freed heap memory for
reuse rather than return it (a hundred aborted readers left ~90 MiB of RSS
behind), so after a reset the process asks it to give back what it can
(``malloc_trim``, a few ms; at most once per ``TRIM_INTERVAL``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import socket
import struct
from collections.abc import Callable

__all__ = ["TRIM_INTERVAL", "release_memory_soon", "reset"]

TRIM_INTERVAL = 0.1
"""Seconds from an abort to giving memory back (aborts in a burst share one trim)."""


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _find_malloc_trim()
_trim_pending = False


def release_memory_soon() -> None:
    """Give freed heap memory back to the system shortly (a no-op off glibc)."""
    global _trim_pending
    if _malloc_trim is None or _trim_pending:
        return
    _trim_pending = True
    asyncio.get_running_loop().call_later(TRIM_INTERVAL, _release_memory)


def _release_memory() -> None:
    global _trim_pending
    _trim_pending = False
    if _malloc_trim is not None:
        _malloc_trim(0)


def reset(transport: asyncio.BaseTransport) -> None:
    """End ``transport``'s connection at once with a reset, dropping what it buffers."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # already gone
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # type: ignore[attr-defined]
    release_memory_soon()
