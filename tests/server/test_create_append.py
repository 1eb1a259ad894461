"""PUT create and POST append/close over real sockets, on both storage backends."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest

from mock_server.testing import serve

S = "/v1/stream"


async def tail(http: httpx.AsyncClient, path: str) -> str:
    response = await http.head(path)
    assert response.status_code == 200
    return response.headers["Stream-Next-Offset"]


async def body_of(http: httpx.AsyncClient, path: str) -> bytes:
    response = await http.get(path, params={"offset": "-1"})
    assert response.status_code == 200
    return response.content


# ---------------------------------------------------------------- create


async def test_create_returns_201_with_location_and_offset(http: httpx.AsyncClient) -> None:
    response = await http.put(f"{S}/a", headers={"Content-Type": "text/plain"})
    assert response.status_code == 201
    assert response.headers["Location"].endswith(f"{S}/a")
    assert response.headers["Content-Type"] == "text/plain"
    incarnation = response.headers["Stream-Incarnation"]
    assert re.fullmatch(r"\d{16}", incarnation)
    assert response.headers["Stream-Next-Offset"] == f"{incarnation}_0000000000000000"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_create_is_idempotent_for_the_same_config(http: httpx.AsyncClient) -> None:
    first = await http.put(f"{S}/a", headers={"Content-Type": "text/plain", "Stream-TTL": "60"})
    again = await http.put(f"{S}/a", headers={"Content-Type": "TEXT/PLAIN", "Stream-TTL": "60"})
    assert (first.status_code, again.status_code) == (201, 200)


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "application/json"},
        {"Content-Type": "text/plain", "Stream-TTL": "30"},
        {"Content-Type": "text/plain", "Stream-Closed": "true"},
    ],
)
async def test_create_with_a_different_config_is_409(
    http: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    await http.put(f"{S}/a", headers={"Content-Type": "text/plain"})
    response = await http.put(f"{S}/a", headers=headers)
    assert response.status_code == 409
    assert "different configuration" in response.text


async def test_create_defaults_to_octet_stream(http: httpx.AsyncClient) -> None:
    response = await http.put(f"{S}/bin")
    assert response.status_code == 201
    assert response.headers["Content-Type"] == "application/octet-stream"


async def test_create_with_body_and_closed(http: httpx.AsyncClient) -> None:
    response = await http.put(
        f"{S}/c", headers={"Content-Type": "text/plain", "Stream-Closed": "true"}, content=b"all"
    )
    assert response.status_code == 201
    assert response.headers["Stream-Closed"] == "true"
    assert await body_of(http, f"{S}/c") == b"all"
    refused = await http.post(f"{S}/c", headers={"Content-Type": "text/plain"}, content=b"x")
    assert refused.status_code == 409


async def test_create_json_with_empty_array_is_an_empty_stream(http: httpx.AsyncClient) -> None:
    response = await http.put(f"{S}/j", headers={"Content-Type": "application/json"}, content=b"[]")
    assert response.status_code == 201
    assert (await http.get(f"{S}/j")).json() == []


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"Stream-TTL": "+5"}, "Stream-TTL"),
        ({"Stream-TTL": "3.5"}, "Stream-TTL"),
        ({"Stream-TTL": "-1"}, "Stream-TTL"),
        ({"Stream-TTL": "05"}, "Stream-TTL"),
        ({"Stream-Expires-At": "tomorrow"}, "Stream-Expires-At"),
        ({"Stream-TTL": "5", "Stream-Expires-At": "2099-01-01T00:00:00Z"}, "not both"),
        ({"Content-Type": "not a type"}, "Content-Type"),
        ({"Stream-Fork-Sub-Offset": "1"}, "Stream-Forked-From"),
    ],
)
async def test_create_rejects_bad_headers_and_creates_nothing(
    http: httpx.AsyncClient, headers: dict[str, str], message: str
) -> None:
    response = await http.put(f"{S}/bad", headers=headers)
    assert response.status_code == 400
    assert message in response.text
    assert (await http.head(f"{S}/bad")).status_code == 404


async def test_create_with_invalid_json_body_creates_nothing(http: httpx.AsyncClient) -> None:
    response = await http.put(
        f"{S}/j", headers={"Content-Type": "application/json"}, content=b"{nope"
    )
    assert response.status_code == 400
    assert "invalid JSON" in response.text
    assert (await http.head(f"{S}/j")).status_code == 404


# ---------------------------------------------------------------- append


async def test_append_returns_204_and_advances_the_offset(http: httpx.AsyncClient) -> None:
    await http.put(f"{S}/t", headers={"Content-Type": "text/plain"})
    first = await http.post(f"{S}/t", headers={"Content-Type": "text/plain"}, content=b"hello ")
    second = await http.post(f"{S}/t", headers={"Content-Type": "text/plain"}, content=b"world")
    assert (first.status_code, second.status_code) == (204, 204)
    assert first.headers["Stream-Next-Offset"] < second.headers["Stream-Next-Offset"]
    assert second.headers["Stream-Next-Offset"] == await tail(http, f"{S}/t")
    assert await body_of(http, f"{S}/t") == b"hello world"


async def test_append_to_a_missing_stream_is_404(http: httpx.AsyncClient) -> None:
    response = await http.post(f"{S}/nope", headers={"Content-Type": "text/plain"}, content=b"x")
    assert response.status_code == 404


@pytest.mark.parametrize(
    ("headers", "body", "status", "message"),
    [
        ({"Content-Type": "text/plain"}, b"", 400, "empty body"),
        ({}, b"x", 400, "Content-Type is required"),
        ({"Content-Type": "application/json"}, b"x", 409, "does not match"),
    ],
)
async def test_append_refusals_change_nothing(
    http: httpx.AsyncClient, headers: dict[str, str], body: bytes, status: int, message: str
) -> None:
    await http.put(f"{S}/t", headers={"Content-Type": "text/plain"}, content=b"keep")
    before = await tail(http, f"{S}/t")
    response = await http.post(f"{S}/t", headers=headers, content=body)
    assert response.status_code == status
    assert message in response.text
    assert await tail(http, f"{S}/t") == before
    assert await body_of(http, f"{S}/t") == b"keep"


async def test_append_larger_than_the_limit_is_413(http: httpx.AsyncClient) -> None:
    await http.put(f"{S}/t", headers={"Content-Type": "text/plain"})
    response = await http.post(
        f"{S}/t", headers={"Content-Type": "text/plain"}, content=b"x" * (64 * 1024 + 1)
    )
    assert response.status_code == 413
    assert "larger than" in response.text
    assert await body_of(http, f"{S}/t") == b""


async def test_json_append_flattens_one_level(http: httpx.AsyncClient) -> None:
    await http.put(f"{S}/j", headers={"Content-Type": "application/json"})
    for body in (b'{"a": 1}', b"[1, 2]", b"[[3, 4], [5]]", b"[[[6]]]"):
        response = await http.post(
            f"{S}/j", headers={"Content-Type": "application/json"}, content=body
        )
        assert response.status_code == 204
    assert (await http.get(f"{S}/j")).json() == [{"a": 1}, 1, 2, [3, 4], [5], [[6]]]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[]", "empty JSON array"),
        (b"{", "invalid JSON"),
        (b"NaN", "invalid JSON"),
        (b"\xff", "invalid JSON"),
        (b"[1e999]", "invalid JSON"),
    ],
)
async def test_json_append_rejects_bad_json(
    http: httpx.AsyncClient, body: bytes, message: str
) -> None:
    await http.put(f"{S}/j", headers={"Content-Type": "application/json"}, content=b"[0]")
    response = await http.post(f"{S}/j", headers={"Content-Type": "application/json"}, content=body)
    assert response.status_code == 400
    assert message in response.text
    assert (await http.get(f"{S}/j")).json() == [0]


async def test_stream_seq_must_increase(http: httpx.AsyncClient) -> None:
    await http.put(f"{S}/t", headers={"Content-Type": "text/plain"})
    ok = await http.post(
        f"{S}/t", headers={"Content-Type": "text/plain", "Stream-Seq": "b"}, content=b"1"
    )
    same = await http.post(
        f"{S}/t", headers={"Content-Type": "text/plain", "Stream-Seq": "b"}, content=b"2"
    )
    lower = await http.post(
        f"{S}/t", headers={"Content-Type": "text/plain", "Stream-Seq": "a"}, content=b"3"
    )
    higher = await http.post(
        f"{S}/t", headers={"Content-Type": "text/plain", "Stream-Seq": "c"}, content=b"4"
    )
    assert [r.status_code for r in (ok, same, lower, higher)] == [204, 409, 409, 204]
    assert await body_of(http, f"{S}/t") == b"14"


# ---------------------------------------------------------------- close


async def test_close_only_is_idempotent_and_keeps_the_offset(http: httpx.AsyncClient) -> None:
    await http.put(f"{S}/t", headers={"Content-Type": "text/plain"}, content=b"data")
    before = await tail(http, f"{S}/t")
    for _ in range(2):
        response = await http.post(f"{S}/t", headers={"Stream-Closed": "true"})
        assert response.status_code == 204
        assert response.headers["Stream-Closed"] == "true"
        assert response.headers["Stream-Next-Offset"] == before
    head = await http.head(f"{S}/t")
    assert head.headers["Stream-Closed"] == "true"


async def test_append_and_close_in_one_step(http: httpx.AsyncClient) -> None:
    await http.put(f"{S}/t", headers={"Content-Type": "text/plain"})
    response = await http.post(
        f"{S}/t", headers={"Content-Type": "text/plain", "Stream-Closed": "true"}, content=b"end"
    )
    assert response.status_code == 204
    assert response.headers["Stream-Closed"] == "true"
    assert await body_of(http, f"{S}/t") == b"end"


async def test_append_to_closed_stream_is_409_with_final_offset(http: httpx.AsyncClient) -> None:
    await http.put(f"{S}/t", headers={"Content-Type": "text/plain"}, content=b"x")
    final = (await http.post(f"{S}/t", headers={"Stream-Closed": "true"})).headers[
        "Stream-Next-Offset"
    ]
    response = await http.post(f"{S}/t", headers={"Content-Type": "text/plain"}, content=b"y")
    assert response.status_code == 409
    assert response.headers["Stream-Closed"] == "true"
    assert response.headers["Stream-Next-Offset"] == final


async def test_stream_closed_other_values_are_ignored(http: httpx.AsyncClient) -> None:
    await http.put(f"{S}/t", headers={"Content-Type": "text/plain"})
    response = await http.post(
        f"{S}/t", headers={"Content-Type": "text/plain", "Stream-Closed": "yes"}, content=b"x"
    )
    assert response.status_code == 204
    assert "Stream-Closed" not in response.headers


async def test_error_precedence_closed_then_content_type_then_seq(
    http: httpx.AsyncClient,
) -> None:
    await http.put(f"{S}/t", headers={"Content-Type": "text/plain"})
    await http.post(
        f"{S}/t", headers={"Content-Type": "text/plain", "Stream-Seq": "5"}, content=b"a"
    )
    mismatch_and_seq = await http.post(
        f"{S}/t", headers={"Content-Type": "application/json", "Stream-Seq": "1"}, content=b"1"
    )
    assert mismatch_and_seq.status_code == 409
    assert "does not match" in mismatch_and_seq.text
    await http.post(f"{S}/t", headers={"Stream-Closed": "true"})
    everything = await http.post(
        f"{S}/t", headers={"Content-Type": "application/json", "Stream-Seq": "1"}, content=b"1"
    )
    assert everything.status_code == 409
    assert everything.headers["Stream-Closed"] == "true"


async def test_concurrent_appends_all_land_once_in_some_order(http: httpx.AsyncClient) -> None:
    await http.put(f"{S}/j", headers={"Content-Type": "application/json"})
    responses = await asyncio.gather(
        *(
            http.post(f"{S}/j", headers={"Content-Type": "application/json"}, content=str(i))
            for i in range(50)
        )
    )
    assert {r.status_code for r in responses} == {204}
    offsets = [r.headers["Stream-Next-Offset"] for r in responses]
    assert len(set(offsets)) == 50
    assert sorted((await http.get(f"{S}/j")).json()) == list(range(50))


async def test_a_retried_create_with_its_idempotency_key_is_201_again(
    http: httpx.AsyncClient,
) -> None:
    """The client whose first answer was lost learns that it created the stream."""
    headers = {"Content-Type": "text/plain", "Idempotency-Key": "create-1"}
    first = await http.put(f"{S}/a", headers=headers, content=b"hi")
    assert first.status_code == 201
    await http.post(f"{S}/a", headers={"Content-Type": "text/plain"}, content=b"!")
    retry = await http.put(f"{S}/a", headers=headers, content=b"hi")
    assert retry.status_code == 201
    for name in ("Location", "Content-Type", "Stream-Incarnation"):
        assert retry.headers[name] == first.headers[name]
    assert retry.headers["Stream-Next-Offset"] == await tail(http, f"{S}/a")
    other_key = {**headers, "Idempotency-Key": "create-2"}
    assert (await http.put(f"{S}/a", headers=other_key)).status_code == 200
    assert (await http.put(f"{S}/a", headers={"Content-Type": "text/plain"})).status_code == 200
    other_config = {**headers, "Content-Type": "application/json"}
    assert (await http.put(f"{S}/a", headers=other_config)).status_code == 409


async def test_an_idempotency_key_only_counts_for_the_put_that_created(
    http: httpx.AsyncClient,
) -> None:
    assert (await http.put(f"{S}/a", headers={"Content-Type": "text/plain"})).status_code == 201
    keyed = {"Content-Type": "text/plain", "Idempotency-Key": "late"}
    assert (await http.put(f"{S}/a", headers=keyed)).status_code == 200
    assert (await http.put(f"{S}/a", headers=keyed)).status_code == 200


@pytest.mark.parametrize("key", ["", "k" * 257])
async def test_a_bad_idempotency_key_is_400(http: httpx.AsyncClient, key: str) -> None:
    headers = {"Content-Type": "text/plain", "Idempotency-Key": key}
    response = await http.put(f"{S}/a", headers=headers)
    assert response.status_code == 400
    assert "Idempotency-Key" in response.text
    assert (await http.head(f"{S}/a")).status_code == 404


async def test_the_idempotency_key_survives_an_sqlite_restart(tmp_path: Path) -> None:
    headers = {"Content-Type": "text/plain", "Idempotency-Key": "create-1"}
    statuses = []
    for _ in range(2):
        async with (
            serve(data_dir=tmp_path / "data") as running,
            httpx.AsyncClient(base_url=running.url) as http,
        ):
            statuses.append((await http.put(f"{S}/a", headers=headers)).status_code)
    assert statuses == [201, 201]
