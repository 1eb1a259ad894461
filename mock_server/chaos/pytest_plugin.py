"""pytest fixtures for chaos-testing reconnects, in this project's tests and in yours.

Registered through the ``pytest11`` entry point when ``durable-sessions`` is
installed (or load it with ``-p mock_server.chaos.pytest_plugin``). Fixtures:

- ``chaos_seed``: this test's seed: ``--chaos-seed N`` (or ``CHAOS_SEED``)
  if given, ``--chaos-seed random`` for a fresh one, else derived from the
  test's id, so every run of a test draws the same faults;
- ``chaos_server``: this project's server in the test's event loop, with
  fault injection (``chaos_server.set_plan(plan)``) and the admin endpoint;
- ``chaos_server_factory``: the same with options (``data_dir``, ``plan``, ...);
- ``chaos_proxy``: ``await chaos_proxy(url, plan)`` puts a TCP chaos proxy in
  front of any server, yours included, and closes it after the test;
- ``history_checker``: a :class:`~mock_server.chaos.HistoryRecorder`.

When a test that used them fails, its report gets a "chaos" section: the
seed and how to replay it, every plan, the faults applied, and the history
check. The async fixtures need pytest-asyncio.

Everything is imported lazily, so the plugin costs nothing (and needs none
of the server's dependencies) in test runs that do not use it; with the SDK
alone, ``chaos_server`` fails its test with the extra to install.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pytest

if TYPE_CHECKING:
    from ._serve import ChaosServer
    from .checker import HistoryRecorder
    from .plan import FaultPlan
    from .proxy import ChaosProxy

_F = TypeVar("_F", bound=Callable[..., Any])


def _async_fixture(function: _F) -> _F:
    """``pytest_asyncio.fixture``, so the fixtures work in strict mode too."""
    try:
        import pytest_asyncio
    except ImportError:  # pragma: no cover - pytest then says the fixture is async
        return cast(_F, pytest.fixture(function))
    return cast(_F, pytest_asyncio.fixture(function))


__all__ = [
    "chaos_proxy",
    "chaos_seed",
    "chaos_server",
    "chaos_server_factory",
    "history_checker",
    "pytest_addoption",
    "pytest_runtest_makereport",
]

ProxyFactory = Callable[..., Awaitable["ChaosProxy"]]
ServerFactory = Callable[..., Awaitable["ChaosServer"]]


@dataclass
class _Record:
    """What a test did with chaos, for its failure report."""

    seed: int | None = None
    seed_given: bool = False
    servers: list[ChaosServer] = field(default_factory=list)
    proxies: list[ChaosProxy] = field(default_factory=list)
    checkers: list[HistoryRecorder] = field(default_factory=list)


_RECORD = pytest.StashKey[_Record]()


def _record(node: pytest.Item | pytest.Collector) -> _Record:
    if _RECORD not in node.stash:
        node.stash[_RECORD] = _Record()
    return node.stash[_RECORD]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("chaos", "deterministic chaos (mock_server.chaos)")
    group.addoption(
        "--chaos-seed",
        default=None,
        metavar="N|random",
        help="seed for the chaos fixtures (default: derived from each test's id;"
        " a failing test prints the seed that replays it)",
    )


def _given_seed(config: pytest.Config) -> str | None:
    value: str | None = config.getoption("chaos_seed", default=None)
    return value if value is not None else os.environ.get("CHAOS_SEED")


@pytest.fixture
def chaos_seed(request: pytest.FixtureRequest) -> int:
    """The seed for this test's plans (see the module docstring)."""
    from .plan import derive_seed

    given = _given_seed(request.config)
    record = _record(request.node)
    if given == "random":
        seed = secrets.randbelow(2**32)
    elif given is not None:
        seed = int(given)
        record.seed_given = True
    else:
        seed = derive_seed(0, request.node.nodeid) % 2**32
    record.seed = seed
    return seed


@_async_fixture
async def chaos_server_factory(
    request: pytest.FixtureRequest,
) -> AsyncIterator[ServerFactory]:
    """``await chaos_server_factory(plan=None, data_dir=None, **settings)``: our
    server with fault injection, stopped after the test."""
    from .._entry import missing_extra

    if (problem := missing_extra("chaos_server", "server")) is not None:
        pytest.fail(problem, pytrace=False)
    from ._serve import serve_chaos

    record = _record(request.node)
    async with AsyncExitStack() as stack:

        async def start(plan: FaultPlan | None = None, **options: Any) -> ChaosServer:
            options.setdefault("long_poll_timeout", 1.0)
            server = await stack.enter_async_context(serve_chaos(plan, **options))
            record.servers.append(server)
            return server

        yield start


@_async_fixture
async def chaos_server(chaos_server_factory: ServerFactory) -> ChaosServer:
    """This project's server (in memory) with fault injection and the admin
    endpoint; ``chaos_server.url``, ``chaos_server.set_plan(plan)``."""
    return await chaos_server_factory()


@_async_fixture
async def chaos_proxy(request: pytest.FixtureRequest) -> AsyncIterator[ProxyFactory]:
    """``await chaos_proxy(upstream_url, plan=None)``: a started TCP chaos
    proxy in front of any server; closed after the test."""
    from .proxy import ChaosProxy

    record = _record(request.node)
    async with AsyncExitStack() as stack:

        async def start(upstream: str, plan: FaultPlan | None = None) -> ChaosProxy:
            proxy = await stack.enter_async_context(ChaosProxy(upstream, plan))
            record.proxies.append(proxy)
            return proxy

        yield start


@pytest.fixture
def history_checker(request: pytest.FixtureRequest) -> HistoryRecorder:
    """A :class:`~mock_server.chaos.HistoryRecorder`: record what was published
    and seen, then ``history_checker.assert_ok()``."""
    from .checker import HistoryRecorder

    recorder = HistoryRecorder()
    _record(request.node).checkers.append(recorder)
    return recorder


def _section(item: pytest.Item, record: _Record) -> str:
    lines: list[str] = []
    if record.seed is not None:
        lines.append(f"chaos seed: {record.seed}")
        lines.append(f"replay: pytest --chaos-seed {record.seed} '{item.nodeid}'")
    for i, server in enumerate(record.servers):
        lines.append(f"server {i} ({server.url}): {server.faults.plan.describe()}")
        applied = server.faults.log
        lines.append(f"  {len(applied)} server fault(s) applied" + (":" if applied else ""))
        lines.extend(f"    {fault}" for fault in applied[-20:])
    for i, proxy in enumerate(record.proxies):
        lines.append(
            f"proxy {i} ({proxy.url} -> {proxy.upstream[0]}:{proxy.upstream[1]}):"
            f" {proxy.plan.describe()}"
        )
        lines.append(
            f"  {len(proxy.connections)} connection(s), {proxy.bytes_down} bytes down,"
            f" {proxy.bytes_up} up; {len(proxy.log)} fault(s) applied" + (":" if proxy.log else "")
        )
        lines.extend(f"    {fault}" for fault in proxy.log[-20:])
    for checker in record.checkers:
        lines.append(str(checker.check()))
    return "\n".join(lines)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """Add the "chaos" section (seed, plans, faults, history) to a failing test's report."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    record = item.stash.get(_RECORD, None)
    if record is None or not report.failed:
        return
    if record.seed is None and not (record.servers or record.proxies or record.checkers):
        return
    report.sections.append(("chaos", _section(item, record)))
