"""Access control over HTTP (``--auth``, docs/security.md), on both storage backends.

The matrix: every operation with every kind of bad token is refused with the
right status and message, and an admin reads every stream back unchanged (same
bytes, same tail). Then the event checks (authors, cancel, steer), the URL token
of SSE, CORS, the connection caps, the server's own routes, the startup rule,
the token CLI and a fuzz with auth on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from mock_server._auth import CAPABILITIES, public_kid
from tests._await import finished
from tests.server import test_fuzz as fuzz
from tests.server.conftest import capture_server_log
from tests.server.test_auth_common import (
    ADMIN,
    FOREIGN_ORIGIN,
    JSON,
    ORIGIN,
    RSA_KEY,
    SECRET,
    AuthServer,
    S,
    admin_http,
    auth_server,
    bearer,
    claims,
    ed,
    es,
    hs,
    hs_with_public_pem,
    rs,
    snapshot,
    tampered,
    unsigned,
)

__all__ = ["admin_http", "auth_server"]  # fixtures, imported to be found

VICTIM = "sessions/victim"
TEAM_A, TEAM_AB = "sessions/team-a", "sessions/team-ab"
ANN = {"id": "ann", "kind": "user"}
HISTORY = [
    {"type": "message", "author": ANN, "text": "hello"},
    {"type": "message", "author": {"id": "bot", "kind": "agent"}, "text": "hi"},
]
# Every stream a refused request could have touched (the "-new" ones must stay absent).
WATCHED = [VICTIM, TEAM_A, TEAM_AB] + [f"{p}-new" for p in (VICTIM, TEAM_A, TEAM_AB)]


async def seed(admin: httpx.AsyncClient) -> None:
    for path in (VICTIM, TEAM_A, TEAM_AB):
        created = await admin.put(f"{S}/{path}", headers=JSON, content=json.dumps(HISTORY))
        assert created.status_code == 201, created.text


# ---------------------------------------------------------------- operations

Send = Callable[[httpx.AsyncClient, str, dict[str, str]], Awaitable[httpx.Response]]


async def _sse(http: httpx.AsyncClient, path: str, headers: dict[str, str]) -> httpx.Response:
    params = {"offset": "-1", "live": "sse"}
    async with http.stream("GET", f"{S}/{path}", params=params, headers=headers) as response:
        if response.status_code >= 300:
            await response.aread()
        return response


async def _long_poll(http: httpx.AsyncClient, path: str, headers: dict[str, str]) -> httpx.Response:
    return await http.get(
        f"{S}/{path}", params={"offset": "now", "live": "long-poll"}, headers=headers
    )


@dataclass(frozen=True)
class Op:
    name: str
    capability: str
    send: Send
    new_stream: bool = False  # it creates target + "-new"

    def path(self, target: str) -> str:
        return f"{target}-new" if self.new_stream else target


OPS = [
    Op("create", "create", lambda h, p, hd: h.put(f"{S}/{p}", headers={**JSON, **hd}), True),
    Op(
        "append",
        "append",
        lambda h, p, hd: h.post(
            f"{S}/{p}", headers={**JSON, **hd}, json={"type": "message", "author": ANN}
        ),
    ),
    Op("read", "read", lambda h, p, hd: h.get(f"{S}/{p}", params={"offset": "-1"}, headers=hd)),
    Op("long-poll", "read", _long_poll),
    Op("sse", "read", _sse),
    Op("head", "read", lambda h, p, hd: h.head(f"{S}/{p}", headers=hd)),
    Op("delete", "delete", lambda h, p, hd: h.delete(f"{S}/{p}", headers=hd)),
    Op(
        "close",
        "delete",
        lambda h, p, hd: h.post(f"{S}/{p}", headers={"Stream-Closed": "true", **hd}),
    ),
]

# ---------------------------------------------------------------- tokens

Token = Callable[[str, str], str | None]
"""A case's token for (the stream the request touches, the capability it needs)."""


def good(path: str, capability: str, **extra: Any) -> dict[str, Any]:
    return claims("ann", [path], [capability], **extra)


def _all_but(capability: str) -> list[str]:
    return sorted(CAPABILITIES - {capability, "admin"})


@dataclass(frozen=True)
class Case:
    name: str
    token: Token
    status: int
    message: str  # a part of the refusal's message
    target: str = VICTIM
    origin: str | None = None
    revoke: bool = False  # the Ed25519 key is removed from the JWKS first


