"""The server's in-memory state of a stream: plain data, no I/O."""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ._offsets import format_offset


@dataclass(frozen=True, slots=True)
class Record:
    """One append, as stored: ``end`` is the position right after it.

    For a JSON stream ``data`` holds the append's messages, each compact JSON,
    joined by commas (``{"a":1},{"b":2}``); for other streams the raw bytes.
    """

    end: int
    data: bytes
    count: int = 1  # messages in a JSON record; 1 for bytes


@dataclass(slots=True)
class ProducerState:
    epoch: int
    last_seq: int
    updated_at: float
    # Where the producer's recent requests landed (seq -> end position), so a
    # retried request learns the offset of the original, not just the tail.
    landed: dict[int, int] = field(default_factory=dict)

    LANDED_KEPT = 64

    def with_landed(self, seq: int, end: int, previous: ProducerState | None) -> ProducerState:
        kept = (
            dict(previous.landed) if previous is not None and previous.epoch == self.epoch else {}
        )
        kept[seq] = end
        if len(kept) > self.LANDED_KEPT:
            for old in sorted(kept)[: len(kept) - self.LANDED_KEPT]:
                del kept[old]
        return ProducerState(self.epoch, self.last_seq, self.updated_at, kept)


@dataclass(slots=True)
class StreamState:
    """Everything the server knows about one stream."""

    path: str
    stream_id: str
    content_type: str
    created_at: float
    ttl_seconds: int | None = None
    expires_at: str | None = None
    closed: bool = False
    closed_by: tuple[str, int, int] | None = None
    forked_from: str | None = None
    fork_offset: int | None = None  # position in the source where the fork starts
    fork_sub_offset: int = 0
    base: int = 0  # position before the first own record
    records: list[Record] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)  # records[i].end, for bisect
    stream_seq: str | None = None
    producers: dict[str, ProducerState] = field(default_factory=dict)
    ref_count: int = 0
    soft_deleted: bool = False
    trimmed_to: int = 0  # retention: positions at or below this are gone (410)
    last_access: float = field(default_factory=time.time)

    @property
    def tail(self) -> int:
        # With every record trimmed away the tail stays where it was, never going back.
        return self.ends[-1] if self.ends else max(self.base, self.trimmed_to)

    @property
    def tail_offset(self) -> str:
        return format_offset(self.tail)

    def next_record(self, data: bytes, count: int = 1, after: int | None = None) -> Record:
        """The record ``data`` would be if appended after ``after`` (default: the tail)."""
        return Record((self.tail if after is None else after) + len(data), data, count)

    def add_records(self, records: list[Record]) -> None:
        self.records.extend(records)
        self.ends.extend(r.end for r in records)

    def own_records_after(self, position: int, cap: int | None = None) -> list[Record]:
        """Own records that end after ``position`` (and no later than ``cap``)."""
        start = bisect.bisect_right(self.ends, position)
        stop = len(self.ends) if cap is None else bisect.bisect_right(self.ends, cap)
        return self.records[start:stop]

    def expires_at_epoch(self) -> float | None:
        if self.expires_at is None:
            return None
        return parse_rfc3339(self.expires_at)

    def is_expired(self, now: float) -> bool:
        deadline = self.expires_at_epoch()
        if deadline is not None and now >= deadline:
            return True
        return self.ttl_seconds is not None and now >= self.last_access + self.ttl_seconds


def parse_rfc3339(text: str) -> float:
    """Seconds since the epoch for an RFC 3339 / ISO 8601 timestamp; ValueError if invalid.

    A timestamp without a zone is taken as UTC.
    """
    value = text.strip()
    if not value or value != text:
        raise ValueError(f"invalid timestamp {text!r}")
    parsed = datetime.fromisoformat(value.replace("z", "Z"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()
