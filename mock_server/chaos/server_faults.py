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
  ``crash`` on the append that makes event *N* exist.

Dropping a connection needs the socket under the ASGI server: with uvicorn
the middleware finds the transport behind ``send`` and closes it with a RST
(``SO_LINGER`` 0) or a FIN, after the bytes already sent have reached the
peer. Under another ASGI server it falls back to raising
:class:`ConnectionDropped`, which servers answer by closing the connection
(or, before a response started, with a 500).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import json
import os
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode

from pydantic import BaseModel

from durable_client import _protocol as P

from .._http import DurableStreamsApp, _respond, _sse_event, cursor_for
from .._model import Record, StreamState
from .._store import ProtocolError, StreamStore, json_items
from ._changes import Changes
from .plan import (
    AfterEvent,
    AtOffset,
    Delay,
    Drop,
    Duplicate,
    FaultPlan,
    HttpError,
    LostAck,
    Match,
    OnRequest,
    OnResume,
    Probability,
    Rule,
    Trim,
    WsClose,
)
from .proxy import unsent_bytes

__all__ = ["ADMIN_PREFIX", "ConnectionDropped", "ServerFaultRecord", "ServerFaults"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ADMIN_PREFIX = "/_chaos"
_FAULTED_PREFIX = "/v1/"
_EVERYTHING = 1 << 62
_FLUSH_TIMEOUT = 2.0


class ConnectionDropped(Exception):
    """Raised to the ASGI server when the middleware cannot reach the socket itself."""


class ServerFaultRecord(BaseModel):
    """A fault the server applied."""

    rule: int
    fault: str
    method: str
    path: str
    detail: str = ""
    at: float

    def __str__(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return f"rule {self.rule}: {self.fault} on {self.method} {self.path}{detail}"


@dataclass
class _RuleState:
    fired: int = 0
    seen: int = 0
    seen_by_path: dict[str, int] = field(default_factory=dict)


class _Request:
    """What the rules look at in a request."""

    def __init__(self, scope: Scope) -> None:
        websocket = scope["type"] == "websocket"
        self.method: str = "WEBSOCKET" if websocket else scope["method"].upper()
        self.path: str = scope["path"]
        self.query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        self.offset = self.query.get(P.OFFSET_PARAM)
        live = self.query.get(P.LIVE_PARAM)
        self.live = live if live in (P.LIVE_SSE, P.LIVE_LONG_POLL) else "catch-up"
        self.is_read = self.method == "GET"
        self.is_resume = self.is_read and self.offset not in (
            None,
            P.OFFSET_BEGINNING,
            P.OFFSET_NOW,
        )

    def matches(self, match: Match | None) -> bool:
        if match is None:
            return True
        if match.method is not None and match.method.upper() != self.method:
            return False
        if match.path is not None and not fnmatch.fnmatchcase(self.path, match.path):
            return False
        return match.live is None or (self.is_read and match.live == self.live)


def _transport_of(send: Send) -> Any:
    """The asyncio transport under uvicorn's ``send`` (a bound method of its
    request cycle, which holds the transport), or None under another server."""
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is not None and hasattr(transport, "abort"):
        return transport
    return None


class _Connection:
    """The client connection of one request, for cutting it."""

    def __init__(self, send: Send, receive: Receive, shutting_down: asyncio.Event) -> None:
        self.send = send
        self.receive = receive
        self.shutting_down = shutting_down
        self.transport = _transport_of(send)
        self.cut = False  # nothing more may be sent

    async def flush(self) -> None:
        """Wait until what was sent has reached the peer (a RST discards unsent bytes)."""
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        deadline = time.monotonic() + _FLUSH_TIMEOUT
        # No event says "the kernel's send queue is empty"; poll it, bounded.
        while (  # noqa: ASYNC110 - kernel state; nothing to await
            not transport.is_closing()
            and (transport.get_write_buffer_size() or unsent_bytes(sock))
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.001)

    async def drop(self, how: Literal["reset", "fin"]) -> None:
        self.cut = True
        if self.transport is None:
            raise ConnectionDropped(how)
        await self.flush()
        if how == "reset":
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
        else:
            self.transport.close()

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


class ServerFaults:
    """ASGI middleware: ``ServerFaults(app, plan)`` serves ``app`` with ``plan``'s server faults.

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
        self.app = app
        self.allow_crash = allow_crash
        self.plan = FaultPlan()
        self.log: list[ServerFaultRecord] = []
        self.requests = 0
        self._rules: dict[int, _RuleState] = {}
        self._changes = Changes()
        if plan is not None:
            self.set_plan(plan)
        if admin:
            from .admin import admin_routes

            app.extra_routes.update(admin_routes(self))

    # ------------------------------------------------------------ control

    @property
    def store(self) -> StreamStore:
        return self.app.store

    def set_plan(self, plan: FaultPlan) -> None:
        """Apply ``plan`` from the next request on; counters restart.

        Raises ``ValueError`` for a ``crash`` fault when crashes are not allowed.
        """
        if not self.allow_crash and any(
            r.fault.kind == "crash" for _, r in plan.for_layer("server")
        ):
            raise ValueError(
                "the crash fault kills the server process: run the server in its own"
                " process (python -m mock_server --chaos, or CrashHarness)"
            )
        self.plan = plan
        self._rules.clear()
        self._changes.changed()

    def reset(self) -> None:
        """No plan, no counters, an empty log."""
        self.plan = FaultPlan()
        self._rules.clear()
        self.log.clear()
        self.requests = 0
        self._changes.changed()

    def fired(self, fault: str | None = None) -> int:
        """How many faults (of kind ``fault``) were applied."""
        return sum(1 for r in self.log if fault is None or r.fault == fault)

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``condition()`` holds, re-checked after each request and fault."""
        await self._changes.wait_for(condition, timeout)

    def _take(self, index: int, rule: Rule) -> bool:
        state = self._rules.setdefault(index, _RuleState())
        if rule.count is not None and state.fired >= rule.count:
            return False
        state.fired += 1
        return True

    def _record(self, index: int, rule: Rule, req: _Request, detail: str = "") -> None:
        self.log.append(
            ServerFaultRecord(
                rule=index,
                fault=rule.fault.kind,
                method=req.method,
                path=req.path,
                detail=detail,
                at=time.monotonic(),
            )
        )
        self._changes.changed()

    # ------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not scope["path"].startswith(
            _FAULTED_PREFIX
        ):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        self.requests += 1
        self._changes.changed()
        rules = self.plan.for_layer("server")
        if not rules:
            await self.app(scope, receive, send)
            return
        req = _Request(scope)
        conn = _Connection(send, receive, self.app.shutting_down)
        fired: list[tuple[int, Rule]] = []
        positional: list[tuple[int, Rule]] = []
        for index, rule in rules:
            if not req.matches(rule.match):
                continue
            if rule.positional:
                positional.append((index, rule))
            elif (
                self._triggered(index, rule, req)
                and self._applicable(rule, req)
                and self._take(index, rule)
            ):
                fired.append((index, rule))

        lost_ack: tuple[int, Rule] | None = None
        for index, rule in fired:
            fault = rule.fault
            if isinstance(fault, Delay):
                rng = self.plan.rng("server", index, "delay", self._rules[index].fired)
                jitter = rng.uniform(-fault.jitter_ms, fault.jitter_ms)
                ms = max(0.0, fault.ms + jitter)
                self._record(index, rule, req, f"{ms:.1f} ms")
                await asyncio.sleep(ms / 1000)
            elif isinstance(fault, Trim):
                self._trim(index, rule, req, fault)
            elif isinstance(fault, Duplicate):
                scope = self._rewind(index, rule, req, fault, scope)
            elif isinstance(fault, LostAck):
                lost_ack = (index, rule)
        for index, rule in fired:
            kind = rule.fault.kind
            if kind in ("http_error", "drop", "stall", "crash"):
                await self._refuse(index, rule, req, conn)
                return

        reads = [
            (i, r)
            for i, r in positional
            if req.is_read and r.fault.kind in ("drop", "stall", "crash")
        ]
        appends = [
            (i, r)
            for i, r in positional
            if req.method == "POST" and r.fault.kind in ("lost_ack", "crash")
        ]
        if req.is_read and reads:
            await self._serve_read(scope, receive, conn, req, reads)
        elif lost_ack is not None or appends:
            await self._serve_append(scope, receive, conn, req, lost_ack, appends)
        else:
            await self.app(scope, receive, send)

    def _triggered(self, index: int, rule: Rule, req: _Request) -> bool:
        trigger = rule.trigger
        state = self._rules.setdefault(index, _RuleState())
        state.seen += 1
        n = state.seen_by_path[req.path] = state.seen_by_path.get(req.path, 0) + 1
        if isinstance(trigger, OnRequest):
            return trigger.hits(state.seen)
        if isinstance(trigger, OnResume):
            return req.is_resume
        if isinstance(trigger, Probability):
            return self.plan.rng("server", index, req.path, n).random() < trigger.p
        return True  # always

    def _applicable(self, rule: Rule, req: _Request) -> bool:
        """Whether the fault can do anything to this request (else it is not spent on it)."""
        if isinstance(rule.fault, Duplicate):
            return req.is_resume
        return True

    # ------------------------------------------------------------ before serving

    def _trim(self, index: int, rule: Rule, req: _Request, fault: Trim) -> None:
        try:
            floor = self.store.trim(req.path, fault.keep_last)
        except ProtocolError as exc:
            self._record(index, rule, req, f"not trimmed: {exc.message}")
            return
        state = self.store.require(req.path)
        self._record(
            index, rule, req, f"kept the last {fault.keep_last}; floor {state.offset(floor)}"
        )

    def _rewind(
        self, index: int, rule: Rule, req: _Request, fault: Duplicate, scope: Scope
    ) -> Scope:
        state = self.store.get(req.path)
        if state is None or req.offset is None:
            return scope
        try:
            position = self.store.parse_read_offset(state, req.offset)
        except ProtocolError:
            return scope  # the application answers the bad offset
        ends = [r.end for r in self.store.read(state, 0, _EVERYTHING).records if r.end <= position]
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
        self._record(index, rule, req, f"offset {req.offset} served from {state.offset(back)}")
        return {**scope, "query_string": urlencode(query).encode("latin-1")}

    async def _refuse(self, index: int, rule: Rule, req: _Request, conn: _Connection) -> None:
        fault = rule.fault
        self._record(index, rule, req)
        if isinstance(fault, HttpError):
            headers = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]
            if fault.retry_after is not None:
                headers.append(("Retry-After", str(fault.retry_after)))
            await _respond(conn.send, fault.status, headers, (fault.message + "\n").encode())
            return
        if isinstance(fault, Drop):
            await conn.drop("reset" if fault.how == "reset" else "fin")
            await conn.wait_gone()
            return
        if fault.kind == "crash":
            _crash()
        # stall: send nothing, keep the connection until the client leaves
        conn.cut = True
        await conn.wait_gone()

    # ------------------------------------------------------------ reads

    def _events_before(self, state: StreamState, position: int) -> int:
        """Events in the stream up to ``position`` (among retained appends)."""
        return sum(
            r.count for r in self.store.read(state, 0, _EVERYTHING).records if r.end <= position
        )

    def _window(self, state: StreamState, start: int, end: int) -> list[Record]:
        return [r for r in self.store.read(state, start, _EVERYTHING).records if r.end <= end]

    def _cut_point(
        self,
        positional: list[tuple[int, Rule]],
        records: list[Record],
        start: int,
        events_before: int,
    ) -> tuple[int, Rule, int] | None:
        """The earliest rule that lands inside ``records``: (rule index, rule, events to keep)."""
        total = sum(r.count for r in records)
        best: tuple[int, Rule, int] | None = None
        for index, rule in positional:
            trigger = rule.trigger
            keep: int | None = None
            if isinstance(trigger, AfterEvent):
                if trigger.n == 0 and events_before == 0 and total:
                    keep = 0
                elif events_before < trigger.n <= events_before + total:
                    keep = trigger.n - events_before
            elif isinstance(trigger, AtOffset):
                target = trigger.position
                if start < target:
                    kept = 0
                    for record in records:
                        kept += record.count
                        if record.end >= target:
                            keep = kept
                            break
            if keep is None:
                continue
            state = self._rules.get(index)
            if rule.count is not None and state is not None and state.fired >= rule.count:
                continue
            if best is None or keep < best[2]:
                best = (index, rule, keep)
        return best

    @staticmethod
    def _split(records: list[Record], keep: int, is_json: bool) -> tuple[list[bytes], int | None]:
        """The first ``keep`` events of ``records`` (compact JSON messages, or raw
        appends) and the position right after them if that is an append boundary."""
        pieces: list[bytes] = []
        boundary: int | None = None
        for record in records:
            if len(pieces) >= keep:
                break
            if is_json:
                items = [
                    json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode()
                    for item in json_items(record)
                ]
            else:
                items = [record.data]
            room = keep - len(pieces)
            pieces.extend(items[:room])
            boundary = record.end if room >= len(items) else None
        return pieces, boundary

    async def _serve_read(
        self,
        scope: Scope,
        receive: Receive,
        conn: _Connection,
        req: _Request,
        positional: list[tuple[int, Rule]],
    ) -> None:
        state = self.store.get(req.path)
        position: int | None = None
        if state is not None and not state.soft_deleted:
            try:
                position = self.store.parse_read_offset(state, _Request(scope).offset)
            except ProtocolError:
                position = None
        if state is None or position is None:
            await self.app(scope, receive, conn.send)
            return
        cutter = _ReadCutter(self, state, position, conn, req, positional)
        await self.app(scope, receive, cutter.send)
        if conn.cut:
            await conn.wait_gone()
        elif cutter.held_start is not None:
            # The application ended without a body (cannot happen for reads; be safe).
            await conn.send(cutter.held_start)

    async def _apply_at_point(
        self, index: int, rule: Rule, req: _Request, conn: _Connection, detail: str
    ) -> Literal["reset", "fin", "end", "stall"]:
        """Record a point fault and say what to do with the connection."""
        self._take(index, rule)
        self._record(index, rule, req, detail)
        fault = rule.fault
        if fault.kind == "crash":
            await conn.flush()
            _crash()
        if isinstance(fault, Drop):
            return fault.how
        if isinstance(fault, LostAck):
            return fault.how
        return "stall"

    # ------------------------------------------------------------ WebSocket

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.requests += 1
        self._changes.changed()
        rules = self.plan.for_layer("server")
        req = _Request(scope)
        conn = _Connection(send, receive, self.app.shutting_down)
        fired: list[tuple[int, Rule]] = []
        positional: list[tuple[int, Rule]] = []
        for index, rule in rules:
            if not req.matches(rule.match):
                continue
            if rule.positional:
                if rule.fault.kind in ("drop", "stall", "ws_close", "crash"):
                    positional.append((index, rule))
            elif (
                self._triggered(index, rule, req)
                and rule.fault.kind in ("delay", "http_error", "drop", "stall", "ws_close", "crash")
                and self._take(index, rule)
            ):
                fired.append((index, rule))
        close_on_accept: WsClose | None = None
        for index, rule in fired:
            fault = rule.fault
            self._record(index, rule, req)
            if isinstance(fault, Delay):
                rng = self.plan.rng("server", index, "delay", self._rules[index].fired)
                jitter = rng.uniform(-fault.jitter_ms, fault.jitter_ms)
                await asyncio.sleep(max(0.0, fault.ms + jitter) / 1000)
            elif isinstance(fault, WsClose):
                close_on_accept = fault
            elif fault.kind == "crash":
                _crash()
            else:
                await self._refuse_handshake(scope, conn, fault)
                return
        cutter = _WsCutter(self, req, conn, positional, close_on_accept)
        await self.app(scope, cutter.receive, cutter.send)
        if conn.cut:
            await conn.wait_gone()

    async def _refuse_handshake(self, scope: Scope, conn: _Connection, fault: Any) -> None:
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

    # ------------------------------------------------------------ appends

    async def _serve_append(
        self,
        scope: Scope,
        receive: Receive,
        conn: _Connection,
        req: _Request,
        lost_ack: tuple[int, Rule] | None,
        positional: list[tuple[int, Rule]],
    ) -> None:
        state = self.store.get(req.path)
        tail_before = state.tail if state is not None else 0
        records_before = len(state.records) if state is not None else 0
        events_before = (
            self._events_before(state, tail_before)
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
            point = self._cut_point(positional, new, tail_before, events_before)
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
            how = await self._apply_at_point(index, rule, req, conn, detail)
        else:
            self._record(index, rule, req, detail)
            assert isinstance(rule.fault, LostAck)
            how = rule.fault.how
        await conn.drop("reset" if how == "reset" else "fin")
        await conn.wait_gone()


def _crash() -> None:
    """``kill -9`` this process: no cleanup, no flush, like a power cut for the process."""
    os.kill(os.getpid(), signal.SIGKILL)


class _ReadCutter:
    """The ``send`` of a read: passes the response through until a positional
    rule lands inside it, then cuts it right there."""

    def __init__(
        self,
        faults: ServerFaults,
        state: StreamState,
        position: int,
        conn: _Connection,
        req: _Request,
        positional: list[tuple[int, Rule]],
    ) -> None:
        self.faults = faults
        self.state = state
        self.position = position
        self.conn = conn
        self.req = req
        self.positional = positional
        self.events_before = faults._events_before(state, position)
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

    # ---------------------------------------------------------------- SSE

    async def _sse_body(self, message: Message) -> None:
        chunk: bytes = message.get("body", b"")
        if not chunk or not self.positional:
            await self.conn.send(message)
            return
        events = [e for e in chunk.split(b"\n\n") if e]
        sent: list[bytes] = []
        i = 0
        while i < len(events):
            event = events[i]
            kind = event.split(b"\n", 1)[0].removeprefix(b"event:").strip()
            if kind == b"control":
                self._advance(event)
                sent.append(event + b"\n\n")
                i += 1
                continue
            # A data event: the control event after it says where it ends.
            end = self._control_offset(events[i + 1]) if i + 1 < len(events) else None
            if end is None:
                sent.append(event + b"\n\n")
                i += 1
                continue
            records = self.faults._window(self.state, self.position, end)
            point = self.faults._cut_point(
                self.positional, records, self.position, self.events_before
            )
            if point is None:
                sent.append(event + b"\n\n")
                i += 1
                continue
            index, rule, keep = point
            pieces, boundary = ServerFaults._split(records, keep, self.is_json)
            trigger = rule.trigger
            with_control = boundary is not None and (
                not isinstance(trigger, AfterEvent) or trigger.control
            )
            if pieces:
                sent.append(self._data_event(pieces))
                if with_control and boundary is not None:
                    sent.append(self._control_event(boundary))
            n = self.events_before + len(pieces)
            detail = f"SSE cut after event {n}" + ("" if with_control else ", control withheld")
            if sent:
                await self.conn.send(
                    {"type": "http.response.body", "body": b"".join(sent), "more_body": True}
                )
            how = await self.faults._apply_at_point(index, rule, self.req, self.conn, detail)
            await self._finish(how)
            return
        await self.conn.send({**message, "body": b"".join(sent)})

    def _control_offset(self, event: bytes) -> int | None:
        lines = event.split(b"\n")
        if lines[0].removeprefix(b"event:").strip() != b"control":
            return None
        data = b"".join(line.removeprefix(b"data:") for line in lines[1:])
        try:
            offset = json.loads(data)[P.SSE_NEXT_OFFSET]
            return self.faults.store.parse_read_offset(self.state, str(offset))
        except (ValueError, KeyError, ProtocolError):
            return None

    def _advance(self, control: bytes) -> None:
        end = self._control_offset(control)
        if end is not None and end > self.position:
            records = self.faults._window(self.state, self.position, end)
            self.events_before += sum(r.count for r in records)
            self.position = end

    def _data_event(self, pieces: list[bytes]) -> bytes:
        if self.is_json:
            text = "[" + ",".join(p.decode() for p in pieces) + "]"
        elif P.is_text_compatible(self.state.content_type):
            text = b"".join(pieces).decode("utf-8")
        else:
            text = base64.b64encode(b"".join(pieces)).decode()
        return _sse_event("data", text)

    def _control_event(self, end: int) -> bytes:
        state = self.state
        closed = state.closed and end == state.tail
        data: dict[str, Any] = {P.SSE_NEXT_OFFSET: state.offset(end)}
        if closed:
            data[P.SSE_CLOSED] = True
        else:
            data[P.SSE_CURSOR] = cursor_for(None)
            if end == state.tail:
                data[P.SSE_UP_TO_DATE] = True
        return _sse_event("control", json.dumps(data, separators=(",", ":")))

    async def _finish(self, how: Literal["reset", "fin", "end", "stall"]) -> None:
        if how == "end":
            self.done = True
            await self.conn.send({"type": "http.response.body", "body": b"", "more_body": False})
        elif how == "stall":
            self.conn.cut = True
        else:
            await self.conn.drop(how)

    # ---------------------------------------------------------------- catch-up / long-poll

    async def _plain_body(self, message: Message) -> None:
        start, self.held_start = self.held_start, None
        if start is None:
            await self.conn.send(message)
            return
        body: bytes = message.get("body", b"")
        headers: list[tuple[bytes, bytes]] = list(start.get("headers", []))
        next_offset = dict(headers).get(P.STREAM_NEXT_OFFSET.lower().encode())
        point = None
        records: list[Record] = []
        if next_offset is not None and not message.get("more_body", False):
            try:
                end = self.faults.store.parse_read_offset(self.state, next_offset.decode())
            except ProtocolError:
                end = None
            if end is not None:
                records = self.faults._window(self.state, self.position, end)
                point = self.faults._cut_point(
                    self.positional, records, self.position, self.events_before
                )
        if point is None:
            await self.conn.send(start)
            await self.conn.send(message)
            return
        index, rule, keep = point
        pieces, boundary = ServerFaults._split(records, keep, self.is_json)
        n = self.events_before + len(pieces)
        total = sum(r.count for r in records)
        fault = rule.fault
        if keep == 0:
            boundary = self.position  # ending before the first event: an empty response
        if isinstance(fault, Drop) and fault.how == "end" and boundary is not None:
            # A complete, shorter response, and the connection closes after it.
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
            await self.faults._apply_at_point(
                index, rule, self.req, self.conn, f"response ended after event {n}"
            )
            self.done = True
            await self.conn.send({**start, "headers": kept})
            await self.conn.send({"type": "http.response.body", "body": payload})
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
        how = await self.faults._apply_at_point(index, rule, self.req, self.conn, detail)
        await self._finish("fin" if how == "end" else how)


class _WsCutter:
    """The ``receive`` and ``send`` of a WebSocket: follows which stream each
    subscription reads, and cuts right after event *N* of a ``data`` frame."""

    def __init__(
        self,
        faults: ServerFaults,
        req: _Request,
        conn: _Connection,
        positional: list[tuple[int, Rule]],
        close_on_accept: WsClose | None,
    ) -> None:
        self.faults = faults
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
        from .._ws import stream_path

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
        store = self.faults.store
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
        before_end = [r for r in store.read(state, 0, _EVERYTHING).records if r.end <= end]
        window: list[Record] = []
        count = 0
        while before_end and count < len(messages):
            record = before_end.pop()
            window.insert(0, record)
            count += record.count
        start = before_end[-1].end if before_end else state.trimmed_to
        events_before = sum(r.count for r in before_end)
        point = self.faults._cut_point(self.positional, window, start, events_before)
        if point is None:
            await self.conn.send(message)
            return
        index, rule, keep = point
        pieces, boundary = ServerFaults._split(window, keep, P.is_json(state.content_type))
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
        self.faults._take(index, rule)
        self.faults._record(index, rule, self.req, detail)
        fault = rule.fault
        if isinstance(fault, WsClose):
            await self._close(fault.code, fault.reason)
        elif isinstance(fault, Drop):
            if fault.how == "end":
                await self._close(1000)
            else:
                await self.conn.drop(fault.how)
        elif fault.kind == "crash":
            await self.conn.flush()
            _crash()
        else:
            self.conn.cut = True  # stall