RSA_KID = public_kid(RSA_KEY.public_key())
NOW = int(time.time())

CASES = [
    # 401: the token does not verify
    Case("missing", lambda p, c: None, 401, "bearer token is required"),
    Case("malformed", lambda p, c: "not-a-jwt", 401, "not a JWT"),
    Case("expired", lambda p, c: hs(good(p, c, ttl=-120)), 401, "expired"),
    Case("not yet valid", lambda p, c: hs(good(p, c, nbf=NOW + 600)), 401, "not valid yet"),
    Case("tampered", lambda p, c: tampered(hs(good(p, c))), 401, "signature does not verify"),
    Case("alg none", lambda p, c: unsigned(good(p, c)), 401, "unsigned"),
    Case(
        "HS/RS confusion, kid", lambda p, c: hs_with_public_pem(good(p, c), RSA_KID), 401, "HS256"
    ),
    Case("HS/RS confusion", lambda p, c: hs_with_public_pem(good(p, c), None), 401, "signature"),
    Case("wrong audience", lambda p, c: hs(good(p, c, aud="other")), 401, "audience"),
    Case("revoked key", lambda p, c: ed(good(p, c)), 401, "unknown key id", revoke=True),
    # 403: verified, but not allowed
    Case("wrong session", lambda p, c: hs(claims("ann", ["sessions/other"], [c])), 403, "cover"),
    Case(
        "prefix vs itself",
        lambda p, c: hs(claims("ann", [f"{TEAM_A}/*"], [c])),
        403,
        "cover",
        target=TEAM_A,
    ),
    Case(
        "prefix escape",
        lambda p, c: hs(claims("ann", [f"{TEAM_A}/*"], [c])),
        403,
        "cover",
        target=TEAM_AB,
    ),
    Case("no capability", lambda p, c: hs(claims("ann", [p], _all_but(c))), 403, "lacks"),
    Case("foreign Origin", lambda p, c: hs(good(p, c)), 403, "Origin", origin=FOREIGN_ORIGIN),
]


def _headers(token: str | None, origin: str | None) -> dict[str, str]:
    headers = bearer(token) if token is not None else {}
    if origin is not None:
        headers["Origin"] = origin
    return headers


def assert_refused(response: httpx.Response, status: int, message: str, where: str) -> None:
    assert response.status_code == status, f"{where}: {response.status_code} {response.text}"
    error = response.json()["error"] if response.content else None
    if response.request.method != "HEAD":
        assert error is not None, where
        assert error["code"] == ("unauthorized" if status == 401 else "forbidden"), where
        assert message in error["message"], f"{where}: {error['message']!r}"
    scope = "invalid_token" if status == 401 else "insufficient_scope"
    assert f'error="{scope}"' in response.headers["www-authenticate"], where


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_every_operation_refuses_a_bad_token_and_changes_nothing(
    auth_server: AuthServer, admin_http: httpx.AsyncClient, case: Case
) -> None:
    await seed(admin_http)
    if case.revoke:
        assert (await admin_http.get(f"{S}/{VICTIM}", params={"offset": "-1"})).status_code == 200
        # The key verifies before the rotation ...
        async with httpx.AsyncClient(base_url=auth_server.url) as http:
            ok = await http.head(f"{S}/{VICTIM}", headers=bearer(ed(good(VICTIM, "read"))))
            assert ok.status_code == 200
        auth_server.revoke_ed_key()  # ... and not after it
    before = await snapshot(admin_http, WATCHED)
    async with httpx.AsyncClient(base_url=auth_server.url, timeout=10) as http:
        for op in OPS:
            path = op.path(case.target)
            response = await op.send(
                http, path, _headers(case.token(path, op.capability), case.origin)
            )
            assert_refused(response, case.status, case.message, f"{case.name} / {op.name}")
    assert await snapshot(admin_http, WATCHED) == before


@pytest.mark.parametrize(
    "sign", [hs, rs, es, ed], ids=["HS256 secret", "RS256 PEM", "ES256 JWKS", "EdDSA JWKS"]
)
async def test_a_good_token_is_let_through_for_every_operation(
    auth_server: AuthServer, admin_http: httpx.AsyncClient, sign: Callable[[Any], str]
) -> None:
    """The control row of the matrix: the same requests with a fitting token work."""
    await seed(admin_http)
    async with httpx.AsyncClient(base_url=auth_server.url, timeout=10) as http:
        for op in OPS:
            path = op.path(VICTIM)
            headers = _headers(sign(good(path, op.capability)), ORIGIN)
            response = await op.send(http, path, headers)
            assert response.status_code < 300, f"{op.name}: {response.status_code} {response.text}"
            assert response.headers.get("access-control-allow-origin") == ORIGIN
            if op.name == "delete":
                await seed_one(admin_http, VICTIM)


