"""Retry and reconnect policies, in the open.

What is retried: only :class:`~durable_client.RetryableError` (transport
failures, timeouts, 429 and 5xx). Everything else raises at once.

How long to wait: capped exponential backoff with *full jitter*: the n-th
consecutive failure waits ``uniform(0, min(max_delay, initial_delay *
multiplier ** (n - 1)))``. A ``Retry-After`` from the server is a floor
(capped by ``max_retry_after``). The count of consecutive failures goes back
to zero after a success, so a connection that worked for an hour and then
dropped starts again with a short delay.

The policy objects and :class:`Backoff` do no I/O. tenacity runs the retry
loop of every request (:func:`retry_call`: stream operations, producer
batches), with our :class:`Backoff` deciding the delays and when to give up.
Long-lived readers (``DurableStream.follow``, session subscriptions) consume
a stream of batches rather than call a function, so they drive the same
:class:`Backoff` themselves. Either way the same numbers decide the waits and
the connection state a UI shows ("reconnecting, attempt 3, in 1.2 s").
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from ._errors import RetryableError, UsageError

__all__ = ["Backoff", "ReconnectPolicy", "RetryPolicy", "retry_call"]

T = TypeVar("T")


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
        exponent = max(0, failures - 1)
        # Avoid float overflow for long outages: stop growing once past max_delay.
        cap = self.initial_delay
        for _ in range(exponent):
            cap *= self.multiplier
            if cap >= self.max_delay:
                return self.max_delay
        return min(cap, self.max_delay)

    def delay(
        self,
        failures: int,
        *,
        retry_after: float | None = None,
        rng: random.Random | None = None,
    ) -> float:
        """The delay before the next attempt after ``failures`` consecutive failures."""
        cap = self.cap(failures)
        delay = (rng or random).uniform(0.0, cap) if self.jitter else cap
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after))
        return delay


@dataclass(frozen=True)
class ReconnectPolicy(RetryPolicy):
    """How a live subscription or a publish queue reconnects: by default forever.

    ``offline_after`` is the number of consecutive failed attempts after which the
    connection state says ``offline`` rather than ``reconnecting`` (still retrying).
    """

    initial_delay: float = 0.1
    max_delay: float = 10.0
    max_attempts: int | None = None
    offline_after: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.offline_after < 1:
            raise UsageError("offline_after must be >= 1")


class Backoff:
    """Consecutive-failure bookkeeping for one retry loop (no I/O).

    Call :meth:`failure` after each failed attempt: it returns the delay before
    the next attempt, or ``None`` when the policy says to give up. Call
    :meth:`reset` after a success.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self._rng = rng
        self._clock = clock
        self.failures = 0
        self._first_failure_at: float | None = None
        self.last_delay: float | None = None
        self.gave_up = False

    def reset(self) -> None:
        """Forget past failures (call after a success)."""
        self.failures = 0
        self._first_failure_at = None
        self.last_delay = None
        self.gave_up = False

    def failure(self, error: BaseException | None = None) -> float | None:
        """Record a failed attempt; the delay before the next one, or ``None`` to give up."""
        now = self._clock()
        if self._first_failure_at is None:
            self._first_failure_at = now
        self.failures += 1
        policy = self.policy
        if policy.max_attempts is not None and self.failures >= policy.max_attempts:
            self.gave_up = True
            return None
        retry_after = getattr(error, "retry_after", None)
        delay = policy.delay(self.failures, retry_after=retry_after, rng=self._rng)
        if policy.max_elapsed is not None and (
            now - self._first_failure_at + delay > policy.max_elapsed
        ):
            self.gave_up = True
            return None
        self.last_delay = delay
        return delay


def is_retryable(exc: BaseException) -> bool:
    """Whether retrying may fix ``exc`` (only :class:`RetryableError` qualifies)."""
    return isinstance(exc, RetryableError)


async def retry_call(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    backoff: Backoff | None = None,
    on_retry: Callable[[int, float, BaseException], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    retry_if: Callable[[BaseException], bool] = is_retryable,
) -> T:
    """Call ``fn`` until it succeeds, retrying what the policy allows.

    ``on_retry(attempt, delay, error)`` runs before each sleep (``attempt`` is the
    number of consecutive failures so far). The last error is re-raised as is
    when the policy gives up; non-retryable errors are raised at once.
    """
    backoff = backoff or Backoff(policy)
    pending: dict[str, float | None] = {"delay": None}

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        delay = backoff.failure(exc)
        pending["delay"] = delay
        return delay or 0.0

    def stop(state: RetryCallState) -> bool:
        return pending["delay"] is None

    def before_sleep(state: RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None:
            exc = state.outcome.exception()
            if exc is not None:
                on_retry(backoff.failures, pending["delay"] or 0.0, exc)

    retrying = AsyncRetrying(
        retry=retry_if_exception(retry_if),
        wait=wait,
        stop=stop,
        before_sleep=before_sleep,
        reraise=True,
        sleep=sleep,
    )
    result: T = await retrying(fn)
    backoff.reset()
    return result
