"""Answers to writes that more than one layer reads.

An :class:`AppendResult` is made by the stream layer and the transports and
read by the producer (its core decides on ``duplicate`` and ``producer_seq``),
so it lives here, below both: ``_stream`` and ``_producer`` import it, and
neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AppendResult"]


@dataclass(frozen=True, slots=True)
class AppendResult:
    """The answer to an append.

    ``offset`` is the stream's next offset after this append. For an
    idempotent-producer duplicate (``duplicate=True``) it is whatever the server
    sent: the current tail, or ``None`` (the Node reference server sends none).
    """

    offset: str | None
    closed: bool
    duplicate: bool
    status: int
    producer_epoch: int | None = None
    producer_seq: int | None = None
