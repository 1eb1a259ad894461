"""Access tokens for the chat app and the agent host (``--token``, ``--token-file``, env).

A token file is read again on every refresh (the SDK asks for a fresh token at
80% of each token's lifetime, after a 401 and when a socket's token lapsed),
so an operator rotates it by writing the next token into the file. The payload
is read here without verification, only to know who the token speaks for
(``sub``, ``name``, ``can``): the server verifies it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from durable_client import DurableError, Forbidden, StaleEpoch, Unauthorized
from durable_client.streams import TokenProvider

__all__ = [
    "TOKEN_ENV",
    "Identity",
    "add_token_arguments",
    "file_token",
    "identity_of",
    "refusal",
    "token_from",
]

#: The environment variable read when neither --token nor --token-file is given.
TOKEN_ENV = "DURABLE_TOKEN"


def add_token_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--token",
        help=f"access token for a server run with --auth (default: ${TOKEN_ENV})",
    )
    group.add_argument(
        "--token-file",
        type=Path,
        help="read the access token from this file, again on every refresh (rotate it there)",
    )


class TokenFileError(DurableError):
    """The token file cannot be read (its path is named, its content never)."""


def file_token(path: Path) -> TokenProvider:
    """A provider that reads ``path`` each time a fresh token is needed."""

    def read_file() -> str:
        return path.read_text(encoding="utf-8").strip()

    async def read() -> str:
        try:
            token = await asyncio.to_thread(read_file)
        except OSError as exc:
            raise TokenFileError(f"cannot read the token file {path}: {exc.strerror}") from exc
        if not token:
            raise TokenFileError(f"the token file {path} is empty")
        return token

    return read


def token_from(args: argparse.Namespace) -> str | TokenProvider | None:
    """The token the command line (or ``$DURABLE_TOKEN``) gives; ``None``: none."""
    if getattr(args, "token_file", None) is not None:
        return file_token(args.token_file)
    token = getattr(args, "token", None) or os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def first_token(args: argparse.Namespace) -> str | None:
    """The token as it is now (the file's current content), to read who it speaks for."""
    if getattr(args, "token_file", None) is not None:
        try:
            return str(args.token_file.read_text(encoding="utf-8").strip()) or None
        except OSError:
            return None
    token = token_from(args)
    return token if isinstance(token, str) else None


@dataclass(frozen=True)
class Identity:
    """Who a token speaks for, as its (unverified) payload says."""

    sub: str | None = None
    name: str | None = None
    kind: str | None = None
    can: tuple[str, ...] = ()

    @property
    def admin(self) -> bool:
        return "admin" in self.can


def identity_of(token: str | None) -> Identity:
    """The ``sub``, ``name``, ``kind`` and ``can`` of a JWT, unverified (empty if unreadable)."""
    if not token:
        return Identity()
    parts = token.split(".")
    if len(parts) != 3:
        return Identity()
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        payload: Any = json.loads(raw)
    except (binascii.Error, ValueError):
        return Identity()
    if not isinstance(payload, dict):
        return Identity()

    def text(key: str) -> str | None:
        value = payload.get(key)
        return value if isinstance(value, str) and value else None

    can = payload.get("can")
    capabilities = tuple(c for c in can if isinstance(c, str)) if isinstance(can, list) else ()
    return Identity(sub=text("sub"), name=text("name"), kind=text("kind"), can=capabilities)


_MESSAGE = re.compile(r'"message"\s*:\s*("(?:[^"\\]|\\.)*")')


def refusal(exc: BaseException, *, have_token: bool) -> str | None:
    """One line saying why the server refused access (401/403), or ``None`` if
    ``exc`` is no such refusal."""
    if isinstance(exc, TokenFileError):
        return exc.message
    if not isinstance(exc, Unauthorized | Forbidden) or isinstance(exc, StaleEpoch):
        return None
    reason = _reason(exc.message)
    if isinstance(exc, Unauthorized):
        if not have_token:
            return (
                f"the server needs an access token ({reason}): "
                f"give --token, --token-file or ${TOKEN_ENV}"
            )
        return f"the server refused the access token: {reason}"
    return f"access denied: {reason}"


def _reason(message: str) -> str:
    """The server's own words in an error's message (its JSON body, or an error frame)."""
    found = _MESSAGE.search(message)
    if found is not None:
        try:
            return str(json.loads(found.group(1)))
        except ValueError:
            pass
    _, _, detail = message.partition(" failed: ")
    detail = detail or message
    for code in ("unauthorized: ", "forbidden: "):
        detail = detail.removeprefix(code)
    return detail.strip() or "no reason given"
