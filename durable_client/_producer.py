"""The idempotent producer: exactly-once appends over an at-least-once network.

A producer is named by ``Producer-Id`` and writes under an *epoch*; each HTTP
request (a batch of messages) carries the next ``Producer-Seq``. The server
keeps the last accepted seq per producer and answers a repeat with 204, so a
batch can be retried as often as needed with the same (epoch, seq) and lands
once. :class:`ProducerState` is that bookkeeping without I/O;
:class:`IdempotentProducer` adds batching with a short linger, pipelining (up
to ``max_in_flight`` batches on the wire) and retries.

Rules the producer follows, each for a reason:

- The first batch of an epoch (seq 0) travels alone: a server that has not
  seen the epoch yet rejects seq > 0 with 400, so pipelining starts only once
  seq 0 is acknowledged.
- A 409 sequence gap while an earlier batch is still unacknowledged means the
  requests overtook each other; the later batch waits for the earlier one and
  is sent again with the same seq. A gap with nothing earlier outstanding is a
  real gap and fails the producer (:class:`SequenceGap`).
- A 403 stale epoch means a newer instance took over (zombie fencing). With
  ``auto_claim`` the producer waits for its in-flight requests, moves to the
  server's epoch + 1 and re-stamps every unacknowledged batch from seq 0, in
  the original order. Without it, :class:`StaleEpoch` fails the producer.
- A restarting producer that owns its id should pass ``epoch=previous + 1``
  (or use ``auto_claim``): the new epoch fences the old instance. In a
  running process, :meth:`IdempotentProducer.restart` does the same (and
  recovers a producer that failed, e.g. after a server lost its state).
- A duplicate answer is believed only for a true retry: a batch whose earlier
  attempt may have reached the server. A duplicate answer to a batch's first
  attempt means an earlier run or another instance already used this id and
  epoch (the server took our new data for a retry of theirs and dropped it):
  :class:`EpochReused`, a :class:`StaleEpoch`, so with ``auto_claim`` the
  producer moves to a new epoch and sends the batch there, and without it the
  producer fails. Our server also compares a duplicate's bytes with the
  original's and refuses a mismatch with 403, which ends the same way.
- Retryable errors (transport, timeouts, 429, 5xx) are retried with the same
  stamp per the retry policy; any other error fails the producer: every
  pending append raises it, and so does the next :meth:`flush`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ._errors import (
    ClientClosed,
    DurableError,
    EpochReused,
    SequenceGap,
    StaleEpoch,
    UsageError,
)
from ._protocol import MAX_PRODUCER_NUMBER, PRODUCER_EPOCH, PRODUCER_ID, PRODUCER_SEQ
from ._retry import Backoff, RetryPolicy, retry_call

if TYPE_CHECKING:
    from ._stream import AppendResult

__all__ = ["BatchSink", "IdempotentProducer", "ProducerStamp", "ProducerState"]


@dataclass(frozen=True, slots=True)
class ProducerStamp:
    """The (id, epoch, seq) triple one request carries."""

    producer_id: str
    epoch: int
    seq: int

    def headers(self) -> dict[str, str]:
        """The three ``Producer-*`` request headers."""
        return {
            PRODUCER_ID: self.producer_id,
            PRODUCER_EPOCH: str(self.epoch),
            PRODUCER_SEQ: str(self.seq),
        }


class ProducerState:
    """Epoch and sequence bookkeeping for one producer (no I/O)."""

    def __init__(self, producer_id: str, epoch: int = 0, *, auto_claim: bool = False) -> None:
        if not isinstance(producer_id, str) or not producer_id:
            raise UsageError("producer_id must be a non-empty string")
        _check_number("epoch", epoch)
        self.producer_id = producer_id
        self.epoch = epoch
        self.auto_claim = auto_claim
        self.next_seq = 0
        #: Highest seq the server confirmed in the current epoch (``None``: none yet).
        self.acked_seq: int | None = None

    def next_stamp(self) -> ProducerStamp:
        """Take the next sequence number of the current epoch."""
        _check_number("seq", self.next_seq)
        stamp = ProducerStamp(self.producer_id, self.epoch, self.next_seq)
        self.next_seq += 1
        return stamp

    def acknowledge(self, stamp: ProducerStamp, server_seq: int | None = None) -> None:
        """Record that the server accepted (or already had) ``stamp``."""
        if stamp.epoch != self.epoch:
            return
        seq = stamp.seq if server_seq is None else max(stamp.seq, server_seq)
        if self.acked_seq is None or seq > self.acked_seq:
            self.acked_seq = seq

    def epoch_confirmed(self) -> bool:
        """Whether the server has accepted a batch of the current epoch."""
        return self.acked_seq is not None

    def claim(self, server_epoch: int) -> int:
        """Move past ``server_epoch`` (after a 403): the new epoch, seq back to 0."""
        new_epoch = max(self.epoch, server_epoch) + 1
        _check_number("epoch", new_epoch)
        self.epoch = new_epoch
        self.next_seq = 0
        self.acked_seq = None
        return new_epoch

    def restart(self) -> int:
        """Start a new epoch (a restarted producer fences its old instance)."""
        self.epoch += 1
        _check_number("epoch", self.epoch)
        self.next_seq = 0
        self.acked_seq = None
        return self.epoch


def _check_number(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(f"{name} must be an integer")
    if value < 0 or value > MAX_PRODUCER_NUMBER:
        raise UsageError(f"{name} must be in [0, 2**53 - 1]")


class BatchSink(Protocol):
    """Where a producer sends its batches (a stream, or a session transport)."""

    @property
    def url(self) -> str:
        """The stream URL, for errors."""
        ...

    async def send_batch(
        self, items: Sequence[bytes], *, stamp: ProducerStamp | None, close: bool = False
    ) -> AppendResult:
        """Send ``items`` as one request (no retry); raise from the error tree."""
        ...


_MAX_GAP_RETRIES = 3


class _BatchState(enum.Enum):
    OPEN = "open"  # still accepting items
    QUEUED = "queued"  # sealed, waiting for a slot (and a stamp)
    SENDING = "sending"  # a task is sending (or backing off between retries)
    PARKED_GAP = "parked-gap"  # overtook an earlier batch; resend after it lands
    PARKED_FENCE = "parked-fence"  # fenced; re-stamp in the claimed epoch
    DONE = "done"


@dataclass(eq=False)
class _Batch:
    items: list[bytes] = field(default_factory=list)
    futures: list[asyncio.Future[AppendResult]] = field(default_factory=list)
    size: int = 0
    close: bool = False
    stamp: ProducerStamp | None = None
    state: _BatchState = _BatchState.OPEN
    done: asyncio.Future[None] | None = None
    # Attempts with the current stamp whose outcome is unknown (they may have
    # been written): only after one is a duplicate answer a true retry.
    tries: int = 0


class IdempotentProducer:
    """Batches, pipelines and retries appends so each lands exactly once.

    Args:
        sink: the stream (a :class:`DurableStream`) or transport to write to.
        producer_id: the producer's name on this stream. By default a fresh
            random one, which is the safe choice: each producer object is its own
            producer, and nothing it sends can be taken for another's retry. A
            stable name (to fence an older instance of the same writer) is
            opt-in, and then a new run must start a new epoch: pass
            ``epoch=previous + 1`` or ``auto_claim=True`` (otherwise its first
            batch raises :class:`EpochReused` rather than being dropped).
        epoch: the epoch to start in (a restarted owner passes previous + 1).
        auto_claim: on 403 (or a reused epoch), take over from the server's epoch + 1.
        linger: seconds a batch waits for more items before it is sent.
        max_batch_bytes: a batch is sent once it holds this many bytes.
        max_batch_items: ... or this many items (``None``: no item limit).
        max_in_flight: batches on the wire at once.
        retry: how a batch is retried (``None``: never).
        on_retry: told ``(attempt, delay, error)`` before each retry sleep.
        on_success: told after each acknowledged batch.

    Use as an async context manager, or call :meth:`detach` / :meth:`close`.
    """

    def __init__(
        self,
        sink: BatchSink,
        producer_id: str | None = None,
        *,
        epoch: int = 0,
        auto_claim: bool = False,
        linger: float = 0.005,
        max_batch_bytes: int = 1024 * 1024,
        max_batch_items: int | None = None,
        max_in_flight: int = 5,
        retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008 - frozen dataclass
        on_retry: Callable[[int, float, BaseException], None] | None = None,
        on_success: Callable[[], None] | None = None,
    ) -> None:
        if linger < 0:
            raise UsageError("linger must be >= 0")
        if max_batch_bytes <= 0:
            raise UsageError("max_batch_bytes must be > 0")
        if max_batch_items is not None and max_batch_items <= 0:
            raise UsageError("max_batch_items must be > 0 (or None)")
        if max_in_flight < 1:
            raise UsageError("max_in_flight must be >= 1")
        self._sink = sink
        if producer_id is None:
            producer_id = f"producer-{uuid.uuid4().hex[:16]}"
        self._state = ProducerState(producer_id, epoch, auto_claim=auto_claim)
        self.linger = linger
        self.max_batch_bytes = max_batch_bytes
        self.max_batch_items = max_batch_items
        self.max_in_flight = max_in_flight
        self.retry = retry
        self._on_retry = on_retry
        self._on_success = on_success

        self._open: _Batch | None = None
        self._linger_handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self._queue: deque[_Batch] = deque()
        self._stamped: list[_Batch] = []  # stamped, not DONE, in seq order
        self._tasks: set[asyncio.Task[None]] = set()
        self._fence: int | None = None
        self._seen_epoch: int | None = None  # the highest epoch a 403 reported
        self._error: DurableError | None = None
        self._closing = False
        self._closed = False
        self._final: AppendResult | None = None

    # --- introspection ---------------------------------------------------------

    @property
    def producer_id(self) -> str:
        return self._state.producer_id

    @property
    def epoch(self) -> int:
        """The current epoch (changes after an auto-claim)."""
        return self._state.epoch

    @property
    def next_seq(self) -> int:
        """The seq the next batch will carry."""
        return self._state.next_seq

    @property
    def error(self) -> DurableError | None:
        """The error that failed the producer, if any."""
        return self._error

    @property
    def pending(self) -> int:
        """Batches not yet acknowledged (open, queued or on the wire)."""
        return (1 if self._open and self._open.items else 0) + len(self._queue) + len(self._stamped)

    # --- appending -------------------------------------------------------------

    def append(self, data: bytes | str) -> asyncio.Future[AppendResult]:
        """Queue one message (bytes; for a JSON stream, one JSON value as text).

        Returns a future that resolves to the :class:`AppendResult` of the batch
        that carried it. Raises at once if the producer failed or was closed.
        """
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        if not raw:
            raise UsageError("cannot append an empty message", url=self._sink.url)
        return self._enqueue(raw)

    def append_json(self, value: Any) -> asyncio.Future[AppendResult]:
        """Queue one JSON message (any JSON-serializable value)."""
        try:
            raw = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise UsageError(f"value is not JSON-serializable: {exc}") from exc
        return self._enqueue(raw)

    def _enqueue(self, raw: bytes) -> asyncio.Future[AppendResult]:
        self._check_usable()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[AppendResult] = loop.create_future()
        fut.add_done_callback(_mark_retrieved)
        batch = self._open
        if batch is not None and batch.items and (batch.size + len(raw) > self.max_batch_bytes):
            self._seal()
            batch = None
        if batch is None:
            batch = _Batch(done=loop.create_future())
            self._open = batch
        batch.items.append(raw)
        batch.futures.append(fut)
        batch.size += len(raw)
        full = batch.size >= self.max_batch_bytes or (
            self.max_batch_items is not None and len(batch.items) >= self.max_batch_items
        )
        if full:
            self._seal()
        elif self._linger_handle is None:
            if self.linger > 0:
                self._linger_handle = loop.call_later(self.linger, self._seal)
            else:
                # Items appended in the same loop iteration still share a batch.
                self._linger_handle = loop.call_soon(self._seal)
        return fut

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closing or self._closed:
            raise ClientClosed("the producer is closed", url=self._sink.url)

    def _seal(self) -> None:
        if self._linger_handle is not None:
            self._linger_handle.cancel()
            self._linger_handle = None
        batch = self._open
        self._open = None
        if batch is None or not batch.items:
            return
        batch.state = _BatchState.QUEUED
        self._queue.append(batch)
        self._pump()

    # --- flushing and shutdown ------------------------------------------------------

    async def flush(self) -> None:
        """Send everything queued and wait until it is acknowledged.

        Raises the producer's error if it failed.
        """
        self._seal()
        while True:
            waiting = [b.done for b in [*self._queue, *self._stamped] if b.done is not None]
            if not waiting:
                break
            await asyncio.gather(*waiting, return_exceptions=True)
        if self._error is not None:
            raise self._error

    async def close(self, final: bytes | str | None = None) -> AppendResult:
        """Flush, then close the *stream* (optionally appending ``final`` first).

        Idempotent: a second call returns the first result.
        """
        if self._final is not None:
            return self._final
        if self._error is not None:
            raise self._error
        self._closing = True
        await self.flush()
        loop = asyncio.get_running_loop()
        batch = _Batch(close=True, done=loop.create_future())
        if final is not None:
            raw = final.encode("utf-8") if isinstance(final, str) else bytes(final)
            if raw:
                batch.items.append(raw)
                batch.size = len(raw)
        fut: asyncio.Future[AppendResult] = loop.create_future()
        fut.add_done_callback(_mark_retrieved)
        batch.futures.append(fut)
        batch.state = _BatchState.QUEUED
        self._queue.append(batch)
        self._pump()
        try:
            result = await fut
        finally:
            self._closed = True
        self._final = result
        return result

    def restart(self) -> int:
        """Start a new epoch in place, as a restarted producer would: seq back
        to 0, past any epoch a 403 reported, so older instances are fenced.

        Clears a failure (``error``) so appends work again. Appends that failed
        stay failed; append them again if they must land (if one did land
        before its failure was reported, it lands twice: exactly-once holds
        within an epoch). Returns the new epoch. Raises :class:`UsageError` if
        batches are still queued or on the wire (flush first).
        """
        if self._closing or self._closed:
            raise ClientClosed("the producer is closed", url=self._sink.url)
        if self._queue or self._stamped or (self._open is not None and self._open.items):
            raise UsageError("restart() needs an idle producer: flush() first")
        fenced_by = self._seen_epoch
        epoch = self._state.restart()
        if fenced_by is not None and fenced_by >= epoch:
            epoch = self._state.claim(fenced_by)
        self._error = None
        return epoch

    async def detach(self) -> None:
        """Flush and stop, leaving the stream open. Idempotent."""
        if self._closed:
            return
        self._closing = True
        try:
            await self.flush()
        finally:
            self._closed = True

    async def aclose(self) -> None:
        """Stop without waiting: cancel sends, fail what is pending with ClientClosed."""
        self._closing = True
        self._closed = True
        if self._linger_handle is not None:
            self._linger_handle.cancel()
            self._linger_handle = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_all(ClientClosed("the producer was closed", url=self._sink.url), record=False)

    async def __aenter__(self) -> IdempotentProducer:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            await self.detach()
        else:
            await self.aclose()

    # --- the send machinery -----------------------------------------------------

    def _in_flight(self) -> int:
        return sum(1 for b in self._stamped if b.state is _BatchState.SENDING)

    def _first_of_epoch_pending(self) -> bool:
        # Until seq 0 of the epoch is acknowledged, nothing else may travel.
        return not self._state.epoch_confirmed() and any(
            b.stamp is not None and b.stamp.seq == 0 and b.state is not _BatchState.DONE
            for b in self._stamped
        )

    def _pump(self) -> None:
        """Decide what to send next; called whenever something changed."""
        if self._error is not None:
            return
        if self._fence is not None:
            if self._in_flight():
                return  # wait for every request of the old epoch to come back
            self._state.claim(self._fence)
            self._fence = None
            for batch in self._stamped:
                batch.stamp = self._state.next_stamp()
                batch.tries = 0
                batch.state = _BatchState.QUEUED
        # Resend batches that are waiting, in seq order.
        first_open = next((b for b in self._stamped if b.state is not _BatchState.DONE), None)
        for batch in self._stamped:
            if self._in_flight() >= self.max_in_flight:
                return
            if batch.state is _BatchState.PARKED_GAP and batch is first_open:
                self._launch(batch)
            elif batch.state is _BatchState.QUEUED:
                if self._first_of_epoch_pending() and batch.stamp and batch.stamp.seq != 0:
                    return
                self._launch(batch)
        while self._queue and self._in_flight() < self.max_in_flight:
            if self._first_of_epoch_pending():
                return
            batch = self._queue.popleft()
            batch.stamp = self._state.next_stamp()
            self._stamped.append(batch)
            self._launch(batch)

    def _launch(self, batch: _Batch) -> None:
        batch.state = _BatchState.SENDING
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: _Batch) -> None:
        backoff = Backoff(self.retry) if self.retry is not None else None
        gap_retries = 0
        while True:
            stamp = batch.stamp
            assert stamp is not None

            async def attempt(stamp: ProducerStamp = stamp) -> AppendResult:
                earlier = batch.tries > 0
                batch.tries += 1
                result = await self._sink.send_batch(batch.items, stamp=stamp, close=batch.close)
                # (A close with no data answers 204 new or not: nothing to tell.)
                if result.duplicate and not earlier and batch.items:
                    raise EpochReused(
                        f"producer {stamp.producer_id!r} epoch {stamp.epoch} seq {stamp.seq} "
                        "was already used (an earlier run or another instance with this id "
                        "and epoch), so the server took this new batch for a retry and did "
                        "not write it. Start a new epoch (epoch=previous + 1, or "
                        "auto_claim=True), or use a producer id of its own per run",
                        url=self._sink.url,
                        status=result.status,
                        current_epoch=stamp.epoch,
                    )
                return result

            try:
                # Retryable failures are retried here (tenacity) with the same
                # stamp: a batch backing off still counts as in flight, so no
                # claim can re-stamp it meanwhile.
                if self.retry is None or backoff is None:
                    result = await attempt()
                else:
                    result = await retry_call(
                        attempt, self.retry, backoff=backoff, on_retry=self._on_retry
                    )
            except asyncio.CancelledError:
                raise
            except SequenceGap as exc:
                batch.tries = 0  # refused: nothing of this attempt was written
                if exc.received_seq is not None and exc.received_seq != stamp.seq:
                    self._fail_all(exc)
                    return
                if self._earlier_outstanding(batch):
                    batch.state = _BatchState.PARKED_GAP
                    self._pump()
                    return
                # Nothing earlier is outstanding any more: the earlier batches
                # landed while this answer was on its way. Send again at once,
                # a few times at most (a server that lost our state stays a gap).
                gap_retries += 1
                if gap_retries > _MAX_GAP_RETRIES:
                    self._fail_all(exc)
                    return
                continue
            except StaleEpoch as exc:
                if exc.current_epoch == stamp.epoch and not isinstance(exc, EpochReused):
                    # Our server's content check: same epoch, but other bytes.
                    exc = EpochReused(
                        exc.message,
                        url=exc.url,
                        status=exc.status,
                        headers=exc.headers,
                        current_epoch=exc.current_epoch,
                    )
                if exc.current_epoch is not None:
                    self._seen_epoch = max(self._seen_epoch or 0, exc.current_epoch)
                if not self._state.auto_claim:
                    self._fail_all(exc)
                    return
                self._fence = max(self._fence or 0, exc.current_epoch or stamp.epoch)
                self._seen_epoch = max(self._seen_epoch or 0, self._fence)
                batch.state = _BatchState.PARKED_FENCE
                self._pump()
                return
            except DurableError as exc:  # fatal, or retries exhausted
                self._fail_all(exc)
                return
            self._complete(batch, result)
            return

    def _earlier_outstanding(self, batch: _Batch) -> bool:
        for other in self._stamped:
            if other is batch:
                return False
            if other.state is not _BatchState.DONE:
                return True
        return False

    def _complete(self, batch: _Batch, result: AppendResult) -> None:
        assert batch.stamp is not None
        self._state.acknowledge(batch.stamp, result.producer_seq)
        batch.state = _BatchState.DONE
        with contextlib.suppress(ValueError):
            self._stamped.remove(batch)
        for fut in batch.futures:
            if not fut.done():
                fut.set_result(result)
        if batch.done is not None and not batch.done.done():
            batch.done.set_result(None)
        if self._on_success is not None:
            self._on_success()
        self._pump()

    def _fail_all(self, error: DurableError, *, record: bool = True) -> None:
        if record and self._error is None:
            self._error = error
        if self._open is not None:
            self._queue.appendleft(self._open)
            self._open = None
        if self._linger_handle is not None:
            self._linger_handle.cancel()
            self._linger_handle = None
        batches = [*self._stamped, *self._queue]
        self._stamped.clear()
        self._queue.clear()
        for batch in batches:
            batch.state = _BatchState.DONE
            for fut in batch.futures:
                if not fut.done():
                    fut.set_exception(error)
            if batch.done is not None and not batch.done.done():
                batch.done.set_result(None)
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()


def _mark_retrieved(fut: asyncio.Future[Any]) -> None:
    # The producer reports its failure through flush()/close(); a caller who
    # never awaits a particular append future should not get asyncio's
    # "exception was never retrieved" log line for it.
    if not fut.cancelled():
        fut.exception()


def producer_headers(stamp: ProducerStamp | None) -> Mapping[str, str]:
    """The request headers for ``stamp`` (empty for ``None``)."""
    return stamp.headers() if stamp is not None else {}
