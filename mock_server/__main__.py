"""Command line: ``python -m mock_server [--host H] [--port P] [--data-dir DIR] ...``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from ._server import Settings, run


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m mock_server",
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
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="'debug' logs one line per request",
    )
    args = parser.parse_args(argv)
    if args.long_poll_timeout <= 0:
        parser.error("--long-poll-timeout must be positive")
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
        presence_grace=args.presence_grace,
        log_level=args.log_level,
        chaos=args.chaos,
        fault_plan=args.fault_plan,
    )


def main(argv: list[str] | None = None) -> None:
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
    except OSError as exc:
        print(
            f"error: cannot listen on {settings.host}:{settings.port}: {exc.strerror}",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
