"""``python -m tui_demo``: chat in a durable session (bundled server and demo agent by default)."""

from __future__ import annotations

import argparse
import os
import sys

from durable_client import Author

from ._launch import DEFAULT_SERVER, LaunchError, data_dir, ensure_agents, ensure_server, is_local
from .app import ChatApp, ChatConfig, default_user, new_session_id


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tui_demo",
        description="Chat in a durable session. Without --server it starts the bundled server "
        "and the demo agent in the background (they keep running when this terminal closes).",
    )
    parser.add_argument("--session", help="join this session (default: start a new one)")
    parser.add_argument(
        "--server", default=DEFAULT_SERVER, help=f"server URL (default {DEFAULT_SERVER})"
    )
    parser.add_argument("--name", default=os.environ.get("USER") or "you", help="your display name")
    parser.add_argument(
        "--agent",
        choices=["demo", "openai", "none"],
        default="demo",
        help="which agent answers (started in the background for a local server)",
    )
    parser.add_argument(
        "--token-rate", type=float, default=25.0, help="demo agent words per second"
    )
    parser.add_argument("--model", help="openai agent: the model name")
    parser.add_argument("--base-url", help="openai agent: the chat-completions base URL")
    parser.add_argument(
        "--list", action="store_true", help="list the server's recent sessions and exit"
    )
    return parser.parse_args(argv)


def terminal_label(name: str) -> str:
    """How this terminal shows in presence: the name and the terminal, e.g. ``ada (pts/3)``."""
    try:
        tty = os.ttyname(sys.stdin.fileno()).removeprefix("/dev/")
    except OSError:
        return name
    return f"{name} ({tty})"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    home = data_dir()
    try:
        ensure_server(args.server, home)
        if args.agent != "none" and is_local(args.server):
            extra = ["--agent", args.agent, "--token-rate", str(args.token_rate)]
            if args.model:
                extra += ["--model", args.model]
            if args.base_url:
                extra += ["--base-url", args.base_url]
            ensure_agents(args.server, home, extra)
    except LaunchError as exc:
        print(f"durable chat: {exc}", file=sys.stderr)
        sys.exit(1)
    if args.list:
        import asyncio

        from ._index import recent

        for entry in asyncio.run(recent(args.server)):
            print(f"{entry.session_id}\t{entry.title}")
        return
    user = (
        default_user()
        if args.name == os.environ.get("USER")
        else Author.user(f"{args.name}-{os.getpid()}", args.name)
    )
    config = ChatConfig(
        server=args.server,
        session_id=args.session or new_session_id(),
        user=user,
        new=args.session is None,
        launcher=os.environ.get("DURABLE_CHAT_LAUNCHER", "python -m tui_demo"),
        label=terminal_label(args.name),
    )
    ChatApp(config).run()


if __name__ == "__main__":
    main()