async def seed_one(http: httpx.AsyncClient, path: str, token: str | None = None) -> None:
    headers = {**JSON, **(bearer(token) if token else {})}
    created = await http.put(f"{S}/{path}", headers=headers, content=json.dumps(HISTORY))
    assert created.status_code == 201, created.text


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class EventCase:
    name: str
    body: bytes
    can: tuple[str, ...]
    status: int  # 204 written, 403 refused
    message: str = ""
    kind: str = "user"


def _body(value: Any) -> bytes:
    return json.dumps(value).encode()


BOB = {"id": "bob", "kind": "user"}
EVENT_CASES = [
    EventCase("own message", _body({"type": "message", "author": ANN}), ("append",), 204),
    EventCase("no author", _body({"type": "note"}), ("append",), 204),
    EventCase("as another user", _body({"author": BOB}), ("append",), 403, "author.id"),
    EventCase(
        "user as agent", _body({"author": {"id": "ann", "kind": "agent"}}), ("append",), 403, "kind"
    ),
    EventCase("author not an object", _body({"author": "ann"}), ("append",), 403, "author"),
    EventCase(
        "escaped key",
        b'{"\\u0061uthor": {"id": "bob", "kind": "user"}}',
        ("append",),
        403,
        "author.id",
    ),
    EventCase(
        "spoof inside a batch", _body([{"author": ANN}, {"author": BOB}]), ("append",), 403, "id"
    ),
    EventCase(
        "cancel without cancel",
        _body({"type": "cancel", "author": ANN}),
        ("append",),
        403,
        "cancel",
    ),
    EventCase(
        "cancel with cancel", _body({"type": "cancel", "author": ANN}), ("append", "cancel"), 204
    ),
    EventCase(
        "steer without steer", _body({"type": "steer", "author": ANN}), ("append",), 403, "steer"
    ),
    EventCase(
        "steer with steer", _body({"type": "steer", "author": ANN}), ("append", "steer"), 204
    ),
    EventCase("admin as anyone", _body({"author": {"id": "x", "kind": "system"}}), ("admin",), 204),
    EventCase(
        "agent as itself",
        _body({"author": {"id": "ann", "kind": "agent"}}),
        ("append",),
        204,
        kind="agent",
    ),
]


@pytest.mark.parametrize("case", EVENT_CASES, ids=[c.name for c in EVENT_CASES])
async def test_appended_events_speak_for_the_token(
    auth_server: AuthServer, admin_http: httpx.AsyncClient, case: EventCase
) -> None:
    await seed(admin_http)
    before = await snapshot(admin_http, [VICTIM])
    token = hs(claims("ann", [VICTIM], list(case.can), kind=case.kind))
    async with httpx.AsyncClient(base_url=auth_server.url, timeout=10) as http:
        response = await http.post(
            f"{S}/{VICTIM}", headers={**JSON, **bearer(token)}, content=case.body
        )
    if case.status == 403:
        assert_refused(response, 403, case.message, case.name)
        assert await snapshot(admin_http, [VICTIM]) == before
    else:
        assert response.status_code == case.status, response.text


