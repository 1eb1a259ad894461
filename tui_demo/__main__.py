"""``python -m tui_demo``: chat in a durable session (bundled server and demo agent by default)."""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import sys

from durable_client import Author, DurableError

from ._launch import (
    DEFAULT_SERVER,
    LaunchError,
    data_dir,
    ensure_agents,
    ensure_server,
    is_local,
    still_running_note,
    stop,
)
from ._token import add_token_arguments, first_token, identity_of, refusal, token_from
from .app import ChatApp, ChatConfig, default_launcher, new_session_id


def default_name() -> str:
    """Who this terminal is by default: ``$USER``, else the login name the system
    knows (``getpass.getuser()``), else a name from the host and this process, so
    that two terminals without ``$USER`` never both show as the same person."""
    name = os.environ.get("USER")
    if name:
        return name
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no login name in the environment nor in the passwd file
        name = ""
    if name:
        return name
    host = socket.gethostname().split(".")[0] or "local"
    return f"{host}-{os.getpid()}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=default_launcher(),
        description="Chat in a durable session. Without --server it starts the bundled server "
        "and the demo agent in the background (they keep running when this terminal closes).",
    )
    parser.add_argument("--session", help="join this session (default: start a new one)")
    parser.add_argument(
        "--server", default=DEFAULT_SERVER, help=f"server URL (default {DEFAULT_SERVER})"
    )
    parser.add_argument("--name", default=None, help="your display name (default: your login name)")
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
    parser.add_argument(
        "--stop",
        action="store_true",
        help="stop the background server and agent host the chat started, and exit",
    )
    add_token_arguments(parser)
    args = parser.parse_args(argv)
    if args.name is None:
        args.name = default_name()
    elif not args.name.strip():
        parser.error("--name must not be empty")
    return args


def user_of(name: str, token: str | None) -> Author:
    """This terminal's author: the token's ``sub`` when there is a token (the server
    refuses events whose author is not the token's subject), else the name plus
    this process id."""
    sub = identity_of(token).sub
    return Author.user(sub or f"{name}-{os.getpid()}", name)


def terminal_label(name: str) -> str:
    """How this terminal shows in presence: the name and the terminal, e.g. ``ada (pts/3)``."""
    try:
        tty = os.ttyname(sys.stdin.fileno()).removeprefix("/dev/")
    except OSError:
        return name
    return f"{name} ({tty})"


def stop_command(launcher: str) -> str:
    """The command that stops what the chat left running, in the launcher's words."""
    if launcher.endswith("dev.py chat"):
        return launcher.removesuffix("chat") + "stop"
    return f"{launcher} --stop"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    home = data_dir()
    launcher = default_launcher()
    if args.stop:
        for line in stop(home):
            print(f"durable chat: {line}")
        return
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
        sys.exit(2)
    token = token_from(args)
    if args.list:
        import asyncio

        from ._index import recent

        try:
            entries = asyncio.run(recent(args.server, token=token))
        except DurableError as exc:
            print(
                f"durable chat: {refusal(exc, have_token=token is not None) or exc}",
                file=sys.stderr,
            )
            sys.exit(2)
        for entry in entries:
            print(f"{entry.session_id}\t{entry.title}")
        return
    config = ChatConfig(
        server=args.server,
        session_id=args.session or new_session_id(),
        user=user_of(args.name, first_token(args)),
        new=args.session is None,
        launcher=launcher,
        label=terminal_label(args.name),
        token=token,
    )
    try:
        ChatApp(config).run()
    finally:
        # The server and agent host outlive this terminal on purpose: say so, and how to stop.
        note = still_running_note(home, stop_command(launcher))
        if note is not None:
            print(note)


if __name__ == "__main__":
    main()
