"""Running the server: build the app, serve it with uvicorn, stop cleanly."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import uvicorn

from ._auth import AUDIENCE, CancelHook
from ._http import DurableStreamsApp, ServerConfig
from ._storage import MemoryStorage, SqliteStorage, Storage
from ._store import StreamStore
from ._ws import WebSocketConfig, WebSocketEndpoint

if TYPE_CHECKING:
    from ._auth import Authority

log = logging.getLogger("mock_server")

Wrap = Callable[[DurableStreamsApp], Any]
"""ASGI middleware around the app: takes it, returns the application to serve."""


@dataclass
class Settings:
    """Everything the command line can set."""

    host: str = "127.0.0.1"
    port: int = 4437
    data_dir: Path | None = None
    durability: Literal["normal", "full"] = "normal"
    long_poll_timeout: float = 30.0
    max_body_bytes: int = 16 * 1024 * 1024
    sse_max_duration: float = 60.0
    websocket: bool = True
    ws_ping_interval: float = 5.0
    ws_ping_timeout: float = 5.0
    ws_max_frame_bytes: int = 1024 * 1024
    ws_max_queued_frames: int = 256
    ws_max_queued_bytes: int = 1024 * 1024
    ws_slow_consumer_timeout: float = 10.0
    ws_frame_rate: float = 1000.0  # client frames a socket may send per second, sustained
    ws_frame_burst: int = 500  # ... and at once
    presence_grace: float = 3.0
    log_level: str = "info"
    chaos: bool = False  # fault middleware and its admin endpoint (/_chaos/...)
    fault_plan: Path | None = None  # a fault plan (.json/.yaml) applied from the start
    subscriptions: bool = False  # the reserved __ds subscription API (docs/subscriptions.md)
    # Access control (docs/security.md). The key: a secret file, DURABLE_AUTH_SECRET, or
    # for embedding ``auth_secret`` itself; and/or PEM public keys and a JWKS file.
    auth: bool = False
    auth_secret_file: Path | None = None
    auth_secret: bytes | None = field(default=None, repr=False)
    auth_public_key: list[Path] = field(default_factory=list)
    auth_jwks: Path | None = None
    auth_issuer: str | None = None
    auth_audience: str = AUDIENCE
    allow_origin: list[str] = field(default_factory=list)
    max_connections_per_ip: int = 256
    max_connections_per_subject: int = 64
    http_rate: float = 1000.0  # HTTP requests a second per token sub with --auth ...
    http_burst: int = 2000  # ... and how many at once; over it: 429 with Retry-After
    insecure: bool = False  # allow a non-loopback host without --auth
    authorize_cancel: CancelHook | None = None  # (claims, path, event) -> may it cancel?
    extra: dict[str, Any] = field(default_factory=dict)


def build_app(settings: Settings) -> DurableStreamsApp:
    """The ASGI application for ``settings`` (SQLite storage when a data dir is given)."""
    storage: Storage = (
        SqliteStorage(settings.data_dir, settings.durability)
        if settings.data_dir is not None
        else MemoryStorage()
    )
    config = ServerConfig(
        long_poll_timeout=settings.long_poll_timeout,
        max_body_bytes=settings.max_body_bytes,
        sse_max_duration=settings.sse_max_duration,
    )
    app = DurableStreamsApp(StreamStore(storage), config)
    try:
        app.authority = authority_of(settings)
    except BaseException:
        storage.close()
        raise
    if settings.websocket:
        app.websocket_handler = WebSocketEndpoint(
            app.store,
            WebSocketConfig(
                max_body_bytes=settings.max_body_bytes,
                max_queued_frames=settings.ws_max_queued_frames,
                max_queued_bytes=settings.ws_max_queued_bytes,
                slow_consumer_timeout=settings.ws_slow_consumer_timeout,
                frame_rate=settings.ws_frame_rate,
                frame_burst=settings.ws_frame_burst,
                presence_grace=settings.presence_grace,
                live_wait=settings.long_poll_timeout,
            ),
            app.shutting_down,
        )
        app.websocket_handler.authority = app.authority
    if settings.subscriptions:
        # Imported here: cryptography is loaded only by a server that signs webhooks.
        from ._subscriptions import SubscriptionManager
        from ._subscriptions_http import ControlApi
        from ._webhooks import SigningKey

        key = (
            SigningKey.in_directory(settings.data_dir)
            if settings.data_dir is not None
            else SigningKey.generate()
        )
        state = settings.data_dir / "subscriptions.json" if settings.data_dir is not None else None
        manager = SubscriptionManager(app.store, key, stopping=app.shutting_down, state_file=state)
        app.control_api = ControlApi(manager)
    return app


def authority_of(settings: Settings) -> Authority | None:
    """The access policy ``settings`` ask for (None without ``auth``); ``ValueError``
    for a key that cannot be used."""
    if not settings.auth:
        return None
    from ._auth import Authority, KeySet, read_secret

    secret = settings.auth_secret
    if secret is None:
        secret = read_secret(settings.auth_secret_file)
    keys = KeySet(secret=secret, public_keys=settings.auth_public_key, jwks=settings.auth_jwks)
    return Authority(
        keys,
        audience=settings.auth_audience,
        issuer=settings.auth_issuer,
        origins=settings.allow_origin,
        max_connections_per_ip=settings.max_connections_per_ip,
        max_connections_per_subject=settings.max_connections_per_subject,
        http_rate=settings.http_rate,
        http_burst=settings.http_burst,
        authorize_cancel=settings.authorize_cancel,
    )


def _start_subscriptions(app: DurableStreamsApp) -> None:
    """Wake what a restart left pending, once the loop runs."""
    from ._subscriptions_http import ControlApi

    if isinstance(app.control_api, ControlApi):
        asyncio.get_running_loop().call_soon(app.control_api.manager.resume)


async def _stop_subscriptions(app: DurableStreamsApp) -> None:
    """Cancel webhook deliveries and leases once the server has stopped."""
    from ._subscriptions_http import ControlApi

    if isinstance(app.control_api, ControlApi):
        await app.control_api.manager.aclose()


class _Server(uvicorn.Server):
    """uvicorn, but live reads end as soon as a stop is asked for."""

    def __init__(self, config: uvicorn.Config, app: DurableStreamsApp) -> None:
        super().__init__(config)
        self.durable_app = app

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.durable_app.begin_shutdown()
        super().handle_exit(sig, frame)


def _uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http="mock_server._http_protocol:BoundedHttpToolsProtocol",  # httptools + 431
        ws="mock_server._ws_protocol:BoundedWebSocketProtocol",  # closes that cannot hang
        lifespan="on",
        log_level=settings.log_level,
        access_log=False,  # our own request log line, at debug level
        timeout_graceful_shutdown=5,
        ws_ping_interval=settings.ws_ping_interval or None,
        ws_ping_timeout=settings.ws_ping_timeout or None,
        ws_max_size=settings.ws_max_frame_bytes,
        ws_per_message_deflate=False,
    )


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
    # and without it every response whose body is written apart from its head waits
    # for a delayed ACK (about 40 ms on Linux).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _announce(app: DurableStreamsApp, sock: socket.socket) -> None:
    """Write the URL into the data directory's lock file, for whoever finds it held."""
    storage = app.store.storage
    if isinstance(storage, SqliteStorage):
        storage.announce(url_of(sock))


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def run(settings: Settings, *, wrap: Wrap | None = None) -> None:
    """Serve until SIGINT/SIGTERM.

    ``wrap`` puts ASGI middleware around the app. ``settings.chaos`` and
    ``settings.fault_plan`` need the chaos middleware, which lives above this
    module: ``python -m mock_server`` passes ``mock_server.chaos.chaos_middleware``.
    Raises ``ValueError`` if they are set and ``wrap`` is not.
    """
    if (settings.chaos or settings.fault_plan is not None) and wrap is None:
        raise ValueError("chaos settings need wrap=mock_server.chaos.chaos_middleware(settings)")
    app = build_app(settings)  # takes the data directory's lock (DataDirInUse if held)
    try:
        sock = bind(settings.host, settings.port)
    except BaseException:
        app.store.storage.close()
        raise
    _announce(app, sock)
    config = _uvicorn_config(wrap(app) if wrap is not None else app, settings)
    config.load()  # import errors surface before the banner says we are up
    server = _Server(config, app)
    storage = f"sqlite at {settings.data_dir}" if settings.data_dir else "in memory"
    chaos = "; chaos admin at /_chaos/plan" if settings.chaos else ""
    chaos += "; --auth: bearer tokens required" if settings.auth else ""
    print(
        f"durable session server on {url_of(sock)} (streams {storage}{chaos}; Ctrl-C stops)",
        flush=True,
    )
    _start_subscriptions(app)
    try:
        await server.serve(sockets=[sock])
    finally:
        await _stop_subscriptions(app)


