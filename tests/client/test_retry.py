"""Retry policy arithmetic and the tenacity-driven retry loop, without sockets."""

from __future__ import annotations

import random

import pytest

from durable_client import (
    ConnectionLost,
    ReconnectPolicy,
    RetryPolicy,
    ServerError,
    StreamNotFound,
    UsageError,
)
from durable_client._core.reconnect import GiveUp, Wait
from durable_client._retry import Backoff, retry_call


def test_caps_grow_then_stop_at_max() -> None:
    policy = RetryPolicy(initial_delay=0.1, max_delay=1.0, multiplier=2.0)
    assert [policy.cap(n) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert policy.cap(10_000) == 1.0  # no overflow after a long outage


def test_full_jitter_stays_within_the_cap() -> None:
    policy = RetryPolicy(initial_delay=0.5, max_delay=4.0)
    rng = random.Random(7)
    for failures in range(1, 10):
        for _ in range(50):
            assert 0.0 <= policy.delay(failures, rng=rng) <= policy.cap(failures)


def test_without_jitter_the_delay_is_the_cap() -> None:
    policy = RetryPolicy(initial_delay=0.25, jitter=False)
    assert policy.delay(3) == 1.0


def test_retry_after_is_a_floor_capped_by_max_retry_after() -> None:
    policy = RetryPolicy(initial_delay=0.1, max_delay=0.2, max_retry_after=3.0)
    assert policy.delay(1, retry_after=2.0, rng=random.Random(1)) == 2.0
    assert policy.delay(1, retry_after=100.0, rng=random.Random(1)) == 3.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_delay": 0},
        {"initial_delay": 2, "max_delay": 1},
        {"multiplier": 0.5},
        {"max_attempts": 0},
        {"max_elapsed": -1},
    ],
)
def test_invalid_policies_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_reconnect_policy_retries_forever_by_default() -> None:
    backoff = Backoff(ReconnectPolicy(initial_delay=0.01, max_delay=0.02), rng=random.Random(0))
    for _ in range(1000):
        assert isinstance(backoff.failure(ConnectionLost("x")), Wait)


def test_backoff_gives_up_after_max_attempts_and_resets() -> None:
    backoff = Backoff(RetryPolicy(max_attempts=3), rng=random.Random(0))
    assert isinstance(backoff.failure(), Wait)
    assert isinstance(backoff.failure(), Wait)
    assert backoff.failure() == GiveUp(attempt=3)
    assert backoff.gave_up
    backoff.reset()
    assert backoff.failures == 0
    assert isinstance(backoff.failure(), Wait)


def test_backoff_gives_up_after_max_elapsed() -> None:
    now = [100.0]
    policy = RetryPolicy(
        initial_delay=1.0, max_delay=1.0, jitter=False, max_attempts=None, max_elapsed=2.5
    )
    backoff = Backoff(policy, clock=lambda: now[0])
    assert backoff.failure() == Wait(1.0, attempt=1)
    now[0] += 1.0
    assert backoff.failure() == Wait(1.0, attempt=2)
    now[0] += 1.0
    assert backoff.failure() == GiveUp(attempt=3)  # 2.0 elapsed + 1.0 more would pass 2.5


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


async def test_retry_call_retries_retryable_errors_then_succeeds() -> None:
    sleeps = Sleeps()
    calls = []
    seen: list[tuple[int, float]] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ServerError("boom", status=503, retry_after=0.5)
        return "ok"

    policy = RetryPolicy(initial_delay=0.1, max_delay=0.2)
    result = await retry_call(
        flaky, policy, sleep=sleeps, on_retry=lambda n, d, e: seen.append((n, d))
    )
    assert result == "ok"
    assert len(calls) == 3
    assert sleeps.delays == [0.5, 0.5]  # Retry-After honoured as a floor
    assert [n for n, _ in seen] == [1, 2]


async def test_retry_call_raises_fatal_errors_at_once() -> None:
    sleeps = Sleeps()
    calls = []

    async def missing() -> None:
        calls.append(1)
        raise StreamNotFound("nope", status=404)

    with pytest.raises(StreamNotFound):
        await retry_call(missing, RetryPolicy(), sleep=sleeps)
    assert len(calls) == 1
    assert sleeps.delays == []


async def test_retry_call_gives_up_with_the_last_error() -> None:
    sleeps = Sleeps()

    async def down() -> None:
        raise ConnectionLost("gone")

    with pytest.raises(ConnectionLost):
        await retry_call(down, RetryPolicy(max_attempts=4), sleep=sleeps)
    assert len(sleeps.delays) == 3


async def test_a_long_lived_loop_resets_when_it_makes_progress() -> None:
    """A reader keeps one attempt open while data flows; each failure after
    data is the first again, so its waits never grow past the first cap."""
    sleeps = Sleeps()
    seen: list[int] = []
    policy = RetryPolicy(initial_delay=0.1, max_delay=10.0, jitter=False, max_attempts=3)
    retrying = policy.retrying(sleep=sleeps, on_retry=lambda n, d, e: seen.append(n))
    connections = 0
    async for attempt in retrying:
        with attempt:
            connections += 1
            if connections < 6:
                retrying.reset()  # this connection delivered something, then broke
                raise ConnectionLost("cut")
    assert connections == 6  # five cuts, never given up although max_attempts=3
    assert sleeps.delays == [0.1] * 5
    assert seen == [1] * 5


async def test_the_engine_gives_up_with_the_last_error_and_reports_each_wait() -> None:
    sleeps = Sleeps()
    seen: list[tuple[int, float, str]] = []
    policy = RetryPolicy(initial_delay=0.1, max_delay=0.2, jitter=False, max_attempts=3)
    errors = iter([ConnectionLost("one"), ServerError("two", status=503), ConnectionLost("three")])

    async def run() -> None:
        async for attempt in policy.retrying(
            sleep=sleeps, on_retry=lambda n, d, e: seen.append((n, d, str(e)))
        ):
            with attempt:
                raise next(errors)

    with pytest.raises(ConnectionLost, match="three"):
        await run()
    assert seen == [(1, 0.1, "one"), (2, 0.2, "two (HTTP 503)")]
    assert sleeps.delays == [0.1, 0.2]


async def test_cancellation_is_never_retried() -> None:
    import asyncio

    sleeps = Sleeps()

    async def run() -> None:
        async for attempt in RetryPolicy(max_attempts=None).retrying(sleep=sleeps):
            with attempt:
                raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await run()
    assert sleeps.delays == []


async def test_the_loop_s_own_test_decides_what_is_retried() -> None:
    sleeps = Sleeps()
    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise KeyError("not a RetryableError, but this loop retries it")
        return "ok"

    result = await retry_call(
        flaky, RetryPolicy(), sleep=sleeps, retry_if=lambda e: isinstance(e, KeyError)
    )
    assert result == "ok"
    assert len(sleeps.delays) == 2
