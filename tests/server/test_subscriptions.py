"""The reserved subscription API (protocol sections 6-7) over real sockets, both backends:
webhooks to a real receiver on 127.0.0.1 (signatures checked with cryptography),
callbacks and their fencing, pull-wake claims and leases, the SSRF rule, bad input."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mock_server._subscriptions import SubscriptionManager, glob_match
from mock_server._subscriptions_http import ControlApi
from mock_server.testing import RunningServer, serve
from tests._await import until

S = "/v1/stream"
SUBS = f"{S}/__ds/subscriptions"
JSON = {"Content-Type": "application/json"}


@dataclass
class Hook:
    """One POST the receiver got."""

    headers: dict[str, str]
    raw: bytes

    @property
    def body(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.raw)
        return parsed


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1: answers each POST with the next of ``answers``
    (status, JSON; the last one repeats), or never (``hang``)."""

    answers: list[tuple[int, Any]] = field(default_factory=lambda: [(200, {})])
    hang: bool = False
    hooks: asyncio.Queue[Hook] = field(default_factory=asyncio.Queue)
    url: str = ""
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _count: int = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/hook"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def next(self, timeout: float = 5.0) -> Hook:
        return await asyncio.wait_for(self.hooks.get(), timeout)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")[1:]
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines if x)
            }
            raw = await reader.readexactly(int(headers.get("content-length", "0")))
            await self.hooks.put(Hook(headers, raw))
            if self.hang:
                await reader.read()  # until the server gives up on us
                return
            status, answer = self.answers[min(self._count, len(self.answers) - 1)]
            self._count += 1
            payload = json.dumps(answer).encode()
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


@pytest.fixture
async def server(backend: str, tmp_path: Path) -> AsyncIterator[RunningServer]:
    data_dir = tmp_path / "data" if backend == "sqlite" else None
    async with serve(data_dir=data_dir, long_poll_timeout=0.5, subscriptions=True) as running:
        yield running


@pytest.fixture
async def http(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        yield client


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hooks = Receiver()
    await hooks.start()
    yield hooks
    await hooks.close()


def manager(server: RunningServer) -> SubscriptionManager:
    api = server.app.control_api
    assert isinstance(api, ControlApi)
    return api.manager


def subscription(server: RunningServer, sub_id: str) -> dict[str, Any]:
    reply = manager(server).get(sub_id)
    assert reply.body is not None
    return reply.body


def cursor(server: RunningServer, sub_id: str, path: str) -> str | None:
    for link in subscription(server, sub_id)["streams"]:
        if link["path"] == path:
            return str(link["acked_offset"])
    return None


async def get_json(url: str) -> Any:
    async with httpx.AsyncClient() as client:
        return (await client.get(url)).json()


def webhook(url: str, pattern: str = "events/*", **extra: Any) -> dict[str, Any]:
    return {"type": "webhook", "pattern": pattern, "webhook": {"url": url}, **extra}


def verify(hook: Hook, jwks: dict[str, Any]) -> dict[str, str]:
    """The signature's parts, once it verifies with the key its ``kid`` names."""
    parts = dict(item.split("=", 1) for item in hook.headers["webhook-signature"].split(","))
    (key,) = [k for k in jwks["keys"] if k["kid"] == parts["kid"]]
    public = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(key["x"] + "=="))
    signature = base64.urlsafe_b64decode(parts["ed25519"] + "==")
    public.verify(signature, parts["t"].encode() + b"." + hook.raw)  # raises if forged
    assert abs(time.time() - int(parts["t"])) < 60
    return parts


async def callback(
    http: httpx.AsyncClient, wake: dict[str, Any], token: str | None = None, **body: Any
) -> httpx.Response:
    return await http.post(
        wake["callback_url"],
        headers={"Authorization": f"Bearer {token or wake['callback_token']}"},
        json={"wake_id": wake["wake_id"], "generation": wake["generation"], **body},
    )


# ---------------------------------------------------------------------- configuration


