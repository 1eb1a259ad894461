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

Every fault fires once. ``offline()``/``online()`` close and reopen the
listening socket (new connections are refused in between) and cut the
connections that are open.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
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
class _Request:
    method: str
    target: str
    fault: Fault | None


class _Cut(Exception):
    """Raised inside a pipe to cut the connection."""


class Proxy:
    """A proxy in front of ``upstream`` (a base URL); ``url`` is its own base URL."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._port = 0
        self._open: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

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

    def add(self, fault: Fault) -> Fault:
        """Schedule ``fault``; returns it (its ``fired`` event is set when it hits)."""
        self.faults.append(fault)
        return fault

    def _fault_for(self, method: str, target: str) -> Fault | None:
        for fault in self.faults:
            if fault.fired.is_set() or not fault.matches(method, target):
                continue
            fault.seen += 1
            if fault.seen == fault.nth:
                return fault
        return None

    # --- connection handling -------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._open.add(task)
        self._writers.add(writer)
        self.connections += 1
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, upstream_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
            self._writers.add(upstream_writer)
            pending: asyncio.Queue[_Request] = asyncio.Queue()
            to_server = asyncio.ensure_future(self._requests(reader, upstream_writer, pending))
            to_client = asyncio.ensure_future(self._responses(up_reader, writer, pending))
            done, rest = await asyncio.wait(
                {to_server, to_client}, return_when=asyncio.FIRST_COMPLETED
            )
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
        finally:
            for w in (writer, upstream_writer):
                if w is not None:
                    self._writers.discard(w)
                    w.transport.abort()
            self._open.discard(task)

    async def _requests(
        self,
        reader: asyncio.StreamReader,
        upstream: asyncio.StreamWriter,
        pending: asyncio.Queue[_Request],
    ) -> None:
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
            await pending.put(_Request(method, target, fault))
            upstream.write(head)
            await _pipe_body(reader, upstream, headers, method=method, status=None)
            await upstream.drain()

    async def _responses(
        self,
        up_reader: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        pending: asyncio.Queue[_Request],
    ) -> None:
        while True:
            head = await _read_head(up_reader)
            if head is None:
                return
            request = await pending.get()
            status, headers = _parse_response_head(head)
            if status < 200:
                client.write(head)
                await client.drain()
                await pending.put(request)  # the final answer is still to come
                continue
            fault = request.fault
            if fault is not None and fault.lose_response:
                fault.fired.set()
                raise _Cut()
            client.write(head)
            await client.drain()
            await _pipe_body(
                up_reader, client, headers, method=request.method, status=status, fault=fault
            )


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
