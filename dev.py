#!/usr/bin/env python3
"""One entry point for every developer task; needs only Python 3.11+ to start.

    python3 dev.py chat [ARGS]   set up, then chat (bundled server and demo agent start if needed)
    python3 dev.py stop          stop the server and agent host the chat left running
    python3 dev.py serve [ARGS]  set up, then run the session server (python -m mock_server ARGS)
    python3 dev.py test [ARGS]   set up, then run the whole test suite (pytest ARGS)
    python3 dev.py lint          ruff check, ruff format --check, mypy
    python3 dev.py conformance   the official server conformance suite, memory and SQLite
    python3 dev.py bench [ARGS]  the benchmarks
    python3 dev.py package       build the wheel; check it alone (pytest untouched, the
                                 commands name their extra), then with [server]
    python3 dev.py setup         set up only

"Set up" makes ``.venv`` and installs the project with its development
extras (once, and again when pyproject.toml changes), and installs the pinned
Node packages in ``conformance/`` when Node.js is present. ``stop`` sets up
nothing: without ``.venv``, ``dev.py chat`` never ran, so nothing is running."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
CONFORMANCE = ROOT / "conformance"


def run(*args: str | Path, cwd: Path = ROOT, env: dict[str, str] | None = None) -> int:
    return subprocess.call([str(a) for a in args], cwd=cwd, env=env)


def must(*args: str | Path, cwd: Path = ROOT) -> None:
    code = run(*args, cwd=cwd)
    if code:
        sys.exit(code)


def setup() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - users may run it with an older python3
        sys.exit(f"Python 3.11 or newer is needed; this is {sys.version.split()[0]}")
    if not PYTHON.exists():
        print("dev: creating .venv", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / ".installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text() != digest:
        print("dev: installing the project and its development tools into .venv", flush=True)
        must(PYTHON, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
        must(PYTHON, "-m", "pip", "install", "--quiet", "-e", ".[dev]")
        stamp.write_text(digest)
    setup_node()


def setup_node() -> None:
    """The pinned Node packages: the conformance suite and the reference server (a test peer)."""
    npm = shutil.which("npm")
    if npm is None:
        print("dev: Node.js/npm not found; interoperability tests and conformance need it")
        return
    marker = CONFORMANCE / "node_modules" / ".package-lock.json"
    lock = CONFORMANCE / "package-lock.json"
    if not marker.exists() or marker.stat().st_mtime < lock.stat().st_mtime:
        print("dev: installing the pinned Node packages in conformance/", flush=True)
        must(npm, "ci", "--no-audit", "--no-fund", "--loglevel=error", cwd=CONFORMANCE)


# A trivial suite for the SDK-only venv: pytest runs, and loads the chaos plugin
# (the pytest11 entry point) without the server's dependencies.
SDK_ONLY_SUITE = """
def test_arithmetic():
    assert 1 + 1 == 2

def test_the_chaos_plugin_loads(pytestconfig, history_checker):
    assert pytestconfig.pluginmanager.has_plugin("mock_server.chaos.pytest_plugin")
"""


def expect(args: list[str | Path], code: int, says: str, cwd: Path) -> None:
    """Run ``args``; exit unless it ends with ``code`` and prints ``says`` (and no traceback)."""
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    output = done.stdout + done.stderr
    if done.returncode != code or says not in output or "Traceback" in output:
        print(output, file=sys.stderr)
        command = " ".join(str(a) for a in args)
        sys.exit(f"dev: `{command}` exited {done.returncode} (expected {code}, printing {says!r})")


def package() -> int:
    """The wheel installs cleanly: the SDK alone brings no server and leaves pytest
    working, its commands name the extra they need, and [server] runs."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        dist = scratch / "dist"
        must(PYTHON, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", dist, ".")
        (wheel,) = dist.glob("*.whl")
        print(f"dev: built {wheel.name}")
        sdk = install(scratch / "sdk", str(wheel))
        must(
            sdk / PYTHON.name,
            "-c",
            "import durable_client, importlib.util as u; "
            "assert u.find_spec('uvicorn') is None, 'the SDK must not bring the server'",
            cwd=scratch,
        )
        print("dev: wheel (SDK only) installs and imports")
        must(sdk / PYTHON.name, "-m", "pip", "install", "--quiet", "pytest")
        suite = scratch / "suite"
        suite.mkdir()
        (suite / "test_trivial.py").write_text(SDK_ONLY_SUITE)
        expect(
            [sdk / PYTHON.name, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
            0,
            "2 passed",
            suite,
        )
        print("dev: pytest in the SDK-only venv loads the chaos plugin and passes")
        expect([sdk / "durable-server"], 2, "durable-server needs the server extra", scratch)
        expect([sdk / "durable-chat"], 2, "durable-chat needs the tui extra", scratch)
        print("dev: durable-server and durable-chat (SDK only) name the extra to install")
        server = install(scratch / "server", f"{wheel}[server]")
        must(
            server / PYTHON.name,
            "-c",
            "import mock_server.__main__ as m; m.parse_args(['--port', '0'])",
            cwd=scratch,
        )
        expect([server / "durable-server", "--help"], 0, "--data-dir", scratch)
        expect([server / "durable-chat"], 2, "durable-chat needs the tui extra", scratch)
        print("dev: wheel[server] installs, imports and runs durable-server")
    return 0


def install(path: Path, requirement: str) -> Path:
    """A fresh venv at ``path`` with ``requirement`` installed; its scripts folder."""
    venv.EnvBuilder(with_pip=True).create(path)
    scripts = path / BIN.name
    must(scripts / PYTHON.name, "-m", "pip", "install", "--quiet", requirement)
    return scripts


def stop() -> int:
    """Stop what ``dev.py chat`` left running, through the chat's own ``--stop``."""
    if not PYTHON.exists():
        print("dev: nothing is running (no .venv: the chat never ran from this checkout)")
        return 0
    return run(PYTHON, "-m", "tui_demo", "--stop")


TASKS = ("chat", "stop", "serve", "test", "lint", "conformance", "bench", "package", "setup")


def main(argv: list[str]) -> int:
    task, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if task in ("help", "-h", "--help"):
        print(__doc__)
        return 0
    if task not in TASKS:
        print(
            f"dev: unknown task {task!r}; the tasks are {', '.join(TASKS)}"
            " (python3 dev.py help says what each does)",
            file=sys.stderr,
        )
        return 2
    if task == "stop":
        return stop()
    setup()
    if task == "test":
        return run(PYTHON, "-m", "pytest", *rest)
    if task == "serve":
        return run(PYTHON, "-m", "mock_server", *rest)
    if task == "chat":
        launcher = {**os.environ, "DURABLE_CHAT_LAUNCHER": "python3 dev.py chat"}
        return run(PYTHON, "-m", "tui_demo", *rest, env=launcher)
    if task == "lint":
        failed = run(BIN / "ruff", "check", ".")
        failed |= run(BIN / "ruff", "format", "--check", ".")
        failed |= run(PYTHON, "-m", "mypy")
        return 1 if failed else 0
    if task == "conformance":
        failed = 0
        for backend in ("memory", "sqlite"):
            failed |= run(
                "bash",
                CONFORMANCE / "run-server-suite.sh",
                backend,
                *rest,
                env={**os.environ, "PYTHON": str(PYTHON)},
            )
        return 1 if failed else 0
    if task == "package":
        return package()
    if task == "bench":
        return run(PYTHON, "-m", "bench", *rest)
    return 0  # setup


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
