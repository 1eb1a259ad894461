"""The httpx boundary of the error tree: HTTP answers and httpx exceptions in,
:class:`DurableError` out.

The tree itself (``_errors``) knows statuses and headers, not httpx, so the
WebSocket side and the in-memory transport use it without the HTTP client;
only the HTTP side imports this module. Callers ``raise ... from exc``.
"""

from __future__ import annotations

import httpx

from ._errors import (
    ConnectError,
    ConnectionLost,
    DurableError,
    RequestTimeout,
    UsageError,
    error_from_status,
)

__all__ = ["error_from_httpx", "error_from_response"]


def error_from_response(
    response: httpx.Response, *, url: str, operation: str, body: str | None = None
) -> DurableError:
    """Map a non-success HTTP answer to the error tree.

    ``operation`` names what was attempted ("append", "read", ...) for the message.
    ``body`` is the response text (read from ``response`` when omitted).
    """
    if body is None:
        try:
            body = response.text
        except (httpx.ResponseNotRead, UnicodeDecodeError):
            body = ""
    return error_from_status(
        response.status_code, response.headers, body, url=url, operation=operation
    )


def error_from_httpx(exc: httpx.HTTPError, *, url: str, operation: str) -> DurableError:
    """Map an httpx transport exception to the error tree."""
    text = f"{operation} failed: {type(exc).__name__}: {exc}".rstrip(": ")
    if isinstance(exc, httpx.TimeoutException):
        return RequestTimeout(text, url=url)
    if isinstance(exc, httpx.ConnectError):
        return ConnectError(text, url=url)
    if isinstance(exc, httpx.TransportError):
        # ReadError, WriteError, RemoteProtocolError (peer closed mid-body), ...
        return ConnectionLost(text, url=url)
    if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
        return UsageError(text, url=url)
    return ConnectionLost(text, url=url)