async def test_authorize_cancel_hook_decides(backend: str, tmp_path: Path) -> None:
    from mock_server.testing import serve

    seen: list[tuple[str, str]] = []

    def only_own_turns(claims_: Any, path: str, event: Any) -> bool:
        seen.append((claims_["sub"], path))
        return bool(event.get("turn") == "mine")

    async with (
        serve(auth=True, auth_secret=SECRET, authorize_cancel=only_own_turns) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        await seed_one(http, VICTIM, ADMIN)
        token = hs(claims("ann", [VICTIM], ["append"]))
        cancel = {"type": "cancel", "author": ANN}
        refused = await http.post(
            f"{S}/{VICTIM}", headers={**JSON, **bearer(token)}, json={**cancel, "turn": "other"}
        )
        assert_refused(refused, 403, "cancel", "hook says no")
        allowed = await http.post(
            f"{S}/{VICTIM}", headers={**JSON, **bearer(token)}, json={**cancel, "turn": "mine"}
        )
        assert allowed.status_code == 204, allowed.text
    assert seen == [("ann", f"{S}/{VICTIM}")] * 2


async def test_a_fork_needs_read_on_its_source(
    auth_server: AuthServer, admin_http: httpx.AsyncClient
) -> None:
    await seed(admin_http)
    token = hs(claims("ann", ["sessions/mine"], ["create", "read"]))
    async with httpx.AsyncClient(base_url=auth_server.url) as http:
        response = await http.put(
            f"{S}/sessions/mine",
            headers={**JSON, **bearer(token), "Stream-Forked-From": f"{S}/{VICTIM}"},
        )
    assert_refused(response, 403, "cover", "fork")
    assert (await admin_http.head(f"{S}/sessions/mine")).status_code == 404


# ---------------------------------------------------------------- where tokens travel


async def test_sse_takes_the_token_in_the_url_and_the_log_never_shows_it(
    auth_server: AuthServer, admin_http: httpx.AsyncClient
) -> None:
    await seed(admin_http)
    token = hs(claims("ann", [VICTIM], ["read"]))
    logger = logging.getLogger("mock_server")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        for log in capture_server_log():
            async with (
                httpx.AsyncClient(base_url=auth_server.url) as http,
                http.stream(
                    "GET",
                    f"{S}/{VICTIM}",
                    params={"offset": "-1", "live": "sse", "access_token": token},
                ) as response,
            ):
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("event: control"):
                        break
            async with httpx.AsyncClient(base_url=auth_server.url) as http:
                # Anywhere else a token in the URL is refused (it would end up in logs).
                refused = await http.get(
                    f"{S}/{VICTIM}", params={"offset": "-1", "access_token": token}
                )
                assert_refused(refused, 401, "live=sse", "access_token on a catch-up read")
            await asyncio.sleep(0)
            lines = [r.getMessage() for r in log.records]
            assert any("access_token=***" in line for line in lines), lines
            assert not any(token in line for line in lines)
            assert not any(token.split(".")[2] in line for line in lines)
    finally:
        logger.setLevel(level)


async def test_cors_is_granted_to_listed_origins_only(auth_server: AuthServer) -> None:
    async with httpx.AsyncClient(base_url=auth_server.url) as http:
        listed = await http.options(f"{S}/{VICTIM}", headers={"Origin": ORIGIN})
        foreign = await http.options(f"{S}/{VICTIM}", headers={"Origin": FOREIGN_ORIGIN})
        health = await http.get("/health", headers={"Origin": FOREIGN_ORIGIN})
    assert listed.status_code == foreign.status_code == 204
    assert listed.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in foreign.headers
    assert health.status_code == 200  # /health stays open
    assert "access-control-allow-origin" not in health.headers


async def test_server_routes_need_an_admin_of_every_stream(
    auth_server: AuthServer, admin_http: httpx.AsyncClient
) -> None:
    scoped_admin = hs(claims("ann", ["sessions/*"], ["admin"]))
    async with httpx.AsyncClient(base_url=auth_server.url) as http:
        for path in ("/nowhere", f"{S}/__ds/subscriptions"):
            response = await http.get(path, headers=bearer(scoped_admin))
            assert_refused(response, 403, "admin", path)
    assert (await admin_http.get("/nowhere")).status_code == 404  # past the check


async def test_live_reads_count_against_the_subject_cap(
    auth_server: AuthServer, admin_http: httpx.AsyncClient
) -> None:
    """The fixture allows 4 connections per subject: a fifth live read gets 429."""
    await seed(admin_http)
    token = hs(claims("ann", [VICTIM], ["read"]))
    params = {"offset": "now", "live": "long-poll"}
    async with httpx.AsyncClient(base_url=auth_server.url, timeout=10) as http:
        polls = [
            asyncio.ensure_future(http.get(f"{S}/{VICTIM}", params=params, headers=bearer(token)))
            for _ in range(4)
        ]
        store = auth_server.running.store
        from tests._await import until

        await until(lambda: store.waiting(f"{S}/{VICTIM}") == 4)
        over = await http.get(f"{S}/{VICTIM}", params=params, headers=bearer(token))
        assert over.status_code == 429, over.text
        assert over.headers["retry-after"] == "1"
        assert over.json()["error"]["code"] == "rate_limited"
        # Other subjects, and catch-up reads, are not counted.
        other = hs(claims("bob", [VICTIM], ["read"]))
        assert (
            await http.get(f"{S}/{VICTIM}", params={"offset": "-1"}, headers=bearer(token))
        ).status_code == 200
        assert (await http.head(f"{S}/{VICTIM}", headers=bearer(other))).status_code == 200
        for poll in polls:
            assert (await poll).status_code == 204
        again = await http.get(f"{S}/{VICTIM}", params=params, headers=bearer(token))
        assert again.status_code == 204  # the slots were given back


# ---------------------------------------------------------------- the command line


async def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mock_server",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await finished(proc, timeout=30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_non_loopback_host_without_auth_refuses_to_start() -> None:
    code, out, err = await _run("--host", "0.0.0.0", "--port", "0")
    assert code == 2
    assert err.count("\n") == 1, err
    assert "--auth" in err, err
    assert "--insecure" in err, err
    assert out == ""


async def test_the_token_cli_mints_a_token_the_server_takes(
    auth_server: AuthServer, admin_http: httpx.AsyncClient, tmp_path: Path
) -> None:
    await seed(admin_http)
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET + b"\n")
    code, out, err = await _run(
        "token",
        "--secret-file",
        str(secret_file),
        "--session",
        "victim",
        "--can",
        "read,append",
        "--ttl",
        "10m",
        "--sub",
        "ann",
    )
    assert (code, err) == (0, "")
    token = out.strip()
    async with httpx.AsyncClient(base_url=auth_server.url) as http:
        read = await http.get(f"{S}/{VICTIM}", params={"offset": "-1"}, headers=bearer(token))
        assert read.status_code == 200
        assert read.json() == HISTORY
        refused = await http.delete(f"{S}/{VICTIM}", headers=bearer(token))
        assert_refused(refused, 403, "lacks", "CLI token without delete")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--can", "read,rwrite"], "unknown capability 'rwrite'"),
        (["--can", "read", "--ttl", "soon"], "--ttl"),
        (["--can", "read", "--kind", "robot"], "--kind"),
    ],
)
async def test_the_token_cli_refuses_bad_values_in_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET)
    code, out, err = await _run(
        "token", "--secret-file", str(secret_file), "--session", "s", "--sub", "ann", *args
    )
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert message in err, err
    assert err.startswith(("python -m mock_server token: error:", "durable-server token: error:"))


