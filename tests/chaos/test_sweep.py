"""The exact-N sweep: a disconnect right after every event N, for every cutting fault.

One server and one closed stream of 200 events for the whole module; each run
is a fresh reader from the beginning with a plan that cuts its connection
right after event N (N = 0..200). Every run must end with the full history,
exactly once, in order, and the fault must have fired exactly once. A second
sweep cuts at byte B through the TCP proxy, mid-SSE-event and mid-body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

import httpx
import pytest
import pytest_asyncio

from mock_server.chaos import (
    AfterBytes,
    AfterEvent,
    ChaosProxy,
    ChaosServer,
    Drop,
    FaultPlan,
    Fin,
    Match,
    ProtocolReader,
    ProtocolWriter,
    Reset,
    Rule,
    check_history,
    serve_chaos,
)
from mock_server.chaos.checker import Published
from mock_server.chaos.reader import RetryPolicy, make_event, new_client

pytestmark = pytest.mark.asyncio(loop_scope="module")

EVENTS = 200
PATH = "sweep"
FAST_RETRY = RetryPolicy(initial=0.0, maximum=0.0)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server() -> AsyncIterator[ChaosServer]:
    async with serve_chaos(long_poll_timeout=0.5) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def published(server: ChaosServer) -> list[Published]:
    async with ProtocolWriter(server.url, PATH) as writer:
        await writer.create()
        for n in range(EVENTS):
            await writer.append(make_event(PATH, n))
        await writer.close_stream()
    return writer.published


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with new_client() as http:
        yield http


VARIANTS = [
    ("sse", "reset", True),
    ("sse", "fin", True),
    ("sse", "end", True),
    ("sse", "reset", False),  # the control event after event N is withheld
    ("long-poll", "reset", True),
    ("long-poll", "fin", True),
    ("long-poll", "end", True),
]


@pytest.mark.parametrize(("transport", "how", "control"), VARIANTS)
async def test_cut_right_after_every_event(
    server: ChaosServer,
    published: list[Published],
    client: httpx.AsyncClient,
    transport: Literal["sse", "long-poll"],
    how: Literal["reset", "fin", "end"],
    control: bool,
) -> None:
    failures = []
    reconnects = 0
    for n in range(EVENTS + 1):
        server.faults.reset()
        rule = Rule(
            trigger=AfterEvent(n=n, control=control),
            fault=Drop(how=how),
            match=Match(method="GET"),
        )
        server.set_plan(FaultPlan(rules=[rule]))
        reader = ProtocolReader(
            server.url,
            PATH,
            transport=transport,
            client=client,
            retry=FAST_RETRY,
        )
        await reader.run(timeout=10)
        report = check_history(published, [reader.history()])
        fired = server.faults.fired("drop")
        if not report.ok or report.subscribers[0].seen != EVENTS or fired != 1:
            failures.append(f"N={n}: fired {fired}x\n{report}")
        reconnects += reader.reconnects
    server.faults.reset()
    assert not failures, "\n".join(failures[:5])
    # A reset or a FIN is a failure the reader recovers from; a clean end is not. After
    # the last event an SSE reader has its closing control event: it does not reconnect.
    if how == "end":
        assert reconnects == 0
    else:
        assert reconnects == EVENTS + (0 if transport == "sse" and control else 1)


@pytest.mark.parametrize("transport", ["sse", "long-poll"])
@pytest.mark.parametrize("fault", [Reset(), Fin()], ids=["reset", "fin"])
async def test_cut_at_every_byte_position_through_the_proxy(
    server: ChaosServer,
    published: list[Published],
    client: httpx.AsyncClient,
    transport: Literal["sse", "long-poll"],
    fault: Reset | Fin,
) -> None:
    async with ChaosProxy(server.url) as proxy:
        reader = ProtocolReader(proxy.url, PATH, transport=transport, client=client)
        await reader.run(timeout=10)
        whole = proxy.connections[0].bytes_down  # one response carries the whole stream
    positions = sorted({*range(0, whole, max(1, whole // 59)), whole - 1})
    failures = []
    for at in positions:
        async with ChaosProxy(server.url) as proxy, new_client() as fresh:
            proxy.set_plan(FaultPlan(rules=[Rule(trigger=AfterBytes(bytes=at), fault=fault)]))
            reader = ProtocolReader(
                proxy.url,
                PATH,
                transport=transport,
                client=fresh,
                retry=FAST_RETRY,
            )
            await reader.run(timeout=10)
            report = check_history(published, [reader.history()])
            cut = proxy.connections[0]
            if not report.ok or cut.bytes_down != at or proxy.fired() != 1:
                failures.append(f"B={at}: {cut.bytes_down} bytes, {proxy.fired()} faults\n{report}")
    assert len(positions) > 55
    assert not failures, "\n".join(failures[:5])
