"""Access tokens: what a session, a stream or a transport sends as ``Authorization: Bearer``.

A token is a JWT the server verifies (``docs/security.md``); the SDK never
verifies nor signs one. It only reads the payload's ``exp`` (and ``iat``)
without any crypto, to know when to fetch the next token: a
:class:`TokenSource` holds either a static token or a :data:`TokenProvider`
(an async function returning the current token), caches what the provider
gave, and asks it again

- once 80% of the token's lifetime has passed (``iat`` to ``exp``; from when
  the token was fetched if it has no ``iat``), so a request never carries a
  token about to lapse;
- after the server refused it (:meth:`TokenSource.invalidate`, on a 401).

One refresh runs at a time; callers that arrive meanwhile wait for it and
share its answer. A refresh that fails while the old token is still valid
keeps the old token (it is tried again shortly); one that fails when the old
token has expired raises. A token whose payload cannot be read (not a JWT, no
``exp``) is used as it is and refreshed only after a 401.

The token itself never appears in a repr, a log line or an error message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

from ._errors import ConnectError, DurableError, UsageError

__all__ = [
    "TokenClaims",
    "TokenProvider",
    "TokenSource",
    "bearer",
    "due_time",
    "read_claims",
    "retry_delay",
]

#: An async function returning the current access token (a JWT), called again
#: whenever a fresh token is needed.
TokenProvider: TypeAlias = Callable[[], Awaitable[str]]

#: The share of a token's lifetime after which the next one is fetched.
REFRESH_AT = 0.8

log = logging.getLogger("durable_client.auth")


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What the SDK reads from a token's payload (unverified)."""

    exp: float | None = None
    iat: float | None = None
    sub: str | None = None
    kind: str | None = None


