"""Await a condition on state that other tasks change, without sleeping."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Changes:
    """Whoever changes the state calls :meth:`changed`; waiters re-check their condition."""

    def __init__(self) -> None:
        self._waiter: asyncio.Future[None] | None = None

    def changed(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Return once ``condition()`` holds; ``TimeoutError`` after ``timeout`` seconds
        (the timeout only bounds a failure)."""
        async with asyncio.timeout(timeout):
            while not condition():
                if self._waiter is None or self._waiter.done():
                    self._waiter = asyncio.get_running_loop().create_future()
                await asyncio.shield(self._waiter)
