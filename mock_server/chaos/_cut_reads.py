"""Cutting a read (catch-up, long-poll or SSE) right after event *N*.

:class:`ReadCutter` stands in for the ``send`` of a read: it passes the
response through until a positional rule lands inside it, then cuts it
there, splitting an SSE batch or shortening a body if need be.
"""

from __future__ import annotations

from durable_client import wire as P

from .._asgi import Message
from .._model import Record, StreamState
from .._store import ProtocolError, StreamStore
from ._rules import Landing, RequestView, RuleBook
from ._sockets import ClientConnection
from ._sse import control_event, data_event, event_kind, events, next_offset
from ._triggers import cut_point, events_before, split, window
from .plan import AfterEvent, Drop, Rule

__all__ = ["ReadCutter", "land"]


async def land(
    book: RuleBook,
    conn: ClientConnection,
    index: int,
    rule: Rule,
    req: RequestView,
    detail: str,
) -> Landing:
    """Fire a positional rule at its point; a ``crash`` happens here and now."""
    how = book.land(index, rule, req, detail)
    if how == "crash":
        await conn.crash()
    return how


class ReadCutter:
    """The ``send`` of a read that a positional rule may cut (see the module docstring)."""

    def __init__(
        self,
        store: StreamStore,
        book: RuleBook,
        state: StreamState,
        position: int,
        conn: ClientConnection,
        req: RequestView,
        positional: list[tuple[int, Rule]],
    ) -> None:
        self.store = store
        self.book = book
        self.state = state
        self.position = position
        self.conn = conn
        self.req = req
        self.positional = positional
        self.events_before = events_before(store, state, position)
        self.is_json = P.is_json(state.content_type)
        self.sse = False
        self.held_start: Message | None = None
        self.done = False

    async def send(self, message: Message) -> None:
        if self.conn.cut or self.done:
            return  # the response was cut: the application's remaining output goes nowhere
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers", []))
            self.sse = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            if self.sse or message["status"] != 200:
                self.positional = self.positional if message["status"] == 200 else []
                await self.conn.send(message)
            else:
                self.held_start = message
            return
        if self.sse:
            await self._sse_body(message)
        else:
            await self._plain_body(message)

    def _cut_point(self, records: list[Record]) -> tuple[int, Rule, int] | None:
        return cut_point(
            self.positional, records, self.position, self.events_before, self.book.can_fire
        )

    def _position_of(self, offset: str | None) -> int | None:
        if offset is None:
            return None
        try:
            return self.store.parse_read_offset(self.state, offset)
        except ProtocolError:
            return None

    async def _land(self, index: int, rule: Rule, detail: str) -> Landing:
        return await land(self.book, self.conn, index, rule, self.req, detail)

    async def _finish(self, how: Landing) -> None:
        if how == "end":
            self.done = True
            await self.conn.send({"type": "http.response.body", "body": b"", "more_body": False})
        elif how == "stall":
            self.conn.cut = True
        elif how in ("reset", "fin"):
            await self.conn.drop(how)

    # ---------------------------------------------------------------- SSE

    async def _sse_body(self, message: Message) -> None:
        chunk: bytes = message.get("body", b"")
        if not chunk or not self.positional:
            await self.conn.send(message)
            return
        parts = events(chunk)
        sent: list[bytes] = []
        i = 0
        while i < len(parts):
            event = parts[i]
            if event_kind(event) == b"control":
                self._advance(event)
                sent.append(event + b"\n\n")
                i += 1
                continue
            # A data event: the control event after it says where it ends.
            end = self._position_of(next_offset(parts[i + 1])) if i + 1 < len(parts) else None
            records = window(self.store, self.state, self.position, end) if end is not None else []
            point = self._cut_point(records) if end is not None else None
            if point is None:
                sent.append(event + b"\n\n")
                i += 1
                continue
            index, rule, keep = point
            pieces, boundary = split(records, keep, self.is_json)
            trigger = rule.trigger
            with_control = boundary is not None and (
                not isinstance(trigger, AfterEvent) or trigger.control
            )
            if pieces:
                sent.append(data_event(self.state.content_type, pieces))
                if with_control and boundary is not None:
                    sent.append(
                        control_event(
                            self.state.offset(boundary),
                            at_tail=boundary == self.state.tail,
                            closed=self.state.closed and boundary == self.state.tail,
                        )
                    )
            n = self.events_before + len(pieces)
            detail = f"SSE cut after event {n}" + ("" if with_control else ", control withheld")
            if sent:
                await self.conn.send(
                    {"type": "http.response.body", "body": b"".join(sent), "more_body": True}
                )
            await self._finish(await self._land(index, rule, detail))
            return
        await self.conn.send({**message, "body": b"".join(sent)})

    def _advance(self, control: bytes) -> None:
        end = self._position_of(next_offset(control))
        if end is not None and end > self.position:
            records = window(self.store, self.state, self.position, end)
            self.events_before += sum(r.count for r in records)
            self.position = end

    # ---------------------------------------------------------------- catch-up / long-poll

    async def _plain_body(self, message: Message) -> None:
        start, self.held_start = self.held_start, None
        if start is None:
            await self.conn.send(message)
            return
        body: bytes = message.get("body", b"")
        headers: list[tuple[bytes, bytes]] = list(start.get("headers", []))
        offset = dict(headers).get(P.STREAM_NEXT_OFFSET.lower().encode())
        point = None
        records: list[Record] = []
        if offset is not None and not message.get("more_body", False):
            end = self._position_of(offset.decode())
            if end is not None:
                records = window(self.store, self.state, self.position, end)
                point = self._cut_point(records)
        if point is None:
            await self.conn.send(start)
            await self.conn.send(message)
            return
        index, rule, keep = point
        pieces, boundary = split(records, keep, self.is_json)
        n = self.events_before + len(pieces)
        total = sum(r.count for r in records)
        fault = rule.fault
        if keep == 0:
            boundary = self.position  # ending before the first event: an empty response
        if isinstance(fault, Drop) and fault.how == "end" and boundary is not None:
            await self._land(index, rule, f"response ended after event {n}")
            await self._shorter_response(start, headers, pieces, boundary)
            return
        # Cut the body right after event n's bytes: the client gets a truncated response.
        if self.is_json:
            prefix = b"[" + b",".join(pieces) if keep < total else body[:-1]
        else:
            prefix = b"".join(pieces)
        detail = f"body cut after event {n} ({len(prefix)} of {len(body)} bytes)"
        await self.conn.send(start)
        if prefix:
            await self.conn.send({"type": "http.response.body", "body": prefix, "more_body": True})
        how = await self._land(index, rule, detail)
        await self._finish("fin" if how == "end" else how)

    async def _shorter_response(
        self,
        start: Message,
        headers: list[tuple[bytes, bytes]],
        pieces: list[bytes],
        boundary: int,
    ) -> None:
        """A complete response that ends at ``boundary``; the connection closes after it."""
        payload = b"[" + b",".join(pieces) + b"]" if self.is_json else b"".join(pieces)
        dropped = {
            b"content-length",
            b"etag",
            b"cache-control",
            P.STREAM_NEXT_OFFSET.lower().encode(),
            P.STREAM_UP_TO_DATE.lower().encode(),
            P.STREAM_CLOSED.lower().encode(),
        }
        kept = [(k, v) for k, v in headers if k.lower() not in dropped]
        kept += [
            (P.STREAM_NEXT_OFFSET.lower().encode(), self.state.offset(boundary).encode()),
            (b"cache-control", b"no-store"),
            (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close"),
        ]
        if boundary == self.state.tail:
            kept.append((P.STREAM_UP_TO_DATE.lower().encode(), b"true"))
            if self.state.closed:
                kept.append((P.STREAM_CLOSED.lower().encode(), b"true"))
        self.done = True
        await self.conn.send({**start, "headers": kept})
        await self.conn.send({"type": "http.response.body", "body": payload})
