"""Scripted faults on HTTP messages and WebSocket frames, and the follower that finds them.

The proxy copies bytes; to hit *the answer to the third POST* or *the first
``ack`` frame* it has to know where messages start and end. A
:class:`MessageFollower` (one per connection, no I/O) is fed each chunk the
proxy reads and says what to forward and whether to cut the connection
there. It follows HTTP/1.1 framing (``Content-Length``, chunked, HEAD, 204
and 304 without a body, 1xx) on kept-alive connections, and after a ``101``
WebSocket frames both ways. A connection whose first bytes are not an HTTP
request (or that stops making sense as HTTP) is forwarded as plain bytes.

An :class:`HttpFault` names a request (method, path, SSE or not, the n-th
match) and what happens to it:

- ``after_events=N``: forward the first N complete SSE events of the response
  (``event: data`` and ``event: control`` both count), then cut the connection;
- ``after_bytes=N``: forward N bytes of the response body, then cut;
- ``lose_response=True``: forward the request, let the server answer, and cut
  the connection before the client sees any of the answer;
- ``drop_request=True``: cut the connection before the request reaches the server.

A :class:`WsFault` names frames (by direction and by a substring of their
text, unmasked) and what happens:

- ``after=N``: forward the first N matching frames, then cut (``0``: right
  after the handshake);
- ``before=N``: cut when the N-th matching frame arrives, without forwarding
  it (a lost ``ack``; an ``append`` that never reaches the server);
- ``after_bytes=N``: forward N bytes of that direction, then cut (mid-frame).

Every scripted fault fires once, and counts matches over all the proxy's
connections; its ``fired`` event is set when it hits.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["HttpFault", "MessageFollower", "Script", "WsFault"]

Direction = Literal["up", "down"]

_MAX_HEAD = 64 * 1024
_METHOD = re.compile(rb"[A-Z]{1,16} ")


@dataclass
class HttpFault:
    """One scripted fault on an HTTP request or its response (see the module docstring)."""

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

    direction: Direction = "down"
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


class Script:
    """A proxy's scripted faults, and the requests it has seen (method, target)."""

    def __init__(self) -> None:
        self.faults: list[HttpFault | WsFault] = []
        self.requests: list[tuple[str, str]] = []

    def fault_for(self, method: str, target: str) -> HttpFault | None:
        """The fault this request is the n-th match of, if any (counts the match)."""
        for fault in self.faults:
            if (
                not isinstance(fault, HttpFault)
                or fault.fired.is_set()
                or not fault.matches(method, target)
            ):
                continue
            fault.seen += 1
            if fault.seen == fault.nth:
                return fault
        return None

    def ws_faults(self, direction: Direction) -> list[WsFault]:
        return [
            f
            for f in self.faults
            if isinstance(f, WsFault) and not f.fired.is_set() and f.direction == direction
        ]


@dataclass
class _Request:
    method: str
    target: str
    fault: HttpFault | None
    upgrade: bool


class _Cut(Exception):
    """Inside the follower: forward what is ready, then cut the connection."""


class _Body:
    """Counts forwarded body bytes and complete SSE events; says where to cut."""

    def __init__(self, fault: HttpFault | None, sse: bool) -> None:
        wanted = fault is not None and (
            fault.after_bytes is not None or (fault.after_events is not None and sse)
        )
        self.fault = fault if wanted else None
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


