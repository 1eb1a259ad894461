"""The history checker: did every subscriber see what was published, exactly once, in order?

Give it what was published (event ids in publication order, with the offset
each append was acknowledged at when known) and what each subscriber saw (event
ids in the order it saw them, with the offset it believed it was at). It
reports, per subscriber:

- **lost**: acknowledged events it never saw (events inside a gap the
  subscriber reported explicitly, e.g. after a ``410``, are ``reported_lost``
  instead: an explicit error, not a silent gap);
- **duplicated**: events it saw more than once;
- **reordered**: events it saw after an event published later;
- **unexpected**: events nobody published;
- **offset issues**: an offset lower than the one before (``regression``),
  or lower than the offset the event was acknowledged at (``before_ack``);
- **offset gaps**: runs of published events skipped between two seen ones;
- **content hash**: SHA-256 of the ids it saw, in order, against that of the
  acknowledged history (equal exactly when it saw everything once, in order).

Unacknowledged events (an append whose response was lost and not retried)
may or may not have committed: seeing one is fine, missing one is not a loss,
seeing it twice is a duplicate.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "HistoryRecorder",
    "HistoryReport",
    "OffsetGap",
    "OffsetIssue",
    "Published",
    "Seen",
    "SubscriberHistory",
    "SubscriberReport",
    "check_history",
    "content_hash",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Published(_Model):
    """One published event: its id, the offset after it (if known), whether
    its append was acknowledged."""

    id: str
    offset: str | None = None
    acked: bool = True


class Seen(_Model):
    """One event as a subscriber saw it: its id and the offset the subscriber
    was at after it (offsets sort as strings in Durable Streams)."""

    id: str
    offset: str | None = None


class SubscriberHistory(_Model):
    """Everything one subscriber saw, and the gaps it reported explicitly
    (``(from_offset, to_offset)``, e.g. a jump to the earliest retained offset)."""

    name: str
    seen: list[Seen] = Field(default_factory=list)
    reported_gaps: list[tuple[str, str]] = Field(default_factory=list)


class OffsetIssue(_Model):
    kind: Literal["regression", "before_ack"]
    index: int  # position in the subscriber's sequence
    id: str
    offset: str
    reference: str  # the offset it was compared with


class OffsetGap(_Model):
    """Published events ``first_id``..``last_id`` (``count`` of them) skipped
    between two events the subscriber saw."""

    after_id: str | None
    first_id: str
    last_id: str
    count: int
    from_offset: str | None = None
    to_offset: str | None = None


class SubscriberReport(_Model):
    name: str
    seen: int
    unique: int
    lost: list[str] = Field(default_factory=list)
    reported_lost: list[str] = Field(default_factory=list)
    duplicated: dict[str, int] = Field(default_factory=dict)  # id -> times seen
    reordered: list[str] = Field(default_factory=list)
    unexpected: list[str] = Field(default_factory=list)
    offset_issues: list[OffsetIssue] = Field(default_factory=list)
    offset_gaps: list[OffsetGap] = Field(default_factory=list)
    content_hash: str
    expected_hash: str

    @property
    def hash_matches(self) -> bool:
        return self.content_hash == self.expected_hash

    @property
    def ok(self) -> bool:
        """No loss, duplicate, reorder, unexpected event or offset issue.

        An explicitly reported loss (``reported_lost``) is not a failure here;
        tests that forbid it check it themselves.
        """
        return not (
            self.lost or self.duplicated or self.reordered or self.unexpected or self.offset_issues
        )


class HistoryReport(_Model):
    published: int
    acknowledged: int
    expected_hash: str
    subscribers: list[SubscriberReport]

    @property
    def ok(self) -> bool:
        """Nothing wrong was found (also true of a check with nothing to compare:
        see :attr:`checked`)."""
        return all(s.ok for s in self.subscribers)

    @property
    def checked(self) -> bool:
        """Whether anything was compared: a subscriber, and an event published or seen.

        A report that checked nothing never says OK (a test that failed before it
        published or read anything has no history to vouch for).
        """
        return bool(self.subscribers) and (
            self.published > 0 or any(s.seen for s in self.subscribers)
        )

    def totals(self) -> dict[str, int]:
        """Counts over all subscribers: seen, lost, duplicated, reordered, ..."""
        return {
            "subscribers": len(self.subscribers),
            "seen": sum(s.seen for s in self.subscribers),
            "lost": sum(len(s.lost) for s in self.subscribers),
            "reported_lost": sum(len(s.reported_lost) for s in self.subscribers),
            "duplicated": sum(n - 1 for s in self.subscribers for n in s.duplicated.values()),
            "reordered": sum(len(s.reordered) for s in self.subscribers),
            "unexpected": sum(len(s.unexpected) for s in self.subscribers),
            "offset_issues": sum(len(s.offset_issues) for s in self.subscribers),
            "hash_mismatches": sum(not s.hash_matches for s in self.subscribers),
        }

    def __str__(self) -> str:
        if not self.checked:
            if not self.published and not self.subscribers:
                return "history check: nothing recorded (not checked)"
            published = (
                f"{self.published} published ({self.acknowledged} acknowledged)"
                if self.published
                else "nothing published"
            )
            seen = "nothing seen" if self.subscribers else "no subscriber recorded"
            return f"history check: not checked: {published}, {seen}"
        verdict = "OK" if self.ok else "FAILED"
        lines = [
            f"history check {verdict}: {self.published} published"
            f" ({self.acknowledged} acknowledged), {len(self.subscribers)} subscriber(s),"
            f" expected sha256 {self.expected_hash[:16]}"
        ]
        for s in self.subscribers:
            status = "ok" if s.ok else "FAILED"
            lines.append(
                f"  {s.name}: {status}: saw {s.seen} ({s.unique} unique);"
                f" lost {len(s.lost)}, duplicated {len(s.duplicated)},"
                f" reordered {len(s.reordered)}, unexpected {len(s.unexpected)},"
                f" offset issues {len(s.offset_issues)};"
                f" hash {'matches' if s.hash_matches else 'differs: ' + s.content_hash[:16]}"
            )
            if s.lost:
                lines.append(f"    lost: {_some(s.lost)}")
            if s.reported_lost:
                lines.append(f"    reported lost (explicit gap): {_some(s.reported_lost)}")
            if s.duplicated:
                lines.append(
                    "    duplicated: " + _some([f"{k} x{v}" for k, v in s.duplicated.items()])
                )
            if s.reordered:
                lines.append(f"    reordered: {_some(s.reordered)}")
            if s.unexpected:
                lines.append(f"    unexpected: {_some(s.unexpected)}")
            for gap in s.offset_gaps[:5]:
                lines.append(
                    f"    gap: {gap.count} event(s) {gap.first_id}..{gap.last_id}"
                    f" skipped after {gap.after_id}"
                    + (f" (offsets {gap.from_offset} -> {gap.to_offset})" if gap.to_offset else "")
                )
            for issue in s.offset_issues[:5]:
                lines.append(
                    f"    offset {issue.kind} at #{issue.index} ({issue.id}):"
                    f" {issue.offset} vs {issue.reference}"
                )
        return "\n".join(lines)


def _some(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def content_hash(ids: Iterable[str]) -> str:
    """SHA-256 over the ids in order (each terminated by a newline)."""
    digest = hashlib.sha256()
    for event_id in ids:
        digest.update(event_id.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def check_history(
    published: Sequence[Published], subscribers: Iterable[SubscriberHistory]
) -> HistoryReport:
    """Compare each subscriber's history with what was published (see the module docstring)."""
    index = {event.id: i for i, event in enumerate(published)}
    acked_ids = [event.id for event in published if event.acked]
    expected = content_hash(acked_ids)
    reports = [_check_one(published, index, expected, sub) for sub in subscribers]
    return HistoryReport(
        published=len(published),
        acknowledged=len(acked_ids),
        expected_hash=expected,
        subscribers=reports,
    )


