"""The server's in-memory state of a stream: plain data, no I/O."""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ._offsets import format_incarnation, format_offset


@dataclass(frozen=True, slots=True)
class Record:
    """One append, as stored: ``end`` is the position right after it.

    For a JSON stream ``data`` holds the append's messages, each compact JSON,
    joined by commas (``{"a":1},{"b":2}``); for other streams the raw bytes.
    """

    end: int
    data: bytes
    count: int = 1  # messages in a JSON record; 1 for bytes


@dataclass(frozen=True, slots=True)
class Landed:
    """Where one producer request landed, and a digest of what it carried."""

    end: int
    digest: str | None = None  # None: stored before digests were kept


@dataclass(slots=True)
class ProducerState:
    epoch: int
    last_seq: int
    updated_at: float
    # The producer's recent requests by seq: a retry learns the offset of the
    # original (not just the tail), and a reused seq with other data is caught.
    landed: dict[int, Landed] = field(default_factory=dict)

    LANDED_KEPT = 64

    def with_landed(
        self, seq: int, landed: Landed, previous: ProducerState | None
    ) -> ProducerState:
        kept = (
            dict(previous.landed) if previous is not None and previous.epoch == self.epoch else {}
        )
        kept[seq] = landed
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
    # Which stream at this path (see _offsets); 0 for one stored before
    # incarnations existed, so it keeps issuing the offsets it issued.
    incarnation: int = 0
    idempotency_key: str | None = None  # of the PUT that created it
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
        return self.offset(self.tail)

    @property
    def incarnation_text(self) -> str:
        return format_incarnation(self.incarnation)

    def offset(self, position: int) -> str:
        """``position`` as an offset of this stream."""
        return format_offset(self.incarnation, position)

    def is_own_boundary(self, position: int) -> bool:
        """Whether this stream itself issues offsets at ``position``: its start, fork
        point, retention floor, or the end of one of its records (a fork's inherited
        positions are its source's boundaries; the store checks those)."""
        if position in (0, self.base, self.trimmed_to):
            return True
        index = bisect.bisect_left(self.ends, position)
        return index < len(self.ends) and self.ends[index] == position

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
