"""The connection state machine and its feed of changes."""

from __future__ import annotations

import asyncio

from durable_client import ConnectionLost, ConnectionState, StreamNotFound
from durable_client._state import ConnectionStateMachine, StatusFeed

S = ConnectionState


def test_happy_path() -> None:
    machine = ConnectionStateMachine()
    assert machine.status.state is S.IDLE
    assert machine.connecting() is not None
    assert machine.status.state is S.CONNECTING
    assert machine.connected() is not None
    assert machine.connected() is None  # no change, no event


def test_retries_go_reconnecting_then_offline_then_back() -> None:
    machine = ConnectionStateMachine(offline_after=3)
    machine.connecting()
    machine.connected()
    error = ConnectionLost("cut")
    first = machine.retrying(1, 0.2, error)
    assert first is not None
    assert (first.state, first.attempt, first.delay, first.error) == (S.RECONNECTING, 1, 0.2, error)
    assert str(first) == "reconnecting (attempt 1, retry in 0.2 s)"
    assert machine.retrying(2, 0.4).state is S.RECONNECTING  # type: ignore[union-attr]
    assert machine.retrying(3, 0.8).state is S.OFFLINE  # type: ignore[union-attr]
    # A reconnect attempt starting does not hide that we are offline.
    assert machine.connecting() is None
    assert machine.connected() is not None


def test_closed_and_failed_are_final() -> None:
    machine = ConnectionStateMachine()
    machine.failed(StreamNotFound("gone"))
    assert machine.status.state is S.FAILED
    assert machine.status.is_final
    assert machine.connected() is None
    assert machine.closed() is None
    other = ConnectionStateMachine()
    other.closed()
    assert other.retrying(1, 1.0) is None
    assert other.status.state is S.CLOSED


async def test_feed_yields_current_then_changes_then_ends() -> None:
    feed = StatusFeed()
    seen: list[ConnectionState] = []
    started = asyncio.Event()

    async def watch() -> None:
        async for status in feed.changes():
            seen.append(status.state)
            started.set()

    task = asyncio.create_task(watch())
    await started.wait()
    feed.connecting()
    feed.connected()
    feed.retrying(1, 0.1)
    feed.connected()
    feed.closed()
    feed.connected()  # after the end: nothing
    await asyncio.wait_for(task, 2)
    assert seen == [S.IDLE, S.CONNECTING, S.CONNECTED, S.RECONNECTING, S.CONNECTED, S.CLOSED]


async def test_wait_for() -> None:
    feed = StatusFeed()
    # Whether the waiter starts before or after the change, it sees CONNECTED.
    waiter = asyncio.create_task(feed.wait_for(S.CONNECTED))
    feed.connecting()
    feed.connected()
    assert (await asyncio.wait_for(waiter, 2)).state is S.CONNECTED
