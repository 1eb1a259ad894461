"""One server per data directory: an OS lock held for the server's life, released by the OS
when the process dies (kill -9 included), refused with the holder's pid and URL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from mock_server import SqliteStorage
from mock_server._storage import DataDirInUse
from mock_server.testing import serve

from .test_process import JSON, S, run_cli, server_process


def refused(result: subprocess.CompletedProcess[str]) -> str:
    """The one-line error of a server that refused the data directory."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "durable session server on" not in result.stdout  # it never said it was up
    return lines[0]


async def test_a_second_server_on_the_same_data_dir_refuses_naming_the_holder(
    tmp_path: Path,
) -> None:
    data_dir = str(tmp_path / "data")
    async with server_process("--data-dir", data_dir) as (first, url):
        async with httpx.AsyncClient(base_url=url) as http:
            await http.put(f"{S}/kept", headers=JSON, content=b"[1]")
        second = await asyncio.to_thread(run_cli, "--port", "0", "--data-dir", data_dir)
        line = refused(second)
        assert f"pid {first.pid}" in line
        assert url in line  # the holder's URL, so the user knows which server to use
        assert data_dir in line
        # The first server is untouched and still serves the directory.
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get(f"{S}/kept")).json() == [1]


async def test_kill_9_releases_the_lock(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    async with server_process("--data-dir", data_dir) as (first, url):
        async with httpx.AsyncClient(base_url=url) as http:
            await http.put(f"{S}/kept", headers=JSON, content=b"[1]")
        first.send_signal(signal.SIGKILL)
        await first.wait()
    # No cleanup ran in the killed process: the OS released the lock with its files.
    async with (
        server_process("--data-dir", data_dir) as (_, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        assert (await http.get(f"{S}/kept")).json() == [1]


async def test_an_embedded_server_holds_the_lock_and_releases_it_on_exit(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with serve(data_dir=data_dir) as running:
        # A server process sees this one, by pid and URL.
        line = refused(await asyncio.to_thread(run_cli, "--data-dir", str(data_dir)))
        assert f"pid {os.getpid()}" in line
        assert running.url in line
        # So does a second embedded server in the same process, before touching anything.
        with pytest.raises(DataDirInUse, match=f"pid {os.getpid()}"):
            async with serve(data_dir=data_dir):
                pass
        # As does build_app's storage used directly.
        with pytest.raises(DataDirInUse):
            SqliteStorage(data_dir)
        async with httpx.AsyncClient(base_url=running.url) as http:
            await http.put(f"{S}/kept", headers=JSON, content=b"[1]")
    # Released on exit: the next server (embedded, then a process) opens the same data.
    async with serve(data_dir=data_dir) as running, httpx.AsyncClient(base_url=running.url) as h:
        assert (await h.get(f"{S}/kept")).json() == [1]
    async with (
        server_process("--data-dir", str(data_dir)) as (_, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        assert (await http.get(f"{S}/kept")).json() == [1]


def test_a_refused_server_changes_nothing_in_the_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    holder = SqliteStorage(data_dir)
    try:
        before = {p.name: p.read_bytes() for p in data_dir.iterdir()}
        refused(run_cli("--port", "0", "--data-dir", str(data_dir)))
        assert {p.name: p.read_bytes() for p in data_dir.iterdir()} == before
    finally:
        holder.close()
    SqliteStorage(data_dir).close()  # and close() gave it up
