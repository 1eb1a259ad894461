"""The server as a process: command line, banner, signals, and kill -9 over SQLite."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

S = "/v1/stream"
JSON = {"Content-Type": "application/json"}
BANNER = re.compile(r"durable session server on (http://127\.0\.0\.1:\d+)")


@asynccontextmanager
async def server_process(*args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """``python -m mock_server --port 0 ARGS``; yields (process, base URL) once it is listening."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mock_server",
        "--port",
        "0",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(20):
            line = (await process.stdout.readline()).decode()
        match = BANNER.search(line)
        assert match, f"unexpected first line: {line!r}"
        url = match.group(1)
        async with httpx.AsyncClient(base_url=url) as http, asyncio.timeout(20):
            while True:  # the banner precedes the first accept; wait for /health
                try:
                    if (await http.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.02)
        yield process, url
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def producer(epoch: int, seq: int) -> dict[str, str]:
    return {**JSON, "Producer-Id": "writer", "Producer-Epoch": str(epoch), "Producer-Seq": str(seq)}


async def test_kill_9_loses_nothing_acknowledged(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    acknowledged: list[int] = []
    offsets: dict[int, str] = {}
    async with (
        server_process("--data-dir", data_dir) as (process, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        await http.put(f"{S}/log", headers=JSON)
        await http.put(f"{S}/done", headers=JSON, content=b"[1]")
        await http.post(f"{S}/done", headers={"Stream-Closed": "true"})
        for seq in range(200):
            response = await http.post(f"{S}/log", headers=producer(1, seq), content=str(seq))
            assert response.status_code == 200
            acknowledged.append(seq)
            offsets[seq] = response.headers["Stream-Next-Offset"]
        # Writes in flight when the process dies may or may not land; none may be torn.
        in_flight = [
            asyncio.create_task(
                http.post(f"{S}/log", headers=producer(1, 200 + i), content=str(200 + i))
            )
            for i in range(20)
        ]
        process.send_signal(signal.SIGKILL)
        await process.wait()
        results = await asyncio.gather(*in_flight, return_exceptions=True)
        acknowledged += [
            200 + i
            for i, r in enumerate(results)
            if isinstance(r, httpx.Response) and r.status_code == 200
        ]

    async with (
        server_process("--data-dir", data_dir) as (_, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        stored = (await http.get(f"{S}/log")).json()
        assert stored[: len(acknowledged)] == acknowledged
        assert stored == list(range(len(stored)))  # a prefix, in order, nothing torn
        last = stored[-1]
        # Producer state survived: the last seq is a duplicate, the next is accepted.
        duplicate = await http.post(f"{S}/log", headers=producer(1, last), content=str(last))
        assert duplicate.status_code == 204
        # Where a recent request landed survives the restart too (at most 20 came after 199),
        # and so does what it carried: the same seq with other data is refused.
        original = await http.post(f"{S}/log", headers=producer(1, 199), content=b"199")
        assert original.headers["Stream-Next-Offset"] == offsets[199]
        reused = await http.post(f"{S}/log", headers=producer(1, 199), content=b"0")
        assert reused.status_code == 403
        assert reused.headers["Producer-Epoch"] == "1"
        stale = await http.post(f"{S}/log", headers=producer(0, 0), content=b"0")
        assert stale.status_code == 403
        following = await http.post(f"{S}/log", headers=producer(1, last + 1), content=b"-1")
        assert following.status_code == 200
        # Closure survived.
        closed = await http.post(f"{S}/done", headers=JSON, content=b"2")
        assert closed.status_code == 409
        assert closed.headers["Stream-Closed"] == "true"


async def test_sigterm_stops_cleanly_even_with_live_readers() -> None:
    async with server_process("--long-poll-timeout", "30") as (process, url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            await http.put(f"{S}/t", headers=JSON)
            async with http.stream("GET", f"{S}/t?offset=-1&live=sse") as sse:
                assert sse.status_code == 200
                process.send_signal(signal.SIGTERM)
                async with asyncio.timeout(10):
                    async for _ in sse.aiter_bytes():
                        pass  # the server ends the response instead of hanging
        async with asyncio.timeout(10):
            assert await process.wait() == 0


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mock_server", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_help_lists_the_options() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for option in ("--host", "--port", "--data-dir", "--long-poll-timeout", "--max-body-bytes"):
        assert option in result.stdout


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single error line of a command that refused its arguments (exit 2)."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "error:" in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--long-poll-timeout", "0"], "--long-poll-timeout must be positive"),
        (["--port", "x"], "invalid int value: 'x'"),
        (["--port", "99999"], "--port must be 0 to 65535"),
        (["--port", "-1"], "--port must be 0 to 65535"),
        (["--max-body-bytes", "-5"], "--max-body-bytes must be positive"),
        (["--presence-grace", "-1"], "--presence-grace must not be negative"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        # Read-only even for root: nothing can be written under /sys.
        (["--data-dir", "/sys"], "--data-dir /sys: cannot write in it"),
    ],
)
def test_bad_arguments_get_a_message_not_a_traceback(args: list[str], says: str) -> None:
    assert says in one_line_error(run_cli(*args))


def test_a_data_dir_that_is_a_file_is_named_as_such(tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    line = one_line_error(run_cli("--port", "0", "--data-dir", str(file)))
    assert f"--data-dir {file}: is not a directory" in line
    assert "cannot listen" not in line
    assert file.read_text() == "mine"  # changed nothing


def test_port_in_use_is_a_clear_error() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("--port", str(port))
    line = one_line_error(result)
    assert f"cannot listen on 127.0.0.1:{port}: port {port} is in use" in line


async def test_debug_logs_one_line_per_request() -> None:
    async with server_process("--log-level", "debug") as (process, url):
        async with httpx.AsyncClient(base_url=url) as http:
            await http.put(f"{S}/logged", headers=JSON)
        process.send_signal(signal.SIGTERM)
        assert process.stdout is not None
        output = (await process.stdout.read()).decode()
    assert re.search(r"PUT /v1/stream/logged -> 201", output)
