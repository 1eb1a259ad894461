"""The chaos proxy: faults in front of any server, at exact points.

:class:`ChaosProxy` listens on a loopback port, opens one upstream connection
per client connection and copies bytes both ways. Two kinds of faults:

- the proxy rules of a :class:`~mock_server.chaos.plan.FaultPlan` decide, per
  connection, what goes wrong at the byte level and exactly where: a TCP
  reset or a FIN after byte *B*, a blackholed (half-open) connection, latency
  with jitter, a bandwidth cap, data sliced into small writes, or the whole
  proxy refusing connections for a while. They work for any protocol over
  TCP (HTTP, SSE, WebSocket, or none);
- scripted faults (:class:`~mock_server.chaos.HttpFault`,
  :class:`~mock_server.chaos.WsFault`, added with :meth:`ChaosProxy.add`) hit
  one HTTP message or WebSocket frame: the n-th POST's answer, the first
  ``ack`` frame, the response after its third SSE event. The proxy follows
  HTTP/1.1 and WebSocket framing to find them (:mod:`._messages`); a
  connection that does not start with an HTTP request is plain bytes.

Besides, :meth:`~ChaosProxy.offline` and :meth:`~ChaosProxy.online` stop and
restart listening, :meth:`~ChaosProxy.cut_all` cuts every open connection
and :meth:`~ChaosProxy.freeze_all` makes them half-open.

Connections are numbered from 1 in accept order. Every random choice (the
``probability`` trigger, jitter, slice sizes) comes from a generator derived
from the plan's seed, the rule and the connection number.

The proxy is also the test's eyes: it counts connections and bytes, lists
the HTTP requests it forwarded, keeps a log of the faults it applied, and
lets the test await a condition (:meth:`ChaosProxy.wait_for`) instead of
sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from ._changes import Changes
from ._messages import HttpFault, MessageFollower, Script, WsFault
from ._sockets import reset, wait_flushed
from .plan import (
    AfterBytes,
    Bandwidth,
    FaultPlan,
    Firings,
    Latency,
    OnConnection,
    Probability,
    Rule,
    Slicer,
)

__all__ = ["ChaosProxy", "ConnectionStats", "HttpFault", "ProxyFaultRecord", "WsFault"]

_CHUNK = 65536

ScriptedFault = TypeVar("ScriptedFault", HttpFault, WsFault)


@dataclass
class ConnectionStats:
    """One proxied connection: bytes each way, and how it ended."""

    number: int
    opened_at: float
    bytes_up: int = 0  # client -> server
    bytes_down: int = 0  # server -> client
    faults: list[str] = field(default_factory=list)
    closed: bool = False
    ended_by: str | None = None  # "client", "upstream", "reset", "fin", "abort", "half_open", ...


@dataclass(frozen=True)
class ProxyFaultRecord:
    """A fault the proxy applied: which rule, on which connection, at which byte."""

    rule: int
    fault: str
    connection: int
    at_byte: int | None
    direction: str | None
    at: float

    def __str__(self) -> str:
        where = f" at byte {self.at_byte} ({self.direction})" if self.at_byte is not None else ""
        return f"rule {self.rule}: {self.fault} on connection {self.connection}{where}"


@dataclass
class _Shaping:
    latency: Latency | None = None
    bandwidth: Bandwidth | None = None
    slicer: Slicer | None = None


async def flush(writer: asyncio.StreamWriter) -> None:
    """Wait until everything written has left the process and reached the peer,
    so a reset right after loses none of it (a RST discards unsent data)."""
    with contextlib.suppress(ConnectionError, OSError):
        await writer.drain()
    await wait_flushed(writer.transport)


class _Link:
    """One client connection and its upstream connection."""

    def __init__(
        self,
        proxy: ChaosProxy,
        stats: ConnectionStats,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
    ) -> None:
        self.proxy = proxy
        self.stats = stats
        self.client_reader = client_reader
        self.client_writer = client_writer
        self.upstream_reader: asyncio.StreamReader | None = None
        self.upstream_writer: asyncio.StreamWriter | None = None
        self.cuts: list[tuple[int, Rule]] = []  # armed after_bytes rules
        self.shaping: dict[str, _Shaping] = {"up": _Shaping(), "down": _Shaping()}
        self.frozen = False  # half-open: nothing is forwarded any more
        self.half_closed: list[str] = []  # "client"/"upstream", in the order they sent EOF
        self.finished = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.follower = MessageFollower(proxy.script)
        self.upgrade_settled = asyncio.Event()  # the answer to a WebSocket upgrade came
        plan = proxy.plan
        self.rng = plan.rng("proxy", "connection", stats.number)

    # ------------------------------------------------------------ ending

    def end(self, how: Literal["reset", "fin", "abort", "client", "upstream", "error"]) -> None:
        """Close both sides: ``reset`` with RSTs, ``abort`` at once (the kernel sends
        what it holds, then a FIN, or a RST if unread data is pending), anything
        else with FINs after what is buffered."""
        if self.stats.closed:
            return
        self.stats.closed = True
        self.stats.ended_by = how
        for writer in (self.client_writer, self.upstream_writer):
            if writer is None:
                continue
            if how == "reset":
                reset(writer.transport)
            elif how == "abort":
                writer.transport.abort()
            else:
                writer.close()
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self.finished.set()
        self.proxy._changed()

    def freeze(self) -> None:
        """Half-open: stop forwarding; keep both sockets open until the client leaves."""
        self.frozen = True
        self.stats.ended_by = "half_open"
        self.proxy._changed()

    async def cut(self) -> None:
        """End the connection right after what was forwarded has arrived (a scripted fault)."""
        for writer in (self.client_writer, self.upstream_writer):
            if writer is not None:
                await flush(writer)
        self.end("abort")

    # ------------------------------------------------------------ pumping

    async def run(self) -> None:
        host, port = self.proxy.upstream
        try:
            self.upstream_reader, self.upstream_writer = await asyncio.open_connection(host, port)
        except OSError:
            self.end("reset")  # the client sees what it would see without the proxy: a failure
            return
        for writer in (self.client_writer, self.upstream_writer):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up = asyncio.ensure_future(
            self.pump(self.client_reader, self.upstream_writer, "up"),
        )
        down = asyncio.ensure_future(
            self.pump(self.upstream_reader, self.client_writer, "down"),
        )
        self.tasks = [up, down]
        try:
            await asyncio.gather(up, down, return_exceptions=True)
        finally:
            if not self.stats.closed:
                self.end("fin")

    async def pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: Literal["up", "down"],
    ) -> None:
        source = "client" if direction == "up" else "upstream"
        while not self.stats.closed:
            try:
                data = await reader.read(_CHUNK)
            except (ConnectionError, OSError):
                if self.frozen:
                    return  # blackholed: not even a reset gets through
                # The peer reset its side: pass the reset on.
                self.end("reset")
                return
            if not data:
                if self.frozen:
                    if direction == "up":
                        self.end("client")  # the client gave up on the blackholed connection
                    return
                # A message its sender cut short goes on as it is.
                if not await self.forward(writer, self.follower.flush(direction), direction):
                    return
                with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                    if writer.can_write_eof():
                        writer.write_eof()
                self._half_closed(direction, source)
                return
            if self.frozen:
                continue  # read and drop: the sender's writes succeed, nothing arrives
            if not await self.follow(writer, data, direction):
                return

    async def follow(
        self, writer: asyncio.StreamWriter, data: bytes, direction: Literal["up", "down"]
    ) -> bool:
        """Pass ``data`` through the message follower and on; False once the link is over."""
        out, cut = self.follower.feed(direction, data)
        if direction == "down":
            self.upgrade_settled.set()
        if not await self.forward(writer, out, direction):
            return False
        if cut and not self.frozen:
            await self.cut()
            return False
        # After a WebSocket upgrade request the client's bytes wait for the answer:
        # they are WebSocket frames if it is a 101, HTTP otherwise.
        while direction == "up" and self.follower.awaiting_upgrade and not self.stats.closed:
            self.upgrade_settled.clear()
            await self.upgrade_settled.wait()
            out, cut = self.follower.feed(direction, b"")
            if not await self.forward(writer, out, direction):
                return False
            if cut and not self.frozen:
                await self.cut()
                return False
        return not self.stats.closed

    async def forward(
        self, writer: asyncio.StreamWriter, data: bytes, direction: Literal["up", "down"]
    ) -> bool:
        """Deliver ``data``, firing the ``after_bytes`` rules that land inside it;
        False once the link is over (a half-open link goes on, forwarding nothing)."""
        while data and not self.frozen:
            counted = self.stats.bytes_up if direction == "up" else self.stats.bytes_down
            cut: tuple[int, Rule] | None = None
            for index, rule in self.cuts:
                trigger = rule.trigger
                assert isinstance(trigger, AfterBytes)
                if (
                    trigger.direction == direction
                    and counted + len(data) >= trigger.bytes
                    and self.proxy._firings.can_fire(index, rule)
                    and (cut is None or trigger.bytes < _cut_at(cut))
                ):
                    cut = (index, rule)
            piece = data if cut is None else data[: max(0, _cut_at(cut) - counted)]
            try:
                await self.deliver(writer, piece, direction)
            except (ConnectionError, OSError):
                self.end("reset")
                return False
            if cut is None:
                break
            data = data[len(piece) :]
            self.cuts.remove(cut)
            await self.proxy._fire_at_point(self, cut[0], cut[1], direction)
            if self.stats.closed:
                return False
        return not self.stats.closed

    def _half_closed(self, direction: str, source: str) -> None:
        """One side finished sending; the connection ends when both have, and
        ``ended_by`` names the side that finished first."""
        self.half_closed.append(source)
        if len(self.half_closed) == 2:
            first = self.half_closed[0]
            self.end("client" if first == "client" else "upstream")

    async def deliver(self, writer: asyncio.StreamWriter, data: bytes, direction: str) -> None:
        """Write ``data`` with this direction's shaping (slices, latency, bandwidth)."""
        if not data:
            return
        shaping = self.shaping[direction]
        if shaping.latency is not None:
            latency = shaping.latency
            jitter = self.rng.uniform(-latency.jitter_ms, latency.jitter_ms)
            await asyncio.sleep(max(0.0, latency.ms + jitter) / 1000)
        pieces = [data]
        if shaping.slicer is not None:
            pieces = self._slice(data, shaping.slicer)
        elif shaping.bandwidth is not None:
            # Pace in pieces of about 20 ms of transmission each.
            size = max(1, shaping.bandwidth.bytes_per_second // 50)
            pieces = [data[i : i + size] for i in range(0, len(data), size)]
        for i, piece in enumerate(pieces):
            if shaping.slicer is not None and shaping.slicer.delay_ms and i:
                await asyncio.sleep(shaping.slicer.delay_ms / 1000)
            if shaping.bandwidth is not None:
                # The time this piece takes on a link of that bandwidth.
                await asyncio.sleep(len(piece) / shaping.bandwidth.bytes_per_second)
            writer.write(piece)
            self._count(direction, len(piece))
            await writer.drain()

    def _slice(self, data: bytes, slicer: Slicer) -> list[bytes]:
        pieces: list[bytes] = []
        start = 0
        while start < len(data):
            size = slicer.average_size + self.rng.randint(
                -slicer.size_variation, slicer.size_variation
            )
            size = max(1, size)
            pieces.append(data[start : start + size])
            start += size
        return pieces

    def _count(self, direction: str, n: int) -> None:
        if direction == "up":
            self.stats.bytes_up += n
            self.proxy.bytes_up += n
        else:
            self.stats.bytes_down += n
            self.proxy.bytes_down += n
        self.proxy._changed()


def _cut_at(cut: tuple[int, Rule]) -> int:
    trigger = cut[1].trigger
    assert isinstance(trigger, AfterBytes)
    return trigger.bytes


class ChaosProxy:
    """A fault-injecting TCP proxy in front of ``upstream`` (see the module docstring).

    ``upstream`` is ``"host:port"``, ``(host, port)`` or a URL (``http://...``).
    Use it as an async context manager, or call :meth:`start` and :meth:`close`::

        async with ChaosProxy(server.url, plan) as proxy:
            client = httpx.AsyncClient(base_url=proxy.url)
            lost = proxy.add(HttpFault(method="POST", lose_response=True))

    The plan can change while it runs (:meth:`set_plan`); a change applies to
    connections accepted afterwards, and resets the rules' counters. Scripted
    faults apply from the next message on.
    """

    def __init__(
        self,
        upstream: str | tuple[str, int],
        plan: FaultPlan | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._upstream_url: str | None = None
        if isinstance(upstream, tuple):
            self.upstream = upstream
        elif "://" in upstream:
            parts = urlsplit(upstream)
            if parts.hostname is None or parts.port is None:
                default = 443 if parts.scheme in ("https", "wss") else 80
                self.upstream = (parts.hostname or "127.0.0.1", parts.port or default)
            else:
                self.upstream = (parts.hostname, parts.port)
            self._upstream_url = upstream
        else:
            host_part, _, port_part = upstream.rpartition(":")
            self.upstream = (host_part or "127.0.0.1", int(port_part))
        self.host = host
        self.port = port
        self.plan = plan or FaultPlan()
        self.connections: list[ConnectionStats] = []
        self.log: list[ProxyFaultRecord] = []
        self.bytes_up = 0
        self.bytes_down = 0
        self.refused_while_down = 0
        self._firings = Firings()
        self._links: dict[int, _Link] = {}
        self._server: asyncio.Server | None = None
        self._up = asyncio.Event()
        self._up_again: asyncio.TimerHandle | None = None
        self._changes = Changes()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.script = Script()

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> ChaosProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start listening (on an ephemeral port unless one was given)."""
        await self._listen()

    async def _listen(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(512)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._accept, sock=sock)
        self._up.set()
        self._changed()

    async def close(self) -> None:
        """Stop listening and close every connection (with FINs)."""
        if self._up_again is not None:
            self._up_again.cancel()
        if self._server is not None:
            self._server.close()
            self._server = None
        self._up.clear()
        for link in list(self._links.values()):
            link.end("fin")
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=2.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def online(self) -> None:
        """Listen (again, on the same port); the same as :meth:`up`."""
        await self.up()

    async def offline(self) -> None:
        """Stop listening (new connections are refused) and cut every open connection
        (:meth:`cut_all`), until :meth:`online`."""
        if self._up_again is not None:
            self._up_again.cancel()
            self._up_again = None
        server, self._server = self._server, None
        self._up.clear()
        if server is not None:
            server.close()
        self.cut_all()
        if server is not None:
            await server.wait_closed()
        self._changed()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def url(self) -> str:
        """The upstream URL with the proxy's host and port (``http://127.0.0.1:P``)."""
        scheme, path, query = "http", "", ""
        if self._upstream_url is not None:
            parts = urlsplit(self._upstream_url)
            scheme, path, query = parts.scheme, parts.path, parts.query
        netloc = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return urlunsplit((scheme, netloc, path, query, ""))

    @property
    def is_up(self) -> bool:
        return self._up.is_set()

    @property
    def active(self) -> int:
        """Connections open right now."""
        return sum(not stats.closed for stats in self.connections)

    # ------------------------------------------------------------ control

    def set_plan(self, plan: FaultPlan) -> None:
        """Use ``plan`` for connections accepted from now on; counters restart."""
        self.plan = plan
        self._firings.clear()

    @property
    def faults(self) -> list[HttpFault | WsFault]:
        """The scripted faults, in the order they were added."""
        return self.script.faults

    @property
    def requests(self) -> list[tuple[str, str]]:
        """Every HTTP request forwarded so far, as (method, target)."""
        return self.script.requests

    def add(self, fault: ScriptedFault) -> ScriptedFault:
        """Schedule a scripted fault; returns it (its ``fired`` event is set when it hits)."""
        self.script.faults.append(fault)
        return fault

    def cut_all(self) -> int:
        """Cut every open connection now, without waiting for anything (the kernel
        sends a FIN, or a RST where unread data is pending); returns how many."""
        links = [link for link in self._links.values() if not link.stats.closed]
        for link in links:
            link.stats.faults.append("cut_all")
            link.end("abort")
        return len(links)

    def freeze_all(self) -> int:
        """Make every open connection half-open: nothing more is forwarded either way and
        nothing is closed (not even when the server gives up) until the client closes
        its side. Returns how many."""
        links = [link for link in self._links.values() if not link.stats.closed]
        for link in links:
            link.stats.faults.append("freeze_all")
            link.freeze()
        return len(links)

    def reset_all(self, how: Literal["reset", "fin"] = "reset") -> int:
        """Cut every open connection (RST by default); returns how many."""
        links = [link for link in self._links.values() if not link.stats.closed]
        for link in links:
            link.stats.faults.append(f"reset_all({how})")
            link.end(how)
        return len(links)

    async def down(self, duration: float | None = None, *, reset_open: bool = True) -> None:
        """Refuse connections (stop listening) for ``duration`` seconds, or until :meth:`up`."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self._up.clear()
        if reset_open:
            self.reset_all("reset")
        if self._up_again is not None:
            self._up_again.cancel()
            self._up_again = None
        if duration is not None:
            loop = asyncio.get_running_loop()
            self._up_again = loop.call_later(duration, self._schedule_up)
        self._changed()

    def _schedule_up(self) -> None:
        self._up_again = None
        task = asyncio.ensure_future(self.up())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def up(self) -> None:
        """Listen again on the same port."""
        if self._server is None:
            await self._listen()

    async def wait_up(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            await self._up.wait()

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``condition()`` holds; re-checked whenever the proxy's state changes
        (connections, bytes, faults, up/down). The timeout only bounds a failure."""
        await self._changes.wait_for(condition, timeout)

    def fired(self, fault: str | None = None) -> int:
        """How many faults (of kind ``fault``) were applied."""
        return sum(1 for r in self.log if fault is None or r.fault == fault)

    def _changed(self) -> None:
        self._changes.changed()

    # ------------------------------------------------------------ rules

    def _record(
        self, link: _Link, index: int, rule: Rule, at_byte: int | None, direction: str | None
    ) -> None:
        record = ProxyFaultRecord(
            rule=index,
            fault=rule.fault.kind,
            connection=link.stats.number,
            at_byte=at_byte,
            direction=direction,
            at=time.monotonic(),
        )
        self.log.append(record)
        link.stats.faults.append(str(record))
        self._changed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # Only close() cancels a connection's task; asyncio would log it as an error.
            reset(writer.transport)
        finally:
            self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._up.is_set():
            # Accepted just before the listener closed: treat it as refused.
            self.refused_while_down += 1
            reset(writer.transport)
            return
        number = len(self.connections) + 1
        stats = ConnectionStats(number=number, opened_at=time.monotonic())
        self.connections.append(stats)
        link = _Link(self, stats, reader, writer)
        self._links[number] = link
        self._changed()
        try:
            if await self._on_accept(link):
                await link.run()
        finally:
            self._links.pop(number, None)
            if not stats.closed:
                link.end("fin")

    async def _on_accept(self, link: _Link) -> bool:
        """Apply the rules that fire when a connection opens; False if it is already over."""
        number = link.stats.number
        for index, rule in self.plan.for_layer("proxy"):
            trigger = rule.trigger
            if isinstance(trigger, AfterBytes):
                link.cuts.append((index, rule))  # armed; counted when it fires
                continue
            if isinstance(trigger, OnConnection) and not trigger.hits(number):
                continue
            if isinstance(trigger, Probability):
                draw = self.plan.rng("proxy", index, "connection", number).random()
                if draw >= trigger.p:
                    continue
            if not self._firings.take(index, rule):
                continue
            self._record(link, index, rule, None, None)
            if not await self._apply(link, rule, None):
                return False
        return True

    async def _fire_at_point(
        self, link: _Link, index: int, rule: Rule, direction: Literal["up", "down"]
    ) -> None:
        if not self._firings.take(index, rule):
            return
        counted = link.stats.bytes_up if direction == "up" else link.stats.bytes_down
        self._record(link, index, rule, counted, direction)
        await self._apply(link, rule, direction)

    async def _apply(self, link: _Link, rule: Rule, direction: str | None) -> bool:
        """Apply ``rule``'s fault to ``link``; False if the connection is over."""
        fault = rule.fault
        kind = fault.kind
        if kind in ("reset", "fin"):
            # What was forwarded must arrive before the cut (a RST discards unsent data).
            for writer in (link.client_writer, link.upstream_writer):
                if writer is not None:
                    await flush(writer)
            link.end("reset" if kind == "reset" else "fin")
            return False
        if kind == "half_open":
            link.freeze()
            if link.upstream_writer is None:
                # Blackholed from the start: never connect upstream; drain the client.
                task = asyncio.ensure_future(
                    link.pump(link.client_reader, link.client_writer, "up")
                )
                link.tasks.append(task)
                await asyncio.gather(task, return_exceptions=True)
                return False
            return True
        if kind == "down":
            assert fault.kind == "down"
            link.end("reset")
            await self.down(fault.duration_ms / 1000, reset_open=fault.reset_open)
            return False
        directions = ["up", "down"] if getattr(fault, "direction", "down") == "both" else None
        for d in directions or [getattr(fault, "direction", "down")]:
            shaping = link.shaping[d]
            if isinstance(fault, Latency):
                shaping.latency = fault
            elif isinstance(fault, Bandwidth):
                shaping.bandwidth = fault
            elif isinstance(fault, Slicer):
                shaping.slicer = fault
        return True