async def test_create_reconfirm_conflict_and_the_signing_keys(
    server: RunningServer, http: httpx.AsyncClient, receiver: Receiver
) -> None:
    config = webhook(receiver.url, lease_ttl_ms=1000, description="d")
    created = await http.put(f"{SUBS}/a", json=config)
    assert created.status_code == 201
    body = created.json()
    assert body["id"] == body["subscription_id"] == "a"
    assert (body["type"], body["pattern"], body["lease_ttl_ms"]) == ("webhook", "events/*", 1000)
    assert body["status"] == "active"
    assert "webhook_secret" not in body
    assert "secret" not in json.dumps(body)
    signing = body["webhook"]["signing"]
    assert signing["jwks_url"] == f"{server.url}{S}/__ds/jwks.json"
    jwks = await http.get(signing["jwks_url"])
    assert jwks.status_code == 200
    assert jwks.headers["content-type"].startswith("application/jwk-set+json")
    (key,) = jwks.json()["keys"]
    assert key["kid"] == signing["kid"]
    assert key["kid"].startswith("ds_")
    assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("OKP", "Ed25519", "EdDSA", "sig")
    assert "d" not in key  # the private part stays private

    again = await http.put(f"{SUBS}/a", json=config)
    assert again.status_code == 200
    assert again.json()["created_at"] == body["created_at"]
    other = await http.put(f"{SUBS}/a", json={**config, "lease_ttl_ms": 2000})
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "SUBSCRIPTION_ALREADY_EXISTS"
    assert (await http.get(f"{SUBS}/a")).json()["lease_ttl_ms"] == 1000

    assert (await http.delete(f"{SUBS}/a")).status_code == 204
    assert (await http.get(f"{SUBS}/a")).json()["error"]["code"] == "SUBSCRIPTION_NOT_FOUND"


async def test_the_signing_key_outlives_a_restart_with_a_data_dir(tmp_path: Path) -> None:
    kids = []
    for _ in range(2):
        async with serve(data_dir=tmp_path / "d", subscriptions=True) as running:
            kids.append((await get_json(f"{running.url}{S}/__ds/jwks.json"))["keys"][0]["kid"])
    assert kids[0] == kids[1]
    assert (tmp_path / "d" / "webhook-signing-key.pem").stat().st_mode & 0o077 == 0


async def test_subscriptions_outlive_a_restart_with_a_data_dir(tmp_path: Path) -> None:
    pull = {"type": "pull-wake", "pattern": "jobs/*", "wake_stream": "w"}
    async with (
        serve(data_dir=tmp_path / "d", subscriptions=True) as running,
        httpx.AsyncClient(base_url=running.url) as http,
    ):
        await http.put(f"{S}/w", headers=JSON, content=b"[]")
        await http.put(f"{S}/jobs/1", headers=JSON, json={"n": 1})
        assert (await http.put(f"{SUBS}/p", json=pull)).status_code == 201
        await http.post(f"{S}/jobs/1", headers=JSON, json={"n": 2})
        claimed = (await http.post(f"{SUBS}/p/claim", json={"worker": "a"})).json()
        before = (await http.get(f"{SUBS}/p")).json()
    assert (tmp_path / "d" / "subscriptions.json").stat().st_mode & 0o077 == 0
    async with (
        serve(data_dir=tmp_path / "d", subscriptions=True) as running,
        httpx.AsyncClient(base_url=running.url) as http,
    ):
        assert (await http.put(f"{SUBS}/p", json=pull)).status_code == 200  # the same config
        # The claim did not survive: the pending work is woken again, one generation on,
        # and the old holder is fenced.
        await until(lambda: subscription(running, "p")["generation"] == claimed["generation"] + 1)
        after = (await http.get(f"{SUBS}/p")).json()
        assert after["streams"] == before["streams"]
        assert after["created_at"] == before["created_at"]
        stale = await http.post(
            f"{SUBS}/p/ack",
            headers={"Authorization": f"Bearer {claimed['token']}"},
            json={"wake_id": claimed["wake_id"], "generation": claimed["generation"]},
        )
        assert (stale.status_code, stale.json()["error"]["code"]) == (409, "FENCED")
        events = (await http.get(f"{S}/w")).json()
        assert [e["generation"] for e in events] == [1, 2]
        assert (await http.post(f"{SUBS}/p/claim", json={"worker": "b"})).status_code == 200


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/hook",
        "http://example.com/hook",
        "http://127.0.1.1/hook",
        "https://10.1.2.3/hook",
        "https://172.16.0.1/hook",
        "https://192.168.1.1/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/hook",
        "https://[fd00::1]/hook",
        "https://0.0.0.0/hook",
        "https://printer.localhost/hook",
        "ftp://example.com/hook",
        "https://user:pw@example.com/hook",
        "https:///nohost",
    ],
)
async def test_unsafe_webhook_urls_are_refused(http: httpx.AsyncClient, url: str) -> None:
    response = await http.put(f"{SUBS}/unsafe", json=webhook(url))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "WEBHOOK_URL_REJECTED"
    assert (await http.get(f"{SUBS}/unsafe")).status_code == 404


