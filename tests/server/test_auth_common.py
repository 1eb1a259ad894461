"""Keys, tokens and an ``--auth`` server for the access-control tests (no tests here).

The server verifies with an HMAC secret, an RSA public key (PEM) and a JWKS file
holding an EC key and an Ed25519 key; the tests sign with all of them, and forge
tokens the server must refuse.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from mock_server._auth import public_kid, secret_kid
from mock_server.testing import RunningServer, serve

S = "/v1/stream"
JSON = {"Content-Type": "application/json"}
SECRET = b"test-secret-0123456789-abcdefghijklmnop"  # >= 32 bytes
ORIGIN = "https://chat.example"
FOREIGN_ORIGIN = "https://evil.example"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PEM = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
EC_KID, ED_KID = "ec-1", "ed-revocable"


def jwks(*, with_ed: bool = True) -> str:
    keys = [{**json.loads(ECAlgorithm.to_jwk(EC_KEY.public_key())), "kid": EC_KID, "alg": "ES256"}]
    if with_ed:
        ed = json.loads(OKPAlgorithm.to_jwk(ED_KEY.public_key()))
        keys.append({**ed, "kid": ED_KID, "alg": "EdDSA"})
    return json.dumps({"keys": keys})


def claims(
    sub: str = "ann",
    streams: list[str] | None = None,
    can: list[str] | None = None,
    *,
    kind: str = "user",
    ttl: float = 600,
    **extra: Any,
) -> dict[str, Any]:
    now = int(time.time())
    return {
        "sub": sub,
        "kind": kind,
        "aud": "durable-sessions",
        "iat": now,
        "exp": now + ttl,
        "streams": streams if streams is not None else ["*"],
        "can": can if can is not None else ["read"],
        **extra,
    }


def hs(payload: dict[str, Any]) -> str:
    """Signed with the server's HMAC secret."""
    return jwt.encode(payload, SECRET, algorithm="HS256", headers={"kid": secret_kid(SECRET)})


def rs(payload: dict[str, Any]) -> str:
    return jwt.encode(
        payload, RSA_KEY, algorithm="RS256", headers={"kid": public_kid(RSA_KEY.public_key())}
    )


def es(payload: dict[str, Any]) -> str:
    return jwt.encode(payload, EC_KEY, algorithm="ES256", headers={"kid": EC_KID})


def ed(payload: dict[str, Any]) -> str:
    return jwt.encode(payload, ED_KEY, algorithm="EdDSA", headers={"kid": ED_KID})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(payload: dict[str, Any]) -> str:
    """``alg: none``: no signature at all."""
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(payload).encode())}."


def hs_with_public_pem(payload: dict[str, Any], kid: str | None) -> str:
    """The HS/RS confusion attack: HS256 with the RSA public key's PEM as the secret
    (PyJWT refuses to make one, so it is made by hand)."""
    header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = hmac.new(RSA_PEM, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{_b64(signature)}"


def tampered(token: str) -> str:
    """``token`` with its payload changed (``sub`` becomes "root") and its signature kept."""
    head, payload, signature = token.split(".")
    claims_ = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims_["sub"] = "root"
    return f"{head}.{_b64(json.dumps(claims_).encode())}.{signature}"


ADMIN = hs(claims("root", ["*"], ["admin"], ttl=3600))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class AuthServer:
    running: RunningServer
    jwks_file: Path

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def ws_url(self) -> str:
        return self.running.url.replace("http://", "ws://") + "/v1/ws"

    def revoke_ed_key(self) -> None:
        """Rotate the JWKS: the Ed25519 key is gone (its tokens with it)."""
        self.jwks_file.write_text(jwks(with_ed=False))


@pytest.fixture
async def auth_server(backend: str, tmp_path: Path) -> AsyncIterator[AuthServer]:
    pem = tmp_path / "rsa.pem"
    pem.write_bytes(RSA_PEM)
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(jwks())
    async with serve(
        data_dir=tmp_path / "data" if backend == "sqlite" else None,
        long_poll_timeout=0.5,
        auth=True,
        auth_secret=SECRET,
        auth_public_key=[pem],
        auth_jwks=jwks_file,
        allow_origin=[ORIGIN],
        max_connections_per_subject=4,
    ) as running:
        yield AuthServer(running, jwks_file)


@pytest.fixture
async def admin_http(auth_server: AuthServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=auth_server.url, timeout=10, headers=bearer(ADMIN)) as c:
        yield c


async def snapshot(admin: httpx.AsyncClient, paths: list[str]) -> dict[str, tuple[Any, ...]]:
    """What an admin reads of each stream: status, bytes, tail, closed."""
    found = {}
    for path in paths:
        read = await admin.get(f"{S}/{path}", params={"offset": "-1"})
        found[path] = (
            read.status_code,
            read.content,
            read.headers.get("stream-next-offset"),
            read.headers.get("stream-closed"),
        )
    return found
