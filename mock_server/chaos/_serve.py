"""Run this project's server with server faults: in-process for tests, or from the command line."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._http import DurableStreamsApp
from .._server import RunningServer, Settings, Wrap, serve
from .plan import FaultPlan
from .server_faults import ServerFaults

__all__ = ["ChaosServer", "chaos_middleware", "serve_chaos"]


@dataclass
class ChaosServer(RunningServer):
    """A running server with fault injection: ``url`` is its base URL."""

    faults: ServerFaults

    def set_plan(self, plan: FaultPlan) -> None:
        """Apply ``plan``'s server rules from the next request on (counters restart)."""
        self.faults.set_plan(plan)

    def stream_url(self, path: str) -> str:
        return f"{self.url}/v1/stream/{path.lstrip('/')}"


def chaos_middleware(settings: Settings) -> Wrap:
    """The middleware ``python -m mock_server --chaos`` / ``--fault-plan`` serves with:
    the faults of ``settings.fault_plan`` from the start, the admin endpoint if
    ``settings.chaos``, and ``crash`` allowed (the server has a process of its own)."""
    plan = FaultPlan.from_file(settings.fault_plan) if settings.fault_plan else None

    def wrap(app: DurableStreamsApp) -> ServerFaults:
        return ServerFaults(app, plan, allow_crash=True, admin=settings.chaos)

    return wrap


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
    made: list[ServerFaults] = []

    def wrap(app: DurableStreamsApp) -> ServerFaults:
        made.append(ServerFaults(app, plan, admin=admin))
        return made[-1]

    async with serve(
        data_dir=data_dir,
        long_poll_timeout=long_poll_timeout,
        host=host,
        port=port,
        wrap=wrap,
        **overrides,
    ) as running:
        yield ChaosServer(running.url, running.app, made[0])
