"""Awaiting a condition that another task changes, for tests with no event to await."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``condition()`` holds; the timeout only bounds a failure."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - state lives in another task, no event
            await asyncio.sleep(0.005)