@pytest.mark.parametrize(
    "url", ["http://localhost:9/h", "http://127.0.0.7:9/h", "https://example.com/h"]
)
async def test_safe_webhook_urls_are_accepted(http: httpx.AsyncClient, url: str) -> None:
    assert (await http.put(f"{SUBS}/ok", json=webhook(url, pattern="nothing/*"))).status_code == 201


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (None, "JSON object"),
        ([], "JSON object"),
        ({"type": "email", "pattern": "a"}, "type"),
        ({"type": "webhook", "webhook": {"url": "http://localhost/h"}}, "pattern or streams"),
        ({"type": "webhook", "pattern": "a"}, "webhook.url"),
        ({"type": "webhook", "pattern": "a", "webhook": {"url": 5}}, "webhook.url"),
        ({"type": "pull-wake", "pattern": "a"}, "wake_stream"),
        ({"type": "pull-wake", "pattern": "a", "wake_stream": "w", "streams": ["w"]}, "wake"),
        ({"type": "pull-wake", "pattern": "a/b*", "wake_stream": "w"}, "whole segments"),
        ({"type": "pull-wake", "pattern": "/a", "wake_stream": "w"}, "relative"),
        ({"type": "pull-wake", "pattern": "__ds/x", "wake_stream": "w"}, "reserved"),
        ({"type": "pull-wake", "streams": ["a\nb"], "wake_stream": "w"}, "control character"),
        ({"type": "pull-wake", "streams": "a", "wake_stream": "w"}, "array"),
        ({"type": "pull-wake", "streams": [1], "wake_stream": "w"}, "non-empty string"),
        ({"type": "pull-wake", "pattern": "a", "wake_stream": "w", "lease_ttl_ms": 999}, "lease"),
        ({"type": "pull-wake", "pattern": "a", "wake_stream": "w", "lease_ttl_ms": 6e5}, "lease"),
        ({"type": "pull-wake", "pattern": "a", "wake_stream": "w", "lease_ttl_ms": True}, "lease"),
        ({"type": "pull-wake", "pattern": "a", "wake_stream": "w", "extra": 1}, "unknown"),
        ({"type": "pull-wake", "pattern": "a", "wake_stream": "w", "description": 1}, "desc"),
    ],
)
async def test_bad_subscription_bodies_are_400_and_change_nothing(
    http: httpx.AsyncClient, body: Any, message: str
) -> None:
    response = await http.put(f"{SUBS}/bad", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "INVALID_REQUEST"
    assert message in error["message"]
    assert (await http.get(f"{SUBS}/bad")).status_code == 404


async def test_bad_requests_and_routes(http: httpx.AsyncClient, receiver: Receiver) -> None:
    not_json = await http.put(f"{SUBS}/x", content=b"{nope", headers=JSON)
    assert (not_json.status_code, not_json.json()["error"]["code"]) == (400, "INVALID_REQUEST")
    nan = await http.put(f"{SUBS}/x", content=b'{"type":"webhook","lease_ttl_ms":NaN}')
    assert nan.status_code == 400
    bad_id = await http.put(f"{SUBS}/{'x' * 201}", json=webhook(receiver.url))
    assert bad_id.status_code == 400
    assert (await http.get(f"{SUBS}/missing")).status_code == 404
    assert (await http.post(f"{SUBS}/missing/claim", json={"worker": "w"})).status_code == 404
    for path in (f"{S}/__ds", f"{S}/__ds/x", f"{SUBS}", f"{SUBS}/x/nope"):
        response = await http.put(path, headers={"Content-Type": "text/plain"})
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "NOT_FOUND"
    wrong_method = await http.post(f"{S}/__ds/jwks.json")
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "GET"
    assert (await http.get("/health")).json()["streams"] == 0  # none of it made a stream

    await http.put(f"{SUBS}/w", json=webhook(receiver.url))
    assert (await http.post(f"{SUBS}/w/claim", json={"worker": "a"})).status_code == 400
    no_token = await http.post(f"{SUBS}/w/callback", json={"wake_id": "w_1", "generation": 1})
    assert (no_token.status_code, no_token.json()["error"]["code"]) == (401, "TOKEN_INVALID")
    forged = await http.post(
        f"{SUBS}/w/callback",
        headers={"Authorization": "Bearer e30.AAAA"},
        json={"wake_id": "w_1", "generation": 1},
    )
    assert (forged.status_code, forged.json()["error"]["code"]) == (401, "TOKEN_INVALID")
    for streams in ({"streams": []}, {"streams": [""]}, {"other": 1}, [1]):
        assert (await http.post(f"{SUBS}/w/streams", json=streams)).status_code == 400


# ---------------------------------------------------------------------- webhooks


async def test_a_webhook_is_signed_and_done_acks_its_snapshot(
    server: RunningServer, http: httpx.AsyncClient, receiver: Receiver
) -> None:
    receiver.answers = [(200, {"done": True})]
    created = (await http.put(f"{SUBS}/s", json=webhook(receiver.url, lease_ttl_ms=1000))).json()
    jwks = (await http.get(created["webhook"]["signing"]["jwks_url"])).json()
    await http.put(f"{S}/events/one", headers=JSON, json={"n": 1})

    hook = await receiver.next()
    assert hook.headers["content-type"] == "application/json"
    assert verify(hook, jwks)["kid"] == created["webhook"]["signing"]["kid"]
    body = hook.body
    assert body["subscription_id"] == "s"
    assert body["generation"] == 1
    assert body["wake_id"].startswith("w_")
    assert body["callback_url"] == f"{server.url}{SUBS}/s/callback"
    (stream,) = body["streams"]
    assert stream["path"] == "events/one"
    assert stream["link_type"] == "glob"
    assert stream["has_pending"] is True
    assert stream["acked_offset"] != stream["tail_offset"]
    await until(lambda: cursor(server, "s", "events/one") == stream["tail_offset"])
    assert subscription(server, "s")["status"] == "active"

    # A second append wakes again, with the next generation.
    await http.post(f"{S}/events/one", headers=JSON, json={"n": 2})
    second = (await receiver.next()).body
    assert second["generation"] == 2
    assert second["wake_id"] != body["wake_id"]
    assert second["streams"][0]["acked_offset"] == stream["tail_offset"]


async def test_callback_acks_and_a_stale_wake_is_fenced(
    server: RunningServer, http: httpx.AsyncClient, receiver: Receiver
) -> None:
    await http.put(f"{SUBS}/c", json=webhook(receiver.url))
    await http.put(f"{S}/events/a", headers=JSON, json={"n": 1})
    wake = (await receiver.next()).body
    tail = wake["streams"][0]["tail_offset"]
    acks = [{"stream": "events/a", "offset": tail}]

    heartbeat = await callback(http, wake, acks=acks)
    assert heartbeat.json() == {"ok": True, "next_wake": False}
    assert cursor(server, "c", "events/a") == tail
    done = await callback(http, wake, acks=acks, done=True)
    assert (done.status_code, done.json()) == (200, {"ok": True, "next_wake": False})
    stale = await callback(http, wake, acks=acks, done=True)
    assert (stale.status_code, stale.json()["error"]["code"]) == (409, "FENCED")

    await http.post(f"{S}/events/a", headers=JSON, json={"n": 2})
    fresh = (await receiver.next()).body
    assert fresh["generation"] == wake["generation"] + 1
    # The old generation's token, or the new token with the old wake, is fenced;
    # a token of another subscription is not a token at all.
    assert (await callback(http, fresh, token=wake["callback_token"])).status_code == 409
    replay = await callback(http, wake, token=fresh["callback_token"])
    assert replay.status_code == 409
    assert (await http.put(f"{SUBS}/other", json=webhook(receiver.url))).status_code == 201
    foreign = await http.post(
        f"{SUBS}/other/callback",
        headers={"Authorization": f"Bearer {fresh['callback_token']}"},
        json={"wake_id": fresh["wake_id"], "generation": fresh["generation"]},
    )
    assert foreign.status_code == 401
    # Acks are checked before anything moves: one bad ack moves no cursor.
    before = cursor(server, "c", "events/a")
    new_tail = fresh["streams"][0]["tail_offset"]
    mixed = [{"stream": "events/a", "offset": new_tail}, {"stream": "events/zz", "offset": tail}]
    refused = await callback(http, fresh, acks=mixed, done=True)
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "INVALID_OFFSET")
    back = await callback(http, fresh, acks=[{"stream": "events/a", "offset": "1_2"}])
    assert back.status_code == 400
    assert cursor(server, "c", "events/a") == before
    assert (await callback(http, fresh, acks=mixed[:1], done=True)).status_code == 200
    assert cursor(server, "c", "events/a") == new_tail
    # Deleted: its callbacks fail and move nothing.
    assert (await http.delete(f"{SUBS}/c")).status_code == 204
    assert (await callback(http, fresh)).status_code == 404


