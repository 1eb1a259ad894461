"""A small HTTP/1.1-aware TCP proxy that injects faults at exact points.

Test support, not product code. It sits between the client and a server on
loopback, forwards bytes both ways, and follows HTTP/1.1 message framing
(Content-Length, chunked, HEAD/204/304 without body) so it knows where each
request and response starts and ends, even on a kept-alive connection. Faults
are data: a :class:`Fault` names which request it hits (method, path,
SSE or not, the n-th match) and what happens:

- ``after_events=N``: forward the first N complete SSE events of the response
  (``event: data`` and ``event: control`` both count), then cut the connection;
- ``after_bytes=N``: forward N bytes of the response body, then cut;
- ``lose_response=True``: forward the request, let the server answer, and cut
  the connection before the client sees any of the answer;
- ``drop_request=True``: cut the connection before the request reaches the server.

A connection upgraded to WebSocket (``101``) is followed frame by frame, and
a :class:`WsFault` names frames (by direction and by a substring of their
text, unmasked) and what happens:

- ``after=N``: forward the first N matching frames, then cut (``0``: right
  after the handshake);
- ``before=N``: cut when the N-th matching frame arrives, without forwarding
  it (a lost ``ack``; an ``append`` that never reaches the server);
- ``after_bytes=N``: forward N bytes of that direction, then cut (mid-frame).

Every fault fires once. ``offline()``/``online()`` close and reopen the
listening socket (new connections are refused in between) and cut the
connections that are open. ``freeze_all()`` makes the open connections
half-open: nothing is forwarded either way any more and nothing is closed
(not even when the server gives up), until the client closes its side.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit


@dataclass
class Fault:
    """One scripted fault (see the module docstring)."""

    method: str | None = None
    path_contains: str | None = None
    sse: bool | None = None
    nth: int = 1
    after_events: int | None = None
    after_bytes: int | None = None
    lose_response: bool = False
    drop_request: bool = False
    seen: int = field(default=0, init=False)
    fired: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    def matches(self, method: str, target: str) -> bool:
        if self.method is not None and method.upper() != self.method.upper():
            return False
        if self.path_contains is not None and self.path_contains not in target:
            return False
        return not (self.sse is not None and ("live=sse" in target) != self.sse)


@dataclass
class WsFault:
    """One scripted fault on WebSocket frames (see the module docstring)."""

    direction: Literal["down", "up"] = "down"
    contains: str | None = None
    after: int | None = None
    before: int | None = None
    after_bytes: int | None = None
    seen: int = field(default=0, init=False)
    fired: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    def matches(self, direction: str, opcode: int, payload: bytes) -> bool:
        if self.direction != direction or opcode not in (0x1, 0x2):
            return False
        return self.contains is None or self.contains.encode() in payload


@dataclass
class _Request:
    method: str
    target: str
    fault: Fault | None
    upgraded: asyncio.Future[bool] | None = None  # set for an Upgrade: websocket request


@dataclass(eq=False)
class _Conn:
    client_reader: asyncio.StreamReader
    client: asyncio.StreamWriter
    upstream_reader: asyncio.StreamReader | None = None
    upstream: asyncio.StreamWriter | None = None
    pipes: tuple[asyncio.Future[None], ...] = ()
    frozen: bool = False


class _Cut(Exception):
    """Raised inside a pipe to cut the connection."""


class Proxy:
    """A proxy in front of ``upstream`` (a base URL); ``url`` is its own base URL."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.faults: list[Fault | WsFault] = []
        self.requests: list[tuple[str, str]] = []
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._port = 0
        self._open: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._conns: set[_Conn] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    async def __aenter__(self) -> Proxy:
        await self.online()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def online(self) -> None:
        """Listen (again, on the same port)."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self._port, reuse_address=True
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def offline(self) -> None:
        """Stop listening and cut every open connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self.cut_all()
        if server is not None:
            await server.wait_closed()

    def cut_all(self) -> None:
        """Cut every open connection now."""
        for writer in list(self._writers):
            writer.transport.abort()

    async def close(self) -> None:
        await self.offline()
        for task in list(self._open):
            task.cancel()
        for task in list(self._open):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def freeze_all(self) -> None:
        """Make every open connection half-open: forward nothing more, close nothing."""
        for conn in list(self._conns):
            conn.frozen = True
            for pipe in conn.pipes:
                pipe.cancel()

    def add(self, fault: Fault | WsFault) -> Fault | WsFault:
        """Schedule ``fault``; returns it (its ``fired`` event is set when it hits)."""
        self.faults.append(fault)
        return fault

    def _fault_for(self, method: str, target: str) -> Fault | None:
        for fault in self.faults:
            if (
                not isinstance(fault, Fault)
                or fault.fired.is_set()
                or not fault.matches(method, target)
            ):
                continue
            fault.seen += 1
            if fault.seen == fault.nth:
                return fault
        return None

    def _ws_faults(self) -> list[WsFault]:
        return [f for f in self.faults if isinstance(f, WsFault) and not f.fired.is_set()]

    # --- connection handling -------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._open.add(task)
        self._writers.add(writer)
        self.connections += 1
        conn = _Conn(reader, writer)
        try:
            up_reader, upstream_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
            conn.upstream_reader, conn.upstream = up_reader, upstream_writer
            self._writers.add(upstream_writer)
            self._conns.add(conn)
            pending: asyncio.Queue[_Request] = asyncio.Queue()
            to_server = asyncio.ensure_future(self._requests(conn, pending))
            to_client = asyncio.ensure_future(self._responses(conn, pending))
            conn.pipes = (to_server, to_client)
            done, rest = await asyncio.wait(
                {to_server, to_client}, return_when=asyncio.FIRST_COMPLETED
            )
            if conn.frozen:
                await _blackhole(conn)
                return
            failed = any(t.exception() is not None for t in done)
            if to_client in done or failed:
                for other in rest:
                    other.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await other
            else:
                # The client finished sending (half-close); let the answer through.
                with contextlib.suppress(Exception):
                    await to_client
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # the proxy closed: this connection task simply ends
        finally:
            self._conns.discard(conn)
            for w in (writer, conn.upstream):
                if w is not None:
                    self._writers.discard(w)
                    w.transport.abort()
            self._open.discard(task)

    async def _requests(self, conn: _Conn, pending: asyncio.Queue[_Request]) -> None:
        reader, upstream = conn.client_reader, conn.upstream
        assert upstream is not None
        while True:
            head = await _read_head(reader)
            if head is None:
                return
            method, target, headers = _parse_request_head(head)
            self.requests.append((method, target))
            fault = self._fault_for(method, target)
            if fault is not None and fault.drop_request:
                fault.fired.set()
                raise _Cut()
            request = _Request(method, target, fault)
            if headers.get("upgrade", "").lower() == "websocket":
                request.upgraded = asyncio.get_running_loop().create_future()
            await pending.put(request)
            upstream.write(head)
            await _pipe_body(reader, upstream, headers, method=method, status=None)
            await upstream.drain()
            if request.upgraded is not None and await request.upgraded:
                await self._pipe_ws(reader, upstream, "up")
                return

    async def _responses(self, conn: _Conn, pending: asyncio.Queue[_Request]) -> None:
        up_reader, client = conn.upstream_reader, conn.client
        assert up_reader is not None
        while True:
            head = await _read_head(up_reader)
            if head is None:
                return
            request = await pending.get()
            status, headers = _parse_response_head(head)
            if status == 101 and request.upgraded is not None:
                client.write(head)
                await client.drain()
                request.upgraded.set_result(True)
                for ws_fault in self._ws_faults():
                    if ws_fault.direction == "down" and ws_fault.after == 0:
                        ws_fault.fired.set()
                        raise _Cut()
                await self._pipe_ws(up_reader, client, "down")
                return
            if status < 200:
                client.write(head)
                await client.drain()
                await pending.put(request)  # the final answer is still to come
                continue
            if request.upgraded is not None:
                request.upgraded.set_result(False)  # refused: plain HTTP goes on
            fault = request.fault
            if fault is not None and fault.lose_response:
                fault.fired.set()
                raise _Cut()
            client.write(head)
            await client.drain()
            await _pipe_body(
                up_reader, client, headers, method=request.method, status=status, fault=fault
            )

    async def _pipe_ws(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: Literal["down", "up"],
    ) -> None:
        """Forward WebSocket frames one by one, applying the :class:`WsFault` rules."""
        sent = 0
        while True:
            try:
                raw, opcode, payload = await _read_ws_frame(reader)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise
                return
            cut_after = False
            for fault in self._ws_faults():
                if fault.direction != direction:
                    continue
                if fault.after_bytes is not None and sent + len(raw) > fault.after_bytes:
                    writer.write(raw[: fault.after_bytes - sent])
                    await writer.drain()
                    fault.fired.set()
                    raise _Cut()
                if not fault.matches(direction, opcode, payload):
                    continue
                fault.seen += 1
                if fault.seen == fault.before:
                    fault.fired.set()
                    raise _Cut()
                if fault.seen == fault.after:
                    fault.fired.set()
                    cut_after = True
            writer.write(raw)
            await writer.drain()
            sent += len(raw)
            if cut_after:
                raise _Cut()


