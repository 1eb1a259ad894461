"""The servers under test, each in a process of its own, on loopback.

:class:`ServerProcess` starts our server (``python -m mock_server``) or the Node
reference server (``conformance/reference-server.mjs``), waits until it
answers, reports its resident memory, and stops it by its process id.
Optionally each process is pinned to one core and the load generator to the
other, so the server and the client never fight over a core.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_SERVER = ROOT / "conformance" / "reference-server.mjs"

#: The long-poll timeout (and SSE keep-alive interval) of both servers.
LONG_POLL_SECONDS = 10.0

OURS = "ours"
NODE = "node"


def node_unavailable() -> str | None:
    """Why the Node reference server cannot run here, or ``None``."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (ROOT / "conformance" / "node_modules" / "@durable-streams" / "server").is_dir():
        return "conformance/node_modules is missing (python3 dev.py test, or npm ci there)"
    return None


@dataclass(frozen=True, slots=True)
class Pinning:
    """Which cores the servers and the load generator may use (``None``: any)."""

    server: frozenset[int] | None = None
    client: frozenset[int] | None = None

    @classmethod
    def split(cls) -> Pinning:
        """Server on the first allowed core, client on the others (if there are two or more)."""
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            return cls()
        return cls(server=frozenset(cores[:1]), client=frozenset(cores[1:]))

    def describe(self) -> str:
        if self.server is None:
            return "not pinned"
        assert self.client is not None
        return f"server on core {sorted(self.server)}, client on core {sorted(self.client)}"


@dataclass
class ServerProcess:
    """One server under test. Use :meth:`start`, then :meth:`stop` (by pid)."""

    kind: str
    pinning: Pinning = field(default_factory=Pinning)
    url: str = ""
    proc: subprocess.Popen[str] | None = None
    _drain: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _command(self) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        if self.kind == OURS:
            return [
                sys.executable,
                "-m",
                "mock_server",
                "--port",
                "0",
                "--long-poll-timeout",
                str(LONG_POLL_SECONDS),
                # As long as the longest benchmark, so that neither server
                # recycles SSE responses in the middle of a measurement (the
                # Node reference never does).
                "--sse-max-duration",
                "600",
                "--log-level",
                "warning",
            ], env
        if self.kind == NODE:
            env["DS_PORT"] = "0"
            env["DS_LONG_POLL_MS"] = str(int(LONG_POLL_SECONDS * 1000))
            return ["node", str(REFERENCE_SERVER)], env
        raise ValueError(f"unknown server kind {self.kind!r}")

    def _preexec(self) -> Callable[[], None] | None:
        cores = self.pinning.server
        if cores is None:
            return None

        def pin() -> None:
            os.sched_setaffinity(0, cores)

        return pin

    def start(self, timeout: float = 30.0) -> ServerProcess:
        """Start the server and wait until it answers ``GET /health`` (or a HEAD)."""
        command, env = self._command()
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=self._preexec(),  # only sched_setaffinity: safe before exec
        )
        found: list[str] = []
        lines: list[str] = []

        def read_banner() -> None:
            assert self.proc is not None
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.append(line)
                if line.startswith("READY "):
                    found.append(line.split()[1].strip())
                    return
                if line.startswith("durable session server on "):
                    found.append(line.split()[4].strip())
                    return

        reader = threading.Thread(target=read_banner, daemon=True)
        reader.start()
        reader.join(timeout)
        if not found:
            self.stop()
            raise RuntimeError(
                f"{self.kind} server did not start within {timeout:.0f} s: {''.join(lines)[-500:]}"
            )
        self.url = found[0]
        assert self.proc.stdout is not None
        # Keep draining its output so it never blocks on a full pipe.
        self._drain = threading.Thread(target=self.proc.stdout.read, daemon=True)
        self._drain.start()
        self._wait_ready(time.monotonic() + timeout)
        return self

    def _wait_ready(self, deadline: float) -> None:
        probe = f"{self.url}/health" if self.kind == OURS else f"{self.url}/v1/stream/_ready"
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    client.get(probe)
                    return
                time.sleep(0.05)
        raise RuntimeError(f"{self.kind} server at {self.url} does not answer")

    def rss_bytes(self) -> int:
        """The server's resident memory now (``VmRSS``)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def stop(self) -> None:
        """Stop this process (stdin closed, then SIGTERM, then SIGKILL; by pid only)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # the Node reference stops when its stdin closes
        if self.kind == OURS:
            proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._drain is not None:
            self._drain.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