async def test_an_unanswered_wake_is_fenced_when_its_lease_runs_out(
    server: RunningServer, http: httpx.AsyncClient, receiver: Receiver
) -> None:
    await http.put(f"{SUBS}/l", json=webhook(receiver.url, lease_ttl_ms=1000))
    await http.put(f"{S}/events/slow", headers=JSON, json={"n": 1})
    first = (await receiver.next()).body
    # No callback: after the 1 s lease the same pending work is woken again.
    second = (await receiver.next(timeout=5)).body
    assert second["generation"] == first["generation"] + 1
    assert second["streams"] == first["streams"]
    late = await callback(http, first, done=True)
    assert (late.status_code, late.json()["error"]["code"]) == (409, "FENCED")
    assert late.json()["error"]["generation"] == second["generation"]
    assert (await callback(http, second, done=True)).status_code == 200


async def test_a_refusing_receiver_is_retried_with_the_same_wake(
    server: RunningServer, http: httpx.AsyncClient, receiver: Receiver
) -> None:
    receiver.answers = [(503, {}), (200, {"done": True})]
    await http.put(f"{SUBS}/r", json=webhook(receiver.url))
    await http.put(f"{S}/events/r", headers=JSON, json={"n": 1})
    refused = await receiver.next()
    await until(lambda: subscription(server, "r")["status"] == "failed")
    assert "next_attempt_at" in subscription(server, "r")
    retried = await receiver.next(timeout=5)  # after 1 s +-20%
    assert retried.body["wake_id"] == refused.body["wake_id"]
    tail = retried.body["streams"][0]["tail_offset"]
    await until(lambda: cursor(server, "r", "events/r") == tail)
    assert subscription(server, "r")["status"] == "active"


