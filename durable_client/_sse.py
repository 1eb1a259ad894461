"""An incremental Server-Sent Events decoder (no I/O).

Feed it bytes as they arrive; it returns the complete events. It follows the
WHATWG event-stream rules: lines end in CRLF, LF or CR (also split across
chunks), ``:`` starts a comment, one space after the colon is dropped, several
``data:`` lines join with ``\\n``, and an event is dispatched at a blank line
only if it has data. ``id`` and ``retry`` are parsed and ignored: Durable
Streams resumes from offsets in control events, not from ``Last-Event-ID``.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

__all__ = ["SSEDecoder", "SSEEvent"]

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event: its type (``message`` when unnamed) and data."""

    event: str
    data: str


class SSEDecoder:
    """Turns a byte stream into :class:`SSEEvent` objects.

    Raises :class:`UnicodeDecodeError` if the bytes are not UTF-8.
    """

    def __init__(self) -> None:
        self._text = codecs.getincrementaldecoder("utf-8")("strict")
        self._parts: list[str] = []  # the unfinished line, in the pieces it came in
        self._skip_lf = False
        self._first = True
        self._event = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume ``chunk``; return the events it completed."""
        text = self._text.decode(chunk)
        if self._first and text:
            self._first = False
            if text.startswith("\ufeff"):
                text = text[1:]
        return self._consume(text)

    def close(self) -> list[SSEEvent]:
        """Signal the end of the stream. An incomplete last event is discarded,
        as the SSE rules require (it was never terminated by a blank line)."""
        self._text.decode(b"", final=True)
        self._parts = []
        self._event = ""
        self._data = []
        return []

    def _consume(self, text: str) -> list[SSEEvent]:
        # Line breaks are found by the regex engine, and an unfinished line is kept
        # in pieces rather than re-scanned with each chunk: linear in the input even
        # for one event of megabytes arriving in many chunks.
        events: list[SSEEvent] = []
        start = 0
        if self._skip_lf and text:
            if text[0] == "\n":
                start = 1
            self._skip_lf = False
        for match in _LINE_BREAK.finditer(text, start):
            end = match.end()
            if end == len(text) and match.group() == "\r":
                self._skip_lf = True  # the LF of a CRLF may arrive in the next chunk
            line = text[start : match.start()]
            if self._parts:
                self._parts.append(line)
                line = "".join(self._parts)
                self._parts = []
            start = end
            event = self._line(line)
            if event is not None:
                events.append(event)
        if start < len(text):
            self._parts.append(text[start:])
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            if not self._data:
                self._event = ""
                return None
            event = SSEEvent(event=self._event or "message", data="\n".join(self._data))
            self._event = ""
            self._data = []
            return event
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        # "id", "retry" and unknown fields are ignored.
        return None
