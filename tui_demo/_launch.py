"""Starting the pieces the chat needs, so that they outlive the terminal that started them.

The first terminal finds no server on the default URL, so it starts the
bundled server (SQLite storage in the data directory) and the agent host as
detached background processes. Later terminals find them running and just
join. Closing any terminal, the first included, ends nothing for the others.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

DEFAULT_SERVER = "http://127.0.0.1:4437"


class LaunchError(Exception):
    """Something the user must fix before chatting (the message says what)."""


def data_dir() -> Path:
    """Where the chat keeps its server data, logs and state."""
    override = os.environ.get("DURABLE_CHAT_HOME")
    if override:
        return Path(override)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "durable-sessions"


def is_local(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        return httpx.get(url.rstrip("/") + "/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _detached(args: list[str], log: Path) -> int:
    """Start ``args`` in a session of its own (the terminal's Ctrl-C and hangup do not
    reach it), output appended to ``log``; returns its process id."""
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        return os.posix_spawn(
            args[0],
            args,
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, fd, 1),
                (os.POSIX_SPAWN_DUP2, fd, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(fd)


def _exited(pid: int) -> bool:
    """Whether our child ``pid`` has exited (reaping it if so)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid


def ensure_server(url: str, home: Path, *, wait: float = 15.0) -> bool:
    """Make sure a server answers at ``url``; start the bundled one if local. True if started."""
    if healthy(url):
        return False
    if not is_local(url):
        raise LaunchError(f"cannot reach the session server at {url}")
    parts = urlsplit(url)
    port = parts.port or 80
    pid = _detached(
        [
            sys.executable,
            "-m",
            "mock_server",
            "--host",
            parts.hostname or "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(home / "server"),
        ],
        home / "server.log",
    )
    (home / f"server-{port}.pid").write_text(str(pid))
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if healthy(url, timeout=0.5):
            return True
        if _exited(pid):
            raise LaunchError(
                f"the bundled server could not start on {url}; see {home / 'server.log'}"
            )
        time.sleep(0.1)
    raise LaunchError(f"the bundled server did not answer on {url} within {wait:.0f} s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ensure_agents(url: str, home: Path, extra_args: list[str]) -> bool:
    """Make sure one agent host serves ``url`` from this machine; True if started."""
    port = urlsplit(url).port or 80
    pidfile = home / f"agents-{port}.pid"
    try:
        if _alive(int(pidfile.read_text())):
            return False
    except (OSError, ValueError):
        pass
    pid = _detached(
        [
            sys.executable,
            "-m",
            "tui_demo.agents",
            "--server",
            url,
            "--state-dir",
            str(home / f"agents-{port}"),
            "--pidfile",
            str(pidfile),
            *extra_args,
        ],
        home / "agents.log",
    )
    # Written here too (the host rewrites it), so a terminal started a moment
    # later finds this host instead of starting a second one.
    pidfile.write_text(str(pid))
    return True
