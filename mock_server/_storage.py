"""Storage backends: where streams live between requests and across restarts.

The protocol logic (``_store.StreamStore``) keeps every stream's working state
in memory and hands each mutation to a ``Storage`` *before* it applies it, in
one call per request. A backend that raises leaves memory untouched, so a
rejected or failed request changes nothing.

- ``MemoryStorage``: keeps nothing; the default. State ends with the process.
- ``SqliteStorage``: one SQLite database in a data directory. Each mutation is
  one transaction, committed before the response is sent, so an acknowledged
  append, a producer's state and a closure survive ``kill -9``. WAL mode with
  ``synchronous=NORMAL`` survives a process crash; ``synchronous=FULL`` (the
  ``durability="full"`` option) also survives power loss, at an fsync per write.

A data directory belongs to one server at a time: ``SqliteStorage`` takes an
exclusive OS lock (``flock``) on ``server.lock`` in it and holds it until
``close()`` or the process ends (the OS releases it after ``kill -9`` too).
A second server on the same directory gets :class:`DataDirInUse`, naming the
pid and URL the holder wrote into the lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from ._model import Landed, ProducerState, Record, StreamState

# A stream's meta is one JSON object; a field missing from an older row takes
# the StreamState default (an incarnation of 0 keeps its offsets unchanged).
_META_FIELDS = (
    "stream_id",
    "content_type",
    "created_at",
    "incarnation",
    "idempotency_key",
    "ttl_seconds",
    "expires_at",
    "closed",
    "closed_by",
    "forked_from",
    "fork_offset",
    "fork_sub_offset",
    "base",
    "stream_seq",
    "ref_count",
    "soft_deleted",
    "trimmed_to",
    "last_access",
)


class Storage(Protocol):
    """Where the store writes each mutation before applying it in memory."""

    def load(self) -> list[StreamState]:
        """Every stored stream, with its records and producer states."""
        ...

    def commit(
        self,
        state: StreamState,
        records: Sequence[Record] = (),
        producer: tuple[str, ProducerState] | None = None,
    ) -> None:
        """Atomically store ``state``'s metadata, new ``records`` and one producer's state."""
        ...

    def delete(self, path: str) -> None:
        """Remove a stream and everything it holds."""
        ...

    def trim(self, state: StreamState, before: int) -> None:
        """Drop the records of ``state`` that end at or before ``before``."""
        ...

    def close(self) -> None: ...


class MemoryStorage:
    """Keeps nothing: the in-memory state is all there is."""

    def load(self) -> list[StreamState]:
        return []

    def commit(
        self,
        state: StreamState,
        records: Sequence[Record] = (),
        producer: tuple[str, ProducerState] | None = None,
    ) -> None:
        return None

    def delete(self, path: str) -> None:
        return None

    def trim(self, state: StreamState, before: int) -> None:
        return None

    def close(self) -> None:
        return None


def _meta_json(state: StreamState) -> str:
    meta: dict[str, Any] = {name: getattr(state, name) for name in _META_FIELDS}
    return json.dumps(meta, separators=(",", ":"))


def _landed_json(landed: dict[int, Landed]) -> str:
    return json.dumps({seq: [at.end, at.digest] for seq, at in landed.items()})


def _landed_from_json(text: str) -> dict[int, Landed]:
    """``{seq: [end, digest]}``, or ``{seq: end}`` as stored before digests were kept."""
    landed: dict[int, Landed] = {}
    for seq, value in json.loads(text).items():
        landed[int(seq)] = Landed(value) if isinstance(value, int) else Landed(*value)
    return landed


LOCK_FILE = "server.lock"


class DataDirInUse(Exception):
    """Another server (``pid``, at ``url`` if it said) holds the data directory's lock."""

    def __init__(self, directory: Path, pid: int | None, url: str | None) -> None:
        self.directory = directory
        self.pid = pid
        self.url = url
        holder = f"server pid {pid}" if pid is not None else "another server"
        where = f" on {url}" if url else ""
        super().__init__(
            f"data directory {directory} is in use by {holder}{where}; "
            "one server per data directory (stop it, or use another --data-dir)"
        )