def read_claims(token: str) -> TokenClaims:
    """The ``exp``, ``iat``, ``sub`` and ``kind`` of a JWT's payload, unverified;
    empty claims for a token that is not a readable JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return TokenClaims()
    segment = parts[1]
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        payload: Any = json.loads(raw)
    except (binascii.Error, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return TokenClaims()
    if not isinstance(payload, dict):
        return TokenClaims()

    def number(name: str) -> float | None:
        value = payload.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value)

    def text(name: str) -> str | None:
        value = payload.get(name)
        return value if isinstance(value, str) else None

    return TokenClaims(exp=number("exp"), iat=number("iat"), sub=text("sub"), kind=text("kind"))


class TokenSource:
    """The current token of a client, refreshed ahead of expiry (see the module docstring).

    Args:
        token: a static token, or a provider called for each fresh token.
        clock: unix seconds now (tests pass a fake one).
    """

    def __init__(
        self,
        token: str | TokenProvider,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(token, str):
            if not token:
                raise UsageError("token must not be empty")
            self._provider: TokenProvider | None = None
        elif callable(token):
            self._provider = token
        else:
            raise UsageError("token must be a string or an async function returning one")
        self._clock = clock
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._claims = TokenClaims()
        self._fetched_at = 0.0
        self._stale = False
        self._retry_at = 0.0  # a failed refresh is not retried before this
        self.generation = 0  # how many tokens this source has held
        if isinstance(token, str):
            self._set(token)

    @classmethod
    def of(cls, token: str | TokenProvider | TokenSource | None) -> TokenSource | None:
        """``token`` as a source (a source is shared as it is)."""
        if token is None or isinstance(token, TokenSource):
            return token
        return cls(token)

    def __repr__(self) -> str:
        what = "provider" if self._provider is not None else "static token"
        exp = self._claims.exp
        if self._token is None:
            state = "no token yet"
        elif exp is None:
            state = "expiry unknown"
        else:
            state = f"expires in {exp - self._clock():.0f} s"
        return f"<TokenSource {what}, {state}>"

    # --- what the token says ---------------------------------------------------------

    @property
    def refreshes(self) -> bool:
        """Whether a fresh token can be had (a provider; a static token cannot change)."""
        return self._provider is not None

    @property
    def expires_at(self) -> float | None:
        """The current token's ``exp`` (unix seconds), if known."""
        return self._claims.exp

    @property
    def claims(self) -> TokenClaims:
        """The current token's readable claims (empty before the first token)."""
        return self._claims

    def clock(self) -> float:
        """Unix seconds now, by this source's clock."""
        return self._clock()

    @property
    def fetched_at(self) -> float:
        """When (unix seconds) the current token was fetched."""
        return self._fetched_at

    def refresh_due(self) -> float | None:
        """When (unix seconds) the current token should be replaced: at 80% of its
        lifetime, or later after a failed refresh; ``None`` if never (no provider,
        or an expiry it cannot read)."""
        if self._provider is None or self._token is None:
            return None
        due = due_time(self._claims, self._fetched_at)
        return None if due is None else max(due, self._retry_at)

    def _valid(self, now: float) -> bool:
        exp = self._claims.exp
        return self._token is not None and (exp is None or now < exp)

    def _fresh(self, now: float) -> bool:
        if self._token is None or self._stale:
            return False
        due = self.refresh_due()
        return due is None or now < due

    def _set(self, token: str) -> None:
        self._token = token
        self._claims = read_claims(token)
        self._fetched_at = self._clock()
        self._stale = False
        self._retry_at = 0.0
        self.generation += 1

    # --- getting one -----------------------------------------------------------------

    async def __call__(self) -> str:
        """The token to send now (a source is itself a :data:`TokenProvider`)."""
        return await self.get()

    async def get(self) -> str:
        """The token to send now, refreshed first if it is due.

        Raises :class:`ConnectError` (retryable) when the provider fails and
        there is no valid token to fall back on.
        """
        if self._fresh(self._clock()):
            assert self._token is not None
            return self._token
        return await self._refresh(self.generation, force=False)

    async def refresh(self) -> str:
        """A fresh token from the provider now (shared with a refresh in flight);
        the current one for a static token."""
        return await self._refresh(self.generation, force=True)

    def invalidate(self, token: str | None = None) -> None:
        """The server refused ``token`` (default: the current one): the next
        :meth:`get` fetches a fresh one. A token already replaced is ignored."""
        if self._provider is None:
            return
        if token is None or token == self._token:
            self._stale = True
            self._retry_at = 0.0

    async def _refresh(self, seen: int, *, force: bool) -> str:
        if self._provider is None:
            assert self._token is not None
            return self._token
        async with self._lock:
            now = self._clock()
            if self.generation != seen and self._token is not None and not self._stale:
                return self._token  # another caller refreshed while we waited
            if not force and self._fresh(now):
                assert self._token is not None
                return self._token
            if not force and not self._stale and self._valid(now) and now < self._retry_at:
                assert self._token is not None
                return self._token  # a refresh just failed: keep the old one a little longer
            try:
                token = await self._provider()
                if not isinstance(token, str) or not token:
                    raise UsageError("the token provider returned no token")
            except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:
                return self._failed(exc, now)
            if token == self._token and not self._stale:
                # The provider has nothing newer yet (a token file not yet rotated):
                # ask again soon, not on every request.
                self._retry_at = now + retry_delay(self._claims.exp, now)
                return token
            self._set(token)
            log.debug("access token refreshed (generation %d)", self.generation)
            return token

    def _failed(self, exc: BaseException, now: float) -> str:
        name = type(exc).__name__
        if self._token is not None and self._valid(now) and not self._stale:
            self._retry_at = now + retry_delay(self._claims.exp, now)
            log.warning("the token provider failed (%s); the current token is kept", name)
            return self._token
        if isinstance(exc, DurableError):
            raise exc
        # The message names only the exception type: a provider's own text might
        # quote what it read (a token).
        raise ConnectError(f"the token provider failed: {name}") from exc


def due_time(claims: TokenClaims, fetched_at: float) -> float | None:
    """When a token with ``claims``, fetched at ``fetched_at``, should be replaced:
    at 80% of its lifetime (``None`` without an ``exp``)."""
    if claims.exp is None:
        return None
    start = claims.iat if claims.iat is not None else fetched_at
    start = min(start, claims.exp)
    return start + REFRESH_AT * (claims.exp - start)


def retry_delay(exp: float | None, now: float) -> float:
    """How long to wait before asking a provider again: a quarter of what is left
    of the current token (at least 50 ms, at most 5 s)."""
    if exp is None:
        return 5.0
    return max(0.05, min(5.0, (exp - now) / 4))


def bearer(token: str) -> str:
    """The ``Authorization`` header value for ``token``."""
    return f"Bearer {token}"
