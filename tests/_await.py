"""Awaiting what another task or process does: a condition with no event to await
(``until``), or a child process's end (``finished``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``condition()`` holds; the timeout only bounds a failure."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - state lives in another task, no event
            await asyncio.sleep(0.005)


async def finished(proc: asyncio.subprocess.Process, timeout: float = 60) -> tuple[bytes, bytes]:
    """A child process's (stdout, stderr) once it exits; killed, by its handle, if it
    is still running after ``timeout`` (the timeout only bounds a failure)."""
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return out or b"", err or b""
