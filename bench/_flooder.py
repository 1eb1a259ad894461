"""``python -m bench._flooder WS_URL``: one hostile socket that floods ``/v1/ws``.

Sends small ``ping`` frames as fast as the server takes them, reads what comes
back (so the server's answers never back up), and when the server closes the
socket (4029: it did not back off) connects again at once and goes on, as a
hostile client would. Prints ``ready`` once the first socket is open, and a JSON
line of counts when its stdin closes (the bench closes it to stop the flood).
A process of its own (at a lower priority), so the flood costs the load
generator's event loop nothing. Bounded: it stops after ``MAX_SECONDS`` whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
import time

import websockets
from websockets.asyncio.client import ClientConnection

MAX_SECONDS = 300.0
FRAME = '{"op":"ping"}'
BATCH = 64  # frames between yields to this process's own loop


class Counts:
    def __init__(self) -> None:
        self.sent = 0
        self.pongs = 0
        self.rate_limited = 0
        self.closes: dict[str, int] = {}
        self.started = time.perf_counter()


async def _read(ws: ClientConnection, counts: Counts) -> None:
    with contextlib.suppress(websockets.ConnectionClosed):
        async for raw in ws:
            frame = json.loads(raw)
            if frame.get("type") == "pong":
                counts.pongs += 1
            elif frame.get("status") == 429:
                counts.rate_limited += 1


async def _one_socket(url: str, counts: Counts, ready: asyncio.Event) -> None:
    async with websockets.connect(
        url, max_size=None, max_queue=None, compression=None, ping_interval=None
    ) as ws:
        ready.set()
        reader = asyncio.create_task(_read(ws, counts))
        try:
            while True:
                for _ in range(BATCH):
                    await ws.send(FRAME)
                    counts.sent += 1
                await asyncio.sleep(0)
        except websockets.ConnectionClosed as closed:
            code = str(closed.rcvd.code) if closed.rcvd is not None else "none"
            counts.closes[code] = counts.closes.get(code, 0) + 1
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def flood(url: str) -> Counts:
    counts = Counts()
    ready = asyncio.Event()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def wait_for_stdin() -> None:
        sys.stdin.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait_for_stdin, daemon=True).start()

    async def keep_flooding() -> None:
        while True:
            with contextlib.suppress(OSError, websockets.InvalidHandshake):
                await _one_socket(url, counts, ready)

    flooding = asyncio.create_task(keep_flooding())
    await ready.wait()
    print("ready", flush=True)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(MAX_SECONDS):
            await stop.wait()
    flooding.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await flooding
    return counts


def main() -> None:
    # It shares the load generator's core(s) with the bystander's client: at a
    # lower priority, the bystander's wake-ups are not queued behind the flood,
    # which then measures the server's fairness, not the scheduler's.
    os.nice(10)
    counts = asyncio.run(flood(sys.argv[1]))
    elapsed = time.perf_counter() - counts.started
    print(
        json.dumps(
            {
                "sent": counts.sent,
                "pongs": counts.pongs,
                "rate_limited": counts.rate_limited,
                "closes": counts.closes,
                "seconds": elapsed,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
