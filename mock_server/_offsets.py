"""Offsets: the server's positions, formatted as opaque, sortable strings.

A position is the number of payload bytes stored in a stream's offset space
before a point. On the wire it is ``"<incarnation:016d>_<position:016d>"``,
the shape the reference server uses, so offsets sort lexicographically within
a stream and forks of a stream share its offset space. The incarnation tells
apart the streams that have lived at one path: a stream deleted and
re-created (or re-created by a server that lost its memory) issues offsets
that no earlier one issued, so a saved offset cannot silently skip into it.
"""

from __future__ import annotations

import re
import secrets
from typing import Final

_OFFSET_RE: Final = re.compile(r"^(\d{1,20})_(\d{1,20})$")
_WIDTH: Final = 16

# The beginning of every stream, whatever its incarnation (clients and the
# conformance suite write it by hand).
ZERO_OFFSET: Final = f"{0:0{_WIDTH}d}_{0:0{_WIDTH}d}"


class InvalidOffset(ValueError):
    """The text is not an offset this server could have issued."""


def new_incarnation() -> int:
    """A random incarnation for a new stream; 0 is left to streams from before incarnations."""
    return 1 + secrets.randbelow(10**_WIDTH - 1)


def format_incarnation(incarnation: int) -> str:
    """The incarnation as the ``Stream-Incarnation`` header and offsets carry it."""
    return f"{incarnation:0{_WIDTH}d}"


def format_offset(incarnation: int, position: int) -> str:
    return f"{incarnation:0{_WIDTH}d}_{position:0{_WIDTH}d}"


def parse_offset(text: str) -> tuple[int, int]:
    """The (incarnation, position) of an offset; raises ``InvalidOffset`` on anything else."""
    match = _OFFSET_RE.match(text)
    if match is None:
        raise InvalidOffset(f"invalid offset {text!r}")
    return int(match.group(1)), int(match.group(2))
