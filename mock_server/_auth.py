"""Access control with ``--auth`` (docs/security.md): JWT bearer tokens, per stream.

- :class:`KeySet`: the verification keys, each pinned to one algorithm: an HMAC
  secret (HS256), PEM public keys (RS256, ES256, EdDSA) and a JWKS file that is
  read again when it changes. A token's ``kid`` header picks its key; removing
  a key revokes every token it signed.
- :class:`Grant`: what a verified token allows (``covers``, ``allows``, the
  author checks on appended events).
- :class:`Authority`: the server's policy: verification (PyJWT, 30 s leeway,
  audience and issuer), the Origin allowlist and the connection caps.
- :func:`mint`: a signed token, for ``durable-server token``.

Refusals are :class:`AuthError` (401, 403 or 429); the front ends turn them
into responses, error frames or handshake refusals. No token is ever put into
a message, a log line or a repr.

PyJWT and cryptography are imported where keys are used, so a server without
``--auth`` never loads them (the front ends import this module for ``AuthError``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from durable_client import wire as P

from ._json_depth import MAX_JSON_DEPTH, nesting_exceeds

__all__ = [
    "AUDIENCE",
    "CAPABILITIES",
    "KINDS",
    "LEEWAY",
    "AuthError",
    "Authority",
    "Grant",
    "KeySet",
    "mint",
]

AUDIENCE: Final = "durable-sessions"
LEEWAY: Final = 30.0
"""Seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat``."""
MIN_SECRET_BYTES: Final = 32
SECRET_ENV: Final = "DURABLE_AUTH_SECRET"
REALM: Final = "durable-sessions"

CAPABILITIES: Final = frozenset(
    {"read", "append", "cancel", "steer", "presence", "create", "delete", "admin"}
)
KINDS: Final = ("user", "agent", "tool", "system")
# A JSON body that holds none of these bytes has no author and no cancel or steer
# event (a key spelled with escapes holds "\\u"): the author checks need not parse it.
_EVENT_MARKERS: Final = (b"author", b"cancel", b"steer", b"\\u")

CancelHook = Callable[[Mapping[str, Any], str, Mapping[str, Any]], bool]
"""``authorize_cancel(claims, path, event) -> bool``: may this token append this cancel?"""


class AuthError(Exception):
    """A refused request: 401 (who are you?), 403 (not allowed) or 429 (too many)."""

    def __init__(self, status: int, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after

    @property
    def code(self) -> str:
        return {401: "unauthorized", 403: "forbidden"}.get(self.status, "rate_limited")

    def headers(self) -> list[tuple[str, str]]:
        """The response headers of this refusal over HTTP."""
        if self.status == 429:
            return [("Retry-After", f"{max(1, round(self.retry_after or 1))}")]
        error = "invalid_token" if self.status == 401 else "insufficient_scope"
        return [("WWW-Authenticate", f'Bearer realm="{REALM}", error="{error}"')]

    def body(self) -> bytes:
        return json.dumps({"error": {"code": self.code, "message": self.message}}).encode()


def unauthorized(message: str) -> AuthError:
    return AuthError(401, message)


def forbidden(message: str) -> AuthError:
    return AuthError(403, message)


# ---------------------------------------------------------------------- keys


def secret_kid(secret: bytes) -> str:
    """The ``kid`` of an HMAC key: ``hs-`` and 8 hex digits of the secret's SHA-256."""
    return "hs-" + hashlib.sha256(secret).hexdigest()[:8]


def public_kid(key: Any) -> str:
    """The ``kid`` of a PEM public key: ``pk-`` and 8 hex digits of the SHA-256 of its DER."""
    from cryptography.hazmat.primitives import serialization

    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "pk-" + hashlib.sha256(der).hexdigest()[:8]


