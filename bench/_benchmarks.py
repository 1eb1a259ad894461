"""The benchmarks. Each takes a :class:`Context` and returns result rows.

Every loop here is bounded in count and in time; every server runs in its own
process on loopback (see :mod:`bench._procs`); the load generator is this
process. docs/benchmarks.md explains what each one measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from durable_client import ConnectionState, RateLimited, SequenceGap
from durable_client.streams import AppendResult, DurableStream, IdempotentProducer, ProducerStamp
from durable_client.transports import WebSocketTransport

from ._clients import (
    create_stream,
    event_bytes,
    fill,
    http_client,
    new_name,
    read,
    session,
    websocket_transport,
)
from ._procs import NODE, OURS, Pinning, ServerProcess
from ._rawhttp import RawHttpClient
from ._report import RAW_HTTP, RAW_WS, SDK, SESSION, UPSTREAM, Better, Row
from ._stats import Dist, quantile
from ._wsclient import WsClient


@dataclass(frozen=True)
class Sizes:
    """How much each benchmark does; one preset per mode (smoke, quick, full)."""

    latency_seconds: float  # measured part of each latency case
    latency_warmup: float  # seconds of events at the start that are not counted
    single_rate: float  # events/s of the one-session case
    many_sessions: int
    many_rate: float  # events/s of each session in the many-sessions case
    append_seconds: float
    producer_events: int
    fanout: tuple[int, ...]
    fanout_events: int
    catchup_events: int
    catchup_runs: int
    resume_trials: int
    storm_clients: int
    memory_subscribers: int
    memory_events: int
    settle: float  # seconds for readers to connect or park, and for a server's memory to settle
    flood_round_trips: int  # bystander appends of each flood case (at FLOOD_BYSTANDER_RATE)


SIZES: dict[str, Sizes] = {
    "full": Sizes(
        latency_seconds=4.0,
        latency_warmup=1.0,
        single_rate=100.0,
        many_sessions=100,
        many_rate=2.0,
        append_seconds=2.0,
        producer_events=30_000,
        fanout=(1, 10, 100),
        fanout_events=2_000,
        catchup_events=100_000,
        catchup_runs=2,
        resume_trials=30,
        storm_clients=300,
        memory_subscribers=300,
        memory_events=100_000,
        settle=1.0,
        flood_round_trips=1_000,
    ),
    "quick": Sizes(
        latency_seconds=0.4,
        latency_warmup=0.15,
        single_rate=100.0,
        many_sessions=10,
        many_rate=10.0,
        append_seconds=0.3,
        producer_events=3_000,
        fanout=(1, 10, 100),
        fanout_events=60,
        catchup_events=5_000,
        catchup_runs=1,
        resume_trials=4,
        storm_clients=40,
        memory_subscribers=50,
        memory_events=10_000,
        settle=0.25,
        flood_round_trips=200,
    ),
    "smoke": Sizes(
        latency_seconds=0.15,
        latency_warmup=0.05,
        single_rate=40.0,
        many_sessions=2,
        many_rate=20.0,
        append_seconds=0.1,
        producer_events=500,
        fanout=(1, 3),
        fanout_events=30,
        catchup_events=1_000,
        catchup_runs=1,
        resume_trials=2,
        storm_clients=6,
        memory_subscribers=5,
        memory_events=1_000,
        settle=0.05,
        flood_round_trips=30,
    ),
}


#: No case of the full run takes a minute; a stuck one is cut off at this.
CASE_TIMEOUT = 300.0


@dataclass
class Context:
    """What every benchmark needs: the running servers, the sizes, what is missing."""

    sizes: Sizes
    servers: dict[str, ServerProcess]
    pinning: Pinning
    upstream: bool  # the upstream Python client is installed
    skipped: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    verbose: bool = True

    def url(self, server: str) -> str:
        return self.servers[server].url

    @property
    def server_kinds(self) -> list[str]:
        return [kind for kind in (OURS, NODE) if kind in self.servers]

    def say(self, text: str) -> None:
        if self.verbose:
            print(text, file=sys.stderr, flush=True)

    async def case(self, label: str, run: Callable[[], Awaitable[list[Row]]]) -> list[Row]:
        """Run one case (at most ``CASE_TIMEOUT`` seconds); a failure is
        reported and the others go on."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(CASE_TIMEOUT):
                rows = await run()
        except Exception as exc:
            message = f"{label}: {type(exc).__name__}: {exc}"
            self.failures.append(message)
            self.say(f"  FAILED {message}")
            return []
        shown = ", ".join(
            f"{r.metric} {r.dist.median:.4g} {r.unit}" for r in rows if math.isfinite(r.dist.median)
        )
        self.say(f"  {label}: {shown} ({time.perf_counter() - started:.1f} s)")
        return rows