def _in_gaps(offset: str | None, gaps: Sequence[tuple[str, str]]) -> bool:
    return offset is not None and any(low < offset <= high for low, high in gaps)


def _check_one(
    published: Sequence[Published],
    index: Mapping[str, int],
    expected_hash: str,
    sub: SubscriberHistory,
) -> SubscriberReport:
    counts = Counter(event.id for event in sub.seen)
    duplicated = {event_id: n for event_id, n in counts.items() if n > 1}
    unexpected = [event_id for event_id in counts if event_id not in index]
    seen_set = set(counts)
    lost: list[str] = []
    reported_lost: list[str] = []
    for item in published:
        if item.id in seen_set or not item.acked:
            continue
        (reported_lost if _in_gaps(item.offset, sub.reported_gaps) else lost).append(item.id)

    reordered: list[str] = []
    issues: list[OffsetIssue] = []
    gaps: list[OffsetGap] = []
    highest = -1  # the highest publication index seen so far
    first_seen: set[str] = set()
    previous_offset: str | None = None
    previous_id: str | None = None
    for position, event in enumerate(sub.seen):
        if event.offset is not None:
            if previous_offset is not None and event.offset < previous_offset:
                issues.append(
                    OffsetIssue(
                        kind="regression",
                        index=position,
                        id=event.id,
                        offset=event.offset,
                        reference=previous_offset,
                    )
                )
            previous_offset = event.offset
        i = index.get(event.id)
        if i is None or event.id in first_seen:
            continue
        first_seen.add(event.id)
        acked_at = published[i].offset
        if event.offset is not None and acked_at is not None and event.offset < acked_at:
            issues.append(
                OffsetIssue(
                    kind="before_ack",
                    index=position,
                    id=event.id,
                    offset=event.offset,
                    reference=acked_at,
                )
            )
        if i < highest:
            reordered.append(event.id)
            continue
        skipped = [published[j] for j in range(highest + 1, i) if published[j].acked]
        skipped = [p for p in skipped if p.id not in seen_set]
        if skipped:
            gaps.append(
                OffsetGap(
                    after_id=previous_id,
                    first_id=skipped[0].id,
                    last_id=skipped[-1].id,
                    count=len(skipped),
                    from_offset=published[highest].offset if highest >= 0 else None,
                    to_offset=published[i].offset,
                )
            )
        highest = i
        previous_id = event.id
    return SubscriberReport(
        name=sub.name,
        seen=len(sub.seen),
        unique=len(counts),
        lost=lost,
        reported_lost=reported_lost,
        duplicated=duplicated,
        reordered=reordered,
        unexpected=unexpected,
        offset_issues=issues,
        offset_gaps=gaps,
        content_hash=content_hash(event.id for event in sub.seen),
        expected_hash=expected_hash,
    )


