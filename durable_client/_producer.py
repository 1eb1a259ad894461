"""The idempotent producer: exactly-once appends over an at-least-once network.

:class:`IdempotentProducer` is the asyncio driver of
:class:`~durable_client._core.producer.ProducerCore`, which makes every
decision (batching, stamps, the first batch of an epoch travelling alone,
parking on a gap, fencing and re-stamping, failing); its module docstring
lists the rules and why. The driver holds what the core does not: the bytes,
the append futures, the linger timer, one task per send, and the retries of
each send with the retry policy, always with the same stamp. Retryable errors
(transport, timeouts, 429, 5xx) are retried there; the outcome of a send (an
answer, or the error that ended it) goes back to the core.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ._core.producer import (
    Batch,
    Complete,
    Fail,
    ProducerCore,
    ProducerStamp,
    ProducerState,
    Send,
)
from ._errors import ClientClosed, DurableError, UsageError
from ._results import AppendResult
from ._retry import Backoff, OnRetry, RetryPolicy, retry_call

__all__ = ["BatchSink", "IdempotentProducer", "ProducerStamp", "ProducerState"]


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


@dataclass(eq=False)
class _Payload:
    """What the driver keeps for one of the core's batches."""

    done: asyncio.Future[None]
    items: list[bytes] = field(default_factory=list)
    futures: list[asyncio.Future[AppendResult]] = field(default_factory=list)
    # The retry budget of the current send (kept across a resend after a gap).
    backoff: Backoff | None = None


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
    A producer that failed raises its error from every pending append, from
    the next :meth:`flush` and from new appends, until :meth:`restart`.
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
        on_retry: OnRetry | None = None,
        on_success: Callable[[], None] | None = None,
    ) -> None:
        if linger < 0:
            raise UsageError("linger must be >= 0")
        if producer_id is None:
            producer_id = f"producer-{uuid.uuid4().hex[:16]}"
        self._core = ProducerCore(
            producer_id,
            epoch,
            auto_claim=auto_claim,
            max_batch_bytes=max_batch_bytes,
            max_batch_items=max_batch_items,
            max_in_flight=max_in_flight,
            url=sink.url,
        )
        self._sink = sink
        self.linger = linger
        self.retry = retry
        self._on_retry = on_retry
        self._on_success = on_success

        self._payloads: dict[Batch, _Payload] = {}
        self._linger_handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self._linger_batch: Batch | None = None  # the open batch the timer is for
        self._tasks: dict[asyncio.Task[None], Batch] = {}
        self._draining = False
        self._closing = False
        self._closed = False
        self._final: AppendResult | None = None

    # --- introspection ---------------------------------------------------------

    @property
    def producer_id(self) -> str:
        return self._core.state.producer_id

    @property
    def epoch(self) -> int:
        """The current epoch (changes after an auto-claim)."""
        return self._core.state.epoch

    @property
    def next_seq(self) -> int:
        """The seq the next batch will carry."""
        return self._core.state.next_seq

    @property
    def error(self) -> DurableError | None:
        """The error that failed the producer, if any."""
        return self._core.error

    @property
    def pending(self) -> int:
        """Batches not yet acknowledged (open, queued or on the wire)."""
        return self._core.pending

    @property
    def max_batch_bytes(self) -> int:
        return self._core.max_batch_bytes

    @property
    def max_batch_items(self) -> int | None:
        return self._core.max_batch_items

    @property
    def max_in_flight(self) -> int:
        return self._core.max_in_flight

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
        batch = self._core.append(len(raw))
        payload = self._payloads.get(batch)
        if payload is None:
            payload = self._payloads[batch] = _Payload(loop.create_future())
        payload.items.append(raw)
        payload.futures.append(fut)
        self._drain()
        return fut

    def _check_usable(self) -> None:
        if self._core.error is not None:
            raise self._core.error
        if self._closing or self._closed:
            raise ClientClosed("the producer is closed", url=self._sink.url)

    # --- flushing and shutdown ------------------------------------------------------

    async def flush(self) -> None:
        """Send everything queued and wait until it is acknowledged.

        Raises the producer's error if it failed.
        """
        self._core.seal()
        self._drain()
        while True:
            waiting = [self._payloads[b].done for b in self._core.outstanding()]
            if not waiting:
                break
            await asyncio.gather(*waiting, return_exceptions=True)
        if self._core.error is not None:
            raise self._core.error

    async def close(self, final: bytes | str | None = None) -> AppendResult:
        """Flush, then close the *stream* (optionally appending ``final`` first).

        Idempotent: a second call returns the first result.
        """
        if self._final is not None:
            return self._final
        if self._core.error is not None:
            raise self._core.error
        self._closing = True
        await self.flush()
        loop = asyncio.get_running_loop()
        raw = b""
        if final is not None:
            raw = final.encode("utf-8") if isinstance(final, str) else bytes(final)
        fut: asyncio.Future[AppendResult] = loop.create_future()
        fut.add_done_callback(_mark_retrieved)
        batch = self._core.append_close(len(raw) if raw else None)
        self._payloads[batch] = _Payload(
            loop.create_future(), items=[raw] if raw else [], futures=[fut]
        )
        self._drain()
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
        return self._core.restart()

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
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._core.abort(ClientClosed("the producer was closed", url=self._sink.url))
        self._drain()

    async def __aenter__(self) -> IdempotentProducer:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            await self.detach()
        else:
            await self.aclose()

    # --- carrying out the core's decisions -----------------------------------------------

    def _drain(self) -> None:
        """Carry out what the core decided; called after every input to it."""
        if self._draining:
            return  # a callback fed the core: the loop below picks its events up
        self._draining = True
        try:
            while events := self._core.next_events():
                for event in events:
                    if isinstance(event, Send):
                        self._launch(event)
                    elif isinstance(event, Complete):
                        self._complete(event)
                    elif isinstance(event, Fail):
                        self._fail(event)
        finally:
            self._draining = False
        self._follow_linger()

    def _follow_linger(self) -> None:
        # One timer, for the open batch: it seals the batch when it expires.
        batch = self._core.open
        if batch is self._linger_batch:
            return
        if self._linger_handle is not None:
            self._linger_handle.cancel()
            self._linger_handle = None
        self._linger_batch = batch
        if batch is not None:
            loop = asyncio.get_running_loop()
            if self.linger > 0:
                self._linger_handle = loop.call_later(self.linger, self._linger_expired)
            else:
                # Items appended in the same loop iteration still share a batch.
                self._linger_handle = loop.call_soon(self._linger_expired)

    def _linger_expired(self) -> None:
        self._linger_handle = None
        self._linger_batch = None
        self._core.seal()
        self._drain()

    def _launch(self, send: Send) -> None:
        if self._closed:
            return  # aclose() is cancelling the sends and fails every batch
        payload = self._payloads[send.batch]
        if not send.resend or payload.backoff is None:
            payload.backoff = Backoff(self.retry) if self.retry is not None else None
        task = asyncio.get_running_loop().create_task(self._send(send, payload))
        self._tasks[task] = send.batch
        task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    async def _send(self, send: Send, payload: _Payload) -> None:
        batch, stamp = send.batch, send.stamp

        async def attempt() -> AppendResult:
            self._core.sent(batch)
            return await self._sink.send_batch(payload.items, stamp=stamp, close=batch.close)

        try:
            # Retryable failures are retried here (tenacity) with the same
            # stamp: a batch backing off still counts as in flight, so no
            # claim can re-stamp it meanwhile.
            if self.retry is None or payload.backoff is None:
                result = await attempt()
            else:
                result = await retry_call(
                    attempt, self.retry, backoff=payload.backoff, on_retry=self._on_retry
                )
        except asyncio.CancelledError:
            raise
        except DurableError as exc:  # fatal, a gap or a fence, or retries exhausted
            self._core.failed(batch, exc)
        else:
            self._core.acked(batch, result)
        self._drain()

    def _complete(self, event: Complete) -> None:
        payload = self._payloads.pop(event.batch)
        for fut in payload.futures:
            if not fut.done():
                fut.set_result(event.result)
        if not payload.done.done():
            payload.done.set_result(None)
        if self._on_success is not None:
            self._on_success()

    def _fail(self, event: Fail) -> None:
        for batch in event.batches:
            payload = self._payloads.pop(batch)
            for fut in payload.futures:
                if not fut.done():
                    fut.set_exception(event.error)
            if not payload.done.done():
                payload.done.set_result(None)
        failed = set(event.batches)
        current = asyncio.current_task()
        for task, batch in list(self._tasks.items()):
            if task is not current and batch in failed:
                task.cancel()


def _mark_retrieved(fut: asyncio.Future[Any]) -> None:
    # The producer reports its failure through flush()/close(); a caller who
    # never awaits a particular append future should not get asyncio's
    # "exception was never retrieved" log line for it.
    if not fut.cancelled():
        fut.exception()
