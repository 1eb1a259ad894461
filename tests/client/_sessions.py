"""Shared by the agent and lease tests: sessions with fast retries, and reading
a subscription until an event."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from durable_client import AnyEvent, Author, ReconnectPolicy, RetryPolicy, Session, Subscription

FAST_RECONNECT = ReconnectPolicy(initial_delay=0.01, max_delay=0.05)
FAST_RETRY = RetryPolicy(initial_delay=0.01, max_delay=0.05, max_attempts=3)


def session_at(base: str, session_id: str, author: Author) -> Session:
    return Session(base, session_id, author=author, retry=FAST_RETRY, reconnect=FAST_RECONNECT)


async def read_until(
    subscription: Subscription, done: Callable[[AnyEvent], bool], timeout: float = 10.0
) -> list[AnyEvent]:
    """Events from ``subscription`` up to and including the first that is ``done``."""
    events: list[AnyEvent] = []
    async with asyncio.timeout(timeout):
        async for event in subscription:
            events.append(event)
            if done(event):
                break
    return events