@dataclass
class RunningServer:
    """A server started by :func:`serve`: ``url`` is its base URL."""

    url: str
    app: DurableStreamsApp

    @property
    def store(self) -> StreamStore:
        return self.app.store


@asynccontextmanager
async def serve(
    *,
    data_dir: str | Path | None = None,
    long_poll_timeout: float = 1.0,
    host: str = "127.0.0.1",
    port: int = 0,
    wrap: Wrap | None = None,
    **overrides: Any,
) -> AsyncIterator[RunningServer]:
    """Run the server in this event loop on an ephemeral loopback port.

    Yields a ``RunningServer`` whose ``url`` is the base URL (streams at
    ``{url}/v1/stream/...``). ``wrap`` puts ASGI middleware around the app
    (``mock_server.chaos.serve_chaos`` passes its fault middleware). Other
    keyword arguments are :class:`Settings` fields. Stops the server, ending
    live reads, on exit.
    """
    settings = Settings(
        host=host,
        port=port,
        data_dir=Path(data_dir) if data_dir is not None else None,
        long_poll_timeout=long_poll_timeout,
        log_level="warning",
        **overrides,
    )
    app = build_app(settings)  # takes the data directory's lock (DataDirInUse if held)
    try:
        sock = bind(host, port)
    except BaseException:
        app.store.storage.close()
        raise
    _announce(app, sock)
    server = _Server(_uvicorn_config(wrap(app) if wrap is not None else app, settings), app)
    _start_subscriptions(app)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:  # uvicorn has no start event; it sets this flag
            if task.done():
                task.result()
                raise RuntimeError("server stopped before it started")
            await asyncio.sleep(0.005)
        yield RunningServer(url_of(sock), app)
    finally:
        app.begin_shutdown()
        server.should_exit = True
        try:
            await task
        finally:
            await _stop_subscriptions(app)
            sock.close()
            # The lifespan shutdown closed it already, unless uvicorn never got that far;
            # either way the data directory is free for the next server when we return.
            app.store.storage.close()
