"""WebSocket backpressure: clients that stop reading cost bounded memory and are dropped.

The memory tests run the server as a process and read its RSS from
``/proc/<pid>/status``. Their clients are plain sockets with a 4 KiB receive
buffer that do the handshake, subscribe, and never read again, so the server
really blocks on them (the history is far larger than any socket buffer).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from durable_client import Author, ReconnectPolicy, RetryPolicy, Session, UserMessage
from durable_client.wire import CLOSE_SLOW_CONSUMER
from mock_server._ws import WebSocketEndpoint
from mock_server._ws_protocol import CLOSE_LINGER
from mock_server.testing import serve
from tests._await import until
from tests.server.conftest import capture_server_log

S = "/v1/stream"
TEXT = {"Content-Type": "text/plain"}
MiB = 1024 * 1024
RECORD = 256 * 1024
HISTORY_RECORDS = 200  # 50 MiB
SLOW_TIMEOUT = 1.0
BANNER = re.compile(r"durable session server on (http://127\.0\.0\.1:(\d+))")

# ---------------------------------------------------------------- the server process


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    url: str
    port: int
    log: Path

    def rss_mib(self, field: str = "VmRSS") -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(rf"{field}:\s+(\d+) kB", status)
        assert match, status
        return int(match.group(1)) / 1024

    def reset_peak(self) -> None:
        """From now on VmHWM is the peak RSS since this call (Linux's clear_refs)."""
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def peers(self, ports: set[int]) -> int:
        """How many of the server's sockets still lead to one of these client ports."""
        return sum(
            1 for local, remote, _ in tcp_sockets() if local == self.port and remote in ports
        )


def server_peers(port: int, ports: set[int]) -> int:
    """How many sockets of the server at ``port`` lead to one of these client ports."""
    return sum(1 for local, remote, _ in tcp_sockets() if local == port and remote in ports)


def tcp_sockets() -> Iterator[tuple[int, int, str]]:
    """(local port, remote port, state) of every IPv4 TCP socket on this machine."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        yield int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16), fields[3]


@contextmanager
def server_process(tmp_path: Path, *args: str) -> Iterator[ServerProcess]:
    """``python -m mock_server --port 0 ARGS`` (uvloop, signals, logging: the real CLI)."""
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "mock_server", "--port", "0", "--ws-ping-interval", "0"]
    command += ["--log-level", "warning", *args]
    with log.open("wb") as err:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()  # the banner; ends with the process
        match = BANNER.search(line)
        assert match, f"unexpected first line: {line!r}; log: {log.read_text()}"
        yield ServerProcess(process, match.group(1), int(match.group(2)), log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


async def history(url: str, name: str, records: int = HISTORY_RECORDS) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        assert (await http.put(f"{S}/{name}", headers=TEXT)).status_code == 201
        for i in range(records):
            body = f"{i:08d}".encode() + b"x" * (RECORD - 8)
            assert (await http.post(f"{S}/{name}", headers=TEXT, content=body)).status_code == 204


async def read_everything(url: str, name: str) -> None:
    """A healthy subscriber reads the whole history once (what the baseline is taken after)."""
    async with connect(url.replace("http", "ws") + "/v1/ws", max_size=None) as ws:
        await ws.send(json.dumps({"op": "subscribe", "sub": "a", "stream": name}))
        async with asyncio.timeout(30):
            while True:
                frame = json.loads(await ws.recv())
                if frame["type"] == "data" and frame["up_to_date"]:
                    return


# ---------------------------------------------------------------- a client that never reads


def never_reading_client(port: int, stream: str) -> socket.socket:
    """A socket that opens /v1/ws, subscribes to ``stream`` and then reads nothing."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16))
    sock.sendall(
        b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
        % (port, key)
    )
    head = b""
    while not head.endswith(b"\r\n\r\n"):  # byte by byte: not one byte of a frame more
        byte = sock.recv(1)
        assert byte, head
        head += byte
    assert head.startswith(b"HTTP/1.1 101"), head
    sock.sendall(masked_text(json.dumps({"op": "subscribe", "sub": "a", "stream": stream})))
    return sock


def masked_text(text: str) -> bytes:
    payload = text.encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    return (
        bytes([0x81, 0x80 | len(payload)])
        + mask
        + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    )


def read_until_closed(sock: socket.socket, limit: int = 256 * MiB) -> str:
    """Read what is left; how the connection ended (``eof`` or ``reset``)."""
    sock.settimeout(5)  # a server still sending live data would keep this from ending
    received = 0
    try:
        while received < limit:
            chunk = sock.recv(1 << 20)
            if not chunk:
                return "eof"
            received += len(chunk)
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return f"still open after {received} bytes"
    return f"still open after {received} bytes"


async def wait_closed(
    server: ServerProcess, ports: set[int], bound: float, limit: float
) -> tuple[float, float]:
    """Wait until the server holds none of these connections, for at most ``bound``
    seconds and while its peak RSS stays under ``limit`` MiB; (seconds, peak MiB)."""
    started = time.monotonic()
    with suppress(TimeoutError):  # the caller's assertions say what went wrong
        # Past the limit it has failed already: don't let the server eat the machine.
        await until(lambda: not server.peers(ports) or server.rss_mib("VmHWM") > limit, bound)
    return time.monotonic() - started, server.rss_mib("VmHWM")


async def settled_rss(server: ServerProcess, at_most: float) -> float:
    """The server's RSS once it is ``at_most`` MiB or less (or the last reading after 5 s)."""
    with suppress(TimeoutError):  # the caller's assertion reports the reading
        await until(lambda: server.rss_mib() <= at_most, 5)
    return server.rss_mib()


# ---------------------------------------------------------------- the process tests

RSS_TOLERANCE = 8.0  # MiB above the baseline once the readers are gone
PER_SOCKET_BOUND = 2.0  # MiB a never-reading socket may hold (docs/websocket.md)


async def test_a_reader_that_never_reads_is_reset_and_its_memory_released(
    tmp_path: Path,
) -> None:
    with server_process(tmp_path, "--ws-slow-consumer-timeout", str(SLOW_TIMEOUT)) as server:
        await history(server.url, "big")
        await read_everything(server.url, "big")
        baseline = server.rss_mib()
        server.reset_peak()
        limit = baseline + PER_SOCKET_BOUND + RSS_TOLERANCE
        bound = SLOW_TIMEOUT + CLOSE_LINGER + 1.0  # the deadline, the linger, slack
        sock = never_reading_client(server.port, "big")
        try:
            ports = {sock.getsockname()[1]}
            took, peak = await wait_closed(server, ports, bound + 5, limit)
            left = server.peers(ports)
            after = await settled_rss(server, baseline + RSS_TOLERANCE)
            ended = read_until_closed(sock)
        finally:
            sock.close()
        numbers = (
            f"{left} still connected after {took:.2f} s (bound {bound:.1f} s);"
            f" RSS baseline {baseline:.1f} MiB,"
            f" peak {peak:.1f} MiB (limit {limit:.1f}), after {after:.1f} MiB;"
            f" the client saw {ended}"
        )
        print(numbers)
        assert left == 0, numbers
        assert took < bound, numbers
        assert peak <= limit, numbers
        assert after <= baseline + RSS_TOLERANCE, numbers
        assert ended in ("eof", "reset"), numbers
        assert "Traceback" not in server.log.read_text()


async def test_a_hundred_readers_that_never_read_stay_under_the_memory_bound(
    tmp_path: Path,
) -> None:
    clients = 100
    with server_process(tmp_path, "--ws-slow-consumer-timeout", str(SLOW_TIMEOUT)) as server:
        await history(server.url, "big")
        await read_everything(server.url, "big")
        baseline = server.rss_mib()
        server.reset_peak()
        limit = baseline + clients * PER_SOCKET_BOUND
        bound = SLOW_TIMEOUT + CLOSE_LINGER + 3.0  # the last connects ~1 s after the first
        socks = [never_reading_client(server.port, "big") for _ in range(clients)]
        try:
            ports = {s.getsockname()[1] for s in socks}
            took, peak = await wait_closed(server, ports, bound + 5, limit)
            left = server.peers(ports)
            after = await settled_rss(server, baseline + RSS_TOLERANCE)
        finally:
            for sock in socks:
                sock.close()
        numbers = (
            f"{clients} clients: {left} still connected after {took:.2f} s (bound {bound:.1f} s);"
            f" RSS baseline {baseline:.1f} MiB, peak {peak:.1f} MiB (limit {limit:.1f}),"
            f" after {after:.1f} MiB"
        )
        print(numbers)
        assert left == 0, numbers
        assert took < bound, numbers
        assert peak <= limit, numbers
        assert after <= baseline + RSS_TOLERANCE, numbers
        assert "Traceback" not in server.log.read_text()


# ---------------------------------------------------------------- in process

FAST_RECONNECT = ReconnectPolicy(initial_delay=0.01, max_delay=0.05)
FAST_RETRY = RetryPolicy(initial_delay=0.01, max_delay=0.05, max_attempts=3)


def numbered(text: str) -> list[int]:
    """The record numbers in a text frame of the history (records of RECORD bytes)."""
    assert len(text) % RECORD == 0, len(text)
    return [int(text[i : i + 8]) for i in range(0, len(text), RECORD)]


async def read_until_close(
    ws: ClientConnection, seen: list[int]
) -> tuple[ConnectionClosed, str | None]:
    """Read data frames into ``seen`` until the socket closes; (how, the last offset)."""
    offset = None
    try:
        async with asyncio.timeout(10):
            while True:
                frame = json.loads(await ws.recv())
                if frame["type"] == "data":
                    seen += numbered(frame["text"])
                    offset = frame["offset"]
    except ConnectionClosed as closed:
        return closed, offset


async def test_a_stalled_reader_that_reads_again_in_time_sees_4008_and_resumes() -> None:
    records = 40  # 10 MiB: more than the socket buffers hold
    async with serve(ws_slow_consumer_timeout=0.5, ws_ping_interval=0) as running:
        endpoint = running.app.websocket_handler
        assert isinstance(endpoint, WebSocketEndpoint)
        await history(running.url, "s", records)
        ws_url = running.url.replace("http", "ws") + "/v1/ws"
        seen: list[int] = []
        async with connect(ws_url, max_size=None) as ws:
            ws.transport.pause_reading()
            await ws.send(json.dumps({"op": "subscribe", "sub": "a", "stream": "s"}))
            await until(lambda: len(endpoint.connections) == 1)
            stalled = time.monotonic()
            await until(lambda: not endpoint.connections)  # 4008 sent, behind the data
            dropped_after = time.monotonic() - stalled
            ws.transport.resume_reading()  # within the linger: the close frame arrives
            closed, resume_at = await read_until_close(ws, seen)
        assert closed.rcvd is not None, closed
        assert closed.rcvd.code == CLOSE_SLOW_CONSUMER
        assert dropped_after < 0.5 + 1.0, dropped_after  # the deadline, and slack
        assert 0 < len(seen) < records
        async with connect(ws_url, max_size=None) as ws:
            await ws.send(
                json.dumps({"op": "subscribe", "sub": "a", "stream": "s", "offset": resume_at})
            )
            async with asyncio.timeout(10):
                while len(seen) < records:
                    frame = json.loads(await ws.recv())
                    if frame["type"] == "data":
                        seen += numbered(frame["text"])
        assert seen == list(range(records))  # nothing lost, nothing twice


async def test_an_sdk_subscriber_that_stalls_is_dropped_and_gets_everything_once() -> None:
    count = 60  # ~6 MiB of events while the subscriber's socket reads nothing
    ann, bob = Author.user("ann", "Ann"), Author.user("bob", "Bob")
    async with serve(ws_slow_consumer_timeout=0.5, ws_ping_interval=0) as running:
        endpoint = running.app.websocket_handler
        assert isinstance(endpoint, WebSocketEndpoint)
        async with (
            Session(
                running.url,
                "stall",
                author=ann,
                transport="websocket",
                retry=FAST_RETRY,
                reconnect=FAST_RECONNECT,
            ) as reader,
            Session(running.url, "stall", author=bob, transport="http", retry=FAST_RETRY) as writer,
        ):
            await writer.create()
            async with reader.subscribe() as events:
                await writer.send_message("first")
                first = await anext(events)
                assert isinstance(first, UserMessage)
                assert first.text == "first"
                transport: Any = reader._transport
                socket_of_reader = transport._socket.ws.transport
                socket_of_reader.pause_reading()  # the subscriber's socket stops reading
                sent = [f"m{i:03d} " + "x" * 100_000 for i in range(count)]
                for text in sent:
                    await writer.send_message(text)
                await until(lambda: not endpoint.connections)  # the server dropped it
                socket_of_reader.resume_reading()
                got: list[str] = []
                async with asyncio.timeout(20):
                    while len(got) < count:
                        event = await anext(events)
                        assert isinstance(event, UserMessage), event
                        got.append(event.text)
                await writer.send_message("after")
                last = await anext(events)
                assert isinstance(last, UserMessage)
                assert last.text == "after"
        assert [t[:4] for t in got] == [t[:4] for t in sent]  # each once, in order
        assert got == sent


async def test_a_record_larger_than_the_budget_is_delivered_whole() -> None:
    budget = 64 * 1024
    async with serve(ws_max_queued_bytes=budget, max_body_bytes=4 * MiB) as running:
        async with httpx.AsyncClient(base_url=running.url) as http:
            assert (await http.put(f"{S}/s", headers=TEXT)).status_code == 201
            for body in (b"a" * 1000, b"b" * (2 * MiB), b"c" * 1000):
                assert (await http.post(f"{S}/s", headers=TEXT, content=body)).status_code == 204
        ws_url = running.url.replace("http", "ws") + "/v1/ws"
        text = ""
        async with connect(ws_url, max_size=None) as ws:
            await ws.send(json.dumps({"op": "subscribe", "sub": "a", "stream": "s"}))
            async with asyncio.timeout(10):
                while len(text) < 2 * MiB + 2000:
                    frame = json.loads(await ws.recv())
                    if frame["type"] == "data":
                        text += frame["text"]
        assert text == "a" * 1000 + "b" * (2 * MiB) + "c" * 1000


async def test_a_reader_that_answers_no_pings_is_reset_by_keepalive_without_a_traceback() -> None:
    """Keepalive gives up on it (1011), and the close that cannot drain turns into a reset."""
    async with serve(
        ws_ping_interval=0.2, ws_ping_timeout=0.2, ws_slow_consumer_timeout=60
    ) as running:
        endpoint = running.app.websocket_handler
        assert isinstance(endpoint, WebSocketEndpoint)
        await history(running.url, "s", 40)
        port = int(running.url.rsplit(":", 1)[1])
        log_capture = capture_server_log()
        log = next(log_capture)
        try:
            sock = await asyncio.to_thread(never_reading_client, port, "s")
            try:
                ports = {sock.getsockname()[1]}
                started = time.monotonic()
                await until(lambda: not server_peers(port, ports), timeout=10)
                took = time.monotonic() - started
                await until(lambda: not endpoint.connections)
            finally:
                sock.close()
        finally:
            next(log_capture, None)  # detaches the handler
        assert took < 0.2 + 0.2 + CLOSE_LINGER + 1.0, took  # ping, pong deadline, linger
        assert log.problems() == []