def _row(
    bench: str,
    case: str,
    transport: str,
    server: str,
    client: str,
    metric: str,
    unit: str,
    better: Better,
    dist: Dist,
    **extra: float | str,
) -> Row:
    return Row(bench, case, transport, server, client, metric, unit, better, dist, dict(extra))


def _single(value: float) -> Dist:
    return Dist(value, None, value, value, 1)


async def _clients(stack: contextlib.AsyncExitStack, count: int) -> list[httpx.AsyncClient]:
    """One HTTP client per reader, as independent users have. (One shared
    client costs the load generator more than the readers do: httpx's pool
    does work in proportion to the connections in use on every request, so 100
    long-polls on one client keep a core busy.)"""
    return [await stack.enter_async_context(http_client(4)) for _ in range(count)]


async def _cancel(tasks: Sequence[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _raise_failed(tasks: Sequence[asyncio.Task[Any]]) -> None:
    for task in tasks:
        if task.done() and not task.cancelled() and (error := task.exception()) is not None:
            raise error


async def _until_all(
    events: Sequence[asyncio.Event], tasks: Sequence[asyncio.Task[Any]], timeout: float
) -> None:
    """Wait until every event is set; raise at once if one of ``tasks`` fails."""
    waiter = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in events)))
    running = set(tasks)
    try:
        async with asyncio.timeout(timeout):
            while not waiter.done():
                await asyncio.wait({waiter, *running}, return_when=asyncio.FIRST_COMPLETED)
                _raise_failed(list(running))
                running = {t for t in running if not t.done()}
    finally:
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)


# --------------------------------------------------------------------------- latency


#: Latency cases whose appends are made with the SDK rather than the bare
#: HTTP client: what an app sees end to end.
WS_SDK_APPENDS = "ws, SDK appends over ws"
SSE_SDK_APPENDS = "sse, SDK appends over http"


async def _latency_case(
    ctx: Context, server: str, client: str, transport: str, sessions: int, rate: float
) -> list[Row]:
    """Append-to-delivery latency: each session gets ``rate`` events/s, one
    event per append, and has one live reader; latency is the time from just
    before the append to the reader receiving the batch with that event.

    Appends are made with the bare HTTP client (one connection per session),
    so that the load generator's own HTTP cost neither adds to every sample
    nor caps the rate; the SDK's append cost is the append benchmark's. The
    ``*_SDK_APPENDS`` cases append with the SDK instead (over the socket for
    ``WS_SDK_APPENDS``).
    """
    sizes = ctx.sizes
    read_as = transport.split(",")[0]
    base = ctx.url(server)
    run = uuid.uuid4().hex[:20]
    names = [new_name("lat") for _ in range(sessions)]
    warm = math.ceil(rate * sizes.latency_warmup)
    total = warm + math.ceil(rate * sizes.latency_seconds)
    sent: list[list[float]] = [[] for _ in names]
    received = [0] * sessions
    samples: list[float] = []
    all_in = [asyncio.Event() for _ in names]
    async with (
        http_client(sessions + 8) as writer_http,
        contextlib.AsyncExitStack() as stack,
    ):
        reader_http = await _clients(stack, sessions)
        streams = await asyncio.gather(*(create_stream(base, n, writer_http) for n in names))
        appends: list[Callable[[bytes], Awaitable[Any]]] = []
        for name, stream in zip(names, streams, strict=True):
            if transport == WS_SDK_APPENDS:
                socket = websocket_transport(base, name, writer_http)
                stack.push_async_callback(socket.aclose)
                appends.append(functools.partial(_send_one, socket))
            elif transport == SSE_SDK_APPENDS:
                appends.append(stream.append)
            else:
                raw = await stack.enter_async_context(RawHttpClient(stream.url))
                appends.append(functools.partial(_post_one, raw))

        async def reader(k: int) -> None:
            got = sent[k]
            async for messages in read(client, read_as, base, names[k], reader_http[k]):
                now = time.perf_counter()
                for message in messages:
                    index = message["index"]
                    if index >= warm:
                        samples.append(now - got[index])
                received[k] += len(messages)
                if received[k] >= total:
                    all_in[k].set()

        async def writer(k: int) -> None:
            loop = asyncio.get_running_loop()
            append = appends[k]
            # Sessions start at evenly spread phases, as independent agents would.
            start = loop.time() + (k / sessions) / rate
            for i in range(total):
                delay = start + i / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                body = event_bytes(i, run)
                sent[k].append(time.perf_counter())
                await append(body)

        readers = [asyncio.create_task(reader(k)) for k in range(sessions)]
        try:
            # Let the readers connect; the warm-up covers the rest.
            await asyncio.sleep(min(0.2, sizes.settle))
            _raise_failed(readers)
            async with asyncio.timeout(sizes.latency_warmup + sizes.latency_seconds + 30):
                await asyncio.gather(*(writer(k) for k in range(sessions)))
            await _until_all(all_in, readers, 30)
        finally:
            await _cancel(readers)
    label = "1 session" if sessions == 1 else f"{sessions} sessions"
    case = f"{label} @ {rate:g} ev/s each"
    return [
        _row(
            "latency",
            case,
            transport,
            server,
            client,
            "append-to-delivery",
            "ms",
            "lower",
            Dist.of(samples, scale=1000),
        )
    ]