def algorithm_of(key: Any) -> str:
    """The one algorithm a public (or private) key verifies (signs) with."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if key.curve.name != "secp256r1":
            raise ValueError(f"EC keys must be P-256 (ES256), not {key.curve.name}")
        return "ES256"
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "EdDSA"
    raise ValueError(f"unsupported key type {type(key).__name__} (use RSA, P-256 or Ed25519)")


def read_secret(path: Path | None) -> bytes | None:
    """The HMAC secret from ``path`` (surrounding whitespace dropped), else from
    ``DURABLE_AUTH_SECRET``, else None. ``ValueError`` if it is shorter than 32 bytes."""
    if path is not None:
        secret = path.read_bytes().strip()
        where = str(path)
    elif os.environ.get(SECRET_ENV):
        secret = os.environ[SECRET_ENV].encode().strip()
        where = SECRET_ENV
    else:
        return None
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"{where}: an HMAC secret needs at least {MIN_SECRET_BYTES} bytes")
    return secret


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str
    algorithm: str
    key: Any = field(repr=False)


class KeySet:
    """The keys tokens are verified with, each pinned to its algorithm.

    The JWKS file is stat'ed at each lookup and read again when its modification
    time or size changed (a key removed from it revokes its tokens at once); a
    JWKS that no longer parses keeps the previous keys and is logged by the caller.
    """

    def __init__(
        self,
        *,
        secret: bytes | None = None,
        public_keys: Iterable[Path] = (),
        jwks: Path | None = None,
    ) -> None:
        from cryptography.hazmat.primitives import serialization

        self._static: dict[str, _Key] = {}
        if secret is not None:
            if len(secret) < MIN_SECRET_BYTES:
                raise ValueError(f"an HMAC secret needs at least {MIN_SECRET_BYTES} bytes")
            kid = secret_kid(secret)
            self._static[kid] = _Key(kid, "HS256", secret)
        for path in public_keys:
            try:
                key = serialization.load_pem_public_key(path.read_bytes())
            except ValueError as exc:
                raise ValueError(f"{path}: not a PEM public key ({exc})") from None
            kid = public_kid(key)
            self._static[kid] = _Key(kid, algorithm_of(key), key)
        self._jwks_path = jwks
        self._jwks_stamp: tuple[int, int] | None = None
        self._jwks: dict[str, _Key] = {}
        if jwks is not None:
            self._jwks = self._read_jwks(jwks)  # a broken file at startup is an error
            self._jwks_stamp = self._stamp(jwks)
        if not self._static and jwks is None:
            raise ValueError(
                "--auth needs a key: --auth-secret-file, DURABLE_AUTH_SECRET,"
                " --auth-public-key or --auth-jwks"
            )

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int] | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    @staticmethod
    def _read_jwks(path: Path) -> dict[str, _Key]:
        import jwt

        try:
            keys = jwt.PyJWKSet.from_json(path.read_text()).keys
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            raise ValueError(f"{path}: not a usable JWKS ({exc})") from None
        found: dict[str, _Key] = {}
        for jwk in keys:
            if jwk.key_id is None or jwk.algorithm_name == "none":
                continue  # a key no token can name, or one that verifies nothing
            found[jwk.key_id] = _Key(jwk.key_id, jwk.algorithm_name, jwk.key)
        return found

    def _refresh(self) -> None:
        if self._jwks_path is None:
            return
        stamp = self._stamp(self._jwks_path)
        if stamp == self._jwks_stamp:
            return
        self._jwks_stamp = stamp
        if stamp is None:  # the file is gone: so are its keys
            self._jwks = {}
            return
        try:
            self._jwks = self._read_jwks(self._jwks_path)
        except ValueError:
            # Half-written (an editor saving): keep the old keys; the next change is read.
            self._jwks_stamp = None

    def candidates(self, kid: str | None, algorithm: str) -> list[_Key]:
        """The keys a token with header ``kid``/``alg`` may be verified with."""
        self._refresh()
        keys = {**self._jwks, **self._static}
        if kid is not None:
            key = keys.get(kid)
            if key is None:
                raise unauthorized("unknown key id (rotated or revoked?)")
            found = [key]
        else:
            found = list(keys.values())
        matching = [k for k in found if k.algorithm == algorithm]
        if not matching:
            raise unauthorized(f"algorithm {algorithm} is not accepted for this key")
        return matching


# ---------------------------------------------------------------------- grants


def event_items(body: bytes) -> list[Any] | None:
    """The messages of a JSON append, for the author checks; None if the body is no
    JSON the store would take (it refuses it then: this parse is laxer than the
    store's, never stricter) or obviously holds no event to check."""
    if not any(marker in body for marker in _EVENT_MARKERS):
        return None
    limit = MAX_JSON_DEPTH + 1 if body.lstrip()[:1] == b"[" else MAX_JSON_DEPTH
    if nesting_exceeds(body, limit):
        return None
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, list) else [value]


