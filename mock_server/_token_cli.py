"""``durable-server token ...``: mint an access token (a JWT) for a server with ``--auth``.

Prints the token and nothing else, so ``export DURABLE_TOKEN=$(durable-server token ...)``
works. The secret comes from ``--secret-file`` or ``DURABLE_AUTH_SECRET``, never from
the command line (it would show in ``ps``); ``--private-key`` signs with an RSA,
P-256 or Ed25519 key whose public half the server has (``--auth-public-key``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

from ._auth import AUDIENCE, CAPABILITIES, KINDS, mint, read_secret, stream_patterns

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``7d`` as seconds; ``ValueError`` otherwise."""
    match = _DURATION.match(text.strip())
    if match is None or float(match[1]) <= 0:
        raise ValueError(f"--ttl {text!r}: use a positive number of seconds, or 15m, 1h, 7d")
    return float(match[1]) * _UNIT[match[2]]


def parse_capabilities(text: str) -> list[str]:
    """``read,append`` as a list; ``ValueError`` naming an unknown capability."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("--can: name at least one capability")
    for name in names:
        if name not in CAPABILITIES:
            raise ValueError(
                f"--can: unknown capability {name!r} (one of {', '.join(sorted(CAPABILITIES))})"
            )
    return names


def main(argv: list[str], *, prog: str) -> None:
    def fail(message: str) -> NoReturn:
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            fail(f"{message} (see --help)")

    parser = Parser(prog=prog, description="Print an access token for a server with --auth.")
    parser.add_argument("--secret-file", type=Path, metavar="FILE", help="the server's secret")
    parser.add_argument(
        "--private-key", type=Path, metavar="FILE", help="sign with this PEM private key"
    )
    parser.add_argument(
        "--session", action="append", default=[], metavar="ID", help="cover sessions/ID"
    )
    parser.add_argument(
        "--prefix", action="append", default=[], metavar="P", help="cover every stream under P/"
    )
    parser.add_argument(
        "--stream", action="append", default=[], metavar="PATH", help="cover this stream ('*': all)"
    )
    parser.add_argument(
        "--can", required=True, metavar="CAPS", help="capabilities, e.g. read,append"
    )
    parser.add_argument(
        "--ttl", default="1h", help="lifetime: seconds, or 15m, 1h, 7d (default 1h)"
    )
    parser.add_argument("--sub", required=True, help="who: the author id its events must carry")
    parser.add_argument("--kind", default="user", choices=KINDS, help="author kind (default user)")
    parser.add_argument("--name", help="display name (informational)")
    parser.add_argument("--audience", default=AUDIENCE, help=f"aud claim (default {AUDIENCE})")
    parser.add_argument("--issuer", help="iss claim")
    args = parser.parse_args(argv)
    try:
        can = parse_capabilities(args.can)
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        fail(str(exc))
    streams = stream_patterns(args.session, args.prefix, args.stream)
    if not streams:
        fail("name what the token covers: --session, --prefix or --stream")
    if not args.sub.strip():
        fail("--sub must not be empty")
    secret: bytes | None = None
    private_key: Any = None
    try:
        if args.private_key is not None:
            from cryptography.hazmat.primitives.serialization import load_pem_private_key

            private_key = load_pem_private_key(args.private_key.read_bytes(), password=None)
        else:
            secret = read_secret(args.secret_file)
            if secret is None:
                fail("give --secret-file, --private-key or DURABLE_AUTH_SECRET")
        token = mint(
            sub=args.sub,
            kind=args.kind,
            name=args.name,
            streams=streams,
            can=can,
            ttl=ttl,
            audience=args.audience,
            issuer=args.issuer,
            secret=secret,
            private_key=private_key,
        )
    except OSError as exc:
        fail(f"{exc.filename}: {exc.strerror or exc}")
    except (ValueError, TypeError) as exc:
        fail(str(exc))
    print(token)
