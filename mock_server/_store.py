"""The Durable Streams protocol state machine, independent of HTTP.

``StreamStore`` decides every outcome of create / append / close / read /
delete as a status code and headers (``ProtocolError`` for refusals), so the
HTTP front end and the WebSocket front end answer the same way. All mutations
are synchronous and happen on the event loop thread, so validation, the write
to storage and the update in memory are one indivisible step per request:
that is what serializes each idempotent producer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import re
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from durable_client import wire as P

from ._json_depth import MAX_JSON_DEPTH, nesting_exceeds
from ._model import Landed, ProducerState, Record, StreamState
from ._offsets import InvalidOffset, new_incarnation, parse_offset
from ._storage import MemoryStorage, Storage

PRODUCER_STATE_TTL = 7 * 24 * 3600.0

RESERVED_MESSAGE = (
    f"{P.STREAM_PATH_PREFIX}{P.RESERVED_PREFIX}/ is reserved by the protocol for its"
    " subscription API, which this server does not implement"
)


class ProtocolError(Exception):
    """A request the protocol refuses: an HTTP status, a short message, extra headers."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def check_not_reserved(path: str) -> None:
    """400 for a path that can name no stream: ``/v1/stream/__ds`` and below (the
    protocol's own API), and a name holding a control character or a lone surrogate
    (not Unicode: it could be neither stored nor echoed in a header or a frame)."""
    name = path.removeprefix(P.STREAM_PATH_PREFIX)
    if name == P.RESERVED_PREFIX or name.startswith(P.RESERVED_PREFIX + "/"):
        raise ProtocolError(400, RESERVED_MESSAGE)
    bad = _BAD_NAME_CHAR.search(name)
    if bad is not None:
        what = "a lone surrogate" if "\ud800" <= bad.group() <= "\udfff" else "a control character"
        raise ProtocolError(
            400, f"stream name holds {what} ({bad.group()!r}); names are printable Unicode"
        )


# C0 controls, DEL, C1 controls, and the surrogates no UTF-8 text can hold.
_BAD_NAME_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def check_utf8_text(content_type: str, data: bytes) -> None:
    """400 unless ``data`` is UTF-8 for a ``text/*`` stream, which SSE carries as UTF-8
    (protocol: "text/* and application/json streams are sent as UTF-8")."""
    if P.is_text_compatible(content_type) and not P.is_json(content_type):
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(
                400,
                f"body is not valid UTF-8 (byte {exc.start}: {exc.reason}); a"
                f" {P.media_type(content_type)} stream holds UTF-8 text (use a binary"
                " content type such as application/octet-stream for bytes)",
            ) from None


def request_digest(data: bytes, close: bool) -> str:
    """What a producer request carried (its data as stored, and whether it closes)."""
    digest = hashlib.blake2b(data, digest_size=16)
    digest.update(b"\x01" if close else b"\x00")
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class CreateRequest:
    content_type: str | None = None
    ttl_seconds: int | None = None
    expires_at: str | None = None
    closed: bool = False
    body: bytes = b""
    forked_from: str | None = None
    fork_offset: str | None = None
    fork_sub_offset: int | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class Producer:
    id: str
    epoch: int
    seq: int


@dataclass(frozen=True, slots=True)
class AppendRequest:
    body: bytes
    content_type: str | None = None
    close: bool = False
    stream_seq: str | None = None
    producer: Producer | None = None