class _Side:
    """What one direction of the connection is in the middle of."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        # head: waiting for a message head; length/chunk/chunk-end/until-close: in a body;
        # upgrade: the client asked for a WebSocket and waits for the answer; ws: frames.
        self.state = "head"
        self.left = 0  # body bytes still to come (length, chunk)
        self.body: _Body | None = None
        self.ws_sent = 0  # WebSocket bytes forwarded this way


class MessageFollower:
    """Follows one proxied connection's messages and applies a :class:`Script` (no I/O)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.raw = False  # not (or no longer) HTTP: forward as is
        self.detected = False
        self._pending: deque[_Request] = deque()
        self._sides: dict[Direction, _Side] = {"up": _Side(), "down": _Side()}

    @property
    def awaiting_upgrade(self) -> bool:
        """The client asked for a WebSocket; its bytes wait until the answer is known."""
        return not self.raw and self._sides["up"].state == "upgrade"

    def feed(self, direction: Direction, data: bytes) -> tuple[bytes, bool]:
        """Take ``data`` read from one side: (bytes to forward now, cut after them)."""
        side = self._sides[direction]
        if self.raw:
            if side.buffer:  # held before the connection turned out not to be HTTP
                data, side.buffer = bytes(side.buffer) + data, bytearray()
            return data, False
        side.buffer += data
        out = bytearray()
        try:
            if not self.detected:
                self._detect(direction)
            while not self.raw and self._step(direction, side, out):
                pass
        except _Cut:
            return bytes(out), True
        if self.raw:  # everything held goes through as is
            out += side.buffer
            side.buffer.clear()
        return bytes(out), False

    def flush(self, direction: Direction) -> bytes:
        """What is held from ``direction`` (its side has ended: forward it as is)."""
        side = self._sides[direction]
        held, side.buffer = bytes(side.buffer), bytearray()
        return held

    # ------------------------------------------------------------ framing

    def _detect(self, direction: Direction) -> None:
        """HTTP if the client speaks first, with a method (clients write a request
        line at once); anything else is plain bytes for the life of the connection."""
        self.detected = True
        self.raw = direction == "down" or not _METHOD.match(self._sides["up"].buffer)

    def _step(self, direction: Direction, side: _Side, out: bytearray) -> bool:
        """Handle what the buffer holds of the current message; False when it needs more."""
        if side.state == "head":
            return self._head(direction, side, out)
        if side.state == "upgrade":
            return False
        if side.state == "ws":
            return self._frame(direction, side, out)
        if side.state in ("length", "until-close"):
            if not side.buffer:
                return False
            take = (
                len(side.buffer)
                if side.state == "until-close"
                else min(side.left, len(side.buffer))
            )
            self._forward_body(side, bytes(side.buffer[:take]), b"", b"", out)
            del side.buffer[:take]
            side.left -= take
            if side.state == "length" and side.left == 0:
                self._end_body(direction, side)
            return True
        if side.state == "chunk":
            return self._chunk(direction, side, out)
        return False

    def _head(self, direction: Direction, side: _Side, out: bytearray) -> bool:
        end = side.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(side.buffer) > _MAX_HEAD:
                self.raw = True
            return False
        head = bytes(side.buffer[: end + 4])
        lines = head[:-4].split(b"\r\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        first = lines[0].decode("latin-1").split(" ", 2)
        if direction == "up":
            if len(first) < 3 or not first[2].startswith("HTTP/1."):
                self.raw = True
                return False
            del side.buffer[: end + 4]
            self._request(side, first[0], first[1], headers, head, out)
        else:
            if len(first) < 2 or not first[0].startswith("HTTP/1.") or not first[1].isdigit():
                self.raw = True
                return False
            if not self._pending:
                self.raw = True  # an answer to nothing: not a conversation we follow
                return False
            del side.buffer[: end + 4]
            self._response(side, int(first[1]), headers, head, out)
        return True

    def _request(
        self,
        side: _Side,
        method: str,
        target: str,
        headers: dict[str, str],
        head: bytes,
        out: bytearray,
    ) -> None:
        self.script.requests.append((method, target))
        fault = self.script.fault_for(method, target)
        if fault is not None and fault.drop_request:
            fault.fired.set()
            raise _Cut
        upgrade = headers.get("upgrade", "").lower() == "websocket"
        self._pending.append(_Request(method, target, fault, upgrade))
        out += head
        self._start_body(side, headers, None, status=None, method=method)
        if side.state == "head" and upgrade:
            side.state = "upgrade"

    def _response(
        self, side: _Side, status: int, headers: dict[str, str], head: bytes, out: bytearray
    ) -> None:
        request = self._pending[0]
        if status == 101 and request.upgrade:
            self._pending.popleft()
            out += head
            side.state = "ws"
            self._sides["up"].state = "ws"
            for ws_fault in self.script.ws_faults("down"):
                if ws_fault.after == 0:
                    ws_fault.fired.set()
                    raise _Cut
            return
        if status < 200:
            out += head  # the final answer is still to come
            return
        self._pending.popleft()
        if request.upgrade and self._sides["up"].state == "upgrade":
            self._sides["up"].state = "head"  # refused: plain HTTP goes on
        fault = request.fault
        if fault is not None and fault.lose_response:
            fault.fired.set()
            raise _Cut
        out += head
        self._start_body(side, headers, fault, status=status, method=request.method)

    def _start_body(
        self,
        side: _Side,
        headers: dict[str, str],
        fault: HttpFault | None,
        *,
        status: int | None,
        method: str,
    ) -> None:
        if status is not None and (method == "HEAD" or status in (204, 304)):
            return
        sse = headers.get("content-type", "").startswith("text/event-stream")
        side.body = _Body(fault, sse)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            side.state = "chunk"
        elif "content-length" in headers:
            try:
                side.left = int(headers["content-length"])
            except ValueError:
                self.raw = True
                return
            side.state = "length" if side.left > 0 else "head"
        elif status is not None:
            side.state = "until-close"  # no framing: the body runs until the server closes

    def _end_body(self, direction: Direction, side: _Side) -> None:
        side.state = "head"
        side.body = None
        if direction == "up" and self._pending and self._pending[-1].upgrade:
            side.state = "upgrade"

    def _chunk(self, direction: Direction, side: _Side, out: bytearray) -> bool:
        line_end = side.buffer.find(b"\r\n")
        if line_end < 0:
            return False
        size_line = bytes(side.buffer[: line_end + 2])
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            self.raw = True
            return False
        if size == 0:
            # The last chunk, then trailer lines up to an empty one.
            trailer_end = side.buffer.find(b"\r\n\r\n", line_end)
            if trailer_end < 0:
                return False
            out += side.buffer[: trailer_end + 4]
            del side.buffer[: trailer_end + 4]
            self._end_body(direction, side)
            return True
        whole = line_end + 2 + size + 2
        if len(side.buffer) < whole:
            return False
        payload = bytes(side.buffer[line_end + 2 : line_end + 2 + size])
        trailer = bytes(side.buffer[whole - 2 : whole])
        del side.buffer[:whole]
        self._forward_body(side, payload, size_line, trailer, out)
        return True

    def _forward_body(
        self, side: _Side, payload: bytes, framing: bytes, trailer: bytes, out: bytearray
    ) -> None:
        allowed = side.body.allowance(payload) if side.body is not None else None
        if allowed is not None:
            out += framing + payload[:allowed]
            fault = side.body.fault if side.body is not None else None
            assert fault is not None
            fault.fired.set()
            raise _Cut
        out += framing + payload + trailer

    # ------------------------------------------------------------ WebSocket

    def _frame(self, direction: Direction, side: _Side, out: bytearray) -> bool:
        frame = _frame_size(side.buffer)
        if frame is None or len(side.buffer) < frame[0]:
            return False
        size, header, masked = frame
        raw = bytes(side.buffer[:size])
        del side.buffer[:size]
        opcode = raw[0] & 0x0F
        payload: bytes | None = None
        cut_after = False
        for fault in self.script.ws_faults(direction):
            if fault.after_bytes is not None and side.ws_sent + len(raw) > fault.after_bytes:
                out += raw[: fault.after_bytes - side.ws_sent]
                fault.fired.set()
                raise _Cut
            if payload is None and fault.contains is not None:
                payload = _unmask(raw, header, masked)
            if not fault.matches(direction, opcode, payload or b""):
                continue
            fault.seen += 1
            if fault.seen == fault.before:
                fault.fired.set()
                raise _Cut
            if fault.seen == fault.after:
                fault.fired.set()
                cut_after = True
        out += raw
        side.ws_sent += len(raw)
        if cut_after:
            raise _Cut
        return True


def _frame_size(buffer: bytearray) -> tuple[int, int, bool] | None:
    """(whole frame size, header size, masked) of the frame at the start of ``buffer``."""
    if len(buffer) < 2:
        return None
    length = buffer[1] & 0x7F
    masked = bool(buffer[1] & 0x80)
    header = 2
    if length == 126:
        if len(buffer) < 4:
            return None
        length, header = int.from_bytes(buffer[2:4], "big"), 4
    elif length == 127:
        if len(buffer) < 10:
            return None
        length, header = int.from_bytes(buffer[2:10], "big"), 10
    if masked:
        header += 4
    return header + length, header, masked


def _unmask(raw: bytes, header: int, masked: bool) -> bytes:
    payload = raw[header:]
    if not masked or not payload:
        return payload
    key = raw[header - 4 : header]
    length = len(payload)
    stream = (key * (length // 4 + 1))[:length]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(length, "big")
