#!/usr/bin/env python3
"""One entry point for every developer task; needs only Python 3.11+ to start.

    python3 dev.py chat [ARGS]   set up, then chat (bundled server and demo agent start if needed)
    python3 dev.py serve [ARGS]  set up, then run the session server (python -m mock_server ARGS)
    python3 dev.py test [ARGS]   set up, then run the whole test suite (pytest ARGS)
    python3 dev.py lint          ruff check, ruff format --check, mypy
    python3 dev.py conformance   the official server conformance suite, memory and SQLite
    python3 dev.py bench [ARGS]  the benchmarks
    python3 dev.py package       build the wheel; install it alone, then with [server]

"Set up" makes ``.venv`` and installs the project with its development
extras (once, and again when pyproject.toml changes), and installs the pinned
Node packages in ``conformance/`` when Node.js is present.
"""

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


def package() -> int:
    """The wheel installs cleanly: the SDK alone brings no server, and [server] runs."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        dist = Path(scratch) / "dist"
        must(PYTHON, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", dist, ".")
        (wheel,) = dist.glob("*.whl")
        print(f"dev: built {wheel.name}")
        checks = {
            "sdk": (
                "",
                "import durable_client, importlib.util as u; "
                "assert u.find_spec('uvicorn') is None, 'the SDK must not bring the server'",
            ),
            "server": (
                "[server]",
                "import mock_server.__main__ as m; m.parse_args(['--port', '0'])",
            ),
        }
        for name, (extra, code) in checks.items():
            env = Path(scratch) / name
            venv.EnvBuilder(with_pip=True).create(env)
            python = env / BIN.name / PYTHON.name
            must(python, "-m", "pip", "install", "--quiet", f"{wheel}{extra}")
            must(python, "-c", code, cwd=Path(scratch))
            print(f"dev: wheel{extra or ' (SDK only)'} installs and imports")
    return 0


def main(argv: list[str]) -> int:
    task, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if task in ("help", "-h", "--help"):
        print(__doc__)
        return 0
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
    print(f"unknown task {task!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
