"""The retry and reconnect policy's decisions, without I/O.

A loop that retries (a request) or reconnects (a reader) tells a
:class:`Backoff` what happened and reads back what to do: after a failure,
:class:`Wait` some seconds or :class:`GiveUp`; after a success, nothing (the
count starts again). It never sleeps and reads no clock or random source it
was not given, so ``tests/client/core/test_reconnect_core.py`` checks every
rule with a seeded ``random.Random`` and a fake clock. The asyncio engine that
runs the loops (``durable_client._retry.Retrying``, on tenacity) only carries
out these decisions.

The rules (``docs/errors.md``, "What is retried, and how"):

- Only a failure that retrying can fix is retried: a
  :class:`~durable_client.RetryableError` unless the loop says otherwise. Any
  other failure gives up at once (``GiveUp(fatal=True)``).
- The n-th failure in a row waits ``uniform(0, cap(n))`` (*full jitter*), or
  ``cap(n)`` itself without jitter, where ``cap(n) = min(max_delay,
  initial_delay * multiplier ** (n - 1))``. Full jitter spreads the clients
  that a server restart disconnected at once over the whole window instead of
  sending them back together.
- A ``Retry-After`` from the server is a floor, capped by ``max_retry_after``:
  the server knows when it can take us back, but a huge value must not park a
  reader for hours.
- Give up after ``max_attempts`` attempts (the first included), or when the
  next wait would end past ``max_elapsed`` seconds after the first failure.
- A success resets the count, so a connection that worked for an hour and then
  dropped starts again with a short delay.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .._errors import RetryableError

__all__ = ["Backoff", "BackoffPolicy", "GiveUp", "Wait", "delay_cap", "is_retryable", "next_delay"]


class BackoffPolicy(Protocol):
    """The numbers a :class:`Backoff` follows (``RetryPolicy`` has them)."""

    @property
    def initial_delay(self) -> float: ...
    @property
    def max_delay(self) -> float: ...
    @property
    def multiplier(self) -> float: ...
    @property
    def jitter(self) -> bool: ...
    @property
    def max_attempts(self) -> int | None: ...
    @property
    def max_elapsed(self) -> float | None: ...
    @property
    def max_retry_after(self) -> float: ...


def is_retryable(error: BaseException) -> bool:
    """Whether retrying may fix ``error``: only a :class:`RetryableError` qualifies."""
    return isinstance(error, RetryableError)


def delay_cap(policy: BackoffPolicy, failures: int) -> float:
    """The upper bound of the wait after ``failures`` failures in a row (>= 1)."""
    cap = policy.initial_delay
    for _ in range(max(0, failures - 1)):
        cap *= policy.multiplier
        if cap >= policy.max_delay:
            # Stop growing once past the maximum: no float overflow after a long outage.
            return policy.max_delay
    return min(cap, policy.max_delay)


def next_delay(
    policy: BackoffPolicy,
    failures: int,
    *,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """The wait after ``failures`` failures in a row, ``Retry-After`` included."""
    cap = delay_cap(policy, failures)
    delay = (rng or random).uniform(0.0, cap) if policy.jitter else cap
    if retry_after is not None:
        delay = max(delay, min(retry_after, policy.max_retry_after))
    return delay


@dataclass(frozen=True, slots=True)
class Wait:
    """Try again in ``delay`` seconds; ``attempt`` is the count of failures in a row."""

    delay: float
    attempt: int


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Stop and raise the last error: retrying cannot fix it (``fatal``), or the
    policy ran out of attempts or time."""

    attempt: int
    fatal: bool = False


class Backoff:
    """The failures in a row of one retry loop, and what each one means.

    Call :meth:`failure` after each failed attempt: it answers :class:`Wait`
    or :class:`GiveUp`. Call :meth:`reset` after a success.

    Args:
        policy: the numbers to follow (a ``RetryPolicy``).
        rng: the random source of the jitter (tests pass a seeded one).
        clock: seconds, for ``max_elapsed`` (tests pass a fake one).
        retry_if: which errors retrying may fix (default: :func:`is_retryable`).
    """

    def __init__(
        self,
        policy: BackoffPolicy,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        retry_if: Callable[[BaseException], bool] = is_retryable,
    ) -> None:
        self.policy = policy
        self.retry_if = retry_if
        self._rng = rng
        self._clock = clock
        #: Failures in a row since the last success.
        self.failures = 0
        #: The wait of the last :class:`Wait` (``None`` after a success).
        self.last_delay: float | None = None
        #: Whether the last failure gave up.
        self.gave_up = False
        self._first_failure_at: float | None = None

    def reset(self) -> None:
        """Forget past failures (call after a success)."""
        self.failures = 0
        self.last_delay = None
        self.gave_up = False
        self._first_failure_at = None

    def failure(
        self, error: BaseException | None = None, *, retryable: bool | None = None
    ) -> Wait | GiveUp:
        """Record a failed attempt and decide what comes next.

        ``error`` is what failed (``None``: a failure with no exception, always
        retryable); its ``retry_after`` attribute, in seconds, is the server's
        ``Retry-After``. ``retryable`` overrides :attr:`retry_if` for this one.
        """
        now = self._clock()
        if self._first_failure_at is None:
            self._first_failure_at = now
        self.failures += 1
        if retryable is None:
            retryable = error is None or self.retry_if(error)
        policy = self.policy
        if not retryable:
            return self._give_up(fatal=True)
        if policy.max_attempts is not None and self.failures >= policy.max_attempts:
            return self._give_up()
        retry_after = getattr(error, "retry_after", None)
        if not isinstance(retry_after, int | float):
            retry_after = None
        delay = next_delay(policy, self.failures, retry_after=retry_after, rng=self._rng)
        if policy.max_elapsed is not None and (
            now - self._first_failure_at + delay > policy.max_elapsed
        ):
            return self._give_up()
        self.last_delay = delay
        return Wait(delay, self.failures)

    def _give_up(self, *, fatal: bool = False) -> GiveUp:
        self.gave_up = True
        return GiveUp(self.failures, fatal)