def data_dir_owner(directory: str | Path) -> dict[str, Any]:
    """What the server holding ``directory`` wrote into its lock file (``pid``, ``url``),
    or ``{}`` if none has (no file, unreadable, or written by no one yet)."""
    try:
        owner = json.loads((Path(directory) / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


class DataDirLock:
    """The exclusive lock on a data directory, held from construction to :meth:`release`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / LOCK_FILE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = data_dir_owner(directory)
            pid, url = owner.get("pid"), owner.get("url")
            raise DataDirInUse(
                directory,
                pid if isinstance(pid, int) else None,
                url if isinstance(url, str) else None,
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        self.record()

    def record(self, url: str | None = None) -> None:
        """Write who holds the lock (this pid, and ``url`` once the server listens)."""
        fd = self._fd
        if fd is None:
            return
        owner: dict[str, Any] = {"pid": os.getpid()}
        if url is not None:
            owner["url"] = url
        data = json.dumps(owner).encode() + b"\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    def release(self) -> None:
        """Give the directory up (idempotent). The file stays; only its lock matters."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the last descriptor releases the flock


class SqliteStorage:
    """Streams in one SQLite database file under ``data_dir``, which it locks
    (one server per data directory; raises :class:`DataDirInUse` otherwise)."""

    def __init__(self, data_dir: str | Path, durability: Literal["normal", "full"] = "normal"):
        directory = Path(data_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.lock = DataDirLock(directory)
        try:
            self._open(directory, durability)
        except BaseException:
            self.lock.release()
            raise

    def announce(self, url: str) -> None:
        """Record in the lock file the URL this server listens on (for a second
        server's error message, and for tools that look for the owner)."""
        self.lock.record(url)

    def _open(self, directory: Path, durability: Literal["normal", "full"]) -> None:
        self.path = directory / "streams.sqlite3"
        # The server is single-threaded asyncio; every call comes from the loop thread.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={durability.upper()}")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS streams (
                path TEXT PRIMARY KEY,
                meta TEXT NOT NULL
            );
            CREATE TABLE IF NOT EXISTS records (
                path TEXT NOT NULL,
                end_pos INTEGER NOT NULL,
                data BLOB NOT NULL,
                count INTEGER NOT NULL,
                PRIMARY KEY (path, end_pos)
            ) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS producers (
                path TEXT NOT NULL,
                producer_id TEXT NOT NULL,
                epoch INTEGER NOT NULL,
                last_seq INTEGER NOT NULL,
                updated_at REAL NOT NULL,
                landed TEXT NOT NULL DEFAULT '{}',
                PRIMARY KEY (path, producer_id)
            ) WITHOUT ROWID;
            """
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(producers)")}
        if "landed" not in columns:  # a database from before the column existed
            self._db.execute("ALTER TABLE producers ADD COLUMN landed TEXT NOT NULL DEFAULT '{}'")

    def load(self) -> list[StreamState]:
        states: dict[str, StreamState] = {}
        for path, meta_text in self._db.execute("SELECT path, meta FROM streams"):
            meta = json.loads(meta_text)
            closed_by = meta.pop("closed_by")
            state = StreamState(
                path=path,
                closed_by=tuple(closed_by) if closed_by else None,
                **meta,
            )
            states[path] = state
        rows: Iterable[tuple[str, int, bytes, int]] = self._db.execute(
            "SELECT path, end_pos, data, count FROM records ORDER BY path, end_pos"
        )
        for path, end, data, count in rows:
            owner = states.get(path)
            if owner is not None:
                owner.records.append(Record(end, bytes(data), count))
                owner.ends.append(end)
        for path, producer_id, epoch, last_seq, updated_at, landed in self._db.execute(
            "SELECT path, producer_id, epoch, last_seq, updated_at, landed FROM producers"
        ):
            owner = states.get(path)
            if owner is not None:
                owner.producers[producer_id] = ProducerState(
                    epoch, last_seq, updated_at, _landed_from_json(landed)
                )
        return list(states.values())

    def commit(
        self,
        state: StreamState,
        records: Sequence[Record] = (),
        producer: tuple[str, ProducerState] | None = None,
    ) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT INTO streams (path, meta) VALUES (?, ?) "
                "ON CONFLICT(path) DO UPDATE SET meta = excluded.meta",
                (state.path, _meta_json(state)),
            )
            if records:
                db.executemany(
                    "INSERT INTO records (path, end_pos, data, count) VALUES (?, ?, ?, ?)",
                    [(state.path, r.end, r.data, r.count) for r in records],
                )
            if producer is not None:
                producer_id, ps = producer
                db.execute(
                    "INSERT INTO producers (path, producer_id, epoch, last_seq, updated_at, landed)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(path, producer_id) DO UPDATE SET "
                    "epoch = excluded.epoch, last_seq = excluded.last_seq, "
                    "updated_at = excluded.updated_at, landed = excluded.landed",
                    (
                        state.path,
                        producer_id,
                        ps.epoch,
                        ps.last_seq,
                        ps.updated_at,
                        _landed_json(ps.landed),
                    ),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def delete(self, path: str) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for table in ("streams", "records", "producers"):
                db.execute(f"DELETE FROM {table} WHERE path = ?", (path,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def trim(self, state: StreamState, before: int) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM records WHERE path = ? AND end_pos <= ?", (state.path, before))
            db.execute(
                "UPDATE streams SET meta = ? WHERE path = ?", (_meta_json(state), state.path)
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the database and release the data directory (idempotent)."""
        self._db.close()
        self.lock.release()
