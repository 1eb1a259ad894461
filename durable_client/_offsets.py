"""Reader positions, resume bookkeeping and offset stores.

Why a position is more than an offset
-------------------------------------
Server offsets are opaque strings, ordered lexicographically, and they mark
*batch* boundaries: one append (one POST) of several JSON messages gets one
offset, and a read returns whole batches, each followed by the offset to read
next. A reader that handed over three of the five messages of a batch cannot
name "after the third" with an offset alone. So a :class:`Position` is an
offset plus ``skip``, the number of messages after that offset already
delivered. Resuming requests the offset and drops the first ``skip`` messages;
this stays correct even when the server regroups messages differently on the
next read, because messages after an offset always come in the same order.

The :class:`ResumeTracker` applies that rule to every batch and checks that
batches join up (each starts where the previous one ended), so a gap or a
replay from a misbehaving transport is an error, not a silent duplicate.

An :class:`EventIdDeduper` is a second, independent guard for *sessions*: it
drops an event whose id was already delivered, which catches the rare
duplicate *in the log itself* (a publisher that crashed after its append
landed and re-sent the event under a new producer epoch). It is the one
dedup of the SDK: a subscription and a :class:`~durable_client.Transcript`
each keep one, bounded, because such a duplicate lands close to its original.

Offset stores persist positions so that a restarted process, or a second
terminal sharing a directory, resumes where it left off.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

from ._errors import ProtocolViolation, UsageError
from ._protocol import OFFSET_BEGINNING, OFFSET_NOW

__all__ = [
    "EventIdDeduper",
    "FileOffsetStore",
    "MemoryOffsetStore",
    "OffsetStore",
    "Position",
    "ResumeTracker",
]

T = TypeVar("T")

_SENTINELS = frozenset({OFFSET_BEGINNING, OFFSET_NOW})


@dataclass(frozen=True, slots=True)
class Position:
    """Where a reader stands: after ``offset``, with ``skip`` more messages already seen.

    ``Position.beginning()`` is the start of the stream. A position is what an
    :class:`OffsetStore` saves and what ``Session.subscribe(start=...)`` accepts.
    """

    offset: str
    skip: int = 0
    #: Which incarnation of the stream the offset belongs to, as the server
    #: reported it (``Stream-Incarnation``); ``None`` if it did not say. A stream
    #: deleted and re-created at the same URL is a new incarnation, and an offset
    #: of the old one means nothing in it: resuming there raises
    #: :class:`StreamReplaced` instead of skipping silently.
    incarnation: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.offset, str) or not self.offset:
            raise UsageError("a position needs a non-empty offset")
        if not isinstance(self.skip, int) or isinstance(self.skip, bool) or self.skip < 0:
            raise UsageError("skip must be an integer >= 0")
        if self.incarnation is not None and (
            not isinstance(self.incarnation, str) or not self.incarnation
        ):
            raise UsageError("incarnation must be a non-empty string or None")

    @classmethod
    def beginning(cls, incarnation: str | None = None) -> Position:
        """The start of the stream."""
        return cls(OFFSET_BEGINNING, 0, incarnation)

    def with_incarnation(self, incarnation: str | None) -> Position:
        """This position, tied to ``incarnation``."""
        if incarnation == self.incarnation:
            return self
        return Position(self.offset, self.skip, incarnation)

    def to_json(self) -> dict[str, object]:
        """A JSON-friendly form (what the file store writes)."""
        data: dict[str, object] = {"offset": self.offset, "skip": self.skip}
        if self.incarnation is not None:
            data["incarnation"] = self.incarnation
        return data

    @classmethod
    def from_json(cls, data: object) -> Position:
        """Inverse of :meth:`to_json`; raises :class:`UsageError` on malformed data."""
        if not isinstance(data, dict):
            raise UsageError("a saved position must be a JSON object")
        offset = data.get("offset")
        skip = data.get("skip", 0)
        incarnation = data.get("incarnation")
        if not isinstance(offset, str) or not isinstance(skip, int) or isinstance(skip, bool):
            raise UsageError("a saved position needs a string offset and an integer skip")
        if incarnation is not None and not isinstance(incarnation, str):
            raise UsageError("a saved position's incarnation must be a string")
        return cls(offset, skip, incarnation)

    def __str__(self) -> str:
        return self.offset if self.skip == 0 else f"{self.offset}+{self.skip}"


def _is_real(offset: str) -> bool:
    return offset not in _SENTINELS


class ResumeTracker:
    """Turns batches into (message, position-after-it) pairs, exactly once.

    ``position`` is where a reconnect must resume: the offset to request and how
    many of the messages after it to drop.
    """

    def __init__(self, start: Position) -> None:
        self.position = start

    def accept(
        self, batch_start: str, messages: Sequence[T], next_offset: str
    ) -> list[tuple[T, Position]]:
        """Take one batch that was read from ``batch_start`` and ends at ``next_offset``.

        Returns the messages not delivered before, each with the position just
        after it. Raises :class:`ProtocolViolation` if the batch does not start
        where the previous one ended, or if the offsets go backwards.
        """
        current = self.position
        if batch_start != current.offset:
            raise ProtocolViolation(
                f"batch starts at {batch_start!r} but the reader stands at {current.offset!r}"
            )
        if _is_real(batch_start) and _is_real(next_offset) and next_offset < batch_start:
            raise ProtocolViolation(
                f"offsets went backwards: {next_offset!r} after {batch_start!r}"
            )
        if messages and next_offset == batch_start and _is_real(batch_start):
            raise ProtocolViolation(
                f"a batch of {len(messages)} message(s) did not advance the offset {batch_start!r}"
            )
        skip = current.skip
        fresh = messages[skip:]
        remaining_skip = max(0, skip - len(messages))
        out: list[tuple[T, Position]] = []
        last = len(fresh) - 1
        incarnation = current.incarnation
        for i, message in enumerate(fresh):
            if i == last:
                after = Position(next_offset, 0, incarnation)
            else:
                after = Position(batch_start, skip + i + 1, incarnation)
            out.append((message, after))
        self.position = Position(next_offset, remaining_skip, incarnation)
        return out


class EventIdDeduper:
    """Remembers the last ``capacity`` event ids and reports repeats."""

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise UsageError("capacity must be >= 1")
        self.capacity = capacity
        self._seen: OrderedDict[str, None] = OrderedDict()

    def seen(self, event_id: str) -> bool:
        """True if ``event_id`` was seen before; otherwise remember it and return False."""
        if event_id in self._seen:
            self._seen.move_to_end(event_id)
            return True
        self._seen[event_id] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return False

    def __len__(self) -> int:
        return len(self._seen)


@runtime_checkable
class OffsetStore(Protocol):
    """Persists reader positions under string keys."""

    async def load(self, key: str) -> Position | None:
        """The saved position for ``key``, or ``None``."""
        ...

    async def save(self, key: str, position: Position) -> None:
        """Remember ``position`` for ``key``."""
        ...

    async def delete(self, key: str) -> None:
        """Forget ``key`` (no error if absent)."""
        ...


class MemoryOffsetStore:
    """Positions in a dict: survives reconnects, not a process restart."""

    def __init__(self) -> None:
        self._positions: dict[str, Position] = {}

    async def load(self, key: str) -> Position | None:
        return self._positions.get(key)

    async def save(self, key: str, position: Position) -> None:
        self._positions[key] = position

    async def delete(self, key: str) -> None:
        self._positions.pop(key, None)


class FileOffsetStore:
    """Positions as small JSON files in a directory, one per key.

    Each save writes a temporary file and renames it over the old one, so a
    crash leaves either the old or the new position, never a torn file. With
    ``fsync=True`` the data is flushed to disk before the rename (slower; only
    needed to survive power loss, not a process crash).
    """

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.directory = Path(directory)
        self.fsync = fsync

    def path_for(self, key: str) -> Path:
        """The file that holds ``key``'s position."""
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
        return self.directory / f"{digest}.json"

    async def load(self, key: str) -> Position | None:
        return await asyncio.to_thread(self._load, key)

    async def save(self, key: str, position: Position) -> None:
        await asyncio.to_thread(self._save, key, position)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._delete, key)

    def _load(self, key: str) -> Position | None:
        path = self.path_for(key)
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise UsageError(f"corrupt offset file {path}") from exc
        if not isinstance(data, dict) or data.get("key") != key:
            raise UsageError(f"offset file {path} does not belong to key {key!r}")
        return Position.from_json(data.get("position"))

    def _save(self, key: str, position: Position) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path_for(key)
        payload = json.dumps({"key": key, "position": position.to_json()})
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(payload)
                if self.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path_for(key).unlink()
