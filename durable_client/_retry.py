"""Retry and reconnect policies, and the one engine that runs every retry loop.

What is retried: only :class:`~durable_client.RetryableError` (transport
failures, timeouts, 429 and 5xx). Everything else raises at once.

How long to wait: capped exponential backoff with *full jitter*: the n-th
consecutive failure waits ``uniform(0, min(max_delay, initial_delay *
multiplier ** (n - 1)))``. A ``Retry-After`` from the server is a floor
(capped by ``max_retry_after``). The count of consecutive failures goes back
to zero after a success, so a connection that worked for an hour and then
dropped starts again with a short delay.

The policy objects are plain data; the decisions are made without I/O by
``_core.reconnect.Backoff``. :class:`Retrying` is the one engine that carries
them out, for every loop: single requests and producer batches
(:func:`retry_call`), ``DurableStream.follow``, session subscriptions and the
WebSocket presence loop. It is tenacity's ``AsyncRetrying`` in its iterator
style, with the ``Backoff`` as its retry, wait and stop::

    async for attempt in policy.retrying(on_retry=report):
        with attempt:
            await do_it()

A long-lived reader keeps one attempt open for as long as its connections
work, and calls :meth:`Retrying.reset` whenever data arrives: a failure after
that is the first again. ``on_retry(attempt, delay, error)`` runs before each
wait, which is what a UI shows ("reconnecting, attempt 3, in 1.2 s").
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TypeAlias, TypeVar

from tenacity import AsyncRetrying, AttemptManager, RetryCallState

from ._core.reconnect import Backoff, GiveUp, Wait, delay_cap, is_retryable, next_delay
from ._errors import UsageError

__all__ = [
    "Attempt",
    "Backoff",
    "OnRetry",
    "ReconnectPolicy",
    "RetryPolicy",
    "Retrying",
    "is_retryable",
    "retry_call",
]

T = TypeVar("T")

#: Told before each wait of a retry loop: ``(attempt, delay, error)``, where
#: ``attempt`` is the count of failures in a row and ``delay`` in seconds.
OnRetry: TypeAlias = Callable[[int, float, BaseException], None]


@dataclass(frozen=True)
class RetryPolicy:
    """How a single operation (create, append, head, ...) is retried.

    Attributes:
        initial_delay: cap of the first delay, in seconds.
        max_delay: cap of any delay, in seconds.
        multiplier: growth of the cap per consecutive failure (>= 1).
        jitter: full jitter (``uniform(0, cap)``) when true, else the cap itself.
        max_attempts: attempts in total, the first included; ``None`` means no limit.
        max_elapsed: give up when the failures have lasted this long (seconds);
            ``None`` means no limit.
        max_retry_after: the longest ``Retry-After`` we honour, in seconds.
    """

    initial_delay: float = 0.1
    max_delay: float = 5.0
    multiplier: float = 2.0
    jitter: bool = True
    max_attempts: int | None = 6
    max_elapsed: float | None = None
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if not self.initial_delay > 0:
            raise UsageError("initial_delay must be > 0")
        if self.max_delay < self.initial_delay:
            raise UsageError("max_delay must be >= initial_delay")
        if self.multiplier < 1.0:
            raise UsageError("multiplier must be >= 1")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise UsageError("max_attempts must be >= 1 (or None for no limit)")
        if self.max_elapsed is not None and self.max_elapsed < 0:
            raise UsageError("max_elapsed must be >= 0 (or None for no limit)")
        if self.max_retry_after < 0:
            raise UsageError("max_retry_after must be >= 0")

    def cap(self, failures: int) -> float:
        """The upper bound of the delay after ``failures`` consecutive failures (>= 1)."""
        return delay_cap(self, failures)

    def delay(
        self,
        failures: int,
        *,
        retry_after: float | None = None,
        rng: random.Random | None = None,
    ) -> float:
        """The delay before the next attempt after ``failures`` consecutive failures."""
        return next_delay(self, failures, retry_after=retry_after, rng=rng)

    def retrying(
        self,
        *,
        rng: random.Random | None = None,
        retry_if: Callable[[BaseException], bool] | None = None,
        on_retry: OnRetry | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> Retrying:
        """A retry loop that follows this policy (see :class:`Retrying`)."""
        return Retrying(
            self, rng=rng, retry_if=retry_if, on_retry=on_retry, sleep=sleep, clock=clock
        )


@dataclass(frozen=True)
class ReconnectPolicy(RetryPolicy):
    """How a live subscription or a publish queue reconnects: by default forever.

    ``offline_after`` is the number of consecutive failed attempts after which the
    connection state says ``offline`` rather than ``reconnecting`` (still retrying).

    ``max_no_progress`` bounds a reader that reaches the server but fails at
    the same position on every connection, delivering nothing: after that
    many such failures in a row it raises :class:`NoProgress` instead of
    reconnecting forever (``None``: no bound). Failures to reach the server at
    all (a refused connection, a timeout, a 429/503 with ``Retry-After``) are
    an outage, not a stuck reader, and do not count.
    """

    initial_delay: float = 0.1
    max_delay: float = 10.0
    max_attempts: int | None = None
    offline_after: int = 3
    max_no_progress: int | None = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.offline_after < 1:
            raise UsageError("offline_after must be >= 1")
        if self.max_no_progress is not None and self.max_no_progress < 1:
            raise UsageError("max_no_progress must be >= 1 or None")


class Attempt:
    """One attempt of a :class:`Retrying` loop: the body of its ``with`` block.

    An exception that leaves the block is the attempt's failure, and the loop
    decides (wait and try again, or raise it). A block that ends without one is
    a success. Cancellation and generator exits are no failures: they leave the
    loop at once.
    """

    __slots__ = ("_manager", "_retrying")

    def __init__(self, manager: AttemptManager, retrying: Retrying) -> None:
        self._manager = manager
        self._retrying = retrying

    def __enter__(self) -> Attempt:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None:
            self._retrying.reset()
            self._manager.__exit__(None, None, None)
            return False
        if not isinstance(exc, Exception):
            return False
        return bool(self._manager.__exit__(exc_type, exc, tb))


class Retrying:
    """The retry loop every retry and reconnect in the SDK runs.

    ``async for attempt in retrying: with attempt: ...`` runs the block until it
    succeeds, as tenacity's ``AsyncRetrying`` does, with a :class:`Backoff`
    making every decision: which errors are retried (``retry_if``; by default
    :class:`~durable_client.RetryableError`), how long to wait, when to give
    up. Giving up raises the last error as it is.

    Args:
        policy: the delays and limits.
        backoff: the failure count to use (default: a new one); one shared by
            several loops makes them count together.
        rng: the random source of the jitter (tests pass a seeded one).
        retry_if: which errors are retried, if not the backoff's own test.
        on_retry: told ``(attempt, delay, error)`` before each wait.
        sleep: how to wait (tests pass one that records the delays).
        clock: seconds, for ``max_elapsed``.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        retry_if: Callable[[BaseException], bool] | None = None,
        on_retry: OnRetry | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.backoff = backoff if backoff is not None else Backoff(policy, rng=rng, clock=clock)
        self._retry_if = retry_if
        self._on_retry = on_retry
        self._decision: Wait | GiveUp | None = None
        self._tenacity = AsyncRetrying(
            retry=self._retry,
            wait=self._wait,
            stop=self._stop,
            before_sleep=self._before_sleep,
            reraise=True,
            sleep=sleep,
        )
        self._attempts: AsyncRetrying | None = None

    @property
    def failures(self) -> int:
        """Failures in a row since the last success."""
        return self.backoff.failures

    def reset(self) -> None:
        """Count the next failure as the first (call when the work succeeds,
        e.g. each time a reader receives data)."""
        self.backoff.reset()

    def __aiter__(self) -> Retrying:
        self._attempts = self._tenacity.__aiter__()
        return self

    async def __anext__(self) -> Attempt:
        if self._attempts is None:
            self._attempts = self._tenacity.__aiter__()
        return Attempt(await self._attempts.__anext__(), self)

    # tenacity's hooks: each failure is decided once, in retry(); wait() and
    # stop() read that decision.

    def _retry(self, state: RetryCallState) -> bool:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None and outcome.failed else None
        if error is None:
            self._decision = None
            return False
        retryable = self._retry_if(error) if self._retry_if is not None else None
        self._decision = self.backoff.failure(error, retryable=retryable)
        return not (isinstance(self._decision, GiveUp) and self._decision.fatal)

    def _wait(self, state: RetryCallState) -> float:
        return self._decision.delay if isinstance(self._decision, Wait) else 0.0

    def _stop(self, state: RetryCallState) -> bool:
        return isinstance(self._decision, GiveUp)

    def _before_sleep(self, state: RetryCallState) -> None:
        decision = self._decision
        outcome = state.outcome
        if self._on_retry is None or not isinstance(decision, Wait) or outcome is None:
            return
        error = outcome.exception()
        if error is not None:
            self._on_retry(decision.attempt, decision.delay, error)


async def retry_call(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    backoff: Backoff | None = None,
    rng: random.Random | None = None,
    on_retry: OnRetry | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    retry_if: Callable[[BaseException], bool] | None = None,
) -> T:
    """Call ``fn`` until it succeeds, retrying what the policy allows.

    ``on_retry(attempt, delay, error)`` runs before each sleep (``attempt`` is the
    number of consecutive failures so far). The last error is re-raised as is
    when the policy gives up; non-retryable errors are raised at once.
    """
    retrying = Retrying(
        policy, backoff=backoff, rng=rng, retry_if=retry_if, on_retry=on_retry, sleep=sleep
    )
    async for attempt in retrying:
        with attempt:
            return await fn()
    raise AssertionError("a retry loop ends with a result or an error")  # pragma: no cover