async def test_a_hanging_receiver_blocks_nothing_and_stops_with_the_server() -> None:
    hanging = Receiver(hang=True)
    await hanging.start()
    try:
        async with (
            serve(subscriptions=True) as running,
            httpx.AsyncClient(base_url=running.url, timeout=5) as http,
        ):
            await http.put(f"{SUBS}/h", json=webhook(hanging.url))
            await http.put(f"{S}/events/h", headers=JSON, json={"n": 1})
            await hanging.next()
            assert (await http.get(f"{S}/events/h")).json() == [{"n": 1}]
            assert (await http.get(f"{SUBS}/h")).status_code == 200
            stopping = time.monotonic()
        assert time.monotonic() - stopping < 3  # the delivery was cancelled, not awaited
    finally:
        await hanging.close()


# ---------------------------------------------------------------------- links


def test_globs() -> None:
    assert glob_match("events/*", "events/a")
    assert not glob_match("events/*", "events/a/b")
    assert not glob_match("events/*", "events")
    assert glob_match("events/**", "events")
    assert glob_match("events/**", "events/a/b")
    assert glob_match("**/log", "a/b/log")
    assert glob_match("**/log", "log")
    assert glob_match("a/**/z", "a/z")
    assert glob_match("a/**/z", "a/b/c/z")
    assert not glob_match("a/**/z", "a/b/c")
    assert glob_match("*/x/*", "a/x/b")
    assert not glob_match("*/x/*", "a/y/b")


