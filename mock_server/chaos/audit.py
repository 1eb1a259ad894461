"""The audit: a standard battery of faults against any Durable Streams server.

Each check is a named :class:`FaultPlan` run by :func:`run_scenario` over
each transport: a writer publishes, a reader follows the stream through the
chaos proxy, and the history checker judges. Proxy checks work against any
server; server checks (cut after event N, lost acknowledgements, 503s,
duplicate delivery, stalls, retention) need the ``/_chaos`` admin endpoint
(``python -m mock_server --chaos``) and are skipped without it.

A URL without ``http://`` or ``https://`` is refused (:func:`check_url`), and a
server that does not answer at all fails at once (:class:`Unreachable`),
before any check runs and retries.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import WebSocketException

from .plan import (
    AfterBytes,
    AfterEvent,
    Bandwidth,
    Down,
    Drop,
    Duplicate,
    FaultPlan,
    Fin,
    HalfOpen,
    HttpError,
    Latency,
    LostAck,
    Match,
    OnConnection,
    OnRequest,
    OnResume,
    Reset,
    Rule,
    Slicer,
    Stall,
    Trim,
    WsClose,
)
from .reader import WS_PATH, new_client
from .scenario import ScenarioResult, Transport, run_scenario

__all__ = [
    "Check",
    "Unreachable",
    "audit",
    "battery",
    "check_url",
    "format_table",
    "has_admin",
    "has_websocket",
    "reach",
]


@dataclass(frozen=True)
class Check:
    """One check of the battery."""

    name: str
    description: str
    plan: FaultPlan
    layer: Literal["proxy", "server"] = "proxy"
    writer_plan: FaultPlan | None = None
    expect_reported_loss: bool = False  # retention: the reader must say what it lost
    live: bool = True  # False: write everything, then read (the point depends on no timing)
    transports: tuple[Transport, ...] | None = None  # None: every transport audited


HTTP_ONLY: tuple[Transport, ...] = ("sse", "long-poll")


def _plan(name: str, *rules: Rule) -> FaultPlan:
    return FaultPlan(name=name, rules=list(rules))


def battery(events: int = 40) -> list[Check]:
    """The standard checks, sized for runs of ``events`` events."""
    third, half = max(1, events // 3), max(1, events // 2)
    reads = Match(method="GET")
    cuts = [200, 1500, 3000]  # mid-head, and mid-body at two points
    return [
        Check("baseline", "no faults", _plan("baseline")),
        Check(
            "reset-mid-stream",
            "TCP RST after byte 200, 1500 and 3000 of the reader's connections",
            _plan(
                "reset-mid-stream",
                *(Rule(trigger=AfterBytes(bytes=b), fault=Reset()) for b in cuts),
            ),
        ),
        Check(
            "fin-mid-stream",
            "close (FIN) after byte 200, 1500 and 3000, mid-frame",
            _plan(
                "fin-mid-stream", *(Rule(trigger=AfterBytes(bytes=b), fault=Fin()) for b in cuts)
            ),
        ),
        Check(
            "reset-on-connect",
            "RST on the reader's 1st, 3rd and 5th connection as it opens",
            _plan(
                "reset-on-connect", Rule(trigger=OnConnection(k=1, every=2), fault=Reset(), count=3)
            ),
        ),
        Check(
            "half-open",
            "the connection goes silent after byte 1500 (blackholed peer)",
            _plan("half-open", Rule(trigger=AfterBytes(bytes=1500), fault=HalfOpen())),
        ),
        Check(
            "latency",
            "30 ms +/- 20 ms on every chunk",
            _plan(
                "latency",
                Rule(trigger=OnConnection(k=1), fault=Latency(ms=30, jitter_ms=20), count=None),
            ),
        ),
        Check(
            "bandwidth",
            "20 kB/s",
            _plan(
                "bandwidth",
                Rule(
                    trigger=OnConnection(k=1), fault=Bandwidth(bytes_per_second=20_000), count=None
                ),
            ),
        ),
        Check(
            "slicer",
            "every write split into 2..12-byte pieces",
            _plan(
                "slicer",
                Rule(
                    trigger=OnConnection(k=1),
                    fault=Slicer(average_size=7, size_variation=5),
                    count=None,
                ),
            ),
        ),
        Check(
            "down",
            "after byte 1500 the reader's connection is reset and new ones are refused for 300 ms",
            _plan("down", Rule(trigger=AfterBytes(bytes=1500), fault=Down(duration_ms=300))),
        ),
        Check(
            "writer-reset-mid-request",
            "the writer's connection reset after 2000 bytes sent, 5 times"
            " (requests and responses lost)",
            _plan("writer-reset-mid-request"),
            writer_plan=_plan(
                "writer",
                Rule(trigger=AfterBytes(bytes=2000, direction="up"), fault=Reset(), count=5),
            ),
        ),
        Check(
            "writer-down",
            "after 2000 bytes sent the writer's connection is reset, new ones refused for 200 ms",
            _plan("writer-down"),
            writer_plan=_plan(
                "writer",
                Rule(trigger=AfterBytes(bytes=2000, direction="up"), fault=Down(duration_ms=200)),
            ),
        ),
        Check(
            "cut-after-event",
            f"server cuts the read right after event {third} (RST) and after event"
            f" {2 * third} without its control event (FIN)",
            _plan(
                "cut-after-event",
                Rule(trigger=AfterEvent(n=third), fault=Drop(how="reset")),
                Rule(
                    trigger=AfterEvent(n=2 * third, control=False),
                    fault=Drop(how="fin"),
                ),
            ),
            layer="server",
        ),
        Check(
            "lost-ack",
            "every 4th append commits but its response is lost (10 times)",
            _plan(
                "lost-ack",
                Rule(
                    trigger=OnRequest(k=1, every=4),
                    fault=LostAck(),
                    count=10,
                    match=Match(method="POST"),
                ),
            ),
            layer="server",
        ),
        Check(
            "503-retry-after",
            "every 5th request answered 503 with Retry-After: 0 (6 times)",
            _plan(
                "503-retry-after",
                Rule(
                    trigger=OnRequest(k=2, every=5),
                    fault=HttpError(status=503, retry_after=0),
                    count=6,
                ),
            ),
            layer="server",
        ),
        Check(
            "duplicate-delivery",
            "resumed reads are served from 3 appends back",
            _plan(
                "duplicate-delivery",
                Rule(trigger=AfterEvent(n=half), fault=Drop(), match=reads),
                Rule(trigger=OnResume(), fault=Duplicate(rewind=3), count=3, match=reads),
            ),
            layer="server",
            transports=HTTP_ONLY,  # a WebSocket resume is a frame, not a request
        ),
        Check(
            "stall",
            f"the server stops answering after event {half} (server-side half-open)",
            _plan("stall", Rule(trigger=AfterEvent(n=half), fault=Stall())),
            layer="server",
        ),
        Check(
            "ws-close-after-event",
            f"the server closes the WebSocket with 1012 right after event {third}"
            f" and with 4008 after event {2 * third}",
            _plan(
                "ws-close-after-event",
                Rule(trigger=AfterEvent(n=third), fault=WsClose(code=1012, reason="restart")),
                Rule(trigger=AfterEvent(n=2 * third), fault=WsClose(code=4008, reason="slow")),
            ),
            layer="server",
            transports=("ws",),
        ),
        Check(
            "retention-trim",
            "retention drops what a resuming reader needs: it must report"
            " the gap (410), not skip it",
            _plan(
                "retention-trim",
                Rule(trigger=AfterEvent(n=third), fault=Drop(how="end"), match=reads),
                Rule(trigger=OnResume(), fault=Trim(keep_last=third), match=reads),
            ),
            layer="server",
            expect_reported_loss=True,
            live=False,
            transports=HTTP_ONLY,
        ),
    ]


class Unreachable(ConnectionError):
    """Nothing answers HTTP at the URL: nothing listens, no route, or not an HTTP server."""


def check_url(url: str) -> str:
    """``url`` if it is an ``http://`` or ``https://`` URL with a host; ``ValueError`` if not."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # e.g. an unclosed IPv6 bracket
        host = None
    if host is None or parts.scheme not in ("http", "https"):
        raise ValueError(
            f"{url!r} is not a server URL: it needs http:// or https:// and a host,"
            " e.g. http://127.0.0.1:4437"
        )
    return url


