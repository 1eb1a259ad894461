"""Application-level faults: an ASGI middleware around this project's server.

:class:`ServerFaults` wraps a :class:`~mock_server.DurableStreamsApp` and
applies the server rules of a :class:`~mock_server.chaos.plan.FaultPlan`
to the requests under ``/v1/`` (never to ``/health`` or the admin endpoint):

- before the request is served: ``delay``, ``trim`` (retention),
  ``duplicate`` (rewind a read's offset), then at most one of ``http_error``,
  ``drop``, ``stall`` or ``crash``;
- after it is served: ``lost_ack`` (the append commits, the response is
  never sent);
- at an exact point inside a read (``after_event``, ``at_offset``): the
  response is cut right after event *N* (``drop``, ``stall``, ``crash``),
  splitting an SSE batch there if need be;
- at an exact append (``after_event``, ``at_offset``): ``lost_ack`` or
  ``crash`` on the append that makes event *N* exist;
- on a WebSocket: ``delay``, ``http_error``, ``drop``, ``stall``, ``crash``
  instead of the handshake, ``ws_close`` right after it, and ``drop``,
  ``stall``, ``ws_close``, ``crash`` right after event *N* of a ``data`` frame.

The pieces: :mod:`._rules` (which rules apply to a request, for HTTP and
WebSocket alike), :mod:`._triggers` (where they land), :mod:`._cut_reads`
and :mod:`._cut_websocket` (cutting a response there, re-reading SSE with
:mod:`._sse`), :mod:`._sockets` (RST, FIN, ``kill -9``).

Dropping a connection needs the socket under the ASGI server: with uvicorn
the middleware finds the transport behind ``send`` and closes it with a RST
(``SO_LINGER`` 0) or a FIN, after the bytes already sent have reached the
peer. Under another ASGI server it falls back to raising
:class:`ConnectionDropped`, which servers answer by closing the connection
(or, before a response started, with a 500).
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qsl, urlencode

from durable_client import wire as P

from .._asgi import Message, Receive, Scope, Send
from .._http import DurableStreamsApp, respond
from .._store import ProtocolError, StreamStore
from ._cut_reads import ReadCutter, land
from ._cut_websocket import WebSocketCutter
from ._rules import RequestView, RuleBook, ServerFaultRecord
from ._sockets import ClientConnection, ConnectionDropped, crash
from ._triggers import cut_point, events_before, retained
from .admin import admin_routes
from .plan import (
    AfterEvent,
    Delay,
    Drop,
    Duplicate,
    FaultPlan,
    HttpError,
    LostAck,
    Rule,
    Trim,
    WsClose,
)

__all__ = ["ADMIN_PREFIX", "ConnectionDropped", "ServerFaultRecord", "ServerFaults"]

ADMIN_PREFIX = "/_chaos"
_FAULTED_PREFIX = "/v1/"
_REFUSALS = ("http_error", "drop", "stall", "crash")


class ServerFaults(RuleBook):
    """ASGI middleware: ``ServerFaults(app, plan)`` serves ``app`` with ``plan``'s server faults.

    It is the server's rule book (plan, counters, log, ``set_plan``, ``reset``,
    ``fired``, ``wait_for``) applied to every request under ``/v1/``.
    ``allow_crash`` permits the ``crash`` fault (``kill -9`` of this process),
    for servers in a process of their own; ``admin`` mounts the admin
    endpoint (see :mod:`mock_server.chaos.admin`) on ``app``.
    """

    def __init__(
        self,
        app: DurableStreamsApp,
        plan: FaultPlan | None = None,
        *,
        allow_crash: bool = False,
        admin: bool = False,
    ) -> None:
        super().__init__(plan, allow_crash=allow_crash)
        self.app = app
        if admin:
            app.extra_routes.update(admin_routes(self, app.store))

    @property
    def store(self) -> StreamStore:
        return self.app.store

    # ------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not scope["path"].startswith(
            _FAULTED_PREFIX
        ):
            await self.app(scope, receive, send)
            return
        req = RequestView(scope)
        selection = self.select(req)
        if not selection.fired and not selection.positional:
            await self.app(scope, receive, send)
            return
        conn = ClientConnection(send, receive, self.app.shutting_down)
        if req.method == "WEBSOCKET":
            await self._websocket(scope, conn, req, selection.fired, selection.positional)
        else:
            await self._http(scope, receive, conn, req, selection.fired, selection.positional)

    async def _http(
        self,
        scope: Scope,
        receive: Receive,
        conn: ClientConnection,
        req: RequestView,
        fired: list[tuple[int, Rule]],
        positional: list[tuple[int, Rule]],
    ) -> None:
        lost_ack: tuple[int, Rule] | None = None
        for index, rule in fired:
            fault = rule.fault
            if isinstance(fault, Delay):
                await self._delay(index, rule, req, fault)
            elif isinstance(fault, Trim):
                self._trim(index, rule, req, fault)
            elif isinstance(fault, Duplicate):
                scope = self._rewind(index, rule, req, fault, scope)
            elif isinstance(fault, LostAck):
                lost_ack = (index, rule)
        for index, rule in fired:
            if rule.fault.kind in _REFUSALS:
                await self._refuse(index, rule, req, conn)
                return
        if req.is_read and positional:
            await self._serve_read(scope, receive, conn, req, positional)
        elif lost_ack is not None or positional:
            await self._serve_append(scope, receive, conn, req, lost_ack, positional)
        else:
            await self.app(scope, receive, conn.send)

    # ------------------------------------------------------------ before serving

    async def _delay(self, index: int, rule: Rule, req: RequestView, fault: Delay) -> None:
        rng = self.plan.rng("server", index, "delay", self.times_fired(index))
        ms = max(0.0, fault.ms + rng.uniform(-fault.jitter_ms, fault.jitter_ms))
        self.record(index, rule, req, f"{ms:.1f} ms")
        await asyncio.sleep(ms / 1000)

    def _trim(self, index: int, rule: Rule, req: RequestView, fault: Trim) -> None:
        try:
            floor = self.store.trim(req.path, fault.keep_last)
        except ProtocolError as exc:
            self.record(index, rule, req, f"not trimmed: {exc.message}")
            return
        state = self.store.require(req.path)
        detail = f"kept the last {fault.keep_last}; floor {state.offset(floor)}"
        self.record(index, rule, req, detail)

    def _rewind(
        self, index: int, rule: Rule, req: RequestView, fault: Duplicate, scope: Scope
    ) -> Scope:
        state = self.store.get(req.path)
        if state is None or req.offset is None:
            return scope
        try:
            position = self.store.parse_read_offset(state, req.offset)
        except ProtocolError:
            return scope  # the application answers the bad offset
        ends = [r.end for r in retained(self.store, state) if r.end <= position]
        if not ends:
            return scope
        back = ends[-1 - fault.rewind] if len(ends) > fault.rewind else max(state.trimmed_to, 0)
        back = max(back, state.trimmed_to)
        if back >= position:
            return scope
        query = [
            (k, state.offset(back) if k == P.OFFSET_PARAM else v)
            for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"))
        ]
        detail = f"offset {req.offset} served from {state.offset(back)}"
        self.record(index, rule, req, detail)
        return {**scope, "query_string": urlencode(query).encode("latin-1")}

    async def _refuse(
        self, index: int, rule: Rule, req: RequestView, conn: ClientConnection
    ) -> None:
        fault = rule.fault
        self.record(index, rule, req)
        if isinstance(fault, HttpError):
            headers = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]
            if fault.retry_after is not None:
                headers.append(("Retry-After", str(fault.retry_after)))
            await respond(conn.send, fault.status, headers, (fault.message + "\n").encode())
            return
        if isinstance(fault, Drop):
            await conn.drop("reset" if fault.how == "reset" else "fin")
            await conn.wait_gone()
            return
        if fault.kind == "crash":
            crash()
        # stall: send nothing, keep the connection until the client leaves
        conn.cut = True
        await conn.wait_gone()

    # ------------------------------------------------------------ reads and appends

    async def _serve_read(
        self,
        scope: Scope,
        receive: Receive,
        conn: ClientConnection,
        req: RequestView,
        positional: list[tuple[int, Rule]],
    ) -> None:
        state = self.store.get(req.path)
        position: int | None = None
        if state is not None and not state.soft_deleted:
            try:
                position = self.store.parse_read_offset(state, RequestView(scope).offset)
            except ProtocolError:
                position = None
        if state is None or position is None:
            await self.app(scope, receive, conn.send)
            return
        cutter = ReadCutter(self.store, self, state, position, conn, req, positional)
        await self.app(scope, receive, cutter.send)
        if conn.cut:
            await conn.wait_gone()
        elif cutter.held_start is not None:
            # The application ended without a body (cannot happen for reads; be safe).
            await conn.send(cutter.held_start)

    async def _serve_append(
        self,
        scope: Scope,
        receive: Receive,
        conn: ClientConnection,
        req: RequestView,
        lost_ack: tuple[int, Rule] | None,
        positional: list[tuple[int, Rule]],
    ) -> None:
        state = self.store.get(req.path)
        tail_before = state.tail if state is not None else 0
        records_before = len(state.records) if state is not None else 0
        before = (
            events_before(self.store, state, tail_before)
            if state is not None and any(isinstance(r.trigger, AfterEvent) for _, r in positional)
            else 0
        )
        captured: list[Message] = []

        async def capture(message: Message) -> None:
            captured.append(message)

        await self.app(scope, receive, capture)

        hit: tuple[int, Rule, str] | None = None
        after = self.store.get(req.path)
        if after is not None and after is state and state is not None and state.tail > tail_before:
            new = state.records[records_before:] if len(state.records) >= records_before else []
            point = cut_point(positional, new, tail_before, before, self.can_fire)
            if point is not None:
                hit = (point[0], point[1], f"append ending at {state.tail_offset}")
        if hit is None and lost_ack is not None:
            hit = (lost_ack[0], lost_ack[1], "response withheld")
        if hit is None:
            for message in captured:
                await conn.send(message)
            return
        index, rule, detail = hit
        if rule.positional:
            how = await land(self, conn, index, rule, req, detail)
        else:
            self.record(index, rule, req, detail)
            assert isinstance(rule.fault, LostAck)
            how = rule.fault.how
        await conn.drop("reset" if how == "reset" else "fin")
        await conn.wait_gone()

    # ------------------------------------------------------------ WebSocket

    async def _websocket(
        self,
        scope: Scope,
        conn: ClientConnection,
        req: RequestView,
        fired: list[tuple[int, Rule]],
        positional: list[tuple[int, Rule]],
    ) -> None:
        close_on_accept: WsClose | None = None
        for index, rule in fired:
            fault = rule.fault
            if isinstance(fault, Delay):
                await self._delay(index, rule, req, fault)
            elif isinstance(fault, WsClose):
                self.record(index, rule, req)
                close_on_accept = fault
            elif fault.kind == "crash":
                self.record(index, rule, req)
                crash()
            else:
                self.record(index, rule, req)
                await self._refuse_handshake(scope, conn, fault)
                return
        cutter = WebSocketCutter(self.store, self, req, conn, positional, close_on_accept)
        await self.app(scope, cutter.receive, cutter.send)
        if conn.cut:
            await conn.wait_gone()

    async def _refuse_handshake(self, scope: Scope, conn: ClientConnection, fault: Any) -> None:
        """An ``http_error``, ``drop`` or ``stall`` instead of the WebSocket handshake."""
        message = await conn.receive()
        if message["type"] != "websocket.connect":
            return
        if isinstance(fault, HttpError):
            if "websocket.http.response" in scope.get("extensions", {}):
                headers = [(b"content-type", b"text/plain; charset=utf-8")]
                if fault.retry_after is not None:
                    headers.append((b"retry-after", str(fault.retry_after).encode()))
                await conn.send(
                    {
                        "type": "websocket.http.response.start",
                        "status": fault.status,
                        "headers": headers,
                    }
                )
                body = (fault.message + "\n").encode()
                await conn.send({"type": "websocket.http.response.body", "body": body})
            else:
                await conn.send({"type": "websocket.close", "code": 1013})
            return
        if isinstance(fault, Drop):
            await conn.drop("reset" if fault.how == "reset" else "fin")
            return
        conn.cut = True  # stall: no answer to the handshake
        await conn.wait_gone()
