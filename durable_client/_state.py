"""Connection state for a UI: the state machine (no I/O) and a feed of changes.

States, and what moves between them::

    idle ──► connecting ──► connected ◄──────────────┐
                 │              │                     │ a request succeeds
                 │              ▼ retryable failure   │
                 └────────► reconnecting(attempt, delay)
                                │ attempt >= offline_after
                                ▼
                             offline(attempt, delay)   (still retrying)

    any ──► failed   a fatal error (not found, offset gone, ...): no more retries
    any ──► closed   the session was closed by its owner, or its stream was closed

``closed`` and ``failed`` are final. ``idle`` is the state before anything
was attempted. A subscription and the publish queue of one session report
into the same machine: both use the same server link.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = ["ConnectionState", "ConnectionStateMachine", "ConnectionStatus", "StatusFeed"]


class ConnectionState(StrEnum):
    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    OFFLINE = "offline"
    CLOSED = "closed"
    FAILED = "failed"


_FINAL = frozenset({ConnectionState.CLOSED, ConnectionState.FAILED})


@dataclass(frozen=True)
class ConnectionStatus:
    """One connection state, with the details a UI shows.

    ``attempt`` counts consecutive failed attempts and ``delay`` is the wait
    before the next one (``reconnecting`` and ``offline``); ``error`` is the
    last error (``reconnecting``, ``offline``, ``failed``).
    """

    state: ConnectionState
    attempt: int = 0
    delay: float | None = None
    error: BaseException | None = field(default=None, compare=False)
    at: float = field(default_factory=time.monotonic, compare=False)

    @property
    def is_final(self) -> bool:
        """Whether no further change will follow (closed or failed)."""
        return self.state in _FINAL

    def __str__(self) -> str:
        if self.state in (ConnectionState.RECONNECTING, ConnectionState.OFFLINE):
            delay = f", retry in {self.delay:.1f} s" if self.delay is not None else ""
            return f"{self.state.value} (attempt {self.attempt}{delay})"
        if self.state is ConnectionState.FAILED and self.error is not None:
            return f"failed: {self.error}"
        return self.state.value


class ConnectionStateMachine:
    """Turns connection events into :class:`ConnectionStatus` values (no I/O).

    Each method returns the new status, or ``None`` when nothing changed.
    """

    def __init__(self, *, offline_after: int = 3) -> None:
        if offline_after < 1:
            raise ValueError("offline_after must be >= 1")
        self.offline_after = offline_after
        self.status = ConnectionStatus(ConnectionState.IDLE)

    def _move(self, status: ConnectionStatus) -> ConnectionStatus | None:
        if self.status.is_final:
            return None
        if status == self.status:
            return None
        self.status = status
        return status

    def connecting(self) -> ConnectionStatus | None:
        """An attempt starts. Ignored unless idle: a reconnect keeps showing
        ``reconnecting``, and a second reader does not make a live link look down."""
        if self.status.state is not ConnectionState.IDLE:
            return None
        return self._move(ConnectionStatus(ConnectionState.CONNECTING))

    def connected(self) -> ConnectionStatus | None:
        """A request got its answer: the link works."""
        return self._move(ConnectionStatus(ConnectionState.CONNECTED))

    def retrying(
        self, attempt: int, delay: float, error: BaseException | None = None
    ) -> ConnectionStatus | None:
        """The ``attempt``-th consecutive attempt failed; the next in ``delay`` seconds."""
        state = (
            ConnectionState.OFFLINE
            if attempt >= self.offline_after
            else ConnectionState.RECONNECTING
        )
        return self._move(ConnectionStatus(state, attempt=attempt, delay=delay, error=error))

    def failed(self, error: BaseException) -> ConnectionStatus | None:
        """A fatal error: retrying cannot help."""
        return self._move(ConnectionStatus(ConnectionState.FAILED, error=error))

    def closed(self) -> ConnectionStatus | None:
        """Closed on purpose (or the stream ended for good)."""
        return self._move(ConnectionStatus(ConnectionState.CLOSED))


class StatusFeed:
    """The current :class:`ConnectionStatus` plus an async stream of changes.

    Every :meth:`changes` iterator first yields the current status, then each
    change, and ends after a final state (closed or failed).
    """

    def __init__(self, *, offline_after: int = 3) -> None:
        self.machine = ConnectionStateMachine(offline_after=offline_after)
        self._listeners: set[asyncio.Queue[ConnectionStatus]] = set()

    @property
    def current(self) -> ConnectionStatus:
        return self.machine.status

    def _publish(self, status: ConnectionStatus | None) -> None:
        if status is None:
            return
        for queue in self._listeners:
            queue.put_nowait(status)

    def connecting(self) -> None:
        self._publish(self.machine.connecting())

    def connected(self) -> None:
        self._publish(self.machine.connected())

    def retrying(self, attempt: int, delay: float, error: BaseException | None = None) -> None:
        self._publish(self.machine.retrying(attempt, delay, error))

    def failed(self, error: BaseException) -> None:
        self._publish(self.machine.failed(error))

    def closed(self) -> None:
        self._publish(self.machine.closed())

    async def changes(self) -> AsyncIterator[ConnectionStatus]:
        """The current status, then every change, until a final state."""
        queue: asyncio.Queue[ConnectionStatus] = asyncio.Queue()
        self._listeners.add(queue)
        try:
            status = self.current
            yield status
            while not status.is_final:
                status = await queue.get()
                yield status
        finally:
            self._listeners.discard(queue)

    async def wait_for(self, *states: ConnectionState) -> ConnectionStatus:
        """Wait until the state is one of ``states`` (returns at once if it is)."""
        async for status in self.changes():
            if status.state in states:
                return status
        return self.current
