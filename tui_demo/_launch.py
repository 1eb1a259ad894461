"""Starting the pieces the chat needs, so that they outlive the terminal that started them.

The first terminal finds no server on the default URL, so it starts the
bundled server (SQLite storage in the data directory) and the agent host as
detached background processes. Later terminals find them running and just
join. Closing any terminal, the first included, ends nothing for the others;
``--stop`` ends what the chat started (by the ids in its pid files).

A server is started only for the default URL: a ``--server`` URL where nothing
answers is most likely a typo, and a second server would mean a second agent
host over the same data (the server refuses a data directory another holds).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
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


def check_url(url: str) -> None:
    """Refuse a server URL that is not ``http(s)://host[:port]`` (LaunchError says why)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise LaunchError(f"--server {url}: not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LaunchError(f"--server {url}: give a URL such as {DEFAULT_SERVER}")


def _address(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host == "localhost":
        host = "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, host, port, parts.path.rstrip("/")


def same_server(a: str, b: str) -> bool:
    """Whether two server URLs name the same address (``localhost`` is 127.0.0.1)."""
    return _address(a) == _address(b)


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


def server_data(home: Path) -> Path:
    """The bundled server's data directory."""
    return home / "server"


def data_dir_owner(home: Path) -> tuple[int, str] | None:
    """The live server holding the chat's data directory, as (pid, URL), if it said so.

    The server writes both into ``server.lock`` there once it listens (the lock
    itself is the server's; this only reads what the holder wrote)."""
    try:
        owner = json.loads((server_data(home) / "server.lock").read_text())
        pid, url = int(owner["pid"]), str(owner["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (pid, url) if _alive(pid) else None


def _log_tail(log: Path, start: int) -> str:
    """The last line written to ``log`` after byte ``start``."""
    try:
        with log.open("rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def ensure_server(
    url: str, home: Path, *, wait: float = 15.0, default: str = DEFAULT_SERVER
) -> bool:
    """Make sure a server answers at ``url``; True if this call started one.

    The bundled server is started only when ``url`` is the ``default`` address;
    anywhere else a silent URL is a :class:`LaunchError` (a mistyped port must
    not start a second server over the same data).
    """
    check_url(url)
    if healthy(url):
        return False
    owner = data_dir_owner(home)
    if not same_server(url, default):
        hint = ""
        if owner is not None and not same_server(owner[1], url):
            hint = f"; the chat's server is at {owner[1]} (pid {owner[0]})"
        raise LaunchError(
            f"nothing answers at {url}{hint}; the chat starts a server only at {default} "
            f"(to serve another port, run one yourself: durable-server --port "
            f"{_address(url)[2]} --data-dir DIR)"
        )
    if not is_local(url):
        raise LaunchError(f"cannot reach the session server at {url}")
    if owner is not None:
        raise LaunchError(
            f"nothing answers at {url}, and the chat's data directory {server_data(home)} "
            f"is held by the server at {owner[1]} (pid {owner[0]}): "
            f"use --server {owner[1]}, or stop it"
        )
    parts = urlsplit(url)
    port = parts.port or 80
    log = home / "server.log"
    start = log.stat().st_size if log.exists() else 0
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
            str(server_data(home)),
        ],
        log,
    )
    (home / f"server-{port}.pid").write_text(str(pid))
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if healthy(url, timeout=0.5):
            return True
        if _exited(pid):
            (home / f"server-{port}.pid").unlink(missing_ok=True)
            said = _log_tail(log, start)
            raise LaunchError(
                f"the bundled server could not start on {url}: {said or 'no output'} (log: {log})"
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
        recorded: int | None = int(pidfile.read_text())
    except (OSError, ValueError):
        recorded = None
    if is_ours(Background("agents", port, recorded, pidfile), home):
        return False
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


# --- what the chat left running, and stopping it -----------------------------------------


@dataclass(frozen=True)
class Background:
    """A background process the chat started, as its pid file records it."""

    kind: str  # "server" or "agents"
    port: int
    pid: int | None  # None: the pid file is unreadable
    pidfile: Path

    @property
    def what(self) -> str:
        if self.kind == "server":
            return f"the session server on port {self.port} (pid {self.pid})"
        return f"the agent host for port {self.port} (pid {self.pid})"


def background(home: Path) -> list[Background]:
    """Every process the chat recorded in a pid file under ``home``."""
    found: list[Background] = []
    for kind in ("server", "agents"):
        for pidfile in sorted(home.glob(f"{kind}-*.pid")):
            try:
                port = int(pidfile.stem.removeprefix(f"{kind}-"))
            except ValueError:
                continue  # not one of ours
            try:
                pid: int | None = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                pid = None
            found.append(Background(kind, port, pid, pidfile))
    return found


def _cmdline(pid: int) -> list[str]:
    """The command line of process ``pid`` ([] if it is gone or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return []
    except OSError:
        return []
    else:
        return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    try:  # no /proc (macOS): ask ps
        out = subprocess.run(
            ["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return out.split()


def is_ours(entry: Background, home: Path) -> bool:
    """Whether ``entry``'s pid is still the process the chat started (not a reused pid)."""
    if entry.pid is None or _gone(entry.pid):
        return False
    args = _cmdline(entry.pid)
    if entry.kind == "server":
        return "mock_server" in args and str(server_data(home)) in args
    return "tui_demo.agents" in args and str(entry.pidfile) in args


def _gone(pid: int) -> bool:
    """Whether ``pid`` has ended (reaping it if it is our child; a zombie counts as ended)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return True
    except ChildProcessError:
        pass
    if not _alive(pid):
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]


def running(home: Path) -> list[Background]:
    """The chat's background processes that are still running."""
    return [entry for entry in background(home) if is_ours(entry, home)]


def still_running_note(home: Path, stop_command: str) -> str | None:
    """One line for the user leaving the chat: what keeps running and how to stop it."""
    alive = running(home)
    if not alive:
        return None
    what = " and ".join(entry.what for entry in alive)
    verb = "keeps" if len(alive) == 1 else "keep"
    return f"durable chat: {what} {verb} running for other terminals; stop with: {stop_command}"


def stop(home: Path, *, wait: float = 10.0) -> list[str]:
    """Stop the background processes the chat started, by the pids in its pid files.

    Only a process that is still the one we started (its command line says so)
    is signalled; a pid file whose process is gone, or whose pid now belongs to
    another program, is removed. Returns one line per pid file saying what happened.
    """
    said: list[str] = []
    # Agents first, so that they do not spend their last moments reconnecting.
    for entry in sorted(background(home), key=lambda e: e.kind != "agents"):
        if entry.pid is None:
            said.append(f"removed {entry.pidfile.name} (it held no process id)")
        elif not is_ours(entry, home):
            if _gone(entry.pid):
                said.append(f"removed a stale {entry.pidfile.name} (pid {entry.pid} had ended)")
            else:
                said.append(
                    f"removed a stale {entry.pidfile.name} (pid {entry.pid} is another "
                    "program now; left it alone)"
                )
        else:
            said.append(_terminate(entry, wait))
        entry.pidfile.unlink(missing_ok=True)
    return said or [f"nothing to stop (no background processes recorded in {home})"]


def _terminate(entry: Background, wait: float) -> str:
    assert entry.pid is not None
    pid = entry.pid
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return f"{entry.what} had just ended"
    except PermissionError:
        return f"cannot stop {entry.what}: not permitted"
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if _gone(pid):
            return f"stopped {entry.what}"
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return f"stopped {entry.what}"
    return f"killed {entry.what} (it did not stop within {wait:.0f} s of SIGTERM)"
