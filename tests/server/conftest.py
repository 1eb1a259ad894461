"""Fixtures: the real server on a loopback socket, once per storage backend."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
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


class ServerLog(logging.Handler):
    """Every record the server (uvicorn, mock_server, asyncio) logs while a test runs."""

    LOGGERS = ("", "uvicorn")  # the root gets mock_server and asyncio; uvicorn stops its own

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def problems(self) -> list[str]:
        """Errors and tracebacks: what a bad request must never cause."""
        return [
            f"{r.name} {r.levelname}: {r.getMessage()}"
            + (
                f" [{r.exc_info[0].__name__}: {r.exc_info[1]}]"
                if r.exc_info and r.exc_info[0]
                else ""
            )
            for r in self.records
            if r.levelno >= logging.ERROR or r.exc_info or "Traceback" in r.getMessage()
        ]


@pytest.fixture
def server_log(server: RunningServer) -> Iterator[ServerLog]:
    """The server's log. Attached after the server starts: uvicorn's logging setup,
    when its config is built, replaces the handlers of its loggers."""
    yield from capture_server_log()


def capture_server_log() -> Iterator[ServerLog]:
    handler = ServerLog()
    loggers = [logging.getLogger(name) for name in ServerLog.LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
