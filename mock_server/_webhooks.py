"""Webhook delivery for subscriptions: the signing key, the URL rule, the retry delays.

Nothing here knows about subscriptions' state (``_subscriptions.py`` does); this
module signs bytes, judges URLs and posts. Protocol sections 6.2, 6.5, 7.1, 12.8.

- ``SigningKey``: an Ed25519 key, its JWK Set (``kid`` = ``ds_`` + the RFC 7638
  thumbprint) and the ``Webhook-Signature`` header over ``"<t>.<raw body>"``.
- ``check_webhook_url``: the SSRF rule. https to a public host, or the development
  exception: http or https to ``localhost`` or ``127.0.0.x``.
- ``retry_delay``: exponential backoff from 1 s to 60 s with +-20% jitter.
- ``post_webhook``: one bounded POST (timeouts, a capped response body); never raises
  for what a receiver does, only returns ``Delivery``.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

KEY_FILE: Final = "webhook-signing-key.pem"
"""Where a SQLite data directory keeps the signing key, so it outlives a restart."""

RETRY_MIN: Final = 1.0
RETRY_MAX: Final = 60.0
RETRY_JITTER: Final = 0.2

DELIVERY_TIMEOUT: Final = httpx.Timeout(10.0, connect=5.0)
"""A receiver gets 5 s to accept the connection and 10 s for each read or write."""

MAX_RESPONSE_BYTES: Final = 64 * 1024
"""The most of a receiver's answer that is read: ``{"done": true}`` is all that matters."""


def b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class SigningKey:
    """The server's webhook signing key: private, with its public JWK and ``kid``."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        raw = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.x = b64url(raw)
        # RFC 8037 section 2 / RFC 7638: the thumbprint hashes the required members, sorted.
        canonical = json.dumps(
            {"crv": "Ed25519", "kty": "OKP", "x": self.x}, separators=(",", ":"), sort_keys=True
        )
        self.kid = "ds_" + b64url(hashlib.sha256(canonical.encode()).digest())[:22]

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def in_directory(cls, directory: Path) -> SigningKey:
        """The key kept in ``directory`` (made, readable by the owner only, if absent)."""
        path = directory / KEY_FILE
        try:
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            key = cls.generate()
            pem = key._private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            partial = path.with_suffix(".tmp")
            partial.write_bytes(pem)
            partial.chmod(0o600)
            partial.replace(path)
            return key
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ValueError(f"{path} holds no Ed25519 private key")
        return cls(loaded)

    def jwks(self) -> dict[str, Any]:
        """The JWK Set receivers verify with (``GET {root}/__ds/jwks.json``)."""
        key = {"kty": "OKP", "crv": "Ed25519", "kid": self.kid, "use": "sig", "alg": "EdDSA"}
        return {"keys": [{**key, "x": self.x}]}

    def signature_header(self, body: bytes, now: float | None = None) -> str:
        """``Webhook-Signature: t=<unix seconds>,kid=<kid>,ed25519=<base64url>``."""
        stamp = str(int(time.time() if now is None else now))
        signature = self._private.sign(stamp.encode() + b"." + body)
        return f"t={stamp},kid={self.kid},ed25519={b64url(signature)}"


class WebhookUrlRejected(ValueError):
    """The URL may not receive webhooks (protocol section 12.8)."""


_DEV_HOSTS: Final = ("localhost",)


def _is_dev_host(host: str) -> bool:
    if host in _DEV_HOSTS:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.version == 4 and address in ipaddress.ip_network("127.0.0.0/24")


def check_webhook_url(url: str) -> None:
    """Raises ``WebhookUrlRejected`` unless ``url`` may receive webhooks.

    Allowed: ``https://`` to a host that is not an IP literal of a private,
    loopback, link-local, multicast or reserved range (no ``.localhost`` names
    either); and, the development exception, ``http://`` or ``https://`` to
    ``localhost`` or ``127.0.0.x``. A host name is not resolved here: a public
    name that resolves to a private address is not caught (no DNS pinning).
    """
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        parts.port  # noqa: B018 - raises ValueError for a port that is no number
    except ValueError as exc:
        raise WebhookUrlRejected(f"webhook.url is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not host:
        raise WebhookUrlRejected("webhook.url must be an https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise WebhookUrlRejected("webhook.url must not carry credentials")
    if _is_dev_host(host):
        return
    if parts.scheme != "https":
        raise WebhookUrlRejected(
            "webhook.url must use https (http only for localhost or 127.0.0.x in development)"
        )
    if host.endswith(".localhost"):
        raise WebhookUrlRejected("webhook.url must not target a local host name")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return  # a name: allowed (see the docstring)
    if not address.is_global:
        raise WebhookUrlRejected(
            "webhook.url must not target a private, loopback, link-local or reserved address"
        )


def retry_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Seconds before retry ``attempt`` (1, 2, ...): 1, 2, 4 ... capped at 60, +-20%."""
    base = min(RETRY_MIN * 2 ** max(0, attempt - 1), RETRY_MAX)
    return float(base) * (1 + RETRY_JITTER * ((rng or random).random() * 2 - 1))


@dataclass(frozen=True, slots=True)
class Delivery:
    """What one POST to a receiver came to: accepted (2xx) or not, and if it said done."""

    accepted: bool
    done: bool = False
    problem: str = ""


async def post_webhook(
    client: httpx.AsyncClient, url: str, body: bytes, key: SigningKey
) -> Delivery:
    """POST a signed wake to ``url``. A receiver that refuses, hangs past the timeouts
    or answers non-2xx is a ``Delivery`` that was not accepted, never an exception."""
    headers = {"Content-Type": "application/json", "Webhook-Signature": key.signature_header(body)}
    try:
        async with client.stream("POST", url, content=body, headers=headers) as response:
            answer = bytearray()
            async for chunk in response.aiter_bytes():
                answer += chunk
                if len(answer) > MAX_RESPONSE_BYTES:
                    break
            status = response.status_code
    except httpx.HTTPError as exc:
        return Delivery(False, problem=f"{type(exc).__name__}: {exc}")
    if not 200 <= status < 300:
        return Delivery(False, problem=f"HTTP {status}")
    try:
        parsed = json.loads(answer)
    except (ValueError, RecursionError):
        parsed = None
    return Delivery(True, done=isinstance(parsed, dict) and parsed.get("done") is True)
