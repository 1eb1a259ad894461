"""Offsets: the server's positions, formatted as opaque, sortable strings.

A position is the number of payload bytes stored in a stream's offset space
before a point. On the wire it is ``"0000000000000000_<position:016d>"``, the
same shape the reference server uses, so offsets sort lexicographically and
forks of a stream share its offset space.
"""

from __future__ import annotations

import re
from typing import Final

_OFFSET_RE: Final = re.compile(r"^(\d{1,20})_(\d{1,20})$")
_WIDTH: Final = 16


class InvalidOffset(ValueError):
    """The text is not an offset this server could have issued."""


def format_offset(position: int) -> str:
    return f"{0:0{_WIDTH}d}_{position:0{_WIDTH}d}"


ZERO_OFFSET: Final = format_offset(0)


def parse_offset(text: str) -> int:
    """The position of an offset string; raises ``InvalidOffset`` on anything else.

    The leading part is reserved and must be zero: this server issues no other.
    """
    match = _OFFSET_RE.match(text)
    if match is None:
        raise InvalidOffset(f"invalid offset {text!r}")
    if int(match.group(1)) != 0:
        raise InvalidOffset(f"unknown offset epoch in {text!r}")
    return int(match.group(2))