async def _post_one(raw: RawHttpClient, body: bytes) -> None:
    status = await raw.post(body)
    if status not in (200, 204):
        raise RuntimeError(f"append answered {status}")


async def _send_one(socket: WebSocketTransport, body: bytes) -> None:
    await socket.send_batch([body], stamp=None)


def _readers_for(ctx: Context, server: str, sessions: int) -> list[tuple[str, str]]:
    """(client, transport) pairs that read live from ``server``."""
    pairs = [(SDK, "sse"), (SDK, "long-poll")]
    if server == OURS:
        pairs.insert(0, (SDK, "ws"))
    if sessions == 1:
        # The client comparison, and what an app sees end to end.
        if ctx.upstream:
            pairs += [(UPSTREAM, "sse"), (UPSTREAM, "long-poll")]
        pairs.append((SDK, SSE_SDK_APPENDS))
        if server == OURS:
            pairs.append((SDK, WS_SDK_APPENDS))
    return pairs


async def bench_latency(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    sizes = ctx.sizes
    for sessions, rate in ((1, sizes.single_rate), (sizes.many_sessions, sizes.many_rate)):
        for server in ctx.server_kinds:
            for client, transport in _readers_for(ctx, server, sessions):

                async def case(
                    server: str = server,
                    client: str = client,
                    transport: str = transport,
                    sessions: int = sessions,
                    rate: float = rate,
                ) -> list[Row]:
                    return await _latency_case(ctx, server, client, transport, sessions, rate)

                rows += await ctx.case(
                    f"latency {sessions}x{rate:g}/s {transport} {server} {client}", case
                )
    return rows


# --------------------------------------------------------------------------- appends


async def _append_sequential(ctx: Context, server: str, client: str, transport: str) -> list[Row]:
    """One append at a time (one event each) for a fixed time: with the SDK, or
    with a bare client (whose round trip is mostly the server's own time)."""
    base = ctx.url(server)
    run = uuid.uuid4().hex[:20]
    name = new_name("seq")
    async with http_client(4) as http, contextlib.AsyncExitStack() as stack:
        stream = await create_stream(base, name, http)
        append: Callable[[bytes], Awaitable[Any]]
        if client == RAW_HTTP:
            raw = await stack.enter_async_context(RawHttpClient(stream.url))

            async def append(body: bytes) -> None:
                status = await raw.post(body)
                if status not in (200, 204):
                    raise RuntimeError(f"append answered {status}")

        elif client == RAW_WS:
            ws = await stack.enter_async_context(WsClient(base))

            async def append(body: bytes) -> None:
                await ws.append(name, json.loads(body))

        elif transport == "ws":
            socket = websocket_transport(base, name, http)
            stack.push_async_callback(socket.aclose)

            async def append(body: bytes) -> None:
                for _ in range(100):  # over the server's per-socket frame rate: back off
                    try:
                        await socket.send_batch([body], stamp=None)
                        return
                    except RateLimited as limited:
                        await asyncio.sleep(limited.retry_after or 0.01)
                raise RuntimeError("append refused 100 times in a row for the rate")

        else:
            append = stream.append
        for i in range(50):  # warm-up: connections, caches
            await append(event_bytes(i, run))
        rtts: list[float] = []
        started = time.perf_counter()
        deadline = started + ctx.sizes.append_seconds
        while time.perf_counter() < deadline and len(rtts) < 1_000_000:
            body = event_bytes(len(rtts), run)
            t = time.perf_counter()
            await append(body)
            rtts.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - started
    return [
        _row(
            "append",
            "one at a time",
            transport,
            server,
            client,
            "append round trip",
            "ms",
            "lower",
            Dist.of(rtts, scale=1000),
            **{"appended ev/s": len(rtts) / elapsed},
        )
    ]


class _CountingSink:
    """A producer's sink (a stream or a transport), counting requests and refusals."""

    def __init__(self, sink: DurableStream | WebSocketTransport) -> None:
        self.sink = sink
        self.requests = 0
        self.gaps = 0

    @property
    def url(self) -> str:
        return self.sink.url

    async def send_batch(
        self, items: Sequence[bytes], *, stamp: ProducerStamp | None, close: bool = False
    ) -> AppendResult:
        self.requests += 1
        try:
            return await self.sink.send_batch(items, stamp=stamp, close=close)
        except SequenceGap:
            self.gaps += 1
            raise


async def _append_producer(ctx: Context, server: str, transport: str, in_flight: int) -> list[Row]:
    """The SDK's IdempotentProducer (batched, pipelined), over HTTP or our
    WebSocket: events arrive 50 at a time as fast as the producer takes them;
    the rate counts until all are acknowledged. Also counts the requests and
    the 409 sequence-gap refusals (pipelined requests that overtook each other)."""
    base = ctx.url(server)
    run = uuid.uuid4().hex[:20]
    total = ctx.sizes.producer_events
    name = new_name("prod")
    async with http_client(8) as http, contextlib.AsyncExitStack() as stack:
        stream = await create_stream(base, name, http)
        if transport == "ws":
            socket = websocket_transport(base, name, http)
            stack.push_async_callback(socket.aclose)
            sink = _CountingSink(socket)
        else:
            sink = _CountingSink(stream)
        async with IdempotentProducer(
            sink, f"bench-{run}", linger=0.0, max_in_flight=in_flight
        ) as producer:
            for i in range(100):
                producer.append(event_bytes(i, run))
            await producer.flush()
            sink.requests = sink.gaps = 0
            started = time.perf_counter()
            async with asyncio.timeout(120):
                pending: list[asyncio.Future[Any]] = []
                for chunk in range(0, total, 50):
                    for i in range(chunk, min(total, chunk + 50)):
                        last = producer.append(event_bytes(i, run))
                    pending.append(last)
                    if len(pending) > 40:  # keep at most ~2000 events queued
                        await pending.pop(0)
                    else:
                        await asyncio.sleep(0)
                await producer.flush()
            elapsed = time.perf_counter() - started
    default = " (the default)" if in_flight == 5 else ""
    return [
        _row(
            "append",
            f"batched producer, {in_flight} in flight{default}",
            transport,
            server,
            SDK,
            "appended",
            "ev/s",
            "higher",
            _single(total / elapsed),
            **{"requests": float(sink.requests), "409 gap refusals": float(sink.gaps)},
        )
    ]


async def bench_append(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    for server in ctx.server_kinds:
        pairs = [(RAW_HTTP, "http"), (SDK, "http")]
        if server == OURS:
            pairs += [(RAW_WS, "ws"), (SDK, "ws")]
        for client, transport in pairs:

            async def sequential(
                server: str = server, client: str = client, transport: str = transport
            ) -> list[Row]:
                return await _append_sequential(ctx, server, client, transport)

            rows += await ctx.case(
                f"append one-at-a-time {transport} {server} {client}", sequential
            )
        producers = [("http", 5), ("http", 1)]
        if server == OURS:
            producers.append(("ws", 5))
        for transport, in_flight in producers:

            async def producer(
                server: str = server, transport: str = transport, in_flight: int = in_flight
            ) -> list[Row]:
                return await _append_producer(ctx, server, transport, in_flight)

            rows += await ctx.case(
                f"append producer {transport} {in_flight} in flight {server}", producer
            )
    return rows


# --------------------------------------------------------------------------- fan-out


async def _fanout_case(
    ctx: Context, server: str, client: str, transport: str, subscribers: int
) -> list[Row]:
    """``subscribers`` live readers on one session; a producer appends the
    events as fast as it can; the rate is deliveries (events x readers) over
    the time from the first append until the last reader has them all."""
    base = ctx.url(server)
    run = uuid.uuid4().hex[:20]
    total = ctx.sizes.fanout_events
    name = new_name("fan")
    counts = [0] * subscribers
    ready = [asyncio.Event() for _ in range(subscribers)]
    done = [asyncio.Event() for _ in range(subscribers)]
    async with http_client(8) as writer_http, contextlib.AsyncExitStack() as stack:
        reader_http = await _clients(stack, subscribers)
        stream = await create_stream(base, name, writer_http)

        async def reader(k: int) -> None:
            async for messages in read(client, transport, base, name, reader_http[k]):
                ready[k].set()
                counts[k] += len(messages)
                if counts[k] >= total:
                    done[k].set()

        readers = [asyncio.create_task(reader(k)) for k in range(subscribers)]
        try:
            await _until_all(ready, readers, 30)
            started = time.perf_counter()
            # One request in flight: pipelined ones overtake each other and
            # are refused (see the append benchmark), which slows the writer.
            async with IdempotentProducer(
                stream, f"bench-{run}", linger=0.0, max_in_flight=1
            ) as producer:
                async with asyncio.timeout(120):
                    pending: list[asyncio.Future[Any]] = []
                    for chunk in range(0, total, 10):
                        for i in range(chunk, min(total, chunk + 10)):
                            last = producer.append(event_bytes(i, run))
                        pending.append(last)
                        if len(pending) > 20:
                            await pending.pop(0)
                        else:
                            await asyncio.sleep(0)
                    await producer.flush()
                appended = time.perf_counter() - started
            await _until_all(done, readers, 120)
            elapsed = time.perf_counter() - started
        finally:
            await _cancel(readers)
    return [
        _row(
            "fan-out",
            f"{subscribers} subscriber{'s' if subscribers > 1 else ''}",
            transport,
            server,
            client,
            "delivered",
            "ev/s",
            "higher",
            _single(subscribers * total / elapsed),
            **{"appended ev/s": total / appended},
        )
    ]


async def bench_fanout(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    for subscribers in ctx.sizes.fanout:
        for server in ctx.server_kinds:
            pairs = [(SDK, "sse")]
            if server == OURS:
                pairs.insert(0, (SDK, "ws"))
            for client, transport in pairs:

                async def case(
                    server: str = server,
                    client: str = client,
                    transport: str = transport,
                    subscribers: int = subscribers,
                ) -> list[Row]:
                    return await _fanout_case(ctx, server, client, transport, subscribers)

                rows += await ctx.case(f"fan-out {subscribers} {transport} {server} {client}", case)
    return rows


# --------------------------------------------------------------------------- catch-up


async def _catchup_read(
    client: str, transport: str, base: str, name: str, total: int, limit: int | None = None
) -> float:
    """Seconds to read ``total`` events of ``name`` from the beginning (or only
    the first ``limit`` of them, for a warm-up)."""
    total = min(total, limit or total)
    async with http_client(4) as http:
        started = time.perf_counter()
        count = 0
        async with asyncio.timeout(300):
            if client == SESSION:
                async with (
                    session(base, name, http, transport) as reader,
                    reader.subscribe("beginning") as events,
                ):
                    async for _ in events:
                        count += 1
                        if count >= total:
                            break
            else:
                async for messages in read(client, transport, base, name, http, live=False):
                    count += len(messages)
                    if count >= total:
                        break
        elapsed = time.perf_counter() - started
    if count < total:
        raise RuntimeError(f"{client} read {count} of {total} events")
    return elapsed


async def bench_catchup(ctx: Context) -> list[Row]:
    """Replay a session of ``catchup_events`` from the start, as fast as each client reads."""
    rows: list[Row] = []
    total = ctx.sizes.catchup_events
    for server in ctx.server_kinds:
        base = ctx.url(server)
        name = new_name("catchup")
        run = uuid.uuid4().hex[:20]
        async with http_client(2) as http:
            stream = await create_stream(base, name, http)
            await fill(stream, total, run)
        # A Session over HTTP catches up over SSE (one connection from the start).
        readers = [(SDK, "http"), (SESSION, "sse")]
        if ctx.upstream:
            readers.append((UPSTREAM, "http"))
        if server == OURS:
            readers += [(SDK, "ws"), (SESSION, "ws")]
        for client, transport in readers:

            async def case(
                server: str = server,
                client: str = client,
                transport: str = transport,
                name: str = name,
            ) -> list[Row]:
                base = ctx.url(server)
                # Warm-up: code paths, caches, and the server's first read of the stream.
                await _catchup_read(
                    client, transport, base, name, total, limit=min(10_000, total // 5 + 1)
                )
                seconds = [
                    await _catchup_read(client, transport, base, name, total)
                    for _ in range(ctx.sizes.catchup_runs)
                ]
                return [
                    _row(
                        "catch-up",
                        f"{total:,} events from the start",
                        transport,
                        server,
                        client,
                        "replayed",
                        "ev/s",
                        "higher",
                        Dist.of([total / s for s in seconds]),
                    )
                ]

            rows += await ctx.case(f"catch-up {transport} {server} {client}", case)
    return rows


# --------------------------------------------------------------------------- resume


@dataclass
class _Follower:
    """A live Session reader: when each event index arrived, and the retry delays."""

    arrivals: dict[int, float] = field(default_factory=dict)
    delays: list[float] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def got(self, index: int) -> None:
        self.arrivals.setdefault(index, time.perf_counter())
        self.changed.set()

    async def wait_for(self, index: int, timeout: float) -> float:
        async with asyncio.timeout(timeout):
            while index not in self.arrivals:
                self.changed.clear()
                await self.changed.wait()
        return self.arrivals[index]


async def _follow(
    follower: _Follower, transport: str, base: str, name: str, http: Any, seed: int
) -> None:
    """Follow ``name`` with a Session until cancelled; it resumes after every
    reset by itself. The jitter is seeded, so each server sees the same delays."""
    async with session(base, name, http, transport, rng=random.Random(seed)) as reader:

        async def watch() -> None:
            async for status in reader.status_changes():
                if status.state is ConnectionState.CONNECTED:
                    follower.connected.set()
                elif status.delay is not None:
                    follower.delays.append(status.delay)

        watcher = asyncio.create_task(watch())
        try:
            async with reader.subscribe("beginning") as events:
                async for item in events:
                    index = getattr(item, "index", None)
                    if isinstance(index, int):
                        follower.got(index)
        finally:
            await _cancel([watcher])


async def _resume_case(ctx: Context, server: str, transport: str, trials: int) -> list[Row]:
    """Reset the reader's connection (a TCP RST from a proxy), append one event
    straight to the server, and time until the reader has it."""
    from mock_server.chaos.proxy import ChaosProxy

    base = ctx.url(server)
    run = uuid.uuid4().hex[:20]
    name = new_name("resume")
    resumes: list[float] = []
    delays: list[float] = []
    async with (
        ChaosProxy(base) as proxy,
        http_client(4) as writer_http,
        http_client(4) as reader_http,
    ):
        stream = await create_stream(base, name, writer_http)
        follower = _Follower()
        task = asyncio.create_task(_follow(follower, transport, proxy.url, name, reader_http, 7))
        try:
            await stream.append(event_bytes(0, run))
            await follower.wait_for(0, 10)
            for k in range(1, trials + 1):
                # Let the reader park its next live request (long-poll re-polls
                # after each answer); a benchmark may settle, a test may not.
                await asyncio.sleep(min(0.1, ctx.sizes.settle))
                _raise_failed([task])
                before = len(follower.delays)
                reset_at = time.perf_counter()
                proxy.reset_all()
                await stream.append(event_bytes(k, run))
                arrived = await follower.wait_for(k, 15)
                resumes.append(arrived - reset_at)
                delays.append(sum(follower.delays[before:]))
        finally:
            await _cancel([task])
    return [
        _row(
            "resume",
            "connection reset, then 1 event",
            transport,
            server,
            SESSION,
            "reset to first missed event",
            "ms",
            "lower",
            Dist.of(resumes, scale=1000),
            **{
                "retry delay p50 ms": Dist.of(delays, scale=1000).median,
                "resume minus delay p50 ms": Dist.of(
                    [r - d for r, d in zip(resumes, delays, strict=True)], scale=1000
                ).median,
            },
        )
    ]


def _live_transports(server: str) -> list[str]:
    return ["ws", "sse", "long-poll"] if server == OURS else ["sse", "long-poll"]


async def bench_resume(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    for server in ctx.server_kinds:
        for transport in _live_transports(server):

            async def case(server: str = server, transport: str = transport) -> list[Row]:
                return await _resume_case(ctx, server, transport, ctx.sizes.resume_trials)

            rows += await ctx.case(f"resume {transport} {server} session", case)
    if ctx.upstream:
        ctx.skipped.append(
            "resume and storm with the upstream client: durable-streams 0.1.0 does not reconnect "
            "by itself (only an on_error hook), so there is nothing of its own to time"
        )
    return rows


# --------------------------------------------------------------------------- storm


async def _storm_case(ctx: Context, server: str, transport: str, clients: int) -> list[Row]:
    """``clients`` live Session readers (10 per session) are all reset at once;
    one event is appended to every session; how long until each reader has it,
    and how spread out the reconnects are (when the proxy accepted them)."""
    from mock_server.chaos.proxy import ChaosProxy

    base = ctx.url(server)
    run = uuid.uuid4().hex[:20]
    per_session = 10
    names = [new_name("storm") for _ in range(max(1, clients // per_session))]
    async with (
        ChaosProxy(base) as proxy,
        http_client(len(names) + 4) as writer_http,
        contextlib.AsyncExitStack() as stack,
    ):
        reader_http = await _clients(stack, clients)
        streams = await asyncio.gather(*(create_stream(base, n, writer_http) for n in names))
        followers = [_Follower() for _ in range(clients)]
        tasks = [
            asyncio.create_task(
                _follow(f, transport, proxy.url, names[k % len(names)], reader_http[k], k)
            )
            for k, f in enumerate(followers)
        ]
        try:
            await _until_all([f.connected for f in followers], tasks, 60)
            await asyncio.sleep(min(0.3, ctx.sizes.settle))  # every reader parked
            _raise_failed(tasks)
            reset_mono = time.monotonic()
            reset_at = time.perf_counter()
            cut = proxy.reset_all()
            await asyncio.gather(*(s.append(event_bytes(1, run)) for s in streams))
            arrivals = await asyncio.gather(*(f.wait_for(1, 60) for f in followers))
        finally:
            await _cancel(tasks)
        reconnects = sorted(
            c.opened_at - reset_mono for c in proxy.connections if c.opened_at >= reset_mono
        )
    back = [a - reset_at for a in arrivals]
    extra: dict[str, float | str] = {
        "all back ms": max(back) * 1000,
        "connections cut": float(cut),
        "reconnects": float(len(reconnects)),
        # When the reconnects reached the server, from the reset: how spread out.
        "reconnect p10-p90 ms": (
            f"{quantile(reconnects, 0.1) * 1000:.0f}-{quantile(reconnects, 0.9) * 1000:.0f}"
        ),
        "last reconnect ms": max(reconnects, default=math.nan) * 1000,
    }
    return [
        _row(
            "storm",
            f"{clients} clients reset at once",
            transport,
            server,
            SESSION,
            "back and caught up",
            "ms",
            "lower",
            Dist.of(back, scale=1000),
            **extra,
        )
    ]


async def bench_storm(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    for server in ctx.server_kinds:
        for transport in _live_transports(server):
            if transport == "long-poll":
                continue  # a storm of parked long-polls is the SSE case, minus the stream

            async def case(server: str = server, transport: str = transport) -> list[Row]:
                return await _storm_case(ctx, server, transport, ctx.sizes.storm_clients)

            rows += await ctx.case(f"storm {transport} {server} session", case)
    return rows


# --------------------------------------------------------------------------- memory


async def _settled_rss(server: ServerProcess, seconds: float) -> int:
    """RSS after ``seconds`` without load (allocators and GC catch up)."""
    await asyncio.sleep(seconds)
    return server.rss_bytes()


async def _memory_subscribers(
    ctx: Context, server: ServerProcess, client: str, transport: str
) -> list[Row]:
    """RSS of a fresh server before and after ``memory_subscribers`` idle live readers."""
    count = ctx.sizes.memory_subscribers
    settle = ctx.sizes.settle
    async with http_client(count + 8) as http:
        name = new_name("mem")
        await create_stream(server.url, name, http)
        # Two readers first, so that the baseline has the code paths loaded.
        await _idle_readers(server.url, name, client, transport, http, 2, None, settle)
        baseline = await _settled_rss(server, settle)
        after = await _idle_readers(
            server.url, name, client, transport, http, count, server, settle
        )
    return [
        _row(
            "memory",
            "idle live subscriber",
            transport,
            server.kind,
            client,
            "server memory per subscriber",
            "KiB",
            "lower",
            _single((after - baseline) / count / 1024),
            **{"subscribers": float(count)},
        )
    ]


async def _idle_readers(
    base: str,
    name: str,
    client: str,
    transport: str,
    http: Any,
    count: int,
    server: ServerProcess | None,
    settle: float,
) -> int:
    """Open ``count`` idle readers, measure the server's RSS, close them."""
    ready = [asyncio.Event() for _ in range(count)]

    async def reader(k: int) -> None:
        async for _ in read(client, transport, base, name, http):
            ready[k].set()

    tasks = [asyncio.create_task(reader(k)) for k in range(count)]
    try:
        if transport == "long-poll":
            # A parked long-poll answers nothing until data comes: give them time.
            await asyncio.sleep(settle)
        else:
            await _until_all(ready, tasks, 30)
        _raise_failed(tasks)
        return await _settled_rss(server, settle) if server is not None else 0
    finally:
        await _cancel(tasks)


async def _memory_events(ctx: Context, server: ServerProcess) -> list[Row]:
    """RSS of a fresh server before and after storing ``memory_events`` events."""
    count = ctx.sizes.memory_events
    settle = ctx.sizes.settle
    run = uuid.uuid4().hex[:20]
    async with http_client(2) as http:
        warm = await create_stream(server.url, new_name("memwarm"), http)
        await fill(warm, 1000, run)
        baseline = await _settled_rss(server, settle)
        stream = await create_stream(server.url, new_name("mem"), http)
        await fill(stream, count, run)
        after = await _settled_rss(server, settle)
    payload = len(event_bytes(count // 2, run))
    return [
        _row(
            "memory",
            "stored event",
            "http",
            server.kind,
            SDK,
            "server memory per event",
            "bytes",
            "lower",
            _single((after - baseline) / count),
            **{"event JSON bytes": float(payload), "events": float(count)},
        )
    ]


async def bench_memory(ctx: Context) -> list[Row]:
    """Each measurement on a fresh server process of its own (memory freed by an
    earlier measurement would hide the next one's growth). The processes start
    together, up front, and each stops right after its measurement."""
    cases: list[tuple[str, str, str]] = []  # (server kind, client, transport or "events")
    for kind in ctx.server_kinds:
        pairs = [(SDK, "sse"), (SDK, "long-poll")]
        if kind == OURS:
            pairs.insert(0, (SDK, "ws"))
        cases += [(kind, client, transport) for client, transport in pairs]
        cases.append((kind, SDK, "events"))
    fresh = [ServerProcess(kind, ctx.pinning) for kind, _, _ in cases]
    stopping: list[asyncio.Future[None]] = []
    rows: list[Row] = []
    try:
        await asyncio.gather(*(asyncio.to_thread(server.start) for server in fresh))
        for server, (kind, client, transport) in zip(fresh, cases, strict=True):

            async def case(
                server: ServerProcess = server, client: str = client, transport: str = transport
            ) -> list[Row]:
                if transport == "events":
                    return await _memory_events(ctx, server)
                return await _memory_subscribers(ctx, server, client, transport)

            rows += await ctx.case(f"memory {transport} {kind}", case)
            # Stop it in the background: an idle process stopping costs the next
            # measurement nothing, and waiting for it would.
            stopping.append(asyncio.ensure_future(asyncio.to_thread(server.stop)))
    finally:
        await asyncio.gather(*stopping, return_exceptions=True)
        await asyncio.gather(*(asyncio.to_thread(server.stop) for server in fresh))
    return rows


# --------------------------------------------------------------------------- flood

#: Appends a second of the bystander: a busy chat client, far under the server's
#: per-socket rate limit (mock_server._ws.FRAME_RATE), as every real client is.
FLOOD_BYSTANDER_RATE = 200.0


async def _bystander_round_trips(ws: WsClient, name: str, count: int, run: str) -> list[float]:
    """``count`` appends, one at a time at ``FLOOD_BYSTANDER_RATE``: each round trip."""
    rtts: list[float] = []
    next_at = time.perf_counter()
    for i in range(count):
        next_at += 1.0 / FLOOD_BYSTANDER_RATE
        t = time.perf_counter()
        await ws.append(name, json.loads(event_bytes(i, run)))
        rtts.append(time.perf_counter() - t)
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    return rtts


async def _flood_case(ctx: Context) -> list[Row]:
    """A bystander's append round trips on its own socket, first alone, then while
    another socket floods the server (``bench._flooder``: a separate process that
    sends small pings as fast as the server takes them and reconnects whenever it
    is closed), in the same run on the same server."""
    base = ctx.url(OURS)
    run = uuid.uuid4().hex[:20]
    name = new_name("flood")
    count = ctx.sizes.flood_round_trips
    ws_url = base.replace("http://", "ws://", 1) + "/v1/ws"
    async with http_client(2) as http, WsClient(base) as ws:
        await create_stream(base, name, http)
        for i in range(50):  # warm-up
            await ws.append(name, json.loads(event_bytes(i, run)))
        quiet = await _bystander_round_trips(ws, name, count, run)
        flooder = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench._flooder",
            ws_url,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert flooder.stdin is not None
        assert flooder.stdout is not None
        try:
            async with asyncio.timeout(30):
                ready = await flooder.stdout.readline()
            if ready.strip() != b"ready":
                raise RuntimeError(f"the flooder did not start: {ready!r}")
            flooded = await _bystander_round_trips(ws, name, count, run)
            flooder.stdin.close()
            async with asyncio.timeout(30):
                counts = json.loads(await flooder.stdout.readline())
                await flooder.wait()
        finally:
            if flooder.returncode is None:
                flooder.kill()  # by its handle: the process this case started
                await flooder.wait()
    seconds = counts["seconds"]
    return [
        _row(
            "flood",
            "bystander alone",
            "ws",
            OURS,
            RAW_WS,
            "append round trip",
            "ms",
            "lower",
            Dist.of(quiet, scale=1000),
        ),
        _row(
            "flood",
            "bystander while another socket floods",
            "ws",
            OURS,
            RAW_WS,
            "append round trip",
            "ms",
            "lower",
            Dist.of(flooded, scale=1000),
            **{
                "flood frames/s": counts["sent"] / seconds,
                "answered/s": counts["pongs"] / seconds,
                "429s": float(counts["rate_limited"]),
                "4029 closes": float(counts["closes"].get("4029", 0)),
            },
        ),
    ]


async def bench_flood(ctx: Context) -> list[Row]:
    """Fairness: a bystander's round trip beside a flooding socket (ours only: WebSocket)."""
    if OURS not in ctx.servers:
        return []
    return await ctx.case("flood bystander ws ours", lambda: _flood_case(ctx))


BENCHMARKS: dict[str, Callable[[Context], Awaitable[list[Row]]]] = {
    "latency": bench_latency,
    "append": bench_append,
    "fanout": bench_fanout,
    "catchup": bench_catchup,
    "resume": bench_resume,
    "storm": bench_storm,
    "memory": bench_memory,
    "flood": bench_flood,
}

__all__ = ["BENCHMARKS", "SIZES", "Context", "Sizes"]
