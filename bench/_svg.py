"""A small SVG plot of the results, drawn by hand (no plotting dependency).

Panels of horizontal bars: latency by transport and server (median with the
p99 as a thin line), fan-out deliveries per second by subscriber count, and
catch-up events per second by client. A picture reads better than the table
where the point is "which bar is longer".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from pathlib import Path

from ._report import Row

_COLORS = {"ours": "#2b6cb0", "node": "#c05621"}
_WIDTH = 760
_BAR = 14
_GAP = 6
_LABEL = 250


@dataclass(frozen=True)
class _Bar:
    label: str
    value: float
    whisker: float | None
    server: str


def _panel(title: str, unit: str, bars: list[_Bar], top: int) -> tuple[list[str], int]:
    parts = [f'<text x="10" y="{top + 16}" font-weight="bold">{escape(title)}</text>']
    y = top + 28
    finite = [b for b in bars if math.isfinite(b.value)]
    if not finite:
        return parts, y
    scale_max = max(max(b.value, b.whisker or 0.0) for b in finite) or 1.0
    span = _WIDTH - _LABEL - 170  # room for the value text after the longest bar
    for bar in finite:
        width = max(1.0, bar.value / scale_max * span)
        color = _COLORS.get(bar.server, "#555")
        parts.append(
            f'<text x="{_LABEL - 6}" y="{y + _BAR - 3}" text-anchor="end">'
            f"{escape(bar.label)}</text>"
        )
        parts.append(
            f'<rect x="{_LABEL}" y="{y}" width="{width:.1f}" height="{_BAR}" fill="{color}"/>'
        )
        end = width
        if bar.whisker is not None and math.isfinite(bar.whisker):
            wx = _LABEL + bar.whisker / scale_max * span
            mid = y + _BAR / 2
            parts.append(
                f'<line x1="{_LABEL + width:.1f}" y1="{mid}" x2="{wx:.1f}" y2="{mid}" '
                f'stroke="{color}" stroke-width="1.5"/>'
                f'<line x1="{wx:.1f}" y1="{y + 2}" x2="{wx:.1f}" y2="{y + _BAR - 2}" '
                f'stroke="{color}" stroke-width="1.5"/>'
            )
            end = max(end, wx - _LABEL)
        text = f"{bar.value:,.3g} {unit}" if bar.value < 100 else f"{bar.value:,.0f} {unit}"
        if bar.whisker is not None:
            text += f" (p99 {bar.whisker:,.3g})"
        parts.append(f'<text x="{_LABEL + end + 6:.1f}" y="{y + _BAR - 3}">{escape(text)}</text>')
        y += _BAR + _GAP
    return parts, y + 10


def plot(rows: list[Row], path: Path, *, title: str) -> None:
    """Write the plot of ``rows`` to ``path``."""
    panels: list[tuple[str, str, list[_Bar]]] = []
    latency = [r for r in rows if r.bench == "latency" and r.case.startswith("1 session")]
    if latency:
        panels.append(
            (
                f"Append-to-delivery latency, {latency[0].case} (median, whisker p99)",
                "ms",
                [
                    _Bar(
                        f"{r.transport} · {r.server} · {r.client}",
                        r.dist.median,
                        r.dist.p99,
                        r.server,
                    )
                    for r in latency
                ],
            )
        )
    fanout = [r for r in rows if r.bench == "fan-out"]
    if fanout:
        panels.append(
            (
                "Fan-out: events delivered per second, all subscribers together",
                "ev/s",
                [
                    _Bar(f"{r.case} · {r.transport} · {r.server}", r.dist.median, None, r.server)
                    for r in fanout
                ],
            )
        )
    catchup = [r for r in rows if r.bench == "catch-up"]
    if catchup:
        panels.append(
            (
                f"Catch-up: {catchup[0].case}, events per second",
                "ev/s",
                [
                    _Bar(f"{r.client} · {r.transport} · {r.server}", r.dist.median, None, r.server)
                    for r in catchup
                ],
            )
        )
    body: list[str] = [
        f'<text x="10" y="20" font-size="15" font-weight="bold">{escape(title)}</text>',
        f'<rect x="{_WIDTH - 190}" y="8" width="12" height="12" fill="{_COLORS["ours"]}"/>'
        f'<text x="{_WIDTH - 174}" y="18">our server</text>'
        f'<rect x="{_WIDTH - 100}" y="8" width="12" height="12" fill="{_COLORS["node"]}"/>'
        f'<text x="{_WIDTH - 84}" y="18">Node reference</text>',
    ]
    y = 34
    for panel_title, unit, bars in panels:
        parts, y = _panel(panel_title, unit, bars, y)
        body.extend(parts)
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{y + 10}" '
        f'font-family="sans-serif" font-size="11">'
        f'<rect width="100%" height="100%" fill="white"/>{"".join(body)}</svg>\n'
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(svg)