async def _blackhole(conn: _Conn) -> None:
    """A frozen connection: read and drop both ways until the client closes."""

    async def drain(reader: asyncio.StreamReader | None) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while reader is not None and await reader.read(65536):
                pass

    server_side = asyncio.ensure_future(drain(conn.upstream_reader))
    try:
        await drain(conn.client_reader)
    finally:
        server_side.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server_side


async def _read_ws_frame(reader: asyncio.StreamReader) -> tuple[bytes, int, bytes]:
    """One WebSocket frame: its raw bytes, its opcode and its (unmasked) payload."""
    head = await reader.readexactly(2)
    opcode = head[0] & 0x0F
    length = head[1] & 0x7F
    extended = b""
    if length == 126:
        extended = await reader.readexactly(2)
        length = int.from_bytes(extended, "big")
    elif length == 127:
        extended = await reader.readexactly(8)
        length = int.from_bytes(extended, "big")
    mask = await reader.readexactly(4) if head[1] & 0x80 else b""
    payload = await reader.readexactly(length)
    raw = head + extended + mask + payload
    if mask and payload:
        key = (mask * (length // 4 + 1))[:length]
        payload = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(
            length, "big"
        )
    return raw, opcode, payload


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None


def _parse_headers(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


def _parse_request_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    method, target, _ = lines[0].decode("latin-1").split(" ", 2)
    return method, target, _parse_headers(lines[1:])


def _parse_response_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    return status, _parse_headers(lines[1:])


class _BodyWatch:
    """Counts forwarded body bytes and complete SSE events; says where to cut."""

    def __init__(self, fault: Fault | None, sse: bool) -> None:
        self.fault = (
            fault
            if fault is not None
            and (fault.after_bytes is not None or (fault.after_events is not None and sse))
            else None
        )
        self.bytes = 0
        self.events = 0
        self._newline = False

    def allowance(self, payload: bytes) -> int | None:
        """How many bytes of ``payload`` may pass before the cut (``None``: all)."""
        fault = self.fault
        if fault is None:
            return None
        if fault.after_bytes is not None:
            left = fault.after_bytes - self.bytes
            if left < len(payload):
                return max(0, left)
            self.bytes += len(payload)
            return None
        assert fault.after_events is not None
        if self.events >= fault.after_events:
            return 0
        for i, byte in enumerate(payload):
            if byte == 0x0A:  # "\n"
                if self._newline:
                    self.events += 1
                    self._newline = False
                    if self.events >= fault.after_events:
                        return i + 1
                else:
                    self._newline = True
            elif byte != 0x0D:
                self._newline = False
        return None


async def _pipe_body(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    headers: dict[str, str],
    *,
    method: str,
    status: int | None,
    fault: Fault | None = None,
) -> None:
    """Forward one message body, following its framing; apply ``fault``."""
    if status is not None and (method == "HEAD" or status in (204, 304)):
        return
    sse = headers.get("content-type", "").startswith("text/event-stream")
    watch = _BodyWatch(fault, sse)

    async def forward(payload: bytes, framing: bytes = b"", trailer: bytes = b"") -> None:
        allowed = watch.allowance(payload)
        if allowed is not None:
            writer.write(framing + payload[:allowed])
            await writer.drain()
            assert fault is not None
            fault.fired.set()
            raise _Cut()
        writer.write(framing + payload + trailer)
        await writer.drain()

    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                trailer = await reader.readuntil(b"\r\n")
                while trailer != b"\r\n":
                    writer.write(trailer)
                    trailer = await reader.readuntil(b"\r\n")
                writer.write(size_line + b"\r\n")
                await writer.drain()
                return
            chunk = await reader.readexactly(size)
            await reader.readexactly(2)
            await forward(chunk, framing=size_line, trailer=b"\r\n")
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            data = await reader.read(min(left, 65536))
            if not data:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(data)
            await forward(data)
    elif status is not None:
        # No framing: the body runs until the server closes the connection.
        while data := await reader.read(65536):
            await forward(data)
        raise _Cut()
