"""A minimal client of our WebSocket transport (``/v1/ws``, docs/websocket.md).

Used where the SDK has no WebSocket transport yet: JSON frames on one socket,
subscriptions delivered as lists of messages, appends pipelined with acks
matched by ``req``. It does no reconnecting of its own; the benchmarks that
need a resume do it with the SDK's reconnect policy (``ReconnectPolicy.retrying()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

WS_PATH = "/v1/ws"
MAX_RATE_LIMITED = 100  # 429s in a row for one append before it fails


class WsError(Exception):
    """An ``error`` frame, or the socket ended."""


class WsClient:
    """One socket to ``/v1/ws``; :meth:`connect`, then subscribe and append."""

    def __init__(self, base_url: str) -> None:
        self.url = base_url.replace("http://", "ws://", 1).rstrip("/") + WS_PATH
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._subs: dict[str, asyncio.Queue[dict[str, Any] | BaseException]] = {}
        self._acks: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)

    async def connect(self) -> WsClient:
        # Keepalive is the server's job here (it pings every 5 s); no compression,
        # as the server offers none.
        self._ws = await websockets.connect(
            self.url, max_size=None, compression=None, ping_interval=None, open_timeout=30
        )
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return self

    async def __aenter__(self) -> WsClient:
        return await self.connect()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._ws is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self._ws.close()

    async def _read(self) -> None:
        assert self._ws is not None
        ended: BaseException = WsError("the socket ended")
        try:
            async for raw in self._ws:
                frame = json.loads(raw)
                kind = frame.get("type")
                if kind == "data" or (kind == "error" and frame.get("sub")):
                    queue = self._subs.get(frame.get("sub", ""))
                    if queue is not None:
                        queue.put_nowait(frame)
                elif kind in ("ack", "error", "pong"):
                    future = self._acks.pop(frame.get("req") or "", None)
                    if future is not None and not future.done():
                        future.set_result(frame)
        except websockets.ConnectionClosed as exc:
            ended = WsError(f"the socket closed: {exc}")
        finally:
            for queue in self._subs.values():
                queue.put_nowait(ended)
            for future in self._acks.values():
                if not future.done():
                    future.set_exception(ended)
            self._acks.clear()

    async def _send(self, frame: dict[str, Any]) -> None:
        assert self._ws is not None
        await self._ws.send(json.dumps(frame, separators=(",", ":")))

    async def subscribe(self, stream: str, offset: str = "-1") -> AsyncIterator[dict[str, Any]]:
        """The ``data`` frames of ``stream`` from ``offset``; ends after a ``closed`` one."""
        sub = f"s{next(self._ids)}"
        queue: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
        self._subs[sub] = queue
        try:
            await self._send({"op": "subscribe", "sub": sub, "stream": stream, "offset": offset})
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.get("type") == "error":
                    raise WsError(f"{item.get('code')}: {item.get('message')}")
                yield item
                if item.get("closed"):
                    return
        finally:
            self._subs.pop(sub, None)

    def append_nowait(self, stream: str, data: Any) -> asyncio.Future[dict[str, Any]]:
        """Send one append; the future resolves to its ``ack`` (or ``error``) frame."""
        req = f"a{next(self._ids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._acks[req] = future
        assert self._ws is not None
        sending = asyncio.ensure_future(
            self._send({"op": "append", "req": req, "stream": stream, "data": data})
        )
        sending.add_done_callback(_retrieve)
        return future

    async def append(self, stream: str, data: Any) -> dict[str, Any]:
        """Append and wait for the ack; over the server's per-socket rate (429), wait
        its ``Retry-After`` and send again, as a well-behaved client does."""
        for _ in range(MAX_RATE_LIMITED):
            frame = await self.append_nowait(stream, data)
            if frame.get("type") == "error" and frame.get("status") == 429:
                await asyncio.sleep(float(frame.get("headers", {}).get("Retry-After", "0.01")))
                continue
            if frame.get("type") != "ack":
                raise WsError(f"append refused: {frame}")
            return frame
        raise WsError(f"append refused {MAX_RATE_LIMITED} times in a row for the rate")


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
