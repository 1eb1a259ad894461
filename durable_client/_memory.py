"""An in-memory session transport: the session log in this process, for tests.

::

    log = MemoryTransport()
    async with (
        Session("memory://test", "s", author=Author.user("ann"), transport=log) as ann,
        Session("memory://test", "s", author=Author.agent("bot"), transport=log) as bot,
    ):
        ...  # subscribe, publish, cancel, run an Agent: no server

A :class:`MemoryTransport` holds streams by URL, as a server would; every
session given the same object shares them. It keeps the rules a session
relies on: one offset per append (``-1`` is the beginning, ``now`` the
tail), history then live, closed streams (appends refused, readers ended),
idempotent producers (a retried stamp is a duplicate; a gap, a stale epoch
or a reused seq with other data is refused with the error a server gives),
and incarnations (a stream deleted and created again is a new one).
Refusals are mapped by the same table as HTTP's (``error_from_status``), so a
test sees the errors production sees. Presence needs the WebSocket
transport and is not offered here.
"""

from __future__ import annotations

import asyncio
import json
import uuid
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import _protocol as P
from ._core.producer import ProducerStamp
from ._errors import ClientClosed, ConnectionLost, DurableError, error_from_status
from ._results import AppendResult
from ._transport import SessionDefaults, SessionTransport, TransportBatch

__all__ = ["MemoryTransport"]

#: How many of a producer's last requests a duplicate is checked against.
_LANDED_KEPT = 64


@dataclass
class _Producer:
    epoch: int
    last_seq: int
    landed: dict[int, tuple[int, tuple[bytes, ...]]] = field(default_factory=dict)


class _Log:
    """One stream: its appends, its producers, and a wake-up for live readers."""

    def __init__(self) -> None:
        self.incarnation = uuid.uuid4().hex[:16]
        self.records: list[tuple[bytes, ...]] = []  # one per append
        self.closed = False
        self.closed_by: ProducerStamp | None = None
        self.producers: dict[str, _Producer] = {}
        self.changed = asyncio.Event()

    @property
    def tail(self) -> str:
        return self.offset(len(self.records))

    @staticmethod
    def offset(index: int) -> str:
        return f"{index:016d}"

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


def _refusal(
    status: int,
    message: str,
    *,
    url: str,
    operation: str,
    headers: Mapping[str, str] | None = None,
) -> DurableError:
    """The error a server's refusal maps to (the same table as over HTTP)."""
    return error_from_status(status, headers or {}, message, url=url, operation=operation)


class MemoryTransport:
    """Streams held in this process; give it to sessions as their transport.

    Sessions given the same object share its streams (a user and an agent in
    one test); a new object starts empty. :meth:`messages` reads a stream's
    log for assertions, :meth:`delete` removes a stream, and
    :meth:`drop_connections` cuts every live read as a network failure would.
    """

    def __init__(self) -> None:
        self._logs: dict[str, _Log] = {}
        self._connections: weakref.WeakSet[_MemoryConnection] = weakref.WeakSet()

    def bind(self, url: str, defaults: SessionDefaults) -> SessionTransport:
        """A connection to the stream at ``url`` (the policies are not needed here)."""
        connection = _MemoryConnection(self, url)
        self._connections.add(connection)
        return connection

    def messages(self, url: str) -> list[Any]:
        """Every message in the stream at ``url``, in order (``[]`` if there is none)."""
        log = self._logs.get(url)
        if log is None:
            return []
        return [json.loads(item) for record in log.records for item in record]

    def delete(self, url: str) -> bool:
        """Delete the stream at ``url``; True if there was one. Live readers are cut."""
        log = self._logs.pop(url, None)
        if log is not None:
            log.notify()
        return log is not None

    def drop_connections(self) -> None:
        """Cut every live read of every session, as a network failure would."""
        for connection in list(self._connections):
            connection.drop_connections()

    def _log(self, url: str, operation: str) -> _Log:
        log = self._logs.get(url)
        if log is None:
            raise _refusal(404, "no stream here", url=url, operation=operation)
        return log