async def reach(url: str, *, timeout: float = 5.0) -> None:
    """Raise :class:`Unreachable` unless an HTTP server answers at ``url`` (any status will do)."""
    async with new_client(timeout=timeout) as http:
        try:
            await http.get(url)
        except httpx.TimeoutException as exc:
            raise Unreachable(f"cannot reach {url}: no answer in {timeout:g} s") from exc
        except httpx.HTTPError as exc:
            raise Unreachable(f"cannot reach {url}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    """The root cause's words: ``Connection refused`` rather than httpx's
    ``All connection attempts failed``."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno is not None:
            return os.strerror(cause.errno) if cause.errno > 0 else str(cause.strerror)
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


async def has_admin(url: str) -> bool:
    """Whether the server at ``url`` has the chaos admin endpoint."""
    async with new_client(timeout=5) as http:
        try:
            response = await http.get(f"{url.rstrip('/')}/_chaos/plan")
        except httpx.HTTPError:
            return False
    return response.status_code == 200 and response.headers.get("content-type", "").startswith(
        "application/json"
    )


async def has_websocket(url: str) -> bool:
    """Whether the server at ``url`` accepts this project's WebSocket transport."""
    ws_url = "ws" + url.rstrip("/").removeprefix("http") + WS_PATH
    try:
        async with ws_connect(ws_url, open_timeout=5, close_timeout=0.5):
            return True
    except (OSError, TimeoutError, WebSocketException):
        return False


def _passed(check: Check, result: ScenarioResult) -> bool:
    if not check.expect_reported_loss:
        return result.ok
    if result.error is not None or result.report is None:
        return False
    subs = result.report.subscribers
    # An explicit gap is the right answer; a silent one (lost) is not.
    return all(not s.lost and not s.duplicated and not s.reordered for s in subs) and all(
        s.reported_lost for s in subs
    )


@dataclass
class AuditRow:
    check: Check
    result: ScenarioResult
    passed: bool


async def audit(
    url: str,
    *,
    events: int = 40,
    transports: Sequence[Transport] | None = None,
    only: Sequence[str] = (),
    idle_timeout: float = 2.0,
    server_checks: bool | None = None,
    progress: Any = None,
) -> list[AuditRow]:
    """Run the battery against ``url``; server checks run if the admin endpoint
    answers; ``transports`` defaults to SSE, long-poll and, if the server
    offers it, WebSocket. Raises ``ValueError`` for a URL without a scheme and
    :class:`Unreachable` when nothing answers there."""
    await reach(check_url(url))
    admin = await has_admin(url) if server_checks is None else server_checks
    if transports is None:
        transports = ["sse", "long-poll"]
        if await has_websocket(url):
            transports.append("ws")
    rows: list[AuditRow] = []
    for check in battery(events):
        if only and check.name not in only:
            continue
        if check.layer == "server" and not admin:
            continue
        for transport in transports:
            if check.transports is not None and transport not in check.transports:
                continue
            result = await run_scenario(
                url,
                check.plan,
                name=check.name,
                events=events,
                transport=transport,
                live=check.live,
                admin=admin,
                writer_plan=check.writer_plan,
                idle_timeout=idle_timeout,
                allow_reported_loss=check.expect_reported_loss,
                timeout=60,
            )
            row = AuditRow(check, result, _passed(check, result))
            rows.append(row)
            if progress is not None:
                progress(row)
    return rows


_COLUMNS = [
    ("check", 26),
    ("transport", 10),
    ("result", 6),
    ("seen", 7),
    ("lost", 5),
    ("dup", 4),
    ("reord", 6),
    ("gap", 4),
    ("reconn", 7),
    ("retries", 8),
    ("faults", 7),
    ("time", 7),
]


def _cells(row: AuditRow) -> list[str]:
    result = row.result
    totals = result.totals()
    seen = f"{totals.get('seen', 0)}/{result.events}"
    return [
        row.check.name,
        result.transport,
        ("PASS" if row.passed else "FAIL") + ("*" if _idle(row) else ""),
        seen,
        str(totals.get("lost", "-")),
        str(totals.get("duplicated", "-")),
        str(totals.get("reordered", "-")),
        str(totals.get("reported_lost", "-")),
        str(result.reconnects),
        str(result.writer_retries),
        str(len(result.faults)),
        f"{result.elapsed:.2f}s",
    ]


def _idle(row: AuditRow) -> bool:
    """A check whose faults never landed (e.g. the connection they wait for never came)."""
    return row.check.name != "baseline" and not row.result.faults


def format_header() -> str:
    return "  ".join(name.ljust(width) for name, width in _COLUMNS).rstrip()


def format_row(row: AuditRow) -> str:
    cells = _cells(row)
    return "  ".join(c.ljust(w) for c, (_, w) in zip(cells, _COLUMNS, strict=True)).rstrip()


def format_table(rows: Sequence[AuditRow]) -> str:
    """The report: one line per (check, transport), then the verdict and the failures."""
    lines = [format_header(), *(format_row(row) for row in rows)]
    failed = [row for row in rows if not row.passed]
    lines.append("")
    lines.append(
        f"{len(rows) - len(failed)} of {len(rows)} passed"
        + ("" if not failed else f"; {len(failed)} FAILED")
    )
    if any(_idle(row) for row in rows):
        lines.append("* no fault landed in this run: it proves nothing either way")
    for row in failed:
        lines.append("")
        lines.append(f"--- {row.check.name} over {row.result.transport}: {row.check.description}")
        lines.append(row.result.describe())
    return "\n".join(lines)


def to_json(rows: Sequence[AuditRow]) -> str:
    return json.dumps(
        [
            {
                "check": row.check.name,
                "description": row.check.description,
                "transport": row.result.transport,
                "passed": row.passed,
                "events": row.result.events,
                "totals": row.result.totals(),
                "reconnects": row.result.reconnects,
                "writer_retries": row.result.writer_retries,
                "faults": row.result.faults,
                "error": row.result.error,
                "elapsed": round(row.result.elapsed, 3),
            }
            for row in rows
        ],
        indent=2,
    )
