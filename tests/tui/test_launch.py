"""The chat's background processes, as a user meets them: a mistyped --server starts
nothing, quitting says what keeps running, --stop stops exactly that, stale pid files
are cleaned up; and the default name when $USER is unset."""

from __future__ import annotations

import contextlib
import getpass
import os
import pwd
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tui_demo.__main__ import default_name, parse_args
from tui_demo._launch import (
    LaunchError,
    ensure_agents,
    ensure_server,
    healthy,
    still_running_note,
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def chat(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m tui_demo ARGS`` with its data in ``home`` (bounded; no terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "tui_demo", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "DURABLE_CHAT_HOME": str(home), "PYTHONWARNINGS": "ignore"},
    )


def pids(home: Path) -> list[int]:
    found = []
    for pidfile in home.glob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            found.append(int(pidfile.read_text()))
    return found


@contextlib.contextmanager
def cleanup(home: Path) -> Iterator[None]:
    """However the test ends, stop what was started with ``home`` (by the recorded ids)."""
    started: set[int] = set()
    try:
        yield
    finally:
        started.update(pids(home))
        for pid in started:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def reap(pid: int) -> None:
    """Collect our exited child ``pid`` (the launcher's processes are children of the test)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def test_a_mistyped_server_port_starts_no_server(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with cleanup(tmp_path):
        result = chat(tmp_path, "--server", url)
        started = pids(tmp_path)
    assert started == [], "a server or agent host was started for a URL nobody meant"
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"nothing answers at {url}" in lines[0]
    assert not healthy(url)


@pytest.mark.parametrize("url", ["localhost:4437", "http://127.0.0.1:99999", "ftp://127.0.0.1"])
def test_a_server_url_that_is_not_one_is_refused(tmp_path: Path, url: str) -> None:
    with cleanup(tmp_path):
        result = chat(tmp_path, "--server", url)
        assert pids(tmp_path) == []
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"--server {url}" in result.stderr


def test_a_typo_names_the_server_that_holds_the_data(tmp_path: Path) -> None:
    real = f"http://127.0.0.1:{free_port()}"
    typo = f"http://127.0.0.1:{free_port()}"
    with cleanup(tmp_path):
        assert ensure_server(real, tmp_path, default=real) is True
        server_pid = int(next(tmp_path.glob("server-*.pid")).read_text())
        # The typo is not the default address: nothing is started, and the error says
        # where the chat's server is.
        with pytest.raises(
            LaunchError, match=f"the chat's server is at {real} \\(pid {server_pid}"
        ):
            ensure_server(typo, tmp_path, default=real)
        # Even if the typo were the default address, a second server over the same data
        # directory is not started: the one that holds it is named.
        with pytest.raises(LaunchError, match=f"held by the server at {real}"):
            ensure_server(typo, tmp_path, default=typo)
        assert not healthy(typo)
        assert len(list(tmp_path.glob("server-*.pid"))) == 1


def test_quitting_says_what_runs_and_stop_stops_it(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with cleanup(tmp_path):
        assert still_running_note(tmp_path, "durable-chat --stop") is None
        ensure_server(url, tmp_path, default=url)
        ensure_agents(url, tmp_path, ["--no-helper"])
        server = int((tmp_path / f"server-{port}.pid").read_text())
        agents = int((tmp_path / f"agents-{port}.pid").read_text())

        note = still_running_note(tmp_path, "durable-chat --stop")
        assert note is not None
        assert "\n" not in note
        assert f"session server on port {port} (pid {server})" in note
        assert f"agent host for port {port} (pid {agents})" in note
        assert note.endswith("stop with: durable-chat --stop")

        result = chat(tmp_path, "--stop")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        assert f"stopped the session server on port {port} (pid {server})" in result.stdout
        assert f"stopped the agent host for port {port} (pid {agents})" in result.stdout
        for pid in (server, agents):
            reap(pid)  # returns at once: --stop waited until they had ended
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert list(tmp_path.glob("*.pid")) == []
        assert not healthy(url)
        assert still_running_note(tmp_path, "durable-chat --stop") is None
        again = chat(tmp_path, "--stop")
        assert again.returncode == 0
        assert "nothing to stop" in again.stdout


def test_stop_cleans_stale_pid_files_and_signals_no_stranger(tmp_path: Path) -> None:
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "server-4998.pid").write_text(str(ended.pid))  # the process is gone
        (tmp_path / "agents-4998.pid").write_text(str(stranger.pid))  # the pid is not ours
        (tmp_path / "server-4997.pid").write_text("not a pid")
        result = chat(tmp_path, "--stop")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        out = result.stdout
        assert f"removed a stale server-4998.pid (pid {ended.pid} had ended)" in out
        assert f"removed a stale agents-4998.pid (pid {stranger.pid} is another program" in out
        assert "removed server-4997.pid (it held no process id)" in out
        assert stranger.poll() is None  # never signalled
        assert list(tmp_path.glob("*.pid")) == []
    finally:
        stranger.kill()
        stranger.wait()


def test_the_default_name_is_not_you_without_user(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("USER", "LOGNAME", "LNAME", "USERNAME"):
        monkeypatch.delenv(variable, raising=False)
    login = pwd.getpwuid(os.getuid()).pw_name
    assert default_name() == login
    assert parse_args([]).name == login


def test_without_any_login_name_the_default_comes_from_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("USER", raising=False)

    def no_login_name() -> str:
        raise OSError("no login name")  # as getpass does for a uid with no passwd entry

    monkeypatch.setattr(getpass, "getuser", no_login_name)
    name = default_name()
    assert name == f"{socket.gethostname().split('.')[0]}-{os.getpid()}"
    assert name != "you"
