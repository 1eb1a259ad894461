"""Fixtures: the real server on a loopback socket, once per storage backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from mock_server.testing import RunningServer, serve


@pytest.fixture(params=["memory", "sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def server(backend: str, tmp_path: Path) -> AsyncIterator[RunningServer]:
    data_dir = tmp_path / "data" if backend == "sqlite" else None
    async with serve(data_dir=data_dir, long_poll_timeout=0.5, max_body_bytes=64 * 1024) as running:
        yield running


@pytest.fixture
async def http(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        yield client


class FakeClock:
    """A clock the test moves by hand, for TTL and expiry."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(server: RunningServer) -> FakeClock:
    fake = FakeClock()
    server.store.clock = fake
    return fake
