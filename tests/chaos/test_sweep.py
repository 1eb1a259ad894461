"""The exact-N sweep: a disconnect right after every event N, for every cutting fault.

One server and one closed stream of 200 events for the whole module; each run
is a fresh reader from the beginning, over SSE, catch-up + long-poll or
WebSocket, with a plan that cuts its connection right after event N
(N = 0..200): 8 (transport, cutting fault) pairs x 201 = 1,608 runs. Every run
must end with the full history, exactly once, in order, and the fault must
have fired exactly once. (A clean end of the response, ``drop`` ``how: end``,
is tested in test_server_faults.py.) A second sweep cuts at byte B through
the TCP proxy: mid-head, mid-SSE-event, mid-body, mid-WebSocket-frame.
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
    ProtocolReader,
    ProtocolWriter,
    Reset,
    Rule,
    WsClose,
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


VARIANTS: list[tuple[Literal["sse", "long-poll", "ws"], Drop | WsClose, bool]] = [
    ("sse", Drop(how="reset"), True),
    ("sse", Drop(how="fin"), True),
    ("sse", Drop(how="reset"), False),  # the control event after event N is withheld
    ("long-poll", Drop(how="reset"), True),
    ("long-poll", Drop(how="fin"), True),
    ("ws", Drop(how="reset"), True),
    ("ws", Drop(how="fin"), True),
    ("ws", WsClose(code=1012), True),
]


def variant_id(value: object) -> str:
    if isinstance(value, Drop):
        return value.how
    if isinstance(value, WsClose):
        return f"close-{value.code}"
    return str(value)


@pytest.mark.parametrize(("transport", "fault", "control"), VARIANTS, ids=variant_id)
async def test_cut_right_after_every_event(
    server: ChaosServer,
    published: list[Published],
    client: httpx.AsyncClient,
    transport: Literal["sse", "long-poll", "ws"],
    fault: Drop | WsClose,
    control: bool,
) -> None:
    failures = []
    reconnects = 0
    for n in range(EVENTS + 1):
        server.faults.reset()
        rule = Rule(trigger=AfterEvent(n=n, control=control), fault=fault)
        server.set_plan(FaultPlan(rules=[rule]))
        reader = ProtocolReader(
            server.url, PATH, transport=transport, client=client, retry=FAST_RETRY
        )
        await reader.run(timeout=10)
        report = check_history(published, [reader.history()])
        fired = server.faults.fired(fault.kind)
        if not report.ok or report.subscribers[0].seen != EVENTS or fired != 1:
            failures.append(f"N={n}: fired {fired}x\n{report}")
        reconnects += reader.reconnects
    server.faults.reset()
    assert not failures, "\n".join(failures[:5])
    # Every cut is a failure the reader recovers from, but after the last event it
    # already has the stream's end (SSE control, WebSocket frame): no reconnect.
    ends_in_band = transport == "ws" or (transport == "sse" and control)
    assert reconnects == EVENTS + (0 if ends_in_band else 1)


@pytest.mark.parametrize("transport", ["sse", "long-poll", "ws"])
@pytest.mark.parametrize("fault", [Reset(), Fin()], ids=["reset", "fin"])
async def test_cut_at_every_byte_position_through_the_proxy(
    server: ChaosServer,
    published: list[Published],
    client: httpx.AsyncClient,
    transport: Literal["sse", "long-poll", "ws"],
    fault: Reset | Fin,
) -> None:
    async with ChaosProxy(server.url) as proxy:
        reader = ProtocolReader(proxy.url, PATH, transport=transport, client=client)
        await reader.run(timeout=10)
        whole = proxy.connections[0].bytes_down  # one response carries the whole stream
    positions = sorted({*range(0, whole, max(1, whole // 31)), whole - 1})
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
    assert len(positions) > 30
    assert not failures, "\n".join(failures[:5])
