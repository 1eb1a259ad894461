"""Slow HTTP readers: bytes queued for one are bounded, and one that reads nothing is dropped.

A client that stops reading an SSE response, or a catch-up or long-poll answer,
leaves the server's writes waiting on a full transport buffer. The server holds
at most that buffer (64 KiB above the kernel's) and one ``send`` for it, and
aborts the connection once the reader has taken nothing for the slow-reader
timeout (``ServerConfig.slow_reader_timeout``, by default the WebSocket
``slow_consumer_timeout``, 10 s). Memory is measured as the RSS of a real server
process (``python -m mock_server``); the resume-after-abort proof uses the SDK
against an in-process server with a short timeout.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import cast

import httpx

from durable_client import ReconnectPolicy
from durable_client.streams import DurableStream, ReadBatch
from mock_server.testing import serve
from tests._await import until
from tests.server.conftest import capture_server_log
from tests.server.sse import controls, datas, read_sse
from tests.server.test_process import server_process

S = "/v1/stream"
MiB = 1024 * 1024
BINARY = {"Content-Type": "application/octet-stream"}
TEXT = {"Content-Type": "text/plain"}
JSON = {"Content-Type": "application/json"}

HISTORY_RECORDS = 60  # of 1 MiB: 60 MiB of history, far more than kernel buffers hold
PEAK_BOUND_MIB = 8.0  # over the baseline, for all the stalled clients of a test together
AFTER_BOUND_MIB = 4.0  # over the baseline, once the stalled clients are aborted

# The server's defaults (mock_server._http), restated so this file runs against a
# server from before them: the slow-reader timeout, the text payload of one SSE
# data event, and the size of one SSE send.
DEADLINE = 10.0
TEXT_PIECE = 16 * 1024
SEND_BYTES = 64 * 1024

_TCP_ESTABLISHED = 1


def status_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (the peak RSS) of process ``pid``, in MiB."""
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of ``sock`` (``tcpi_state``, the first byte of TCP_INFO)."""
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0])


@contextlib.contextmanager
def never_reading(port: int, requests: list[str], count: int = 1) -> Iterator[list[socket.socket]]:
    """``count`` connections, each sending ``requests`` (GET targets, pipelined) and
    then reading nothing, ever."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port))
            socks.append(sock)
            sock.sendall(
                b"".join(
                    f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
                    for target in requests
                )
            )
        yield socks
    finally:
        for sock in socks:
            sock.close()


async def write_history(http: httpx.AsyncClient, path: str) -> None:
    """``HISTORY_RECORDS`` records of 1 MiB of random bytes."""
    assert (await http.put(path, headers=BINARY)).status_code == 201
    for _ in range(HISTORY_RECORDS):
        response = await http.post(path, headers=BINARY, content=os.urandom(MiB))
        assert response.status_code in (200, 204), response.text


async def aborted_within(socks: list[socket.socket], timeout: float) -> float | None:
    """Seconds until the server has reset every one of ``socks``; None if it has not
    within ``timeout``."""
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        await until(lambda: all(tcp_state(s) != _TCP_ESTABLISHED for s in socks), timeout)
        return time.monotonic() - started
    return None


async def stall_and_measure(port: int, pid: int, requests: list[str], count: int) -> str:
    """Stall ``count`` never-reading clients; assert the server's RSS stays bounded
    and returns to its baseline once the deadline has aborted them."""
    before = status_mib(pid)
    with never_reading(port, requests, count) as socks:
        took = await aborted_within(socks, DEADLINE + 15)
        during = status_mib(pid)
    # The aborted connections' memory is released at once; the handlers end soon after.
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(f"http://127.0.0.1:{port}/health")).status_code == 200
    after = status_mib(pid)
    peak = during["VmHWM"] - before["VmRSS"]
    held = after["VmRSS"] - before["VmRSS"]
    report = (
        f"{count} never-reading client(s) of {requests[0]!r} x{len(requests)}:"
        f" baseline RSS {before['VmRSS']:.1f} MiB (peak so far {before['VmHWM']:.1f}),"
        f" peak while stalled {during['VmHWM']:.1f} (+{peak:.1f}, bound +{PEAK_BOUND_MIB}),"
        f" RSS at the end {during['VmRSS']:.1f}, once they were gone {after['VmRSS']:.1f}"
        f" (+{held:.1f}, bound +{AFTER_BOUND_MIB});"
        f" aborted after {'never' if took is None else f'{took:.1f} s'}"
        f" (deadline {DEADLINE} s)"
    )
    assert took is not None, report
    # Not before the deadline (it counts from the stall), nor much after it (the
    # server looks every tenth of it).
    assert DEADLINE - 1 <= took <= 1.5 * DEADLINE, report
    assert peak <= PEAK_BOUND_MIB, report
    assert held <= AFTER_BOUND_MIB, report
    return report


