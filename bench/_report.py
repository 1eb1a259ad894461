"""Result rows, ratios to the peers, the printed table and the JSON file."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ._procs import NODE, OURS
from ._stats import Dist

Better = Literal["lower", "higher"]

#: Client names in rows: our SDK's stream client, our SDK's Session, the bare
#: WebSocket and HTTP clients in bench/, and the upstream Python client.
SDK = "sdk"
SESSION = "session"
RAW_WS = "raw-ws"
RAW_HTTP = "raw-http"
UPSTREAM = "upstream"


@dataclass
class Row:
    """One measurement: a distribution (or a single figure) of one metric."""

    bench: str
    case: str
    transport: str
    server: str
    client: str
    metric: str
    unit: str
    better: Better
    dist: Dist
    extra: dict[str, float | str] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)

    def key(self) -> tuple[str, str, str, str, str, str]:
        return (self.bench, self.case, self.transport, self.server, self.client, self.metric)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["dist"] = {k: _finite(v) for k, v in asdict(self.dist).items()}
        return data


def _finite(value: float | int | None) -> float | int | None:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


#: Which HTTP row a WebSocket row is compared with (same server, same client).
_HTTP_COUNTERPART = {
    "ws": ("sse", "http"),
    "ws, SDK appends over ws": ("sse, SDK appends over http",),
}


def factor(ours: Row, peer: Row) -> float | None:
    """How many times better ``ours`` is than ``peer`` (> 1: ours wins), by median."""
    a, b = ours.dist.median, peer.dist.median
    if not (math.isfinite(a) and math.isfinite(b)) or a <= 0 or b <= 0:
        return None
    return b / a if ours.better == "lower" else a / b


def add_ratios(rows: list[Row]) -> None:
    """Fill ``Row.ratios``: vs the Node server (same client), vs the upstream
    client (same server), and a WebSocket row vs our SSE (same client kind)."""
    index = {row.key(): row for row in rows}
    for row in rows:
        bench, case, transport, server, client, metric = row.key()
        if server == OURS:
            peer = index.get((bench, case, transport, NODE, client, metric))
            if peer is not None and (f := factor(row, peer)) is not None:
                row.ratios["node"] = f
        if client in (SDK, SESSION):
            peer = index.get((bench, case, transport, server, UPSTREAM, metric))
            if peer is not None and (f := factor(row, peer)) is not None:
                row.ratios["upstream"] = f
        if server == OURS:
            for other in _HTTP_COUNTERPART.get(transport, ()):
                peer = index.get((bench, case, other, OURS, client, metric))
                if peer is not None and (f := factor(row, peer)) is not None:
                    row.ratios[f"our {other.split(',')[0]}"] = f


def _number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if value >= 10_000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _extra_text(extra: dict[str, float | str]) -> str:
    parts = []
    for name, value in extra.items():
        text = _number(value) if isinstance(value, float | int) else value
        parts.append(f"{name} {text}")
    return "; ".join(parts)


def table(rows: list[Row]) -> str:
    """The rows as an aligned text table (one block per benchmark)."""
    header = [
        "case",
        "transport",
        "server",
        "client",
        "metric",
        "median",
        "p99",
        "n",
        "vs peers (>1: ours better)",
        "notes",
    ]
    lines: list[str] = []
    benches: list[str] = []
    for row in rows:
        if row.bench not in benches:
            benches.append(row.bench)
    for bench in benches:
        body = []
        for row in (r for r in rows if r.bench == bench):
            ratios = ", ".join(f"{name} {value:.2f}x" for name, value in row.ratios.items())
            body.append(
                [
                    row.case,
                    row.transport,
                    row.server,
                    row.client,
                    f"{row.metric} ({row.unit}, {row.better} is better)",
                    _number(row.dist.median),
                    _number(row.dist.p99),
                    str(row.dist.n),
                    ratios or "-",
                    _extra_text(row.extra),
                ]
            )
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header) - 1)]
        lines.append(f"== {bench}")
        for cells in [header, *body]:
            fixed = "  ".join(c.ljust(w) for c, w in zip(cells[:-1], widths, strict=False))
            lines.append(f"{fixed}  {cells[-1]}".rstrip())
        lines.append("")
    return "\n".join(lines)


def markdown(rows: list[Row]) -> str:
    """The rows as a Markdown table (for docs/benchmarks.md)."""
    out = [
        "| benchmark | case | transport | server | client | metric | median | p99 | n "
        "| vs peers (>1: ours better) | notes |",
        "|---|---|---|---|---|---|---:|---:|---:|---|---|",
    ]
    for row in rows:
        ratios = ", ".join(f"{name} {value:.2f}x" for name, value in row.ratios.items())
        out.append(
            f"| {row.bench} | {row.case} | {row.transport} | {row.server} | {row.client} "
            f"| {row.metric} ({row.unit}, {row.better} better) | {_number(row.dist.median)} "
            f"| {_number(row.dist.p99)} | {row.dist.n} | {ratios or '-'} "
            f"| {_extra_text(row.extra)} |"
        )
    return "\n".join(out)


def write_json(
    path: Path,
    *,
    machine: dict[str, Any],
    settings: dict[str, Any],
    rows: list[Row],
    skipped: list[str],
    failures: list[str],
    wall_seconds: float,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "machine": machine,
        "settings": settings,
        "wall_seconds": round(wall_seconds, 2),
        "rows": [row.to_json() for row in rows],
        "skipped": skipped,
        "failures": failures,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
