"""The reconnect core's decisions: no socket, no event loop, no real clock.

Every rule of ``_core.reconnect`` is checked by feeding failures and
successes into a :class:`Backoff` and comparing its decisions with a model of
the documented policy, exhaustively over small attempt counts and outcome
sequences, with a seeded random source.
"""

from __future__ import annotations

import itertools
import random

import pytest

from durable_client import ConnectionLost, OffsetGone, RetryPolicy, ServerError, StreamNotFound
from durable_client._core.reconnect import Backoff, GiveUp, Wait, delay_cap, next_delay

POLICIES = [
    RetryPolicy(initial_delay=i, max_delay=m, multiplier=k, jitter=j, max_attempts=a)
    for i, m, k, j, a in itertools.product(
        (0.1, 0.25), (0.25, 1.0), (1.0, 2.0, 3.0), (True, False), (1, 2, 3, 4, None)
    )
    if m >= i
]


def model_cap(policy: RetryPolicy, failures: int) -> float:
    return float(min(policy.max_delay, policy.initial_delay * policy.multiplier ** (failures - 1)))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_caps_follow_the_formula(policy: RetryPolicy) -> None:
    for failures in range(1, 12):
        assert delay_cap(policy, failures) == pytest.approx(model_cap(policy, failures))


def test_caps_stop_growing_without_overflow() -> None:
    policy = RetryPolicy(initial_delay=0.1, max_delay=2.0, multiplier=10.0)
    assert delay_cap(policy, 100_000) == 2.0


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_every_outcome_sequence_gets_the_policy_s_decisions(policy: RetryPolicy) -> None:
    """All sequences of up to 6 failures (F) and successes (S): the n-th failure
    in a row waits uniform(0, cap(n)) (or cap(n)), gives up at max_attempts, and
    a success starts the count again."""
    for length in range(1, 7):
        for outcomes in itertools.product("FS", repeat=length):
            backoff = Backoff(policy, rng=random.Random(42))
            twin = random.Random(42)  # draws what the backoff must draw, in order
            in_a_row = 0
            for outcome in outcomes:
                if outcome == "S":
                    backoff.reset()
                    in_a_row = 0
                    assert backoff.failures == 0
                    continue
                in_a_row += 1
                decision = backoff.failure(ConnectionLost("cut"))
                if policy.max_attempts is not None and in_a_row >= policy.max_attempts:
                    assert decision == GiveUp(in_a_row)
                    assert backoff.gave_up
                    continue
                cap = model_cap(policy, in_a_row)
                expected = twin.uniform(0.0, cap) if policy.jitter else cap
                assert isinstance(decision, Wait)
                assert decision.attempt == in_a_row
                assert decision.delay == pytest.approx(expected)
                assert 0.0 <= decision.delay <= cap + 1e-12
                assert backoff.last_delay == decision.delay


def test_full_jitter_spreads_over_the_whole_window() -> None:
    policy = RetryPolicy(initial_delay=1.0, max_delay=1.0)
    rng = random.Random(3)
    delays = [next_delay(policy, 1, rng=rng) for _ in range(2000)]
    assert min(delays) < 0.05
    assert max(delays) > 0.95
    assert all(0.0 <= d <= 1.0 for d in delays)


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [(None, 0.5), (0.0, 0.5), (0.2, 0.5), (2.0, 2.0), (3.0, 3.0), (100.0, 3.0)],
)
def test_retry_after_is_a_floor_capped_by_max_retry_after(
    retry_after: float | None, expected: float
) -> None:
    policy = RetryPolicy(initial_delay=0.5, max_delay=0.5, jitter=False, max_retry_after=3.0)
    backoff = Backoff(policy)
    error = ServerError("busy", status=503, retry_after=retry_after)
    assert backoff.failure(error) == Wait(expected, 1)


def test_retry_after_of_another_type_is_ignored() -> None:
    class Odd(ConnectionLost):
        retry_after = "soon"  # type: ignore[assignment]

    policy = RetryPolicy(initial_delay=0.5, max_delay=0.5, jitter=False)
    assert Backoff(policy).failure(Odd("x")) == Wait(0.5, 1)


@pytest.mark.parametrize(
    "error", [StreamNotFound("gone", status=404), OffsetGone("old"), KeyError()]
)
def test_a_failure_retrying_cannot_fix_gives_up_at_once(error: BaseException) -> None:
    backoff = Backoff(RetryPolicy(max_attempts=None))
    assert backoff.failure(error) == GiveUp(1, fatal=True)
    assert backoff.gave_up


def test_the_loop_s_own_test_decides_what_is_retried() -> None:
    backoff = Backoff(RetryPolicy(jitter=False), retry_if=lambda e: isinstance(e, KeyError))
    assert backoff.failure(KeyError()) == Wait(0.1, 1)
    assert backoff.failure(ConnectionLost("x")) == GiveUp(2, fatal=True)
    backoff.reset()
    assert backoff.failure(ConnectionLost("x"), retryable=True) == Wait(0.1, 1)
    assert backoff.failure(KeyError(), retryable=False) == GiveUp(2, fatal=True)


def test_a_failure_without_an_error_is_retried() -> None:
    assert Backoff(RetryPolicy(jitter=False)).failure() == Wait(0.1, 1)


@pytest.mark.parametrize("max_elapsed", [0.0, 0.5, 1.0, 2.5, 4.0])
def test_max_elapsed_gives_up_when_the_next_wait_would_pass_it(max_elapsed: float) -> None:
    clock = FakeClock()
    policy = RetryPolicy(
        initial_delay=1.0, max_delay=1.0, jitter=False, max_attempts=None, max_elapsed=max_elapsed
    )
    backoff = Backoff(policy, clock=clock)
    elapsed = 0.0
    for attempt in range(1, 10):
        decision = backoff.failure(ConnectionLost("x"))
        if elapsed + 1.0 > max_elapsed:
            assert decision == GiveUp(attempt)
            break
        assert decision == Wait(1.0, attempt)
        clock.now += 1.0
        elapsed += 1.0
    else:
        pytest.fail("never gave up")


def test_max_elapsed_counts_from_the_first_failure_after_a_reset() -> None:
    clock = FakeClock()
    policy = RetryPolicy(
        initial_delay=1.0, max_delay=1.0, jitter=False, max_attempts=None, max_elapsed=1.5
    )
    backoff = Backoff(policy, clock=clock)
    assert backoff.failure() == Wait(1.0, 1)
    clock.now += 1.0
    assert backoff.failure() == GiveUp(2)
    clock.now += 100.0
    backoff.reset()  # the connection worked for a while
    assert backoff.failure() == Wait(1.0, 1)


def test_a_reconnect_policy_never_runs_out() -> None:
    from durable_client import ReconnectPolicy

    backoff = Backoff(ReconnectPolicy(), rng=random.Random(0))
    decisions = [backoff.failure(ConnectionLost("x")) for _ in range(500)]
    assert all(isinstance(d, Wait) for d in decisions)
    assert [d.attempt for d in decisions if isinstance(d, Wait)] == list(range(1, 501))
    assert max(d.delay for d in decisions if isinstance(d, Wait)) <= 10.0