# -------------------------------------------------------------- a real server process


async def test_never_reading_sse_clients_stay_bounded_and_are_aborted() -> None:
    # The default configuration: the deadline is the WebSocket slow-consumer timeout.
    async with (
        server_process() as (process, url),
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        await write_history(http, f"{S}/big")
        port = int(url.rsplit(":", 1)[1])
        # Before the bound, each held the read it was sending (1 MiB, 1.4 MiB as
        # base64) plus its copies: about +4 MiB per client, until it went away.
        print(await stall_and_measure(port, process.pid, [f"{S}/big?offset=-1&live=sse"], 4))


async def test_never_reading_catch_up_and_long_poll_client_is_aborted() -> None:
    # No WebSocket endpoint: the deadline is the HTTP front end's own default.
    async with (
        server_process("--no-websocket") as (process, url),
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        await write_history(http, f"{S}/big")
        port = int(url.rsplit(":", 1)[1])
        # Pipelined 1 MiB answers, more than the kernel's buffers hold: catch-up
        # and long-poll reads alternate on one connection that reads nothing.
        requests = [
            f"{S}/big?offset=-1" if i % 2 else f"{S}/big?offset=-1&live=long-poll"
            for i in range(24)
        ]
        print(await stall_and_measure(port, process.pid, requests, 2))


# -------------------------------------------------------------- SSE events are bounded


async def test_sse_sends_are_bounded_and_carry_the_data_exactly() -> None:
    """A large backlog goes out in bounded events, cut where nothing can change:
    never inside a UTF-8 character, never between CR and LF."""
    piece = TEXT_PIECE
    texts = [
        "a" * (piece - 1) + "\r\n" + "b" * 10,  # CRLF across a piece boundary
        "é" * (piece // 2 + 1),  # two-byte characters across boundaries
        " lead" + "\n" * (3 * piece),  # a leading space; line breaks only (6x on the wire)
        "😀" * piece + "\r",  # four-byte characters, a CR ending the read
        "x" * (MiB - 7),
    ]
    async with serve(max_body_bytes=4 * MiB) as server, httpx.AsyncClient(timeout=30) as http:
        url = f"{server.url}{S}/text"
        await http.put(url, headers=TEXT)
        for text in texts:
            await http.post(url, headers=TEXT, content=text.encode())
        binary = f"{server.url}{S}/bin"
        payload = os.urandom(3 * MiB + 5)
        await http.put(binary, headers=BINARY, content=payload)
        json_url = f"{server.url}{S}/json"
        await http.put(json_url, headers=JSON)
        values = [{"i": i, "pad": "p" * 1000} for i in range(300)]
        for value in values:
            await http.post(json_url, headers=JSON, json=value)

        def done(events: list[tuple[str, str]]) -> bool:
            return any(c.get("upToDate") for c in controls(events))

        _, events = await read_sse(http, f"{url}?offset=-1&live=sse", done)
        expected = "".join(texts)
        for crlf in ("\r\n", "\r"):
            expected = expected.replace(crlf, "\n")
        assert "".join(datas(events)) == expected
        wire = [len(f"event: {kind}\ndata:{data}\n\n".encode()) for kind, data in events]
        assert max(wire) <= 6 * piece + 64, f"largest event {max(wire)} bytes"

        _, events = await read_sse(http, f"{binary}?offset=-1&live=sse", done)
        assert b"".join(base64.b64decode(d) for d in datas(events)) == payload
        assert max(len(d) for d in datas(events)) <= SEND_BYTES

        _, events = await read_sse(http, f"{json_url}?offset=-1&live=sse", done)
        got = [item for d in datas(events) for item in json.loads(d)]
        assert got == values
        assert max(len(d) for d in datas(events)) <= 2 * TEXT_PIECE


# -------------------------------------------------------------- resume after the abort


async def test_a_stalled_sdk_subscriber_is_aborted_and_resumes_losing_nothing(
    backend: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data" if backend == "sqlite" else None
    records = [bytes([i]) * (MiB // 2) for i in range(40)]  # 20 MiB: more than kernel buffers
    async with serve(data_dir=data_dir, ws_slow_consumer_timeout=0.5) as server:
        with contextlib.contextmanager(capture_server_log)() as server_log:
            async with DurableStream(f"{server.url}{S}/log") as stream:
                await stream.create(content_type="application/octet-stream")
                for record in records:
                    await stream.append(record)
                got: list[bytes] = []
                retries: list[BaseException] = []
                policy = ReconnectPolicy(initial_delay=0.01, max_delay=0.05)

                def aborted() -> bool:
                    return any("connection aborted" in r.getMessage() for r in server_log.records)

                async with asyncio.timeout(30):
                    # An async generator, though typed as an iterator: close it on break.
                    follow = cast(
                        AsyncGenerator[ReadBatch, None],
                        stream.follow(
                            live="sse",
                            reconnect=policy,
                            on_retry=lambda attempt, delay, error: retries.append(error),
                        ),
                    )
                    async with contextlib.aclosing(follow) as batches:
                        async for batch in batches:
                            got.append(batch.data)
                            if len(got) == 1:  # stall: read nothing until the server gives up
                                await until(aborted, timeout=10)
                            if batch.up_to_date:
                                break
            warnings = [r.getMessage() for r in server_log.records if r.levelno == logging.WARNING]
            assert b"".join(got) == b"".join(records), (
                f"{sum(map(len, got))} bytes read of {sum(map(len, records))}"
            )
            assert retries, "the subscriber never had to reconnect"
            assert any("read nothing of its response" in w for w in warnings), warnings
            assert not server_log.problems()


async def test_a_slow_reader_that_keeps_reading_is_not_aborted() -> None:
    """The deadline is for a reader that takes nothing: one that takes a little at a
    time keeps its response, even while the server's buffer stays full for longer
    than the timeout (the kernel's send queue shrinking is progress)."""
    timeout = 1.0
    async with (
        serve(ws_slow_consumer_timeout=timeout) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
    ):
        with contextlib.contextmanager(capture_server_log)() as server_log:
            await http.put(f"{S}/big", headers=BINARY)
            for _ in range(8):
                await http.post(f"{S}/big", headers=BINARY, content=os.urandom(MiB))
            port = int(server.url.rsplit(":", 1)[1])
            loop = asyncio.get_running_loop()
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
                sock.connect(("127.0.0.1", port))
                sock.setblocking(False)
                target = f"{S}/big?offset=-1&live=sse"
                await loop.sock_sendall(sock, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                received = 0
                # 32 KiB/s: draining the 48 KiB between the high- and low-water marks
                # alone takes longer than the timeout. The pacing is what is tested.
                for _ in range(int(5 * timeout / 0.25)):
                    chunk = await asyncio.wait_for(loop.sock_recv(sock, 8192), 10)
                    assert chunk, f"the server ended the response after {received} bytes"
                    received += len(chunk)
                    await asyncio.sleep(0.25)
                assert tcp_state(sock) == _TCP_ESTABLISHED, f"reset after {received} bytes"
            aborts = [r.getMessage() for r in server_log.records if "aborted" in r.getMessage()]
            assert not aborts, aborts
