"""Command line: ``python -m mock_server [--host H] [--port P] [--data-dir DIR] ...``."""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import logging
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import NoReturn

from ._server import Settings, run
from ._storage import DataDirInUse

# The name the user typed: the console script, or the module.
PROG = "durable-server" if Path(sys.argv[0]).name == "durable-server" else "python -m mock_server"


class _Parser(argparse.ArgumentParser):
    """argparse, with every error on one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see --help)")


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = _Parser(
        prog=PROG,
        description="Durable Streams session server (in memory, or SQLite with --data-dir).",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, default=4437, help="port (default 4437; 0 picks a free one)"
    )
    parser.add_argument("--data-dir", type=Path, help="keep streams in SQLite in this directory")
    parser.add_argument(
        "--durability",
        choices=["normal", "full"],
        default="normal",
        help="SQLite sync: 'normal' survives a process crash, 'full' also power loss",
    )
    parser.add_argument(
        "--long-poll-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a long-poll waits before 204 (default 30)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=16 * 1024 * 1024,
        help="largest accepted request body; larger gets 413 (default 16 MiB)",
    )
    parser.add_argument(
        "--sse-max-duration",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="close SSE responses after this long; clients resume (default 60)",
    )
    parser.add_argument(
        "--no-websocket",
        action="store_true",
        help="serve HTTP only (clients fall back to SSE / long-poll)",
    )
    parser.add_argument(
        "--ws-ping-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="WebSocket keepalive ping interval (default 5; 0 disables)",
    )
    parser.add_argument(
        "--ws-ping-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="close a WebSocket whose pong is this late (default 5)",
    )
    parser.add_argument(
        "--ws-slow-consumer-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="close a WebSocket (4008), or reset an HTTP response, that takes nothing"
        " for this long (default 10)",
    )
    parser.add_argument(
        "--ws-max-queued-bytes",
        type=int,
        default=1024 * 1024,
        metavar="BYTES",
        help="data bytes queued per WebSocket before delivery waits (default 1 MiB)",
    )
    parser.add_argument(
        "--ws-frame-rate",
        type=float,
        default=1000.0,
        metavar="PER_SECOND",
        help="client frames per second per WebSocket; more get 429 (default 1000)",
    )
    parser.add_argument(
        "--ws-frame-burst",
        type=int,
        default=500,
        metavar="FRAMES",
        help="client frames a WebSocket may send at once (default 500)",
    )
    parser.add_argument(
        "--presence-grace",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="a vanished client leaves presence after this (default 3)",
    )
    parser.add_argument(
        "--chaos",
        action="store_true",
        help="enable fault injection and its admin endpoint /_chaos/plan (for tests only)",
    )
    parser.add_argument(
        "--fault-plan",
        type=Path,
        metavar="FILE",
        help="apply this fault plan (.json, .yaml) from the start; see docs/chaos.md",
    )
    parser.add_argument(
        "--subscriptions",
        action="store_true",
        help="serve the reserved __ds subscription API: webhooks (outbound HTTP) and"
        " pull-wake; see docs/subscriptions.md",
    )
    auth = parser.add_argument_group("access control (docs/security.md)")
    auth.add_argument(
        "--auth", action="store_true", help="require a bearer token (JWT) on every request"
    )
    auth.add_argument(
        "--auth-secret-file",
        type=Path,
        metavar="FILE",
        help="HS256 secret (>= 32 bytes); or set DURABLE_AUTH_SECRET",
    )
    auth.add_argument(
        "--auth-public-key",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="PEM public key (RS256, ES256, EdDSA) tokens may be signed for; repeatable",
    )
    auth.add_argument(
        "--auth-jwks", type=Path, metavar="FILE", help="JWKS file, read again when it changes"
    )
    auth.add_argument("--auth-issuer", metavar="ISS", help="require this iss claim")
    auth.add_argument(
        "--auth-audience",
        default="durable-sessions",
        metavar="AUD",
        help="require this aud claim (default durable-sessions)",
    )
    auth.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="browser origin allowed with --auth (exact, e.g. https://chat.example); repeatable",
    )
    auth.add_argument(
        "--max-connections-per-ip",
        type=int,
        default=256,
        metavar="N",
        help="open WebSockets and live reads per client address with --auth (default 256)",
    )
    auth.add_argument(
        "--max-connections-per-subject",
        type=int,
        default=64,
        metavar="N",
        help="open WebSockets and live reads per token sub with --auth (default 64)",
    )
    auth.add_argument(
        "--http-rate",
        type=float,
        default=1000.0,
        metavar="N",
        help="HTTP requests a second per token sub with --auth; over it 429 (default 1000)",
    )
    auth.add_argument(
        "--http-burst",
        type=int,
        default=2000,
        metavar="N",
        help="HTTP requests at once per token sub with --auth (default 2000)",
    )
    auth.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host without --auth (anyone who reaches it has every right)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="'debug' logs one line per request",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0 to 65535 (0 picks a free one), not {args.port}")
    if args.long_poll_timeout <= 0:
        parser.error("--long-poll-timeout must be positive")
    for option in (
        "max_body_bytes",
        "sse_max_duration",
        "ws_slow_consumer_timeout",
        "ws_max_queued_bytes",
        "ws_frame_rate",
        "ws_frame_burst",
    ):
        if getattr(args, option) <= 0:
            parser.error(f"--{option.replace('_', '-')} must be positive")
    for option in ("ws_ping_interval", "ws_ping_timeout", "presence_grace"):
        if getattr(args, option) < 0:
            parser.error(f"--{option.replace('_', '-')} must not be negative")
    _check_auth(parser, args)
    if args.data_dir is not None:
        problem = _data_dir_problem(args.data_dir)
        if problem is not None:
            parser.error(f"--data-dir {args.data_dir}: {problem}")
    if args.fault_plan is not None:
        from .chaos.plan import FaultPlan

        try:
            FaultPlan.from_file(args.fault_plan)
        except (OSError, ValueError) as exc:
            parser.error(f"--fault-plan: {exc}")
    return Settings(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        durability=args.durability,
        long_poll_timeout=args.long_poll_timeout,
        max_body_bytes=args.max_body_bytes,
        sse_max_duration=args.sse_max_duration,
        websocket=not args.no_websocket,
        ws_ping_interval=args.ws_ping_interval,
        ws_ping_timeout=args.ws_ping_timeout,
        ws_slow_consumer_timeout=args.ws_slow_consumer_timeout,
        ws_max_queued_bytes=args.ws_max_queued_bytes,
        ws_frame_rate=args.ws_frame_rate,
        ws_frame_burst=args.ws_frame_burst,
        presence_grace=args.presence_grace,
        log_level=args.log_level,
        chaos=args.chaos,
        fault_plan=args.fault_plan,
        subscriptions=args.subscriptions,
        auth=args.auth,
        auth_secret_file=args.auth_secret_file,
        auth_public_key=list(args.auth_public_key),
        auth_jwks=args.auth_jwks,
        auth_issuer=args.auth_issuer,
        auth_audience=args.auth_audience,
        allow_origin=list(args.allow_origin),
        max_connections_per_ip=args.max_connections_per_ip,
        max_connections_per_subject=args.max_connections_per_subject,
        http_rate=args.http_rate,
        http_burst=args.http_burst,
        insecure=args.insecure,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_auth(parser: _Parser, args: argparse.Namespace) -> None:
    """The access-control switches make sense together, and a server reachable from
    other machines is not started open by accident."""
    if not args.auth and not args.insecure and not _is_loopback(args.host):
        parser.error(
            f"--host {args.host} is reachable from other machines: add --auth (docs/security.md),"
            " or --insecure to serve it open"
        )
    key_options = (args.auth_secret_file, args.auth_public_key, args.auth_jwks, args.allow_origin)
    if not args.auth:
        if any(key_options) or args.auth_issuer is not None:
            parser.error("the --auth-* and --allow-origin options need --auth")
        return
    for option in (
        "max_connections_per_ip",
        "max_connections_per_subject",
        "http_rate",
        "http_burst",
    ):
        if getattr(args, option) <= 0:
            parser.error(f"--{option.replace('_', '-')} must be positive")
    from ._server import Settings, authority_of

    try:
        authority_of(
            Settings(
                auth=True,
                auth_secret_file=args.auth_secret_file,
                auth_public_key=list(args.auth_public_key),
                auth_jwks=args.auth_jwks,
            )
        )
    except OSError as exc:
        parser.error(f"--auth: {exc.filename}: {exc.strerror or exc}")
    except ValueError as exc:
        parser.error(f"--auth: {exc}")


def _data_dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a data directory (creating it if missing), or None."""
    if path.exists() and not path.is_dir():
        return "is not a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create it: {exc.strerror or exc}"
    probe = path / f".write-test-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        return f"cannot write in it: {exc.strerror or exc}"
    return None


def _fail(message: str) -> NoReturn:
    """One line on stderr, argparse style, and exit 2."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["token"]:
        from ._token_cli import main as token

        token(args[1:], prog=f"{PROG} token")
        return
    settings = parse_args(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        asyncio_run = asyncio.run
    else:
        asyncio_run = uvloop.run
    # uvicorn stops gracefully on SIGTERM, then re-raises it; after a graceful
    # stop that is not an error, so let the re-raised signal end us with status 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    wrap = None
    if settings.chaos or settings.fault_plan is not None:
        from .chaos import chaos_middleware

        wrap = chaos_middleware(settings)
    try:
        asyncio_run(run(settings, wrap=wrap))
    except KeyboardInterrupt:
        pass
    except DataDirInUse as exc:
        _fail(str(exc))
    except sqlite3.Error as exc:
        _fail(f"--data-dir {settings.data_dir}: cannot open its database: {exc}")
    except OSError as exc:
        where = f"{settings.host}:{settings.port}"
        if exc.errno == errno.EADDRINUSE:
            _fail(f"cannot listen on {where}: port {settings.port} is in use (another server?)")
        _fail(f"cannot listen on {where}: {exc.strerror or exc}")


if __name__ == "__main__":
    main()
