"""dev.py: a mistyped task is refused before any set-up, and ``stop`` needs none."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def dev(checkout: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(checkout / "dev.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def bare_checkout(tmp_path: Path) -> Path:
    """dev.py alone, as in a fresh clone before its first run: no .venv."""
    shutil.copy(ROOT / "dev.py", tmp_path / "dev.py")
    return tmp_path


def test_an_unknown_task_is_refused_before_any_setup(tmp_path: Path) -> None:
    checkout = bare_checkout(tmp_path)
    result = dev(checkout, "tset")
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("dev: unknown task 'tset'; the tasks are chat, stop, serve, test,")
    assert not (checkout / ".venv").exists()


def test_stop_without_a_venv_says_nothing_is_running(tmp_path: Path) -> None:
    checkout = bare_checkout(tmp_path)
    result = dev(checkout, "stop")
    assert result.returncode == 0, result.stderr
    assert "nothing is running" in result.stdout
    assert not (checkout / ".venv").exists()


def test_stop_asks_the_chat_to_stop_what_it_started(tmp_path: Path) -> None:
    """With .venv, ``dev.py stop`` is ``python -m tui_demo --stop`` (here on an empty chat home)."""
    result = dev(ROOT, "stop", DURABLE_CHAT_HOME=str(tmp_path / "home"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dev: installing" not in result.stdout
    assert "Traceback" not in result.stderr
