"""Fixtures for the client tests: real servers on loopback sockets.

- ``reference_url``: the Node reference server (``conformance/reference-server.mjs``),
  one subprocess for the whole run, killed at teardown. Skipped without node or
  its ``node_modules``.
- ``ours_url``: our ``mock_server`` (HTTP and WebSocket), one for the whole run.
- ``ours_http_url``: our server with WebSocket turned off (``websocket=False``).
- ``server_url``: parametrized by ``server_kind`` over ``ours`` and ``reference``,
  for interoperability tests. In modules marked ``both_transports`` (the
  session guarantees), over ``ours-websocket``, ``ours-http`` and
  ``reference`` instead: sessions pick their transport by themselves
  (``transport="auto"``), so the same tests run over WebSocket (our server
  offers it) and HTTP (``ours-http`` and the Node server refuse it).
- ``transport``: ``websocket`` or ``http``, what sessions of that run use
  (tests that inject faults need to know where to cut).
- ``proxy``: a fault-injecting TCP proxy (``_proxy.Proxy``) in front of the
  parametrized server; it follows HTTP and WebSocket frames.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from mock_server.chaos import ChaosProxy as Proxy

ROOT = Path(__file__).resolve().parents[2]
REFERENCE_SERVER = ROOT / "conformance" / "reference-server.mjs"
LONG_POLL_MS = 500


def _reference_available() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not (ROOT / "conformance" / "node_modules" / "@durable-streams" / "server").is_dir():
        return "conformance/node_modules is missing (run: python3 dev.py setup)"
    return None


@pytest.fixture(scope="session")
def reference_url() -> Iterator[str]:
    """The Node reference server's base URL (started once per test run)."""
    reason = _reference_available()
    if reason:
        if os.environ.get("CI"):
            # CI installs Node packages itself (dev.py); a skip there would hide a broken step.
            pytest.fail(f"interoperability tests cannot run in CI: {reason}")
        pytest.skip(reason)
    env = {**os.environ, "DS_LONG_POLL_MS": str(LONG_POLL_MS), "DS_PORT": "0"}
    proc = subprocess.Popen(
        ["node", str(REFERENCE_SERVER)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    assert proc.stdout is not None
    url: list[str] = []

    def read_ready() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("READY "):
                url.append(line.split()[1].strip())
                return

    reader = threading.Thread(target=read_ready, daemon=True)
    reader.start()
    reader.join(timeout=20)
    if not url:
        proc.kill()
        proc.wait(timeout=5)
        pytest.fail("the reference server did not print READY within 20 s")
    # Keep draining its output so it never blocks on a full pipe.
    drain = threading.Thread(target=proc.stdout.read, daemon=True)
    drain.start()
    try:
        yield url[0]
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # the server exits when its stdin closes
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        drain.join(timeout=5)
        proc.stdout.close()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "both_transports: run the module's server tests over WebSocket and HTTP"
    )
    config.addinivalue_line(
        "markers",
        "ours_only: a test of what only our server offers (or of a server it starts itself);"
        " not run against the Node reference server",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "server_kind" in metafunc.fixturenames:
        both = metafunc.definition.get_closest_marker("both_transports") is not None
        kinds = ["ours-websocket", "ours-http", "reference"] if both else ["ours", "reference"]
        if metafunc.definition.get_closest_marker("ours_only") is not None:
            kinds.remove("reference")
        metafunc.parametrize("server_kind", kinds)


@pytest.fixture(scope="session")
def ours_url() -> Iterator[str]:
    """Our server (mock_server.testing.serve), once for the whole run."""
    yield from _serve_in_thread()


@pytest.fixture(scope="session")
def ours_http_url() -> Iterator[str]:
    """Our server without its WebSocket transport, once for the whole run."""
    yield from _serve_in_thread(websocket=False)


def _serve_in_thread(**overrides: object) -> Iterator[str]:
    """Run our server on its own event loop in a background thread, so one
    server serves every test (each test uses its own stream names) instead of
    starting and stopping one per test."""
    try:
        from mock_server.testing import serve
    except ImportError:  # pragma: no cover - the server package is optional here
        pytest.skip("mock_server.testing is not available")
    url: list[str] = []
    started = threading.Event()
    stop: list[asyncio.Event] = []
    errors: list[BaseException] = []
    loop = asyncio.new_event_loop()

    async def run() -> None:
        stop.append(asyncio.Event())
        async with serve(long_poll_timeout=LONG_POLL_MS / 1000, **overrides) as running:
            url.append(running.url)
            started.set()
            await stop[0].wait()

    def main() -> None:
        try:
            loop.run_until_complete(run())
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            started.set()
            # As asyncio.run() does: let tasks still winding down (a socket's
            # subscriptions, cancelled as it closed) finish before the loop goes.
            leftover = asyncio.all_tasks(loop)
            for task in leftover:
                task.cancel()

            async def finish() -> None:
                await asyncio.gather(*leftover, return_exceptions=True)

            loop.run_until_complete(finish())
            loop.close()

    thread = threading.Thread(target=main, name="mock-server", daemon=True)
    thread.start()
    started.wait(timeout=20)
    if not url:
        pytest.fail(f"our server did not start: {errors}")
    try:
        yield url[0]
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(timeout=10)


@pytest.fixture
def server_url(server_kind: str, request: pytest.FixtureRequest) -> str:
    """A base URL: our server or the Node reference server (parametrized)."""
    fixture = {"reference": "reference_url", "ours-http": "ours_http_url"}.get(
        server_kind, "ours_url"
    )
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def transport(server_kind: str) -> str:
    """The transport sessions use against ``server_url``: ``websocket`` or ``http``."""
    return "websocket" if server_kind in ("ours", "ours-websocket") else "http"


@pytest.fixture
async def proxy(server_url: str) -> AsyncIterator[Proxy]:
    """A fault-injecting proxy in front of ``server_url``."""
    async with Proxy(server_url) as running:
        yield running


@pytest.fixture
def stream_name() -> str:
    """A stream path no other test uses (the reference server lives all run)."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Unique names for sessions and streams."""
    return lambda prefix: f"{prefix}-{uuid.uuid4().hex[:12]}"