# ---------------------------------------------------------------- fuzz, with auth on

FUZZ_TOKENS = [
    None,
    ADMIN,
    hs(claims("fz", ["fz/*", "victim", "victim-json"], sorted(CAPABILITIES - {"admin"}))),
    hs(claims("fz", ["*"], ["read"], ttl=-100)),
    "garbage",
    unsigned(claims("fz", ["*"], ["admin"])),
]


async def test_fuzz_with_auth_on_never_5xx_never_a_traceback(tmp_path: Path, backend: str) -> None:
    from mock_server.testing import serve

    async with (
        serve(
            data_dir=tmp_path / "data" if backend == "sqlite" else None,
            long_poll_timeout=0.05,
            sse_max_duration=0.2,
            max_body_bytes=16 * 1024,
            auth=True,
            auth_secret=SECRET,
            allow_origin=[ORIGIN],
        ) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10, headers=bearer(ADMIN)) as admin,
    ):
        await fuzz._setup(admin)
        before = {name: await fuzz.snapshot(admin, name) for name in fuzz.VICTIMS}
        known = [str(snap[2]) for snap in before.values()]
        port = int(server.url.rsplit(":", 1)[1])
        for seed_ in fuzz.SEEDS:
            rng = random.Random(seed_)
            for log in capture_server_log():
                for case in range(fuzz.HTTP_CASES):
                    request = fuzz.gen_request(rng, known)
                    token = rng.choice(FUZZ_TOKENS)
                    if token is not None:
                        where = rng.choice(["header", "header", "query"])
                        if where == "header":
                            request = request.replace(
                                b"\r\n", f"\r\nAuthorization: Bearer {token}\r\n".encode(), 1
                            )
                        else:
                            line, rest = request.split(b" HTTP/1.1", 1)
                            glue = b"&" if b"?" in line else b"?"
                            request = (
                                line + glue + f"access_token={token}".encode() + b" HTTP/1.1" + rest
                            )
                    answer = await asyncio.to_thread(fuzz.exchange, port, request)
                    where_ = f"seed {seed_} case {case}: {request[:400]!r}"
                    assert answer.startswith(b"HTTP/1.1 "), f"{where_}\n-> {answer[:300]!r}"
                    assert int(answer[9:12]) < 500, f"{where_}\n-> {answer[:500]!r}"
                    assert log.problems() == [], where_
        after = {name: await fuzz.snapshot(admin, name) for name in fuzz.VICTIMS}
        assert after == before