class HistoryRecorder:
    """Collects a run's history as it happens, then checks it.

    >>> history = HistoryRecorder()
    >>> history.published("e1", offset="0000000000000000_0000000000000010")
    >>> history.seen("reader", "e1", offset="0000000000000000_0000000000000010")
    >>> history.check().ok
    True
    """

    def __init__(self) -> None:
        self._published: list[Published] = []
        self._subscribers: dict[str, SubscriberHistory] = {}

    def published(self, event_id: str, *, offset: str | None = None, acked: bool = True) -> None:
        self._published.append(Published(id=event_id, offset=offset, acked=acked))

    def subscriber(self, name: str) -> SubscriberHistory:
        """The history of ``name`` (created empty on first use)."""
        if name not in self._subscribers:
            self._subscribers[name] = SubscriberHistory(name=name)
        return self._subscribers[name]

    def seen(self, subscriber: str, event_id: str, *, offset: str | None = None) -> None:
        self.subscriber(subscriber).seen.append(Seen(id=event_id, offset=offset))

    def reported_gap(self, subscriber: str, from_offset: str, to_offset: str) -> None:
        self.subscriber(subscriber).reported_gaps.append((from_offset, to_offset))

    def check(self) -> HistoryReport:
        return check_history(self._published, self._subscribers.values())

    def assert_ok(self) -> HistoryReport:
        """Check; raise ``AssertionError`` with the readable report if anything is wrong."""
        report = self.check()
        if not report.ok:
            raise AssertionError(str(report))
        return report
