"""How deep JSON nests, found without parsing it.

A parser recurses once per level of arrays and objects, so a deeply nested
document costs stack and time before it is refused (and parsers disagree on
where they stop: Python's json module near 1,000 levels, pydantic's at 200).
The server refuses too-deep WebSocket frames and JSON appends with this scan
before any parser sees them, so whatever it stores every client can read.
"""

from __future__ import annotations

import re
from array import array
from itertools import accumulate

__all__ = ["MAX_JSON_DEPTH", "nesting_exceeds"]

MAX_JSON_DEPTH = 64
"""Arrays and objects inside one another in one appended JSON message."""

# Strings (closed or not: an unclosed one runs to the end, so the scan stays linear).
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1, +1, -1, -1 as signed bytes
_DEPTH_CHUNK = 4096


def nesting_exceeds(text: str | bytes, limit: int) -> bool:
    """Whether arrays and objects in ``text`` nest deeper than ``limit``, without
    parsing it: the brackets outside strings, counted at C speed (a deep frame
    stops at its first chunk). Mismatched brackets are the parser's to refuse."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if data.count(b"[") + data.count(b"{") <= limit:  # the common case: few brackets at all
        return False
    outside = _JSON_STRING.sub(b"", data)
    steps = outside.translate(_BRACKET_STEPS, _NOT_BRACKETS)
    depth = 0
    for start in range(0, len(steps), _DEPTH_CHUNK):
        levels = list(accumulate(array("b", steps[start : start + _DEPTH_CHUNK]), initial=depth))
        if max(levels) > limit:
            return True
        depth = levels[-1]
    return False
