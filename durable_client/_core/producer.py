"""The idempotent producer's decisions, without I/O.

A producer is named by ``Producer-Id`` and writes under an *epoch*; each request
(a batch of messages) carries the next ``Producer-Seq``. The server keeps the
last accepted seq per producer and answers a repeat with 204, so a batch can be
retried as often as needed with the same (epoch, seq) and lands once.
:class:`ProducerState` is that bookkeeping; :class:`ProducerCore` adds batching,
pipelining (up to ``max_in_flight`` batches on the wire) and every rule below.
It sees sizes and answers, never bytes, sockets, tasks or clocks: feed it what
happened (:meth:`~ProducerCore.append`, :meth:`~ProducerCore.seal`,
:meth:`~ProducerCore.sent`, :meth:`~ProducerCore.acked`,
:meth:`~ProducerCore.failed`) and read what to do next from
:meth:`~ProducerCore.next_events`: :class:`Send` a batch with a stamp,
:class:`Complete` a batch with its result, :class:`Fail` batches with an error.
The asyncio driver (``durable_client._producer.IdempotentProducer``) holds the
bytes and futures, runs the linger timer and one task per send, and retries
each send with the retry policy (same stamp) before it reports the outcome.

Rules the core follows, each for a reason:

- The first batch of an epoch (seq 0) travels alone: a server that has not
  seen the epoch yet rejects seq > 0 with 400, so pipelining starts only once
  seq 0 is acknowledged.
- A 409 sequence gap while an earlier batch is still unacknowledged means the
  requests overtook each other; the later batch is parked until the earlier
  one lands and is then sent again with the same seq. A gap with nothing
  earlier outstanding means the earlier batches landed while the answer was on
  its way: the batch is sent again at once, a few times at most (a server that
  lost our state stays a gap), then it fails the producer
  (:class:`SequenceGap`). A gap naming another seq than ours fails it at once.
- A 403 stale epoch means a newer instance took over (zombie fencing). With
  ``auto_claim`` the core waits for its in-flight requests, moves to the
  server's epoch + 1 and re-stamps every unacknowledged batch from seq 0, in
  the original order. Without it, :class:`StaleEpoch` fails the producer.
- A restarting producer that owns its id should start at ``previous + 1`` (or
  use ``auto_claim``): the new epoch fences the old instance.
  :meth:`ProducerCore.restart` does the same in place, past any epoch a 403
  reported, and clears a failure.
- A duplicate answer is believed only for a true retry: a batch whose earlier
  attempt (with the same stamp) may have reached the server. A duplicate
  answer to a batch's first attempt means an earlier run or another instance
  already used this id and epoch (the server took our new data for a retry of
  theirs and dropped it): :class:`EpochReused`, a :class:`StaleEpoch`, so with
  ``auto_claim`` the core moves to a new epoch and sends the batch there, and
  without it the producer fails. Our server also compares a duplicate's bytes
  with the original's and refuses a mismatch with 403 naming our own epoch,
  which the core reads as the same :class:`EpochReused`.
- Any other error reported for a batch (fatal, or retries exhausted) fails the
  producer: every unresolved batch fails with it, and so does every later
  :meth:`~ProducerCore.append` until :meth:`~ProducerCore.restart`.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from .._errors import DurableError, EpochReused, SequenceGap, StaleEpoch, UsageError
from .._protocol import MAX_PRODUCER_NUMBER, PRODUCER_EPOCH, PRODUCER_ID, PRODUCER_SEQ
from .._results import AppendResult

__all__ = [
    "Batch",
    "BatchState",
    "Complete",
    "Fail",
    "ProducerCore",
    "ProducerEvent",
    "ProducerStamp",
    "ProducerState",
    "Send",
]

#: Resends at once after a gap with nothing earlier outstanding, per send.
MAX_GAP_RESENDS = 3


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
    """Epoch and sequence bookkeeping for one producer."""

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


class BatchState(enum.Enum):
    """Where a batch is on its way to the server."""

    OPEN = "open"  # still accepting items
    QUEUED = "queued"  # sealed, waiting for a slot (and a stamp, or a new one after a claim)
    SENDING = "sending"  # a Send is out and its outcome not reported yet
    PARKED_GAP = "parked-gap"  # overtook an earlier batch; resend after it lands
    PARKED_FENCE = "parked-fence"  # fenced; re-stamp in the claimed epoch
    DONE = "done"  # completed or failed


@dataclass(eq=False)
class Batch:
    """One request's worth of items, as the core sees it: a count and a size.

    The driver keeps the bytes and the futures, keyed by this object.
    """

    #: How many items, and their bytes.
    count: int = 0
    size: int = 0
    #: The batch that closes the stream (``ProducerCore.append_close``).
    close: bool = False
    stamp: ProducerStamp | None = None
    state: BatchState = BatchState.OPEN
    #: Attempts with the current stamp whose outcome is unknown (they may have
    #: been written): only after one is a duplicate answer a true retry.
    tries: int = 0
    #: Resends at once after a gap, in the current send.
    gap_resends: int = 0


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``batch`` with ``stamp`` (one task; retry it with the same stamp).

    ``resend`` is true for a resend at once after a gap answer: it continues
    the send that got the answer, so it keeps that send's retry budget.
    """

    batch: Batch
    stamp: ProducerStamp
    resend: bool = False


