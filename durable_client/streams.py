"""The stream layer: one Durable Streams stream over HTTP, below sessions.

Most apps never need it: a :class:`~durable_client.Session` reads and writes
its stream for them. Use it for streams that are not sessions (an index, a
log), or to speak the protocol directly:

- :class:`DurableStream`: create, append, read (catch-up, long-poll, SSE,
  :meth:`~DurableStream.follow`), head, delete, close one stream URL;
- :class:`IdempotentProducer`: exactly-once appends (producer id, epoch,
  seq), batched and pipelined, into any :class:`BatchSink`;
- the answers (:class:`ReadBatch`, :class:`AppendResult`, ...) and the types
  their signatures use (:data:`DynamicValue`, :data:`LiveMode`,
  :data:`OnRetry`, :data:`TokenProvider`: the async function that
  ``token=`` takes on sessions, streams and transports).

Retry policies and the error tree are at the package root.
"""

from __future__ import annotations

from ._auth import TokenProvider
from ._core.producer import ProducerStamp
from ._producer import BatchSink, IdempotentProducer
from ._results import AppendResult
from ._retry import OnRetry
from ._stream import (
    CloseResult,
    CreateResult,
    DurableStream,
    DynamicValue,
    HeadResult,
    LiveMode,
    ReadBatch,
)

__all__ = [
    "AppendResult",
    "BatchSink",
    "CloseResult",
    "CreateResult",
    "DurableStream",
    "DynamicValue",
    "HeadResult",
    "IdempotentProducer",
    "LiveMode",
    "OnRetry",
    "ProducerStamp",
    "ReadBatch",
    "TokenProvider",
]