async def test_explicit_links_and_glob_links(
    server: RunningServer, http: httpx.AsyncClient, receiver: Receiver
) -> None:
    await http.put(f"{S}/events/old", headers=JSON, json={"n": 0})
    config = {"type": "webhook", "pattern": "events/*", "streams": ["manual/a"]}
    config["webhook"] = {"url": receiver.url}
    body = (await http.put(f"{SUBS}/e", json=config)).json()
    links = {link["path"]: link for link in body["streams"]}
    assert links["manual/a"]["link_type"] == "explicit"
    # An existing stream is linked at its tail: history is not replayed.
    old = links["events/old"]
    assert old["link_type"] == "glob"
    assert old["acked_offset"] == (await http.head(f"{S}/events/old")).headers["stream-next-offset"]

    assert (
        await http.post(f"{SUBS}/e/streams", json={"streams": ["events/old"]})
    ).status_code == 204
    assert cursor(server, "e", "events/old") == old["acked_offset"]  # its cursor kept
    links = {x["path"]: x for x in subscription(server, "e")["streams"]}
    assert links["events/old"]["link_type"] == "explicit"
    assert (await http.delete(f"{SUBS}/e/streams/events%2Fold")).status_code == 204
    links = {x["path"]: x for x in subscription(server, "e")["streams"]}
    assert links["events/old"]["link_type"] == "glob"  # the pattern still matches
    assert (await http.post(f"{SUBS}/e/streams", json={"streams": ["manual/b"]})).status_code == 204
    assert (await http.delete(f"{SUBS}/e/streams/manual/b")).status_code == 204
    assert (await http.delete(f"{SUBS}/e/streams/manual/b")).status_code == 204  # idempotent
    assert {x["path"] for x in subscription(server, "e")["streams"]} == {"manual/a", "events/old"}
    assert receiver.hooks.empty()

    # A stream that is explicitly linked before it exists wakes once it has data.
    await http.put(f"{S}/manual/a", headers=JSON, json={"n": 1})
    wake = (await receiver.next()).body
    assert [s["path"] for s in wake["streams"] if s["has_pending"]] == ["manual/a"]


# ---------------------------------------------------------------------- pull-wake


