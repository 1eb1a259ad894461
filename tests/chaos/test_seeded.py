"""Seeded schedules: random fault plans, each replayable from its seed alone.

Each seed draws a plan (``FaultPlan.random(seed)``: one to three rules over
both layers) and runs it: a writer publishes, a reader behind the chaos
proxy follows over SSE, catch-up + long-poll or WebSocket, writer and reader
together or one after the other. Every run must end with 0 lost, 0 duplicated,
0 reordered. A failure prints the seed, the plan and the faults applied.

``CHAOS_PLANS`` (default 200) and ``CHAOS_EVENTS`` (default 20) size the
run; the long run is ``CHAOS_PLANS=2000 CHAOS_EVENTS=100 python3 dev.py test
tests/chaos/test_seeded.py`` (or ``python -m mock_server.chaos soak``).
Replay one seed with ``-k seed-137``.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from typing import Literal

import pytest
import pytest_asyncio

from mock_server.chaos import ChaosServer, FaultPlan, serve_chaos
from mock_server.chaos.scenario import ScenarioResult, run_scenario, summary

pytestmark = pytest.mark.asyncio(loop_scope="module")

PLANS = int(os.environ.get("CHAOS_PLANS", "200"))
EVENTS = int(os.environ.get("CHAOS_EVENTS", "20"))
INCARNATION = re.compile(r"\b\d{16}_")
RESULTS: list[ScenarioResult] = []


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server() -> AsyncIterator[ChaosServer]:
    async with serve_chaos(long_poll_timeout=0.5) as running:
        yield running


TRANSPORTS: list[Literal["sse", "long-poll", "ws"]] = ["sse", "long-poll", "ws"]


def mode(seed: int) -> tuple[Literal["sse", "long-poll", "ws"], bool]:
    """The seed picks the transport and whether writer and reader run together."""
    return TRANSPORTS[seed % 3], (seed // 3) % 2 == 0


@pytest.mark.parametrize("seed", range(PLANS), ids=lambda seed: f"seed-{seed}")
async def test_random_plan_loses_and_repeats_nothing(server: ChaosServer, seed: int) -> None:
    plan = FaultPlan.random(seed, events=EVENTS)
    transport, live = mode(seed)
    result = await run_scenario(
        server.url,
        plan,
        path=f"seed-{seed}",
        events=EVENTS,
        transport=transport,
        live=live,
        faults=server.faults,
        timeout=30,
    )
    RESULTS.append(result)
    assert result.ok, result.describe()
    totals = result.totals()
    assert (totals["lost"], totals["duplicated"], totals["reordered"]) == (0, 0, 0)
    assert totals["seen"] == EVENTS


async def test_seeded_totals() -> None:
    """The whole batch: every plan ran, every event was checked, nothing went wrong."""
    if len(RESULTS) < PLANS:
        pytest.skip("runs only after the whole batch")
    totals = summary(RESULTS)
    print(f"\nseeded chaos: {totals}")
    assert totals["runs"] == PLANS
    assert totals["events_checked"] == PLANS * EVENTS
    assert (totals["lost"], totals["duplicated"], totals["reordered"]) == (0, 0, 0)
    assert totals["faults"] > PLANS  # the plans did inject faults


async def test_a_seed_replays_the_same_faults_at_the_same_points(server: ChaosServer) -> None:
    """Run plans twice each, writer first so that nothing depends on timing: the
    same faults land on the same connections, bytes, requests and events."""
    kinds = ["reset", "fin", "drop", "lost_ack", "duplicate", "delay", "http_error"]
    landed = 0
    for seed in range(8):
        runs = []
        for attempt in range(2):
            path = f"replay-{seed}-{attempt}"
            result = await run_scenario(
                server.url,
                FaultPlan.random(seed, events=EVENTS, kinds=kinds),
                path=path,
                events=EVENTS,
                live=False,
                faults=server.faults,
            )
            assert result.ok, result.describe()
            # Each run's stream has its own random incarnation; only positions must repeat.
            runs.append(
                [INCARNATION.sub("INC_", fault.replace(path, "PATH")) for fault in result.faults]
            )
        assert runs[0] == runs[1], f"seed {seed}"
        landed += len(runs[0])
    assert landed >= 8
