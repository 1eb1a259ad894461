"""Run this project's server in-process with server faults (for tests)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._http import DurableStreamsApp
from .._server import Settings, _Server, _uvicorn_config, bind, build_app, url_of
from .._store import StreamStore
from .plan import FaultPlan
from .server_faults import ServerFaults

__all__ = ["ChaosServer", "serve_chaos"]


@dataclass
class ChaosServer:
    """A running server with fault injection: ``url`` is its base URL."""

    url: str
    app: DurableStreamsApp
    faults: ServerFaults

    @property
    def store(self) -> StreamStore:
        return self.app.store

    def set_plan(self, plan: FaultPlan) -> None:
        """Apply ``plan``'s server rules from the next request on (counters restart)."""
        self.faults.set_plan(plan)

    def stream_url(self, path: str) -> str:
        return f"{self.url}/v1/stream/{path.lstrip('/')}"


@asynccontextmanager
async def serve_chaos(
    plan: FaultPlan | None = None,
    *,
    data_dir: str | Path | None = None,
    long_poll_timeout: float = 1.0,
    admin: bool = True,
    host: str = "127.0.0.1",
    port: int = 0,
    **overrides: Any,
) -> AsyncIterator[ChaosServer]:
    """Run the server in this event loop on a loopback port, with ``plan``'s server faults.

    ``admin`` mounts the ``/_chaos/`` admin endpoint. Other keyword arguments
    are :class:`mock_server.Settings` fields. The ``crash`` fault needs the
    server in its own process: use :class:`~mock_server.chaos.CrashHarness`.
    """
    settings = Settings(
        host=host,
        port=port,
        data_dir=Path(data_dir) if data_dir is not None else None,
        long_poll_timeout=long_poll_timeout,
        log_level="warning",
        **overrides,
    )
    app = build_app(settings)
    faults = ServerFaults(app, plan, admin=admin)
    sock = bind(host, port)
    server = _Server(_uvicorn_config(faults, settings), app)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:  # uvicorn has no start event; it sets this flag
            if task.done():
                task.result()
                raise RuntimeError("server stopped before it started")
            await asyncio.sleep(0.005)
        yield ChaosServer(url_of(sock), app, faults)
    finally:
        app.begin_shutdown()
        server.should_exit = True
        await task
        sock.close()
