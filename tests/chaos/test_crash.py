"""Crash and restart over SQLite: kill -9 mid-stream loses no acknowledged event.

The server runs as a process (``CrashHarness``); a writer keeps appending and
readers keep following while it is killed and restarted on the same port and
data directory. Writers retry with their producer sequence numbers, readers
resume from their offsets: in the end each reader has every acknowledged
event exactly once, in order.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from mock_server.chaos import (
    AfterEvent,
    Crash,
    FaultPlan,
    Match,
    ProtocolReader,
    ProtocolWriter,
    Rule,
    check_history,
)
from mock_server.chaos.crash import CrashHarness, ServerDidNotStart
from mock_server.chaos.reader import RetryPolicy, make_event

SERVER_ARGS = ["--long-poll-timeout", "0.5", "--log-level", "warning"]
PATIENT = RetryPolicy(initial=0.01, maximum=0.1, max_attempts=400)


async def test_kill_9_mid_stream_loses_nothing_acknowledged(tmp_path: Path) -> None:
    async with CrashHarness(tmp_path / "data", args=SERVER_ARGS) as server:
        writer = ProtocolWriter(server.url, "crash", request_timeout=1.0, retry=PATIENT)
        await writer.create()
        readers = [
            ProtocolReader(server.url, "crash", transport=t, idle_timeout=1.0, retry=PATIENT)
            for t in ("sse", "long-poll")
        ]
        reading = [asyncio.ensure_future(r.run(timeout=60)) for r in readers]
        restarts: list[asyncio.Task[None]] = []
        for n in range(300):
            await writer.append(make_event("crash", n))
            if n in (100, 200):
                # kill -9 now, while readers are live and the writer goes on writing.
                restarts.append(asyncio.ensure_future(server.restart()))
        await asyncio.gather(*restarts)
        await writer.close_stream()
        await asyncio.gather(*reading)
        await writer.aclose()

        assert server.crashes == 2
        assert server.starts == 3
        report = check_history(writer.published, [r.history() for r in readers])
        assert report.ok, str(report)
        for sub in report.subscribers:
            assert (sub.seen, len(sub.lost), len(sub.duplicated)) == (300, 0, 0)
            assert sub.hash_matches
        assert all(r.reconnects >= 2 for r in readers)  # they did live through the crashes
        async with httpx.AsyncClient() as http:
            stored = (await http.get(f"{server.url}/v1/stream/crash?offset=-1")).json()
        assert [event["n"] for event in stored] == list(range(300))


async def test_crash_from_the_plan_after_an_append_and_inside_a_read(tmp_path: Path) -> None:
    """The server kills itself right after committing the append that makes
    event 50, before answering it: the harness restarts it and the writer's
    retry is recognised as a duplicate. Then it kills itself again right after
    sending event 30 to a reader, which resumes after the restart."""
    crash_at_50 = Rule(trigger=AfterEvent(n=50), fault=Crash(), match=Match(method="POST"))
    crash_at_30 = Rule(trigger=AfterEvent(n=30), fault=Crash(), match=Match(method="GET"))
    async with CrashHarness(tmp_path / "data", args=SERVER_ARGS, auto_restart=True) as server:
        writer = ProtocolWriter(server.url, "self", request_timeout=1.0, retry=PATIENT)
        await writer.create()
        await server.set_plan(FaultPlan(rules=[crash_at_50]))
        live = ProtocolReader(server.url, "self", idle_timeout=1.0, retry=PATIENT)
        reading = asyncio.ensure_future(live.run(timeout=60))
        for n in range(80):
            await writer.append(make_event("self", n))
        await writer.close_stream()
        await reading
        await writer.aclose()
        assert (server.crashes, server.starts) == (1, 2)
        assert writer.duplicate_acks == 1  # event 50 committed before the crash

        await server.set_plan(FaultPlan(rules=[crash_at_30]))  # the restart had no plan
        late = ProtocolReader(server.url, "self", idle_timeout=1.0, retry=PATIENT)
        await late.run(timeout=60)
        await server.wait_started(3)
        assert server.crashes == 2
        assert late.reconnects >= 1

    report = check_history(writer.published, [live.history(), late.history()])
    assert report.ok, str(report)
    assert [sub.seen for sub in report.subscribers] == [80, 80]


async def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    harness = CrashHarness(tmp_path / "data", args=["--long-poll-timeout", "0"], startup_timeout=5)
    with pytest.raises(ServerDidNotStart, match="long-poll-timeout must be positive"):
        await harness.start()