async def test_subscription_routes_with_their_own_tokens_pass_the_access_check(
    backend: str, tmp_path: Path
) -> None:
    """The __ds callback/ack/release routes take the subscription API's own bearer
    tokens (docs/subscriptions.md): --auth leaves them to it; the rest needs an admin."""
    from mock_server.testing import serve

    async with (
        serve(
            data_dir=tmp_path / "data" if backend == "sqlite" else None,
            auth=True,
            auth_secret=SECRET,
            subscriptions=True,
        ) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        user = hs(claims("ann", ["*"], ["read", "append", "create"]))
        listing = await http.get(f"{S}/__ds/subscriptions", headers=bearer(user))
        assert_refused(listing, 403, "admin", "the subscription API itself")
        ack = await http.post(
            f"{S}/__ds/subscriptions/nope/ack", headers=bearer("its-own-token"), json={}
        )
        assert ack.status_code != 401 or "JWT" not in ack.text, ack.text
        assert ack.status_code < 500


async def test_the_token_cli_signs_with_a_private_key(
    auth_server: AuthServer, admin_http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """RS256 with --private-key: the server has the public half (--auth-public-key)."""
    from cryptography.hazmat.primitives import serialization

    await seed(admin_http)
    key_file = tmp_path / "rsa-private.pem"
    key_file.write_bytes(
        RSA_KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    code, out, err = await _run(
        "token", "--private-key", str(key_file), "--prefix", "sessions", "--can", "read",
        "--sub", "helper", "--kind", "agent",
    )  # fmt: skip
    assert (code, err) == (0, "")
    async with httpx.AsyncClient(base_url=auth_server.url) as http:
        head = await http.head(f"{S}/{VICTIM}", headers=bearer(out.strip()))
    assert head.status_code == 200


def test_the_per_address_cap_counts_every_subject() -> None:
    from mock_server._auth import AuthError, Authority, Grant, KeySet

    authority = Authority(KeySet(secret=SECRET), max_connections_per_ip=2)
    grants = [Grant(sub, "user", ("*",), frozenset({"read"}), 0.0) for sub in ("a", "b", "c")]
    with authority.connection("10.0.0.1", grants[0]), authority.connection("10.0.0.1", grants[1]):
        with pytest.raises(AuthError) as refused, authority.connection("10.0.0.1", grants[2]):
            pass
        assert refused.value.status == 429
        with authority.connection("10.0.0.2", grants[2]):  # another address is not counted
            pass
    with authority.connection("10.0.0.1", grants[2]):  # the slots were given back
        pass


# ---------------------------------------------------------------- request rate, per token


async def test_a_token_over_its_request_rate_gets_429_and_changes_nothing(tmp_path: Path) -> None:
    """HTTP requests are counted per token subject (connections are pooled, so a
    per-connection count would bound nothing): a burst of 3, then 1 a second."""
    from mock_server.testing import serve

    async with serve(auth=True, auth_secret=SECRET, http_rate=1.0, http_burst=3) as running:
        admin_token = hs(claims("root", ["*"], ["admin"]))
        ann = hs(claims("ann", [VICTIM], ["read", "append", "create"]))
        async with httpx.AsyncClient(base_url=running.url, timeout=10) as http:
            url = f"{S}/{VICTIM}"
            made = await http.put(url, headers={**bearer(ann), "content-type": "application/json"})
            assert made.status_code == 201
            for _ in range(2):
                assert (await http.head(url, headers=bearer(ann))).status_code == 200
            refused = await http.post(
                url,
                json=[{"type": "note", "text": "over the rate"}],
                headers=bearer(ann),
            )
            assert refused.status_code == 429, refused.text
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == "rate_limited"
            # Another subject has its own bucket, and the refused append wrote nothing.
            read = await http.get(url, params={"offset": "-1"}, headers=bearer(admin_token))
            assert read.status_code == 200
            assert read.json() == []