class _MemoryConnection:
    """One session's link to a :class:`MemoryTransport` (a :class:`SessionTransport`)."""

    def __init__(self, memory: MemoryTransport, url: str) -> None:
        self._memory = memory
        self._url = url
        self._drops = 0  # bumped by drop_connections(); a live read that sees it ends
        self._closed = False

    @property
    def name(self) -> str:
        return "memory"

    @property
    def url(self) -> str:
        return self._url

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("the session was closed", url=self._url)

    async def create(self) -> bool:
        self._check_open()
        if self._url in self._memory._logs:
            return False
        self._memory._logs[self._url] = _Log()
        return True

    async def tail(self) -> str:
        self._check_open()
        return self._memory._log(self._url, "head").tail

    def drop_connections(self) -> None:
        self._drops += 1
        for log in self._memory._logs.values():
            log.notify()

    async def aclose(self) -> None:
        self._closed = True

    # --- reading ---------------------------------------------------------------------

    def _start_index(self, log: _Log, offset: str) -> int:
        if offset == P.OFFSET_BEGINNING:
            return 0
        if offset == P.OFFSET_NOW:
            return len(log.records)
        if len(offset) == 16 and offset.isdigit() and int(offset) <= len(log.records):
            return int(offset)
        raise _refusal(
            400,
            f"offset {offset!r} was never issued by this stream",
            url=self._url,
            operation="read",
            headers={P.STREAM_INCARNATION: log.incarnation},
        )

    async def subscribe(self, offset: str) -> AsyncIterator[TransportBatch]:
        self._check_open()
        log = self._memory._log(self._url, "read")
        index = self._start_index(log, offset)
        drops = self._drops
        first = True
        while True:
            if self._memory._logs.get(self._url) is not log or self._drops != drops:
                raise ConnectionLost("the connection was cut", url=self._url)
            if first or index < len(log.records) or log.closed:
                end = len(log.records)
                messages = tuple(
                    json.loads(item) for record in log.records[index:end] for item in record
                )
                yield TransportBatch(
                    messages, offset, log.offset(end), True, log.closed, log.incarnation
                )
                if log.closed:
                    return
                first, index, offset = False, end, log.offset(end)
                continue
            await log.changed.wait()

    # --- writing ---------------------------------------------------------------------

    async def send_batch(
        self, items: Sequence[bytes], *, stamp: ProducerStamp | None, close: bool = False
    ) -> AppendResult:
        self._check_open()
        operation = "close" if close and not items else "append"
        log = self._memory._log(self._url, operation)
        record = tuple(bytes(item) for item in items)
        if not record and not close:
            raise _refusal(400, "an empty append", url=self._url, operation=operation)
        for item in record:
            try:
                json.loads(item)
            except ValueError as exc:
                raise _refusal(400, f"not JSON: {exc}", url=self._url, operation=operation) from exc
        if log.closed:
            if stamp is not None and stamp == log.closed_by:
                return AppendResult(log.tail, True, True, 204, stamp.epoch, stamp.seq)
            raise _refusal(
                409,
                "stream is closed",
                url=self._url,
                operation=operation,
                headers={P.STREAM_CLOSED: "true", P.STREAM_NEXT_OFFSET: log.tail},
            )
        if stamp is not None and self._is_duplicate(log, stamp, operation):
            return self._duplicate(log, stamp, record, operation)
        if record:
            log.records.append(record)
        if stamp is not None:
            self._landed(log, stamp, record)
        if close:
            log.closed, log.closed_by = True, stamp
        log.notify()
        return AppendResult(
            log.tail,
            close,
            False,
            200 if stamp is not None and record else 204,
            stamp.epoch if stamp is not None else None,
            stamp.seq if stamp is not None else None,
        )

    def _is_duplicate(self, log: _Log, stamp: ProducerStamp, operation: str) -> bool:
        """Whether ``stamp`` repeats an accepted request; raises what a server refuses."""
        current = log.producers.get(stamp.producer_id)
        if current is None or stamp.epoch > current.epoch:
            if stamp.seq == 0:
                return False
            if current is None:
                raise self._gap(0, stamp.seq, operation)
            message = "a new Producer-Epoch must start at Producer-Seq 0"
            raise _refusal(400, message, url=self._url, operation=operation)
        if stamp.epoch < current.epoch:
            raise _refusal(
                403,
                "stale Producer-Epoch (fenced by a newer one)",
                url=self._url,
                operation=operation,
                headers={P.PRODUCER_EPOCH: str(current.epoch)},
            )
        if stamp.seq <= current.last_seq:
            return True
        if stamp.seq == current.last_seq + 1:
            return False
        raise self._gap(current.last_seq + 1, stamp.seq, operation)

    def _gap(self, expected: int, received: int, operation: str) -> DurableError:
        return _refusal(
            409,
            f"Producer-Seq gap: expected {expected}, received {received}",
            url=self._url,
            operation=operation,
            headers={
                P.PRODUCER_EXPECTED_SEQ: str(expected),
                P.PRODUCER_RECEIVED_SEQ: str(received),
            },
        )

    def _duplicate(
        self, log: _Log, stamp: ProducerStamp, record: tuple[bytes, ...], operation: str
    ) -> AppendResult:
        current = log.producers[stamp.producer_id]
        landed = current.landed.get(stamp.seq)
        if landed is not None and landed[1] != record:
            # Not a retry: a restarted producer reusing its epoch. A duplicate
            # answer would drop its data, so fence it instead.
            raise _refusal(
                403,
                f"Producer-Seq {stamp.seq} of epoch {stamp.epoch} was already used for"
                " different data: a restarted producer must start a new epoch",
                url=self._url,
                operation=operation,
                headers={P.PRODUCER_EPOCH: str(current.epoch)},
            )
        offset = log.offset(landed[0]) if landed is not None else log.tail
        return AppendResult(offset, log.closed, True, 204, stamp.epoch, current.last_seq)

    @staticmethod
    def _landed(log: _Log, stamp: ProducerStamp, record: tuple[bytes, ...]) -> None:
        current = log.producers.get(stamp.producer_id)
        if current is None or stamp.epoch > current.epoch:
            current = log.producers[stamp.producer_id] = _Producer(stamp.epoch, stamp.seq)
        current.last_seq = stamp.seq
        current.landed[stamp.seq] = (len(log.records), record)
        current.landed.pop(stamp.seq - _LANDED_KEPT, None)
