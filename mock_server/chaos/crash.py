"""Crash and restart: this project's server as a process, killed with ``kill -9`` and restarted.

:class:`CrashHarness` runs ``python -m mock_server --data-dir D --port P --chaos``
as a subprocess. :meth:`~CrashHarness.crash` kills it with ``SIGKILL`` at the
point the test chooses and :meth:`~CrashHarness.restart` starts it again on
the same port and data directory, so clients reconnect to the same URL and
find the durable (SQLite) state. With ``auto_restart=True`` it also restarts
the server after the server kills itself (the plan's ``crash`` fault).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import httpx

from .plan import FaultPlan

__all__ = ["CrashHarness", "ServerDidNotStart"]

_BANNER = re.compile(r"durable session server on (http://\S+?) ")


class ServerDidNotStart(RuntimeError):
    """The server process exited or stayed silent instead of serving."""


class CrashHarness:
    """A server process to kill and restart (see the module docstring)::

    async with CrashHarness(tmp_path / "data") as server:
        ...  # clients use server.url
        await server.crash()      # kill -9
        await server.restart()    # same port, same data directory
    """

    def __init__(
        self,
        data_dir: str | Path | None,
        *,
        port: int = 0,
        args: Sequence[str] = (),
        chaos: bool = True,
        auto_restart: bool = False,
        restart_delay: float = 0.0,
        startup_timeout: float = 20.0,
        python: str = sys.executable,
    ) -> None:
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.port = port
        self.args = list(args)
        self.chaos = chaos
        self.auto_restart = auto_restart
        self.restart_delay = restart_delay
        self.startup_timeout = startup_timeout
        self.python = python
        self.process: asyncio.subprocess.Process | None = None
        self.url = ""
        self.starts = 0
        self.crashes = 0  # kills by crash() and deaths the harness did not ask for
        self.output: deque[str] = deque(maxlen=200)  # the server's last lines, for failures
        self._drain: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        self._killing = False
        self._restarted = asyncio.Event()

    async def __aenter__(self) -> CrashHarness:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _command(self) -> list[str]:
        command = [self.python, "-m", "mock_server", "--port", str(self.port)]
        if self.data_dir is not None:
            command += ["--data-dir", str(self.data_dir)]
        if self.chaos:
            command.append("--chaos")
        return command + self.args

    async def start(self) -> None:
        """Start the server and wait until it answers ``/health``.

        Raises :class:`ServerDidNotStart` (with its output) if it does not.
        """
        self._stopping = False
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                await self._start_once(deadline)
                break
            except ServerDidNotStart as exc:
                # Right after a kill the port can be busy for a moment; try again.
                if "cannot listen" not in str(exc) or time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.05)
        self.starts += 1
        self._restarted.set()
        self._restarted = asyncio.Event()
        if self.auto_restart and self._watch is None:
            self._watch = asyncio.ensure_future(self._watch_for_crashes())

    async def _start_once(self, deadline: float) -> None:
        process = await asyncio.create_subprocess_exec(
            *self._command(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self.process = process
        assert process.stdout is not None
        try:
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                line = (await process.stdout.readline()).decode(errors="replace")
        except TimeoutError:
            line = ""
        self.output.append(line.rstrip())
        match = _BANNER.search(line)
        if match is None:
            # It failed (or stays silent): collect what it says, then make sure it is gone.
            more = b""
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    more = await process.stdout.read()
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            rest = (line + more.decode(errors="replace")).strip()
            self.output.extend(rest.splitlines())
            raise ServerDidNotStart(f"{' '.join(self._command())} did not start:\n{rest}")
        self.url = match.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
        self._drain = asyncio.ensure_future(self._read_output(process))
        # The banner precedes the first accept: wait until it answers.
        async with httpx.AsyncClient(base_url=self.url) as http:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/health", timeout=1.0)).status_code == 200:
                        return
                if process.returncode is not None or time.monotonic() > deadline:
                    raise ServerDidNotStart("the server exited before answering /health")
                await asyncio.sleep(0.01)

    async def _read_output(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            self.output.append(line.decode(errors="replace").rstrip())

    async def crash(self) -> None:
        """``kill -9`` the server now and wait until it is gone (with
        ``auto_restart`` the harness then starts it again by itself)."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        self._killing = True
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGKILL)
        await process.wait()
        self.crashes += 1
        if self._drain is not None:
            await self._drain

    async def restart(self, delay: float | None = None) -> None:
        """Start again on the same port and data directory (after ``delay``
        seconds), killing it first if it still runs. Not with ``auto_restart``."""
        if self.auto_restart:
            raise RuntimeError("with auto_restart the harness restarts by itself")
        if self.process is not None and self.process.returncode is None:
            await self.crash()
        await asyncio.sleep(self.restart_delay if delay is None else delay)
        await self.start()

    async def _watch_for_crashes(self) -> None:
        """Restart the server whenever it dies without being asked to stop."""
        while not self._stopping and self.process is not None:
            await self.process.wait()
            if self._stopping:
                return
            if self._drain is not None:
                await self._drain
            if not self._killing:
                self.crashes += 1  # it died by itself: the plan's crash fault
            self._killing = False
            await asyncio.sleep(self.restart_delay)
            if not self._stopping:
                await self.start()

    async def wait_started(self, count: int, timeout: float = 30.0) -> None:
        """Wait until the server has been started ``count`` times in all."""
        async with asyncio.timeout(timeout):
            while self.starts < count:
                await self._restarted.wait()

    async def set_plan(self, plan: FaultPlan) -> None:
        """Replace the running server's fault plan (needs ``chaos=True``)."""
        async with httpx.AsyncClient(base_url=self.url) as http:
            response = await http.put("/_chaos/plan", content=plan.to_json())
            response.raise_for_status()

    async def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it lingers)."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        process = self.process
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._drain is not None:
            with contextlib.suppress(Exception):
                await self._drain
