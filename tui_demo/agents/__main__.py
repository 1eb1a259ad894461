"""``python -m tui_demo.agents --server URL``: run agents for every chat session of a server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from durable_client import DurableError

from .._token import add_token_arguments, first_token, identity_of, refusal, token_from
from .host import AgentHost, HostConfig
from .openai import ModelConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tui_demo.agents", description=__doc__)
    parser.add_argument("--server", default="http://127.0.0.1:4437", help="session server URL")
    parser.add_argument("--agent", choices=["demo", "openai"], default="demo")
    parser.add_argument(
        "--token-rate", type=float, default=25.0, help="demo agent: words per second (default 25)"
    )
    parser.add_argument("--no-helper", action="store_true", help="demo agent: no sub-agent")
    parser.add_argument(
        "--base-url",
        default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
        help="openai agent: chat-completions base URL",
    )
    parser.add_argument("--model", default=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"))
    parser.add_argument(
        "--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key"
    )
    parser.add_argument(
        "--state-dir", type=Path, help="where to keep read offsets and this host's name"
    )
    parser.add_argument(
        "--lease-ttl",
        type=float,
        default=10.0,
        help="seconds a reply may go silent before readers end it as abandoned (default 10)",
    )
    parser.add_argument("--pidfile", type=Path, help="write the process id here")
    parser.add_argument("--log-level", default="info")
    add_token_arguments(parser)
    args = parser.parse_args(argv)
    if not 0.05 < args.lease_ttl <= 3600:
        parser.error("--lease-ttl must be more than 0.05 and at most 3600 seconds")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    model = None
    if args.agent == "openai":
        model = ModelConfig(args.base_url, args.model, os.environ.get(args.api_key_env))
    config = HostConfig(
        server=args.server,
        agent=args.agent,
        token_rate=args.token_rate,
        helper=not args.no_helper,
        model=model,
        state_dir=args.state_dir,
        lease_ttl=args.lease_ttl,
        token=token_from(args),
        identity=identity_of(first_token(args)),
    )
    if args.pidfile is not None:
        args.pidfile.parent.mkdir(parents=True, exist_ok=True)
        args.pidfile.write_text(str(os.getpid()))
    code = 0
    try:
        asyncio.run(_run(config))
    except KeyboardInterrupt:
        pass
    except DurableError as exc:
        # One line, not a traceback: most often an access refusal (401/403).
        print(
            f"{parser.prog}: {refusal(exc, have_token=config.token is not None) or exc}",
            file=sys.stderr,
        )
        code = 2
    finally:
        if args.pidfile is not None:
            with contextlib.suppress(OSError):
                if args.pidfile.read_text() == str(os.getpid()):
                    args.pidfile.unlink()
    sys.exit(code)


async def _run(config: HostConfig) -> None:
    task = asyncio.create_task(AgentHost(config).run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


if __name__ == "__main__":
    main()
