"""Cutting a WebSocket (``/v1/ws``) right after the handshake or after event *N*.

:class:`WebSocketCutter` stands in for the ``receive`` and ``send`` of a
WebSocket: it follows which stream each subscription reads and cuts right
after event *N* of a ``data`` frame, sending the shorter frame first.
"""

from __future__ import annotations

import json
from typing import Any

from durable_client import wire as P

from .._asgi import Message
from .._model import Record
from .._store import ProtocolError, StreamStore
from .._ws import stream_path
from ._rules import RequestView, RuleBook
from ._sockets import ClientConnection
from ._triggers import cut_point, retained, split
from .plan import Drop, Rule, WsClose

__all__ = ["WebSocketCutter"]


class WebSocketCutter:
    """The ``receive`` and ``send`` of a WebSocket that a rule may close or cut."""

    def __init__(
        self,
        store: StreamStore,
        book: RuleBook,
        req: RequestView,
        conn: ClientConnection,
        positional: list[tuple[int, Rule]],
        close_on_accept: WsClose | None,
    ) -> None:
        self.store = store
        self.book = book
        self.req = req
        self.conn = conn
        self.positional = positional
        self.close_on_accept = close_on_accept
        self.subscriptions: dict[str, str] = {}  # sub id -> stream path
        self.closed_by_us: int | None = None

    async def receive(self) -> Message:
        if self.closed_by_us is not None:
            return {"type": "websocket.disconnect", "code": self.closed_by_us}
        message = await self.conn.receive()
        text = message.get("text") if message["type"] == "websocket.receive" else None
        if text and self.positional:
            self._follow(text)
        return message

    def _follow(self, text: str) -> None:
        try:
            frame = json.loads(text)
            if isinstance(frame, dict) and frame.get("op") == "subscribe":
                self.subscriptions[str(frame["sub"])] = stream_path(str(frame["stream"]))
        except (ValueError, KeyError, TypeError, ProtocolError):
            pass  # the application answers a bad frame

    async def _close(self, code: int, reason: str = "") -> None:
        self.closed_by_us = code
        self.conn.cut = True
        await self.conn.send({"type": "websocket.close", "code": code, "reason": reason})

    async def send(self, message: Message) -> None:
        if self.conn.cut:
            return
        if message["type"] == "websocket.accept" and self.close_on_accept is not None:
            await self.conn.send(message)
            fault = self.close_on_accept
            await self._close(fault.code, fault.reason)
            return
        text = message.get("text") if message["type"] == "websocket.send" else None
        if text is None or not self.positional:
            await self.conn.send(message)
            return
        try:
            frame = json.loads(text)
        except ValueError:
            frame = None
        if not isinstance(frame, dict) or frame.get("type") != "data":
            await self.conn.send(message)
            return
        await self._data(message, frame)

    async def _data(self, message: Message, frame: dict[str, Any]) -> None:
        store = self.store
        path = self.subscriptions.get(str(frame.get("sub")))
        state = store.get(path) if path is not None else None
        messages = frame.get("messages")
        if state is None or not isinstance(messages, list) or not messages:
            await self.conn.send(message)
            return
        try:
            end = store.parse_read_offset(state, str(frame["offset"]))
        except (KeyError, ProtocolError):
            await self.conn.send(message)
            return
        # The frame holds the last len(messages) events before its offset.
        before_end = [r for r in retained(store, state) if r.end <= end]
        window: list[Record] = []
        count = 0
        while before_end and count < len(messages):
            record = before_end.pop()
            window.insert(0, record)
            count += record.count
        start = before_end[-1].end if before_end else state.trimmed_to
        events_before = sum(r.count for r in before_end)
        point = cut_point(self.positional, window, start, events_before, self.book.can_fire)
        if point is None:
            await self.conn.send(message)
            return
        index, rule, keep = point
        pieces, boundary = split(window, keep, P.is_json(state.content_type))
        detail = f"WebSocket cut after event {events_before + len(pieces)}"
        if pieces and boundary is not None:
            at_tail = boundary == state.tail
            shorter = {
                **frame,
                "messages": [json.loads(piece) for piece in pieces],
                "offset": state.offset(boundary),
                "up_to_date": at_tail,
                "closed": at_tail and state.closed,
            }
            await self.conn.send({"type": "websocket.send", "text": json.dumps(shorter)})
        elif pieces:
            detail += " (inside an append: nothing of it sent)"
        how = self.book.land(index, rule, self.req, detail)
        fault = rule.fault
        if isinstance(fault, WsClose):
            await self._close(fault.code, fault.reason)
        elif how == "crash":
            await self.conn.crash()
        elif isinstance(fault, Drop) and how == "end":
            await self._close(1000)
        elif how in ("reset", "fin"):
            await self.conn.drop(how)
        else:
            self.conn.cut = True  # stall
