"""Shared fixtures for the chaos tests: a plain TCP upstream to put the proxy in front of."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

PAYLOAD = bytes(i % 251 for i in range(20_000))


@dataclass
class Upstream:
    """A TCP server that sends ``PAYLOAD`` on connect, then echoes and records what it gets."""

    port: int = 0
    received: list[bytearray] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    send_on_connect: bytes = PAYLOAD

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = bytearray()
        self.received.append(got)
        self.changed.set()
        try:
            writer.write(self.send_on_connect)
            await writer.drain()
            while data := await reader.read(65536):
                got.extend(data)
                self.changed.set()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def wait(self, condition: object, timeout: float = 5.0) -> None:
        assert callable(condition)
        async with asyncio.timeout(timeout):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
    up.port = server.sockets[0].getsockname()[1]
    async with server:
        yield up
        server.close()


def _plugin_registered() -> bool:
    """Whether pytest loads the chaos plugin by itself (its pytest11 entry point)."""
    from importlib.metadata import entry_points

    return any(
        ep.value.startswith("mock_server.chaos.pytest_plugin")
        for ep in entry_points(group="pytest11")
    )


if not _plugin_registered():
    # Until the entry point is installed, use the plugin's fixtures and report hook here.
    from mock_server.chaos.pytest_plugin import (  # noqa: F401
        chaos_proxy,
        chaos_seed,
        chaos_server,
        chaos_server_factory,
        history_checker,
        pytest_runtest_makereport,
    )