@dataclass(frozen=True, slots=True)
class Complete:
    """``batch`` landed: resolve its appends with ``result``."""

    batch: Batch
    result: AppendResult


@dataclass(frozen=True, slots=True)
class Fail:
    """``batches`` will not land: fail their appends with ``error`` (and stop their sends)."""

    batches: tuple[Batch, ...]
    error: DurableError


ProducerEvent = Send | Complete | Fail


class ProducerCore:
    """Batching, pipelining, parking, fencing and failing for one producer.

    Args:
        producer_id: the producer's name on the stream.
        epoch: the epoch to start in.
        auto_claim: on 403 (or a reused epoch), take over from the server's epoch + 1.
        max_batch_bytes: a batch is sealed once it holds this many bytes.
        max_batch_items: ... or this many items (``None``: no item limit).
        max_in_flight: batches with a send out at once.
        url: the stream URL, for the errors the core makes.

    Raises :class:`UsageError` for an invalid option.
    """

    def __init__(
        self,
        producer_id: str,
        epoch: int = 0,
        *,
        auto_claim: bool = False,
        max_batch_bytes: int = 1024 * 1024,
        max_batch_items: int | None = None,
        max_in_flight: int = 5,
        url: str | None = None,
    ) -> None:
        if max_batch_bytes <= 0:
            raise UsageError("max_batch_bytes must be > 0")
        if max_batch_items is not None and max_batch_items <= 0:
            raise UsageError("max_batch_items must be > 0 (or None)")
        if max_in_flight < 1:
            raise UsageError("max_in_flight must be >= 1")
        self.state = ProducerState(producer_id, epoch, auto_claim=auto_claim)
        self.max_batch_bytes = max_batch_bytes
        self.max_batch_items = max_batch_items
        self.max_in_flight = max_in_flight
        self.url = url
        self._open: Batch | None = None
        self._queue: deque[Batch] = deque()  # sealed, never stamped
        self._stamped: list[Batch] = []  # stamped and not done, in seq order
        self._fence: int | None = None  # the epoch to claim past, once nothing is in flight
        self._seen_epoch: int | None = None  # the highest epoch a 403 reported
        self._error: DurableError | None = None
        self._events: list[ProducerEvent] = []

    # --- what the driver reads ----------------------------------------------------

    @property
    def error(self) -> DurableError | None:
        """The error that failed the producer, if any."""
        return self._error

    @property
    def open(self) -> Batch | None:
        """The batch still taking items (never an empty one), if any."""
        return self._open

    @property
    def pending(self) -> int:
        """Batches not yet resolved (open, queued or on the wire)."""
        return (1 if self._open is not None else 0) + len(self._queue) + len(self._stamped)

    @property
    def in_flight(self) -> int:
        """Batches with a send out."""
        return sum(1 for b in self._stamped if b.state is BatchState.SENDING)

    def outstanding(self) -> list[Batch]:
        """The sealed batches not yet resolved, in order (what a flush waits for)."""
        return [*self._stamped, *self._queue]

    def next_events(self) -> list[ProducerEvent]:
        """Take what was decided since the last call, in order."""
        events, self._events = self._events, []
        return events

    # --- appending ------------------------------------------------------------------

    def append(self, size: int) -> Batch:
        """Add one item of ``size`` bytes; return the batch that carries it.

        An item that would overflow the open batch seals it first; a batch that
        reaches a limit is sealed at once. Raises the producer's error if it failed.
        """
        if self._error is not None:
            raise self._error
        batch = self._open
        if batch is not None and batch.size + size > self.max_batch_bytes:
            self.seal()
            batch = None
        if batch is None:
            batch = self._open = Batch()
        batch.count += 1
        batch.size += size
        if batch.size >= self.max_batch_bytes or (
            self.max_batch_items is not None and batch.count >= self.max_batch_items
        ):
            self.seal()
        return batch

    def seal(self) -> None:
        """Stop the open batch taking items and queue it (the linger expired, or a flush)."""
        batch, self._open = self._open, None
        if batch is None:
            return
        batch.state = BatchState.QUEUED
        self._queue.append(batch)
        self._pump()

    def append_close(self, final_size: int | None = None) -> Batch:
        """Queue the batch that closes the stream, with one final item of
        ``final_size`` bytes or none. Raises the producer's error if it failed."""
        if self._error is not None:
            raise self._error
        self.seal()
        batch = Batch(close=True, state=BatchState.QUEUED)
        if final_size is not None:
            batch.count, batch.size = 1, final_size
        self._queue.append(batch)
        self._pump()
        return batch

    # --- what happened to a send ----------------------------------------------------

    def sent(self, batch: Batch) -> None:
        """An attempt of ``batch`` with its current stamp went out (each retry too)."""
        batch.tries += 1

    def acked(self, batch: Batch, result: AppendResult) -> None:
        """The server answered ``batch``'s latest attempt with success or a duplicate."""
        if batch.state is not BatchState.SENDING:
            return  # already resolved (a failure overtook this answer)
        stamp = batch.stamp
        assert stamp is not None
        # (A close with no data answers 204 new or not: nothing to tell.)
        if result.duplicate and batch.tries <= 1 and batch.count:
            self.failed(
                batch,
                EpochReused(
                    f"producer {stamp.producer_id!r} epoch {stamp.epoch} seq {stamp.seq} "
                    "was already used (an earlier run or another instance with this id "
                    "and epoch), so the server took this new batch for a retry and did "
                    "not write it. Start a new epoch (epoch=previous + 1, or "
                    "auto_claim=True), or use a producer id of its own per run",
                    url=self.url,
                    status=result.status,
                    current_epoch=stamp.epoch,
                ),
            )
            return
        self.state.acknowledge(stamp, result.producer_seq)
        batch.state = BatchState.DONE
        self._stamped.remove(batch)
        self._events.append(Complete(batch, result))
        self._pump()

    def failed(self, batch: Batch, error: DurableError) -> None:
        """``batch``'s send ended with ``error`` (not retryable, or retries exhausted)."""
        if batch.state is not BatchState.SENDING:
            return
        stamp = batch.stamp
        assert stamp is not None
        if isinstance(error, SequenceGap):
            self._gap(batch, stamp, error)
        elif isinstance(error, StaleEpoch):
            self._fenced(batch, stamp, error)
        else:
            self._fail_all(error)

    def _gap(self, batch: Batch, stamp: ProducerStamp, error: SequenceGap) -> None:
        batch.tries = 0  # refused: nothing of this attempt was written
        if error.received_seq is not None and error.received_seq != stamp.seq:
            self._fail_all(error)
        elif self._earlier_outstanding(batch):
            batch.state = BatchState.PARKED_GAP
            self._pump()
        elif batch.gap_resends < MAX_GAP_RESENDS:
            batch.gap_resends += 1
            self._events.append(Send(batch, stamp, resend=True))
        else:
            self._fail_all(error)

    def _fenced(self, batch: Batch, stamp: ProducerStamp, error: StaleEpoch) -> None:
        if error.current_epoch == stamp.epoch and not isinstance(error, EpochReused):
            # Our server's content check: same epoch, but other bytes.
            error = EpochReused(
                error.message,
                url=error.url,
                status=error.status,
                headers=error.headers,
                current_epoch=error.current_epoch,
            )
        if error.current_epoch is not None:
            self._seen_epoch = max(self._seen_epoch or 0, error.current_epoch)
        if not self.state.auto_claim:
            self._fail_all(error)
            return
        self._fence = max(self._fence or 0, error.current_epoch or stamp.epoch)
        self._seen_epoch = max(self._seen_epoch or 0, self._fence)
        batch.state = BatchState.PARKED_FENCE
        self._pump()

    def _earlier_outstanding(self, batch: Batch) -> bool:
        # _stamped holds no done batch, so anything before ``batch`` is outstanding.
        return bool(self._stamped) and self._stamped[0] is not batch

    # --- the producer as a whole ------------------------------------------------------

    def abort(self, error: DurableError) -> None:
        """Fail every unresolved batch with ``error``, without failing the producer
        (it is being closed)."""
        self._fail_all(error, record=False)

    def restart(self) -> int:
        """Start a new epoch in place, past any epoch a 403 reported; clear a failure.

        Returns the new epoch. Raises :class:`UsageError` if a batch is unresolved.
        """
        if self.pending:
            raise UsageError("restart() needs an idle producer: flush() first", url=self.url)
        fenced_by = self._seen_epoch
        epoch = self.state.restart()
        if fenced_by is not None and fenced_by >= epoch:
            epoch = self.state.claim(fenced_by)
        self._error = None
        return epoch

    def _first_of_epoch_pending(self) -> bool:
        # Until seq 0 of the epoch is acknowledged, nothing else may travel.
        return not self.state.epoch_confirmed() and any(
            b.stamp is not None and b.stamp.seq == 0 for b in self._stamped
        )

    def _pump(self) -> None:
        """Decide what to send next; called whenever something changed."""
        if self._error is not None:
            return
        if self._fence is not None:
            if self.in_flight:
                return  # wait for every request of the old epoch to come back
            self.state.claim(self._fence)
            self._fence = None
            for batch in self._stamped:
                batch.stamp = self.state.next_stamp()
                batch.tries = 0
                batch.state = BatchState.QUEUED
        # Resend batches that are waiting, in seq order.
        head = self._stamped[0] if self._stamped else None
        for batch in self._stamped:
            if self.in_flight >= self.max_in_flight:
                return
            if batch.state is BatchState.PARKED_GAP and batch is head:
                self._launch(batch)
            elif batch.state is BatchState.QUEUED:
                assert batch.stamp is not None
                if batch.stamp.seq != 0 and self._first_of_epoch_pending():
                    return
                self._launch(batch)
        while self._queue and self.in_flight < self.max_in_flight:
            if self._first_of_epoch_pending():
                return
            batch = self._queue.popleft()
            batch.stamp = self.state.next_stamp()
            self._stamped.append(batch)
            self._launch(batch)

    def _launch(self, batch: Batch) -> None:
        assert batch.stamp is not None
        batch.state = BatchState.SENDING
        batch.gap_resends = 0
        self._events.append(Send(batch, batch.stamp))

    def _fail_all(self, error: DurableError, *, record: bool = True) -> None:
        if record and self._error is None:
            self._error = error
        if self._open is not None:
            self._queue.appendleft(self._open)
            self._open = None
        batches = (*self._stamped, *self._queue)
        self._stamped.clear()
        self._queue.clear()
        for batch in batches:
            batch.state = BatchState.DONE
        if batches:
            self._events.append(Fail(batches, error))