def stream_name(path: str) -> str | None:
    """A store path's name under ``/v1/stream/`` (None for any other path)."""
    if path.startswith(P.STREAM_PATH_PREFIX) and path != P.STREAM_PATH_PREFIX:
        return path[len(P.STREAM_PATH_PREFIX) :]
    return None


def _pattern_covers(pattern: str, name: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith("/*"):
        # Whole segments: "a/*" covers "a/x" and deeper, never "a" nor "ab".
        return name.startswith(pattern[:-1]) and len(name) > len(pattern) - 1
    return name == pattern


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified token allows. ``exp`` is in Unix seconds."""

    sub: str
    kind: str
    streams: tuple[str, ...]
    can: frozenset[str]
    exp: float
    name: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def server_admin(self) -> bool:
        """``admin`` on every stream: also the server's own routes."""
        return "admin" in self.can and "*" in self.streams

    def covers(self, path: str) -> bool:
        name = stream_name(path)
        return name is not None and any(_pattern_covers(p, name) for p in self.streams)

    def allows(self, capability: str, path: str) -> bool:
        return self.covers(path) and (capability in self.can or "admin" in self.can)

    def require(self, capability: str, path: str) -> None:
        """403 unless this token may ``capability`` on ``path``."""
        if not self.covers(path):
            raise forbidden(f"the token does not cover stream {stream_name(path) or path!r}")
        if capability not in self.can and "admin" not in self.can:
            raise forbidden(f"the token lacks the {capability!r} capability")

    def check_events(
        self, path: str, items: Iterable[Any], authorize_cancel: CancelHook | None = None
    ) -> None:
        """403 for an appended message that speaks for someone else, or a cancel or
        steer this token may not send. ``items`` are the appended JSON values."""
        admin = "admin" in self.can
        for item in items:
            if not isinstance(item, dict):
                continue
            if "author" in item and not admin:
                author = item["author"]
                if not isinstance(author, dict):
                    raise forbidden("an event's author must be an object {id, kind}")
                if author.get("id") != self.sub:
                    raise forbidden("an event's author.id must be the token's sub")
                if author.get("kind") != self.kind:
                    raise forbidden(f"an event's author.kind must be the token's {self.kind!r}")
            event_type = item.get("type")
            if event_type == "cancel":
                allowed = (
                    authorize_cancel(self.claims, path, item)
                    if authorize_cancel is not None
                    else admin or "cancel" in self.can
                )
                if not allowed:
                    raise forbidden("a cancel event needs the 'cancel' capability")
            elif event_type == "steer" and not admin and "steer" not in self.can:
                raise forbidden("a steer event needs the 'steer' capability")

    def check_member(self, client_id: str, kind: str | None) -> None:
        """403 unless a presence member is this token's own: ``client_id`` is its sub
        and ``kind`` its kind ("agent" for agents, "user" for every other kind, as
        the SDK's ``Session`` sends it)."""
        if "admin" in self.can:
            return
        if client_id != self.sub:
            raise forbidden("a presence member's client_id must be the token's sub")
        if kind is not None and kind != ("agent" if self.kind == "agent" else "user"):
            raise forbidden(f"a presence member's kind does not match the token's {self.kind!r}")


def _grant(claims: dict[str, Any]) -> Grant:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise unauthorized("the token has no sub")
    kind = claims.get("kind", "user")
    if kind not in KINDS:
        raise unauthorized(f"the token's kind must be one of {', '.join(KINDS)}")
    streams = claims.get("streams", [])
    if not isinstance(streams, list) or not all(isinstance(s, str) and s for s in streams):
        raise unauthorized("the token's streams must be a list of stream paths")
    can = claims.get("can", [])
    if not isinstance(can, list) or not all(isinstance(c, str) for c in can):
        raise unauthorized("the token's can must be a list of capabilities")
    unknown = sorted(set(can) - CAPABILITIES)
    if unknown:
        raise unauthorized(f"the token names an unknown capability {unknown[0]!r}")
    name = claims.get("name")
    return Grant(
        sub=sub,
        kind=kind,
        streams=tuple(streams),
        can=frozenset(can),
        exp=float(claims["exp"]),
        name=name if isinstance(name, str) else None,
        claims=claims,
    )


# ---------------------------------------------------------------------- the policy


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header (None without one)."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized("the Authorization header must be 'Bearer <token>'")
    return token.strip()


class _Counter:
    """Open connections per key, with a cap."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.open: dict[str, int] = {}

    def check(self, key: str) -> None:
        if self.open.get(key, 0) >= self.limit:
            raise AuthError(
                429, f"more than {self.limit} open connections {self.what}", retry_after=1
            )

    def add(self, key: str, step: int) -> None:
        count = self.open.get(key, 0) + step
        if count > 0:
            self.open[key] = count
        else:
            self.open.pop(key, None)


class _RequestRate:
    """HTTP requests per key (a token's ``sub``): a token bucket of ``burst``
    requests refilled at ``rate`` a second; over it, 429 with ``Retry-After``.

    Keyed by subject, not by connection: HTTP clients pool and reopen
    connections at will, so a per-connection count would not bound anything.
    Idle keys (a full bucket) are dropped once the table grows past ``MAX_KEYS``.
    """

    MAX_KEYS = 10_000

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str) -> None:
        now = self.clock()
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            raise AuthError(
                429,
                f"more than {self.rate:g} requests a second for this token",
                retry_after=(1.0 - tokens) / self.rate,
            )
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > self.MAX_KEYS:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        full = [
            key
            for key, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self.rate >= self.burst
        ]
        for key in full:
            del self._buckets[key]


class Authority:
    """The server's access policy with ``--auth``."""

    def __init__(
        self,
        keys: KeySet,
        *,
        audience: str = AUDIENCE,
        issuer: str | None = None,
        origins: Iterable[str] = (),
        max_connections_per_ip: int = 256,
        max_connections_per_subject: int = 64,
        http_rate: float = 1000.0,
        http_burst: int = 2000,
        authorize_cancel: CancelHook | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.audience = audience
        self.issuer = issuer
        self.origins = frozenset(origins)
        self.authorize_cancel = authorize_cancel
        self.clock = clock
        self._per_ip = _Counter(max_connections_per_ip, "from this address")
        self._per_subject = _Counter(max_connections_per_subject, "for this subject")
        self.requests = _RequestRate(http_rate, http_burst, time.monotonic)

    def verify(self, token: str | None) -> Grant:
        """The grant of ``token``; 401 if it is missing or does not verify."""
        import jwt

        if token is None:
            raise unauthorized("a bearer token is required")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise unauthorized("the token is not a JWT") from None
        algorithm = header.get("alg")
        kid = header.get("kid")
        if not isinstance(algorithm, str) or algorithm.lower() == "none":
            raise unauthorized("unsigned tokens are not accepted")
        if kid is not None and not isinstance(kid, str):
            raise unauthorized("the token's kid must be a string")
        claims: dict[str, Any] | None = None
        problem = "the token's signature does not verify"
        for key in self.keys.candidates(kid, algorithm):
            try:
                claims = jwt.decode(
                    token,
                    key.key,
                    algorithms=[key.algorithm],
                    audience=self.audience,
                    issuer=self.issuer,
                    leeway=LEEWAY,
                    options={"require": ["exp"]},
                )
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                problem = "the token has expired"
            except jwt.ImmatureSignatureError:
                problem = "the token is not valid yet (nbf or iat in the future)"
            except jwt.InvalidAudienceError:
                problem = "the token is for another audience"
            except jwt.InvalidIssuerError:
                problem = "the token is from another issuer"
            except jwt.MissingRequiredClaimError as exc:
                problem = f"the token has no {exc.claim} claim"
            except jwt.PyJWTError:
                problem = "the token is malformed"
            break
        if claims is None:
            raise unauthorized(problem)
        return _grant(claims)

    def check_origin(self, origin: str | None) -> None:
        """403 for a browser page from an origin not on the allowlist."""
        if origin is not None and origin not in self.origins:
            raise forbidden("requests from this Origin are not allowed")

    def cors_origin(self, origin: str | None) -> str | None:
        """The ``Access-Control-Allow-Origin`` to grant, if any."""
        return origin if origin is not None and origin in self.origins else None

    @contextmanager
    def connection(self, ip: str, grant: Grant) -> Iterator[None]:
        """Count one open socket or live read; 429 over a cap (checked before it opens)."""
        self._per_ip.check(ip)
        self._per_subject.check(grant.sub)
        self._per_ip.add(ip, 1)
        self._per_subject.add(grant.sub, 1)
        try:
            yield
        finally:
            self._per_ip.add(ip, -1)
            self._per_subject.add(grant.sub, -1)


# ---------------------------------------------------------------------- minting


def stream_patterns(
    sessions: Iterable[str] = (), prefixes: Iterable[str] = (), streams: Iterable[str] = ()
) -> list[str]:
    """The ``streams`` claim: ``sessions/<id>`` per session, ``<prefix>/*`` per prefix."""
    found = [f"sessions/{s}" for s in sessions]
    found += [p if p == "*" or p.endswith("/*") else p.rstrip("/") + "/*" for p in prefixes]
    found += list(streams)
    return found


def mint(
    *,
    sub: str,
    streams: Iterable[str],
    can: Iterable[str],
    ttl: float,
    kind: str = "user",
    name: str | None = None,
    audience: str = AUDIENCE,
    issuer: str | None = None,
    secret: bytes | None = None,
    private_key: Any = None,
    now: float | None = None,
) -> str:
    """A signed token (HS256 with ``secret``, else RS/ES/EdDSA with ``private_key``)."""
    import jwt

    capabilities = sorted(set(can))
    unknown = sorted(set(capabilities) - CAPABILITIES)
    if unknown:
        raise ValueError(
            f"unknown capability {unknown[0]!r} (use {', '.join(sorted(CAPABILITIES))})"
        )
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "sub": sub,
        "kind": kind,
        "aud": audience,
        "iat": issued,
        "exp": issued + max(1, round(ttl)),
        "streams": list(streams),
        "can": capabilities,
    }
    if name is not None:
        claims["name"] = name
    if issuer is not None:
        claims["iss"] = issuer
    if secret is not None:
        return jwt.encode(claims, secret, algorithm="HS256", headers={"kid": secret_kid(secret)})
    if private_key is None:
        raise ValueError("mint needs a secret or a private key")
    public = private_key.public_key()
    return jwt.encode(
        claims,
        private_key,
        algorithm=algorithm_of(private_key),
        headers={"kid": public_kid(public)},
    )
