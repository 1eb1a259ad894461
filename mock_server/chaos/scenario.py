"""One chaos run: a writer, a reader behind the chaos proxy, a plan, a verdict.

:func:`run_scenario` creates a JSON stream, applies the plan (proxy rules in
a :class:`ChaosProxy` in front of the reader, server rules in our server
through :class:`ServerFaults` or the admin endpoint), publishes ``events``
events with :class:`ProtocolWriter`, follows the stream to its end with
:class:`ProtocolReader`, and checks the history. ``live=True`` runs writer
and reader together; ``live=False`` writes everything first, which makes
every byte position and connection number the same on every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from .checker import HistoryReport, check_history
from .plan import FaultPlan
from .proxy import ChaosProxy
from .reader import (
    ProtocolReader,
    ProtocolWriter,
    ReaderGaveUp,
    RetryPolicy,
    Transport,
    WriterGaveUp,
    make_event,
    new_client,
)
from .server_faults import ServerFaults

__all__ = ["ScenarioResult", "Transport", "run_scenario"]


@dataclass
class ScenarioResult:
    """What happened in one run, and whether it was right."""

    name: str
    transport: str
    plan: FaultPlan
    events: int
    report: HistoryReport | None
    elapsed: float
    error: str | None = None
    reconnects: int = 0
    writer_retries: int = 0
    duplicates_dropped: int = 0
    faults: list[str] = field(default_factory=list)
    allow_reported_loss: bool = False

    @property
    def ok(self) -> bool:
        if self.error is not None or self.report is None:
            return False
        if not self.report.ok:
            return False
        if not self.allow_reported_loss:
            return all(not s.reported_lost for s in self.report.subscribers)
        return True

    def totals(self) -> dict[str, int]:
        if self.report is None:
            return {}
        return self.report.totals()

    def describe(self) -> str:
        """A failure explanation: the verdict, the plan (with its seed), the faults."""
        lines = [
            f"scenario {self.name} over {self.transport}: {'ok' if self.ok else 'FAILED'}"
            f" in {self.elapsed:.2f}s ({self.reconnects} reconnects,"
            f" {self.writer_retries} writer retries)"
        ]
        if self.error:
            lines.append(f"error: {self.error}")
        if self.report is not None:
            lines.append(str(self.report))
        lines.append(self.plan.describe())
        if self.plan.name == f"random-{self.plan.seed}":
            lines.append(
                f"replay: FaultPlan.random({self.plan.seed}, events={self.events})"
                f" (python -m mock_server.chaos plan --random {self.plan.seed}"
                f" --events {self.events})"
            )
        if self.faults:
            lines.append("faults applied:")
            lines.extend(f"  {fault}" for fault in self.faults)
        return "\n".join(lines)


async def _set_server_plan(
    url: str, plan: FaultPlan, faults: ServerFaults | None, admin: bool, client: httpx.AsyncClient
) -> None:
    if faults is not None:
        faults.set_plan(plan)
    elif admin:
        response = await client.put(f"{url.rstrip('/')}/_chaos/plan", content=plan.to_json())
        response.raise_for_status()


async def _server_log(
    url: str, faults: ServerFaults | None, admin: bool, client: httpx.AsyncClient, since: int
) -> list[str]:
    if faults is not None:
        return [f"server {record}" for record in faults.log[since:]]
    if admin:
        response = await client.get(f"{url.rstrip('/')}/_chaos/log")
        if response.status_code == 200:
            return [
                f"server rule {r['rule']}: {r['fault']} on {r['method']} {r['path']}"
                + (f" ({r['detail']})" if r.get("detail") else "")
                for r in response.json()[since:]
            ]
    return []


async def run_scenario(
    url: str,
    plan: FaultPlan,
    *,
    name: str | None = None,
    path: str | None = None,
    events: int = 50,
    event_bytes: int = 60,
    transport: Transport = "sse",
    live: bool = True,
    faults: ServerFaults | None = None,
    admin: bool = False,
    writer_plan: FaultPlan | None = None,
    idle_timeout: float = 2.0,
    request_timeout: float = 2.0,
    timeout: float = 30.0,
    retry: RetryPolicy | None = None,
    allow_reported_loss: bool = False,
) -> ScenarioResult:
    """Run one scenario against the Durable Streams server at ``url`` (see the module docstring).

    ``faults`` (our server in-process) or ``admin=True`` (a server with the
    ``/_chaos`` endpoint) apply the plan's server rules; otherwise only its
    proxy rules act. ``writer_plan`` puts a second proxy, with that plan, in
    front of the writer. The server plan is cleared afterwards.
    """
    path = path or f"chaos-{uuid.uuid4().hex[:12]}"
    name = name or plan.name or path
    started = time.monotonic()
    result = ScenarioResult(
        name=name,
        transport=transport,
        plan=plan,
        events=events,
        report=None,
        elapsed=0.0,
        allow_reported_loss=allow_reported_loss,
    )
    server_rules = bool(plan.for_layer("server"))
    async with (
        new_client(timeout=request_timeout) as control,
        ChaosProxy(url, plan) as proxy,
        ChaosProxy(url, writer_plan or FaultPlan()) as writer_proxy,
        new_client() as reader_client,
        new_client() as writer_client,
    ):
        writer = ProtocolWriter(
            writer_proxy.url if writer_plan else url,
            path,
            request_timeout=request_timeout,
            retry=retry,
            client=writer_client,
        )
        reader = ProtocolReader(
            proxy.url,
            path,
            transport=transport,
            name=f"{transport}-reader",
            idle_timeout=idle_timeout,
            retry=retry,
            client=reader_client,
        )

        async def write() -> None:
            for n in range(events):
                await writer.append(make_event(path, n, event_bytes))
            await writer.close_stream()

        log_start = 0
        try:
            await writer.create()
            if server_rules and faults is not None:
                log_start = len(faults.log)
            elif server_rules:
                log_start = len((await control.get(f"{url.rstrip('/')}/_chaos/log")).json())
            if server_rules:
                await _set_server_plan(url, plan, faults, admin, control)
            async with asyncio.timeout(timeout):
                if live:
                    await asyncio.gather(write(), reader.run(timeout=None))
                else:
                    await write()
                    await reader.run(timeout=None)
        except (WriterGaveUp, ReaderGaveUp, httpx.HTTPError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        except TimeoutError:
            result.error = (
                f"timed out after {timeout}s: reader at {reader.offset} with"
                f" {len(reader.seen)} events, writer at seq {writer.seq}"
            )
        finally:
            if server_rules:
                with contextlib.suppress(httpx.HTTPError):
                    result.faults += await _server_log(url, faults, admin, control, log_start)
                    await _set_server_plan(url, FaultPlan(), faults, admin, control)
        result.faults = (
            [f"proxy {r}" for r in proxy.log]
            + [f"writer-proxy {r}" for r in writer_proxy.log]
            + result.faults
        )
        result.report = check_history(writer.published, [reader.history()])
        result.reconnects = reader.reconnects
        result.writer_retries = writer.retries
        result.duplicates_dropped = reader.duplicates_dropped
    result.elapsed = time.monotonic() - started
    return result


def summary(results: list[ScenarioResult]) -> dict[str, Any]:
    """Counts over many runs: runs, failures, events checked, lost, duplicated, reordered."""
    totals: dict[str, Any] = {
        "runs": len(results),
        "failed": sum(not r.ok for r in results),
        "events_checked": 0,
        "lost": 0,
        "duplicated": 0,
        "reordered": 0,
        "unexpected": 0,
        "reconnects": sum(r.reconnects for r in results),
        "faults": sum(len(r.faults) for r in results),
    }
    for r in results:
        t = r.totals()
        totals["events_checked"] += t.get("seen", 0)
        for key in ("lost", "duplicated", "reordered", "unexpected"):
            totals[key] += t.get(key, 0)
    return totals
