"""DELETE, TTL and expiry, forks, CORS, health and unknown routes."""

from __future__ import annotations

import httpx
import pytest

from .conftest import FakeClock

S = "/v1/stream"
TEXT = {"Content-Type": "text/plain"}


async def test_delete_then_404(http: httpx.AsyncClient) -> None:
    await http.put(f"{S}/d", headers=TEXT, content=b"x")
    assert (await http.delete(f"{S}/d")).status_code == 204
    assert (await http.get(f"{S}/d")).status_code == 404
    assert (await http.delete(f"{S}/d")).status_code == 404


async def test_sliding_ttl_expires_idle_streams(http: httpx.AsyncClient, clock: FakeClock) -> None:
    await http.put(f"{S}/ttl", headers={**TEXT, "Stream-TTL": "10"})
    clock.advance(8)
    assert (await http.get(f"{S}/ttl")).status_code == 200  # a read refreshes the TTL
    clock.advance(8)
    assert (await http.head(f"{S}/ttl")).status_code == 200  # HEAD does not refresh it
    clock.advance(3)
    assert (await http.get(f"{S}/ttl")).status_code == 404


async def test_expires_at_is_a_fixed_deadline(http: httpx.AsyncClient, clock: FakeClock) -> None:
    await http.put(f"{S}/exp", headers={**TEXT, "Stream-Expires-At": "2027-01-15T08:00:20Z"})
    clock.now = 1_800_000_000.0  # 2027-01-15T08:00:00Z
    assert (await http.post(f"{S}/exp", headers=TEXT, content=b"x")).status_code == 204
    clock.advance(25)
    assert (await http.post(f"{S}/exp", headers=TEXT, content=b"y")).status_code == 404
    recreated = await http.put(f"{S}/exp", headers=TEXT)
    assert recreated.status_code == 201  # an expired path can be used again


async def test_fork_inherits_history_but_not_later_appends(http: httpx.AsyncClient) -> None:
    await http.put(f"{S}/src", headers=TEXT, content=b"ab")
    fork = await http.put(f"{S}/fork", headers={"Stream-Forked-From": f"{S}/src"})
    assert fork.status_code == 201
    assert fork.headers["Content-Type"] == "text/plain"
    await http.post(f"{S}/src", headers=TEXT, content=b"-source")
    await http.post(f"{S}/fork", headers=TEXT, content=b"-fork")
    assert (await http.get(f"{S}/fork")).content == b"ab-fork"
    assert (await http.get(f"{S}/src")).content == b"ab-source"


async def test_fork_at_an_offset_and_sub_offset(http: httpx.AsyncClient) -> None:
    first = await http.put(f"{S}/src", headers=TEXT, content=b"first")
    await http.post(f"{S}/src", headers=TEXT, content=b"second")
    response = await http.put(
        f"{S}/fork",
        headers={
            "Stream-Forked-From": f"{S}/src",
            "Stream-Fork-Offset": first.headers["Stream-Next-Offset"],
            "Stream-Fork-Sub-Offset": "3",
        },
    )
    assert response.status_code == 201
    assert (await http.get(f"{S}/fork")).content == b"firstsec"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Stream-Forked-From": f"{S}/missing"}, 404),
        ({"Stream-Forked-From": f"{S}/src", "Content-Type": "application/json"}, 409),
        (
            {
                "Stream-Forked-From": f"{S}/src",
                "Stream-Fork-Offset": "INCARNATION_0000000000000099",  # past the tail
            },
            400,
        ),
        (
            {
                "Stream-Forked-From": f"{S}/src",
                "Stream-Fork-Offset": "INCARNATION_0000000000000001",  # inside the body
            },
            400,
        ),
        (
            {
                "Stream-Forked-From": f"{S}/src",
                "Stream-Fork-Offset": "9999999999999999_9999999999999999",
            },
            400,
        ),
        ({"Stream-Forked-From": f"{S}/src", "Stream-Fork-Offset": "garbage"}, 400),
        ({"Stream-Forked-From": f"{S}/src", "Stream-Fork-Sub-Offset": "1"}, 400),
    ],
)
async def test_bad_forks_are_refused(
    http: httpx.AsyncClient, headers: dict[str, str], status: int
) -> None:
    source = await http.put(f"{S}/src", headers=TEXT, content=b"ab")
    incarnation = source.headers["Stream-Incarnation"]
    headers = {k: v.replace("INCARNATION", incarnation) for k, v in headers.items()}
    response = await http.put(f"{S}/fork", headers=headers)
    assert response.status_code == status
    assert (await http.head(f"{S}/fork")).status_code == 404


async def test_deleting_a_forked_source_soft_deletes_it(http: httpx.AsyncClient) -> None:
    await http.put(f"{S}/src", headers=TEXT, content=b"ab")
    await http.put(f"{S}/fork", headers={"Stream-Forked-From": f"{S}/src"})
    assert (await http.delete(f"{S}/src")).status_code == 204
    assert (await http.get(f"{S}/src")).status_code == 410
    assert (await http.head(f"{S}/src")).status_code == 410
    assert (await http.put(f"{S}/src", headers=TEXT)).status_code == 409
    assert (await http.get(f"{S}/fork")).content == b"ab"  # the fork still reads through it
    assert (await http.delete(f"{S}/fork")).status_code == 204
    # the last fork gone, the soft-deleted source goes too and its path is free
    assert (await http.put(f"{S}/src", headers=TEXT)).status_code == 201


async def test_cors_preflight_and_headers(http: httpx.AsyncClient) -> None:
    response = await http.options(
        f"{S}/x",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    for name in ("producer-id", "stream-closed", "if-none-match", "content-type"):
        assert name in allowed
    exposed = (await http.get(f"{S}/x")).headers["Access-Control-Expose-Headers"].lower()
    assert "stream-next-offset" in exposed


async def test_health_and_unknown_routes(http: httpx.AsyncClient) -> None:
    health = await http.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert (await http.get("/elsewhere")).status_code == 404
    assert (await http.patch(f"{S}/x")).status_code == 405


@pytest.mark.parametrize("path", [f"{S}/__ds", f"{S}/__ds/subscriptions/x"])
@pytest.mark.parametrize("method", ["PUT", "POST", "GET", "HEAD", "DELETE"])
async def test_the_reserved_prefix_is_400_and_never_a_stream(
    http: httpx.AsyncClient, path: str, method: str
) -> None:
    before = (await http.get("/health")).json()["streams"]
    response = await http.request(
        method, path, headers=TEXT, content=b"" if method != "POST" else b"x"
    )
    assert response.status_code == 400
    if method != "HEAD":
        assert "is reserved by the protocol for its subscription API" in response.text
    assert (await http.get("/health")).json()["streams"] == before


async def test_names_that_only_start_like_the_reserved_prefix_are_streams(
    http: httpx.AsyncClient,
) -> None:
    assert (await http.put(f"{S}/__dsx", headers=TEXT)).status_code == 201
    assert (await http.put(f"{S}/a/__ds", headers=TEXT)).status_code == 201
    fork = await http.put(f"{S}/fork", headers={"Stream-Forked-From": f"{S}/__ds/x"})
    assert fork.status_code == 400