async def test_pull_wake_claim_ack_release_and_lease_expiry(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    await http.put(f"{S}/wake/pool", headers=JSON, content=b"[]")
    config = {"type": "pull-wake", "pattern": "**", "wake_stream": "wake/pool"}
    assert (await http.put(f"{SUBS}/p", json={**config, "lease_ttl_ms": 1000})).status_code == 201
    await http.put(f"{S}/jobs/1", headers=JSON, json={"job": 1})

    async def wake_events() -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = (await http.get(f"{S}/wake/pool")).json()
        return events

    await until(lambda: subscription(server, "p")["generation"] == 1)
    (event,) = await wake_events()
    assert (event["type"], event["subscription_id"], event["stream"]) == ("wake", "p", "jobs/1")
    assert event["generation"] == 1

    claim = await http.post(f"{SUBS}/p/claim", json={"worker": "w1"})
    assert claim.status_code == 200
    claimed = claim.json()
    assert claimed["generation"] == 1
    assert claimed["lease_ttl_ms"] == 1000
    assert {s["path"] for s in claimed["streams"]} == {"jobs/1"}  # not its own wake stream
    busy = await http.post(f"{SUBS}/p/claim", json={"worker": "w2"})
    assert busy.status_code == 409
    assert busy.json()["error"] | {"message": None} == {
        "code": "ALREADY_CLAIMED",
        "current_holder": "w1",
        "generation": 1,
        "message": None,
    }
    auth = {"Authorization": f"Bearer {claimed['token']}"}
    stamp = {"wake_id": claimed["wake_id"], "generation": 1}
    heartbeat = await http.post(f"{SUBS}/p/ack", headers=auth, json=stamp)
    assert heartbeat.json() == {"ok": True, "next_wake": False}

    # Release without acking: the work is still pending, so a new wake is written.
    assert (await http.post(f"{SUBS}/p/release", headers=auth, json=stamp)).status_code == 204
    events = await wake_events()
    assert [e["generation"] for e in events] == [1, 2]
    stale = await http.post(f"{SUBS}/p/ack", headers=auth, json=stamp)
    assert (stale.status_code, stale.json()["error"]["code"]) == (409, "FENCED")

    # The next holder lets its 1 s lease run out: it is fenced, the work wakes again.
    second = (await http.post(f"{SUBS}/p/claim", json={"worker": "w2"})).json()
    assert second["generation"] == 2
    await until(lambda: subscription(server, "p")["generation"] == 3)
    late = await http.post(
        f"{SUBS}/p/ack",
        headers={"Authorization": f"Bearer {second['token']}"},
        json={"wake_id": second["wake_id"], "generation": 2, "done": True},
    )
    assert (late.status_code, late.json()["error"]["code"]) == (409, "FENCED")

    third = (await http.post(f"{SUBS}/p/claim", json={"worker": "w3"})).json()
    tail = third["streams"][0]["tail_offset"]
    done = await http.post(
        f"{SUBS}/p/ack",
        headers={"Authorization": f"Bearer {third['token']}"},
        json={
            "wake_id": third["wake_id"],
            "generation": 3,
            "acks": [{"stream": "jobs/1", "offset": tail}],
            "done": True,
        },
    )
    assert done.json() == {"ok": True, "next_wake": False}
    idle = await http.post(f"{SUBS}/p/claim", json={"worker": "w3"})
    assert (idle.status_code, idle.json()["error"]["code"]) == (409, "NO_PENDING_WORK")
    assert [e["generation"] for e in await wake_events()] == [1, 2, 3]


async def test_a_re_created_stream_is_pending_from_its_beginning(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    await http.put(f"{S}/w", headers=JSON, content=b"[]")
    config = {"type": "pull-wake", "streams": ["s"], "wake_stream": "w"}
    await http.put(f"{S}/s", headers=JSON, json={"old": 1})
    await http.put(f"{SUBS}/q", json=config)
    assert (await http.post(f"{SUBS}/q/claim", json={"worker": "a"})).status_code == 409
    await http.delete(f"{S}/s")
    await http.put(f"{S}/s", headers=JSON, json={"new": 1})
    claimed = await http.post(f"{SUBS}/q/claim", json={"worker": "a"})
    assert claimed.status_code == 200
    (stream,) = claimed.json()["streams"]
    assert stream["has_pending"] is True
    incarnation = (await http.head(f"{S}/s")).headers["stream-incarnation"]
    assert stream["acked_offset"] == f"{incarnation}_{0:016d}"