@dataclass(frozen=True, slots=True)
class AppendResult:
    status: int  # 200 new producer append, 204 plain append / duplicate / close
    next_offset: str
    closed: bool
    incarnation: str  # the Stream-Incarnation of the stream appended to
    producer: Producer | None = None
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class ReadResult:
    records: list[Record]
    end: int  # the position the next read starts after
    next_offset: str
    up_to_date: bool
    closed: bool  # the stream is closed and this read reaches its final offset


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _strict_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("number out of range")
    return value


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def parse_json_messages(body: bytes, *, allow_empty: bool) -> tuple[bytes, int]:
    """A JSON-mode body as (comma-joined compact messages, message count).

    A top-level array is flattened by one level. Raises ``ProtocolError(400)``, also
    for a message nested deeper than ``MAX_JSON_DEPTH`` (some reader's parser would
    refuse it: stored, it could never be delivered).
    """
    limit = MAX_JSON_DEPTH + 1 if body.lstrip()[:1] == b"[" else MAX_JSON_DEPTH
    if nesting_exceeds(body, limit):
        raise ProtocolError(
            400, f"invalid JSON body: a message nests deeper than {MAX_JSON_DEPTH} arrays/objects"
        )
    try:
        value = json.loads(
            body.decode("utf-8"), parse_constant=_reject_constant, parse_float=_strict_float
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(400, f"invalid JSON body: {exc}") from None
    items = value if isinstance(value, list) else [value]
    if not items:
        if allow_empty:
            return b"", 0
        raise ProtocolError(400, "an empty JSON array appends nothing")
    try:
        return ",".join(_dump(item) for item in items).encode(), len(items)
    except UnicodeEncodeError as exc:  # "\ud800": valid JSON syntax, but no Unicode text
        lone = exc.object[exc.start : exc.end]
        raise ProtocolError(
            400, f"invalid JSON body: a string holds a lone surrogate ({lone!r}), not Unicode"
        ) from None


def json_items(record: Record) -> list[Any]:
    parsed: list[Any] = json.loads(b"[" + record.data + b"]")
    return parsed


class StreamStore:
    """All streams of one server, with their waiters."""

    def __init__(
        self,
        storage: Storage | None = None,
        *,
        clock: Callable[[], float] = time.time,
        max_read_bytes: int = 1024 * 1024,
    ) -> None:
        self.storage: Storage = storage if storage is not None else MemoryStorage()
        self.clock = clock
        self.max_read_bytes = max_read_bytes
        self._streams: dict[str, StreamState] = {}
        self._changed: dict[str, asyncio.Future[None]] = {}
        self._waiting: dict[str, int] = {}
        # Called with the path after every create, append, close and delete (subscriptions
        # wake on it); a listener must not call back into the store before it returns.
        self.listeners: list[Callable[[str], None]] = []
        now = clock()
        for state in self.storage.load():
            # Reads refresh a sliding TTL without a write; after a restart the
            # last access is unknown, so count it as now (never expire early).
            state.last_access = now
            self._streams[state.path] = state
        for state in self._streams.values():
            if state.forked_from is not None and state.forked_from in self._streams:
                self._streams[state.forked_from].ref_count += 1

    # ------------------------------------------------------------------ access

    def paths(self) -> list[str]:
        return list(self._streams)

    def peek(self, path: str) -> StreamState | None:
        """The stream at ``path`` as stored, expired or not."""
        return self._streams.get(path)

    def get(self, path: str) -> StreamState | None:
        """The live (or soft-deleted) stream at ``path``; expires it if its time is up."""
        state = self._streams.get(path)
        if state is None:
            return None
        if not state.soft_deleted and state.is_expired(self.clock()):
            if state.ref_count > 0:
                self._commit(state, soft_deleted=True)
                self._notify(path)
                return state
            self._delete_cascade(state)
            return None
        return state

    def require(self, path: str) -> StreamState:
        """The live stream at ``path``: 404 if there is none, 410 if soft-deleted."""
        state = self.get(path)
        if state is None:
            raise ProtocolError(404, "stream not found")
        if state.soft_deleted:
            raise ProtocolError(410, "stream is gone (deleted; its forks still use its data)")
        return state

    def touch(self, state: StreamState) -> None:
        """Refresh a sliding TTL (every read or write that reaches the server but HEAD)."""
        state.last_access = self.clock()

    # ------------------------------------------------------------------ create

    def create(self, path: str, req: CreateRequest) -> tuple[StreamState, bool]:
        """Create ``path``; returns (stream, created). Same config again is (existing, False),
        unless it carries the Idempotency-Key of the request that created it: a retry of
        that request, whose answer was lost, is told that it created the stream."""
        check_not_reserved(path)
        existing = self._streams.get(path)
        if existing is not None:
            if existing.soft_deleted:
                raise ProtocolError(
                    409, "stream was deleted but its forks still use it; the path cannot be reused"
                )
            if existing.is_expired(self.clock()):
                if existing.ref_count > 0:
                    self._commit(existing, soft_deleted=True)
                    raise ProtocolError(
                        409, "stream expired but its forks still use it; the path cannot be reused"
                    )
                self._delete_cascade(existing)
            elif self._same_config(existing, req):
                replay = req.idempotency_key is not None
                return existing, replay and req.idempotency_key == existing.idempotency_key
            else:
                raise ProtocolError(409, "stream already exists with a different configuration")

        source: StreamState | None = None
        base = 0
        prefix: Record | None = None
        content_type = req.content_type
        ttl, expires_at = req.ttl_seconds, req.expires_at
        if req.forked_from is not None:
            source = self._fork_source(req.forked_from)
            if content_type is not None and P.media_type(content_type) != P.media_type(
                source.content_type
            ):
                raise ProtocolError(409, "content type differs from the fork's source stream")
            content_type = content_type or source.content_type
            base = source.tail
            if req.fork_offset is not None:
                base = self.resolve_offset(source, req.fork_offset, fork=True)
            if req.fork_sub_offset:
                prefix = self._sub_offset_prefix(source, base, req.fork_sub_offset)
            if ttl is None and expires_at is None:
                ttl, expires_at = source.ttl_seconds, source.expires_at
        content_type = content_type or P.DEFAULT_CONTENT_TYPE

        now = self.clock()
        state = StreamState(
            path=path,
            stream_id=uuid.uuid4().hex[:12],
            content_type=content_type,
            created_at=now,
            incarnation=new_incarnation(),
            idempotency_key=req.idempotency_key,
            ttl_seconds=ttl,
            expires_at=expires_at,
            closed=req.closed,
            forked_from=req.forked_from,
            fork_offset=base if source is not None else None,
            fork_sub_offset=req.fork_sub_offset or 0,
            base=base,
            last_access=now,
        )
        records: list[Record] = []
        if prefix is not None:
            records.append(state.next_record(prefix.data, prefix.count))
        if req.body:
            data, count = self._encode(state, req.body, allow_empty=True)
            if data:
                after = records[-1].end if records else None
                records.append(state.next_record(data, count, after=after))
        self.storage.commit(state, records)
        state.add_records(records)
        self._streams[path] = state
        if source is not None:
            source.ref_count += 1
        self._notify(path)
        return state, True

    def _same_config(self, state: StreamState, req: CreateRequest) -> bool:
        requested_type = req.content_type
        if requested_type is None and req.forked_from is None:
            requested_type = P.DEFAULT_CONTENT_TYPE
        same_type = requested_type is None or P.media_type(requested_type) == P.media_type(
            state.content_type
        )
        same_fork = req.forked_from == state.forked_from and (
            req.fork_offset is None
            or (
                state.fork_offset is not None
                and self._fork_position(state, req.fork_offset) == state.fork_offset
            )
        )
        ttl, expires_at = req.ttl_seconds, req.expires_at
        if state.forked_from is not None and ttl is None and expires_at is None:
            # A fork that set no expiry inherited its source's; compare against that.
            ttl, expires_at = state.ttl_seconds, state.expires_at
        return (
            same_type
            and ttl == state.ttl_seconds
            and expires_at == state.expires_at
            and req.closed == state.closed
            and same_fork
            and (req.fork_sub_offset or 0) == state.fork_sub_offset
        )

    def _fork_position(self, fork: StreamState, fork_offset: str) -> int | None:
        """Where ``fork_offset`` is in the fork's source; None if it is not valid there."""
        source = self._streams.get(fork.forked_from) if fork.forked_from else None
        if source is None:
            return None
        try:
            return self.resolve_offset(source, fork_offset, fork=True)
        except ProtocolError:
            return None

    def _fork_source(self, forked_from: str) -> StreamState:
        source = self._streams.get(forked_from)
        if source is None or (not source.soft_deleted and source.is_expired(self.clock())):
            raise ProtocolError(404, "the fork's source stream does not exist")
        if source.soft_deleted:
            raise ProtocolError(409, "the fork's source stream was deleted")
        return source

    def _sub_offset_prefix(self, source: StreamState, base: int, sub_offset: int) -> Record:
        following = self._collect(source, base, None)
        if not following:
            raise ProtocolError(400, "Stream-Fork-Sub-Offset: no append follows the fork offset")
        first = following[0]
        if P.is_json(source.content_type):
            items = json_items(first)
            if sub_offset > len(items):
                raise ProtocolError(400, "Stream-Fork-Sub-Offset exceeds the append's messages")
            data = ",".join(_dump(item) for item in items[:sub_offset]).encode()
            return Record(0, data, sub_offset)
        if sub_offset > len(first.data):
            raise ProtocolError(400, "Stream-Fork-Sub-Offset exceeds the append's length")
        prefix = first.data[:sub_offset]
        if P.is_text_compatible(source.content_type):
            try:
                prefix.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError(
                    400, "Stream-Fork-Sub-Offset falls inside a UTF-8 character of the append"
                ) from None
        return Record(0, prefix)

    # ------------------------------------------------------------------ append / close

    def append(self, path: str, req: AppendRequest) -> AppendResult:
        """Append (and/or close). Raises ``ProtocolError`` for every refusal."""
        state = self.require(path)
        self.touch(state)
        producer = req.producer
        if not req.body:
            if not req.close:
                raise ProtocolError(400, "empty body (send Stream-Closed: true to close)")
            return self._close(state, producer)

        if req.content_type is None:
            raise ProtocolError(400, "Content-Type is required with a body")
        if state.closed:
            if producer is not None and state.closed_by == (
                producer.id,
                producer.epoch,
                producer.seq,
            ):
                return AppendResult(
                    204, state.tail_offset, True, state.incarnation_text, producer, duplicate=True
                )
            raise self._closed_error(state)
        if P.media_type(req.content_type) != P.media_type(state.content_type):
            raise ProtocolError(
                409,
                f"Content-Type {req.content_type!r} does not match the stream's"
                f" {state.content_type!r}",
            )
        proposed = self._validate_producer(state, producer) if producer is not None else None
        if producer is not None and proposed is None:
            data, _ = self._encode(state, req.body, allow_empty=False)
            return self._duplicate(state, producer, request_digest(data, req.close))
        if (
            req.stream_seq is not None
            and state.stream_seq is not None
            and req.stream_seq.encode() <= state.stream_seq.encode()
        ):
            raise ProtocolError(409, "Stream-Seq must increase")
        data, count = self._encode(state, req.body, allow_empty=False)
        record = state.next_record(data, count)
        changes: dict[str, Any] = {}
        if req.stream_seq is not None:
            changes["stream_seq"] = req.stream_seq
        if req.close:
            changes["closed"] = True
            if producer is not None:
                changes["closed_by"] = (producer.id, producer.epoch, producer.seq)
        producer_row = None
        if producer is not None and proposed is not None:
            landed = proposed.with_landed(
                producer.seq,
                Landed(record.end, request_digest(data, req.close)),
                state.producers.get(producer.id),
            )
            producer_row = (producer.id, landed)
        self._commit(state, [record], producer_row, **changes)
        self._notify(path)
        return AppendResult(
            200 if producer else 204,
            state.offset(record.end),
            req.close,
            state.incarnation_text,
            producer,
        )

    def _close(self, state: StreamState, producer: Producer | None) -> AppendResult:
        incarnation = state.incarnation_text
        if producer is None:
            if not state.closed:
                self._commit(state, closed=True)
                self._notify(state.path)
            return AppendResult(204, state.tail_offset, True, incarnation)
        if state.closed:
            if state.closed_by == (producer.id, producer.epoch, producer.seq):
                return AppendResult(
                    204, state.tail_offset, True, incarnation, producer, duplicate=True
                )
            raise self._closed_error(state)
        proposed = self._validate_producer(state, producer)
        digest = request_digest(b"", True)
        if proposed is None:
            return self._duplicate(state, producer, digest)
        landed = Landed(state.tail, digest)
        self._commit(
            state,
            (),
            (
                producer.id,
                proposed.with_landed(producer.seq, landed, state.producers.get(producer.id)),
            ),
            closed=True,
            closed_by=(producer.id, producer.epoch, producer.seq),
        )
        self._notify(state.path)
        return AppendResult(204, state.tail_offset, True, incarnation, producer)

    @staticmethod
    def _closed_error(state: StreamState) -> ProtocolError:
        return ProtocolError(
            409,
            "stream is closed",
            {P.STREAM_CLOSED: "true", P.STREAM_NEXT_OFFSET: state.tail_offset},
        )

    @staticmethod
    def _duplicate(state: StreamState, producer: Producer, digest: str) -> AppendResult:
        """A retry of an accepted request: nothing is written; say where the original landed.

        The offset is exact for the producer's last 64 requests (the tail for older ones).
        If one of those carried other data, this is no retry but a restarted producer
        reusing its epoch: a 204 would drop its data, so it gets the 403 that fences a
        stale epoch and moves it to a new one.
        """
        current = state.producers[producer.id]
        landed = current.landed.get(producer.seq)
        if landed is not None and landed.digest is not None and landed.digest != digest:
            raise ProtocolError(
                403,
                f"Producer-Seq {producer.seq} of epoch {producer.epoch} was already used for"
                " different data: a restarted producer must start a new epoch"
                f" (Producer-Epoch > {current.epoch})",
                {P.PRODUCER_EPOCH: str(current.epoch)},
            )
        offset = state.offset(landed.end) if landed is not None else state.tail_offset
        echo = Producer(producer.id, producer.epoch, current.last_seq)
        return AppendResult(204, offset, state.closed, state.incarnation_text, echo, duplicate=True)

    def _validate_producer(self, state: StreamState, producer: Producer) -> ProducerState | None:
        """The producer state this request would commit; None for a duplicate.

        Raises 403 (stale epoch), 400 (new epoch not at seq 0), 409 (sequence gap).
        """
        now = self.clock()
        for pid in [
            p for p, s in state.producers.items() if now - s.updated_at > PRODUCER_STATE_TTL
        ]:
            del state.producers[pid]
        current = state.producers.get(producer.id)
        if current is None or producer.epoch > current.epoch:
            if producer.seq != 0:
                if current is None:
                    raise self._gap(0, producer.seq)
                raise ProtocolError(400, "a new Producer-Epoch must start at Producer-Seq 0")
            return ProducerState(producer.epoch, 0, now)
        if producer.epoch < current.epoch:
            raise ProtocolError(
                403,
                "stale Producer-Epoch (fenced by a newer one)",
                {P.PRODUCER_EPOCH: str(current.epoch)},
            )
        if producer.seq <= current.last_seq:
            return None
        if producer.seq == current.last_seq + 1:
            return ProducerState(producer.epoch, producer.seq, now)
        raise self._gap(current.last_seq + 1, producer.seq)

    @staticmethod
    def _gap(expected: int, received: int) -> ProtocolError:
        return ProtocolError(
            409,
            f"Producer-Seq gap: expected {expected}, received {received}",
            {P.PRODUCER_EXPECTED_SEQ: str(expected), P.PRODUCER_RECEIVED_SEQ: str(received)},
        )

    def _encode(self, state: StreamState, body: bytes, *, allow_empty: bool) -> tuple[bytes, int]:
        if P.is_json(state.content_type):
            return parse_json_messages(body, allow_empty=allow_empty)
        check_utf8_text(state.content_type, body)
        return body, 1

    def _commit(
        self,
        state: StreamState,
        records: Sequence[Record] = (),
        producer: tuple[str, ProducerState] | None = None,
        **changes: Any,
    ) -> None:
        """Store a mutation, then apply it in memory (nothing changes if storage fails)."""
        candidate = dataclasses.replace(state, **changes) if changes else state
        self.storage.commit(candidate, records, producer)
        for name, value in changes.items():
            setattr(state, name, value)
        if records:
            state.add_records(list(records))
        if producer is not None:
            state.producers[producer[0]] = producer[1]

    # ------------------------------------------------------------------ read

    def parse_read_offset(self, state: StreamState, offset: str | None) -> int:
        """The position a read starts after: ``-1``, ``now`` or an offset (``resolve_offset``)."""
        if offset is None or offset == P.OFFSET_BEGINNING:
            # The beginning is the beginning of what is retained: after a trim, its floor.
            return state.trimmed_to
        if offset == P.OFFSET_NOW:
            return state.tail
        return self.resolve_offset(state, offset)

    def resolve_offset(self, state: StreamState, offset: str, *, fork: bool = False) -> int:
        """The position of an offset that ``state`` issued (``fork``: a Stream-Fork-Offset).

        Only a boundary the stream issued is valid: an offset inside a record, past the
        tail or of another stream at this path would read garbage or skip data. Raises
        400 for those and 410 for a position below retention. The all-zero offset is the
        start in every incarnation; a fork also accepts its source's offsets up to the
        fork point, since it shares the source's offset space.
        """
        what = "Stream-Fork-Offset" if fork else "offset"
        subject = "the source stream" if fork else "this stream"
        try:
            incarnation, position = parse_offset(offset)
        except InvalidOffset:
            raise ProtocolError(400, f"invalid {what} {offset!r}") from None
        if (incarnation, position) != (0, 0):
            if incarnation not in self._lineage(state):
                if fork:
                    raise ProtocolError(
                        400,
                        f"{what} {offset!r} was not issued by the source stream (it belongs to"
                        " another stream, or to an earlier one at the source's path)",
                    )
                raise ProtocolError(
                    400,
                    f"offset {offset!r} was issued by an earlier stream at this path (deleted"
                    " and re-created, or lost by a server restart); read from -1",
                )
            if position > state.tail:
                raise ProtocolError(400, f"{what} {offset!r} is beyond the end of {subject}")
            if position >= state.trimmed_to and not self._issued(state, incarnation, position):
                raise ProtocolError(
                    400,
                    f"{what} {offset!r} is not a position {subject} ever issued"
                    " (offsets fall between appends, never inside one)",
                )
        return self._retained(state, position, what)

    @staticmethod
    def _retained(state: StreamState, position: int, what: str) -> int:
        if position < state.trimmed_to:
            raise ProtocolError(
                410,
                f"{what} is no longer retained; read from the earliest retained offset",
                {P.STREAM_NEXT_OFFSET: state.offset(state.trimmed_to)},
            )
        return position

    def _source(self, state: StreamState) -> StreamState | None:
        return self._streams.get(state.forked_from) if state.forked_from is not None else None

    def _lineage(self, state: StreamState) -> set[int]:
        """The incarnations whose offsets ``state`` may be read with: its own, its sources'."""
        incarnations, seen = {state.incarnation}, {state.path}
        source = self._source(state)
        while source is not None and source.path not in seen:
            incarnations.add(source.incarnation)
            seen.add(source.path)
            source = self._source(source)
        return incarnations

    def _is_boundary(self, state: StreamState, position: int) -> bool:
        """Whether any offset of ``state``'s offset space points at ``position``."""
        if state.is_own_boundary(position):
            return True
        source = self._source(state)
        return source is not None and position < state.base and self._is_boundary(source, position)

    def _issued(self, state: StreamState, incarnation: int, position: int) -> bool:
        """Whether ``state``, or below its fork point its source, issued this offset."""
        if incarnation == state.incarnation and self._is_boundary(state, position):
            return True
        source = self._source(state)
        return (
            source is not None
            and position <= state.base
            and self._issued(source, incarnation, position)
        )

    def read(self, state: StreamState, after: int, max_bytes: int | None = None) -> ReadResult:
        """Records after ``after``, at most about ``max_bytes`` (at least one record)."""
        limit = self.max_read_bytes if max_bytes is None else max_bytes
        records = self._collect(state, after, None)
        size = 0
        for index, record in enumerate(records):
            size += len(record.data)
            if size >= limit and index + 1 < len(records):
                records = records[: index + 1]
                end = records[-1].end
                return ReadResult(records, end, state.offset(end), False, False)
        end = records[-1].end if records else state.tail
        return ReadResult(records, end, state.offset(end), True, state.closed and end == state.tail)

    def _collect(self, state: StreamState, after: int, cap: int | None) -> list[Record]:
        records: list[Record] = []
        if state.forked_from is not None and after < state.base:
            source = self._streams.get(state.forked_from)
            if source is not None:
                limit = state.base if cap is None else min(cap, state.base)
                records.extend(self._collect(source, after, limit))
        records.extend(state.own_records_after(after, cap))
        return records

    def watch(self, path: str) -> asyncio.Future[None]:
        """The future that resolves at the next change of ``path``, registered now.

        Call it in the same step as the read that found nothing new: a change
        between that read and the registration would otherwise wake nobody.
        The future is shared; never cancel it.
        """
        future = self._changed.get(path)
        if future is None or future.done():
            future = asyncio.get_running_loop().create_future()
            self._changed[path] = future
        return future

    async def tail(
        self,
        state: StreamState,
        position: int,
        *,
        until: float | None = None,
        idle: float = 30.0,
        stop: Sequence[asyncio.Event] = (),
        max_bytes: int | None = None,
    ) -> AsyncGenerator[ReadResult, None]:
        """Follow ``state`` from ``position``: the live tail of long-poll, SSE and WebSocket.

        Yields the first read at once (even with nothing in it: the reader
        learns where it is), then every read with new records, the read that
        reaches the end of a closed stream, and, when ``idle`` seconds pass
        without a change, a fresh read with nothing new (a heartbeat). Each
        read is at most about ``max_bytes`` (``read``); after one that stops
        short of the tail the next follows at once.

        The change is watched before a result is yielded, so an append made
        while the caller handles it (sends it, waits for room) wakes the next
        wait. Ends after the closing read, when an event of ``stop`` is set
        (checked before every read but the first, and awaited in every wait),
        or at ``until``, a ``time.monotonic()`` deadline (a last heartbeat is
        yielded there). Every wake-up touches the stream: a live reader keeps
        a sliding TTL alive.

        Raises ``ProtocolError`` 404, or 410 with the ``Stream-Incarnation``,
        when the stream is deleted under the reader.
        """
        first, heartbeat = True, False
        while True:
            self._check_still_there(state)
            result = self.read(state, position, max_bytes)
            position = result.end
            if result.closed:
                yield result
                return
            # Watch before yielding: the caller may yield to the loop with the result.
            change = self.watch(state.path) if result.up_to_date else None
            if first or heartbeat or result.records:
                yield result
            first = heartbeat = False
            if any(event.is_set() for event in stop):
                return
            if change is None:
                continue  # more records are waiting: read on at once
            timeout = idle if until is None else min(idle, until - time.monotonic())
            if timeout <= 0:
                return
            heartbeat = not await self._wait_for_change(state.path, change, stop, timeout)
            if any(event.is_set() for event in stop):
                return
            self.touch(state)

    def _check_still_there(self, state: StreamState) -> None:
        """404 if ``state`` was deleted (or replaced) under a live read, 410 if soft-deleted."""
        current = self.get(state.path)
        if current is not state:
            raise ProtocolError(404, "stream was deleted")
        if state.soft_deleted:
            raise ProtocolError(
                410, "stream was deleted", {P.STREAM_INCARNATION: state.incarnation_text}
            )

    async def _wait_for_change(
        self, path: str, change: asyncio.Future[None], stop: Sequence[asyncio.Event], timeout: float
    ) -> bool:
        """Wait for ``change``, an event of ``stop`` or the timeout; whether ``change`` came."""
        self._waiting[path] = self._waiting.get(path, 0) + 1
        stopping = [asyncio.ensure_future(event.wait()) for event in stop]
        watched: list[asyncio.Future[Any]] = [change, *stopping]
        try:
            await asyncio.wait(watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in stopping:
                waiter.cancel()
            self._waiting[path] -= 1
            if not self._waiting[path]:
                del self._waiting[path]
        return change.done()

    def waiting(self, path: str) -> int:
        """How many live reads are waiting for ``path`` to change (for tests and metrics)."""
        return self._waiting.get(path, 0)

    def _notify(self, path: str) -> None:
        future = self._changed.pop(path, None)
        if future is not None and not future.done():
            future.set_result(None)
        for listener in self.listeners:
            listener(path)

    # ------------------------------------------------------------------ delete / retention

    def delete(self, path: str) -> None:
        state = self._streams.get(path)
        if state is None or (
            not state.soft_deleted and state.is_expired(self.clock()) and state.ref_count == 0
        ):
            if state is not None:
                self._delete_cascade(state)
            raise ProtocolError(404, "stream not found")
        if state.soft_deleted:
            raise ProtocolError(410, "stream is gone (deleted; its forks still use its data)")
        if state.ref_count > 0:
            self._commit(state, soft_deleted=True)
        else:
            self._delete_cascade(state)
        self._notify(path)

    def _delete_cascade(self, state: StreamState) -> None:
        self.storage.delete(state.path)
        self._streams.pop(state.path, None)
        self._notify(state.path)
        if state.forked_from is None:
            return
        parent = self._streams.get(state.forked_from)
        if parent is None:
            return
        parent.ref_count = max(0, parent.ref_count - 1)
        if parent.ref_count == 0 and parent.soft_deleted:
            self._delete_cascade(parent)

    def trim(self, path: str, keep_last: int) -> int:
        """Retention: drop all but the last ``keep_last`` own records; returns the new floor."""
        state = self.require(path)
        if state.ref_count > 0:
            raise ProtocolError(409, "cannot trim a stream that forks still read from")
        if keep_last >= len(state.records):
            return state.trimmed_to
        floor = state.records[-keep_last - 1].end if keep_last >= 0 else state.tail
        candidate = dataclasses.replace(state, trimmed_to=floor)
        self.storage.trim(candidate, floor)
        cut = len(state.records) - keep_last
        del state.records[:cut]
        del state.ends[:cut]
        state.trimmed_to = floor
        return floor
