"""Where server rules fire: request triggers, and the point a positional trigger
(``after_event``, ``at_offset``) lands inside a read or an append.

Pure decisions over counts and records; the rule book keeps the counts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from .._model import Record, StreamState
from .._store import StreamStore, json_items
from .plan import AfterEvent, AtOffset, OnRequest, OnResume, Probability, Rule, Trigger

__all__ = ["CutPoint", "cut_point", "events_before", "request_fires", "split", "window"]

_EVERYTHING = 1 << 62

CutPoint = tuple[int, Rule, int]
"""(rule index, rule, events to keep before the cut)."""


def request_fires(
    trigger: Trigger, *, seen: int, is_resume: bool, draw: Callable[[], float]
) -> bool:
    """Whether a request trigger fires on a request the rule has now ``seen`` times.

    ``draw`` gives the request's random number (only ``probability`` asks).
    """
    if isinstance(trigger, OnRequest):
        return trigger.hits(seen)
    if isinstance(trigger, OnResume):
        return is_resume
    if isinstance(trigger, Probability):
        return draw() < trigger.p
    return True  # always


def cut_point(
    positional: Sequence[tuple[int, Rule]],
    records: Sequence[Record],
    start: int,
    events_before: int,
    can_fire: Callable[[int, Rule], bool],
) -> CutPoint | None:
    """The earliest rule that lands inside ``records``, which follow position ``start``
    and the stream's first ``events_before`` events."""
    total = sum(r.count for r in records)
    best: CutPoint | None = None
    for index, rule in positional:
        trigger = rule.trigger
        keep: int | None = None
        if isinstance(trigger, AfterEvent):
            if trigger.n == 0 and events_before == 0 and total:
                keep = 0
            elif events_before < trigger.n <= events_before + total:
                keep = trigger.n - events_before
        elif isinstance(trigger, AtOffset):
            target = trigger.position
            if start < target:
                kept = 0
                for record in records:
                    kept += record.count
                    if record.end >= target:
                        keep = kept
                        break
        if keep is None or not can_fire(index, rule):
            continue
        if best is None or keep < best[2]:
            best = (index, rule, keep)
    return best


def split(records: Sequence[Record], keep: int, is_json: bool) -> tuple[list[bytes], int | None]:
    """The first ``keep`` events of ``records`` (compact JSON messages, or raw
    appends) and the position right after them if that is an append boundary."""
    pieces: list[bytes] = []
    boundary: int | None = None
    for record in records:
        if len(pieces) >= keep:
            break
        if is_json:
            items = [
                json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode()
                for item in json_items(record)
            ]
        else:
            items = [record.data]
        room = keep - len(pieces)
        pieces.extend(items[:room])
        boundary = record.end if room >= len(items) else None
    return pieces, boundary


def events_before(store: StreamStore, state: StreamState, position: int) -> int:
    """Events in the stream up to ``position`` (among retained appends)."""
    return sum(r.count for r in store.read(state, 0, _EVERYTHING).records if r.end <= position)


def window(store: StreamStore, state: StreamState, start: int, end: int) -> list[Record]:
    """The records between positions ``start`` and ``end``."""
    return [r for r in store.read(state, start, _EVERYTHING).records if r.end <= end]


def retained(store: StreamStore, state: StreamState) -> list[Record]:
    """Every retained record of the stream."""
    return store.read(state, 0, _EVERYTHING).records
