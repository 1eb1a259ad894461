"""Idempotent producers: exactly the statuses of the protocol, serialized per producer."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import httpx
import pytest

from mock_server.testing import serve

PATH = "/v1/stream/p"
JSON = {"Content-Type": "application/json"}


def producer(pid: str, epoch: int, seq: int) -> dict[str, str]:
    return {**JSON, "Producer-Id": pid, "Producer-Epoch": str(epoch), "Producer-Seq": str(seq)}


@pytest.fixture
async def stream(http: httpx.AsyncClient) -> str:
    assert (await http.put(PATH, headers=JSON)).status_code == 201
    return PATH


async def messages(http: httpx.AsyncClient) -> list[object]:
    result: list[object] = (await http.get(PATH)).json()
    return result


async def test_new_append_is_200_and_echoes_epoch_and_seq(
    http: httpx.AsyncClient, stream: str
) -> None:
    response = await http.post(stream, headers=producer("w", 0, 0), content=b"1")
    assert response.status_code == 200
    assert response.headers["Producer-Epoch"] == "0"
    assert response.headers["Producer-Seq"] == "0"
    assert "Stream-Next-Offset" in response.headers


async def test_duplicate_is_204_and_writes_nothing(http: httpx.AsyncClient, stream: str) -> None:
    await http.post(stream, headers=producer("w", 0, 0), content=b"1")
    await http.post(stream, headers=producer("w", 0, 1), content=b"2")
    retry = await http.post(stream, headers=producer("w", 0, 0), content=b"1")
    assert retry.status_code == 204
    assert retry.headers["Producer-Seq"] == "1"  # the highest accepted
    assert await messages(http) == [1, 2]


async def test_stale_epoch_is_403_with_the_current_epoch(
    http: httpx.AsyncClient, stream: str
) -> None:
    await http.post(stream, headers=producer("w", 3, 0), content=b"1")
    response = await http.post(stream, headers=producer("w", 2, 1), content=b"2")
    assert response.status_code == 403
    assert response.headers["Producer-Epoch"] == "3"
    assert await messages(http) == [1]


async def test_new_epoch_must_start_at_seq_zero(http: httpx.AsyncClient, stream: str) -> None:
    await http.post(stream, headers=producer("w", 0, 0), content=b"1")
    bad = await http.post(stream, headers=producer("w", 1, 5), content=b"2")
    assert bad.status_code == 400
    good = await http.post(stream, headers=producer("w", 1, 0), content=b"3")
    assert good.status_code == 200
    assert await messages(http) == [1, 3]


async def test_sequence_gap_is_409_with_expected_and_received(
    http: httpx.AsyncClient, stream: str
) -> None:
    await http.post(stream, headers=producer("w", 0, 0), content=b"1")
    response = await http.post(stream, headers=producer("w", 0, 3), content=b"2")
    assert response.status_code == 409
    assert response.headers["Producer-Expected-Seq"] == "1"
    assert response.headers["Producer-Received-Seq"] == "3"
    first = await http.post(stream, headers=producer("x", 0, 2), content=b"9")
    assert first.status_code == 409
    assert first.headers["Producer-Expected-Seq"] == "0"
    assert await messages(http) == [1]


@pytest.mark.parametrize(
    "headers",
    [
        {"Producer-Id": "w", "Producer-Epoch": "0"},
        {"Producer-Seq": "0"},
        {"Producer-Id": "", "Producer-Epoch": "0", "Producer-Seq": "0"},
        {"Producer-Id": "w", "Producer-Epoch": "1e3", "Producer-Seq": "0"},
        {"Producer-Id": "w", "Producer-Epoch": "0", "Producer-Seq": "-1"},
        {"Producer-Id": "w", "Producer-Epoch": "0", "Producer-Seq": str(2**53)},
    ],
)
async def test_malformed_producer_headers_are_400(
    http: httpx.AsyncClient, stream: str, headers: dict[str, str]
) -> None:
    response = await http.post(stream, headers={**JSON, **headers}, content=b"1")
    assert response.status_code == 400
    assert "Producer" in response.text
    assert await messages(http) == []


async def test_producers_are_independent(http: httpx.AsyncClient, stream: str) -> None:
    for pid in ("a", "b"):
        for seq in range(3):
            response = await http.post(stream, headers=producer(pid, 0, seq), content=b"0")
            assert response.status_code == 200
    assert len(await messages(http)) == 6


async def test_pipelined_requests_are_serialized_per_producer(
    http: httpx.AsyncClient, stream: str
) -> None:
    """Requests sent together land in seq order; a seq that arrives early is a 409 gap."""
    responses = await asyncio.gather(
        *(http.post(stream, headers=producer("w", 0, s), content=str(s)) for s in range(20))
    )
    accepted = sorted(int(r.headers["Producer-Seq"]) for r in responses if r.status_code == 200)
    assert {r.status_code for r in responses} <= {200, 409}
    stored = await messages(http)
    assert stored == accepted == list(range(len(stored)))


async def test_duplicate_of_the_closing_request_is_204(
    http: httpx.AsyncClient, stream: str
) -> None:
    closing = {**producer("w", 0, 0), "Stream-Closed": "true"}
    first = await http.post(stream, headers=closing, content=b"1")
    assert first.status_code == 200
    assert first.headers["Stream-Closed"] == "true"
    retry = await http.post(stream, headers=closing, content=b"1")
    assert retry.status_code == 204
    assert retry.headers["Stream-Closed"] == "true"
    other = await http.post(stream, headers=producer("w", 0, 1), content=b"2")
    assert other.status_code == 409
    assert other.headers["Stream-Closed"] == "true"
    assert await messages(http) == [1]


async def test_close_only_with_producer_participates_in_sequencing(
    http: httpx.AsyncClient, stream: str
) -> None:
    await http.post(stream, headers=producer("w", 0, 0), content=b"1")
    close = {**producer("w", 0, 1), "Stream-Closed": "true"}
    del close["Content-Type"]
    first = await http.post(stream, headers=close)
    retry = await http.post(stream, headers=close)
    assert (first.status_code, retry.status_code) == (204, 204)
    assert retry.headers["Stream-Closed"] == "true"
    stranger = {**close, "Producer-Id": "z", "Producer-Seq": "0"}
    assert (await http.post(stream, headers=stranger)).status_code == 409


async def test_a_duplicate_reports_where_the_original_landed(
    http: httpx.AsyncClient, stream: str
) -> None:
    first = await http.post(stream, headers=producer("w", 0, 0), content=b"1")
    await http.post(stream, headers=producer("w", 0, 1), content=b"2")
    await http.post(stream, headers=producer("other", 0, 0), content=b"3")
    retry = await http.post(stream, headers=producer("w", 0, 0), content=b"1")
    assert retry.status_code == 204
    assert retry.headers["Stream-Next-Offset"] == first.headers["Stream-Next-Offset"]


async def test_a_reused_seq_with_other_data_is_403_not_a_silent_duplicate(
    http: httpx.AsyncClient, stream: str
) -> None:
    """A producer that restarted and reuses its epoch would lose its data to a 204."""
    await http.post(stream, headers=producer("w", 0, 0), content=b'{"n":1}')
    same = await http.post(stream, headers=producer("w", 0, 0), content=b'[{"n": 1}]')
    assert same.status_code == 204  # the same messages, however the JSON is spelled
    reused = await http.post(stream, headers=producer("w", 0, 0), content=b'{"n":2}')
    assert reused.status_code == 403
    assert reused.headers["Producer-Epoch"] == "0"
    assert "Producer-Seq 0 of epoch 0 was already used for different data" in reused.text
    assert "Producer-Epoch > 0" in reused.text
    assert await messages(http) == [{"n": 1}]
    # What a client with auto-claim does next: a new epoch, from seq 0, lands.
    claimed = await http.post(stream, headers=producer("w", 1, 0), content=b'{"n":2}')
    assert claimed.status_code == 200
    assert await messages(http) == [{"n": 1}, {"n": 2}]


async def test_a_reused_seq_that_now_closes_is_403_and_closes_nothing(
    http: httpx.AsyncClient, stream: str
) -> None:
    await http.post(stream, headers=producer("w", 0, 0), content=b"1")
    closing = {**producer("w", 0, 0), "Stream-Closed": "true"}
    assert (await http.post(stream, headers=closing, content=b"1")).status_code == 403
    assert "Stream-Closed" not in (await http.head(stream)).headers


async def test_a_retried_close_with_another_body_is_still_a_duplicate(
    http: httpx.AsyncClient, stream: str
) -> None:
    """Once closed, the closing request's retry is a 204 whatever its body (conformance)."""
    closing = {**producer("w", 0, 0), "Stream-Closed": "true"}
    assert (await http.post(stream, headers=closing, content=b"1")).status_code == 200
    retry = await http.post(stream, headers=closing, content=b"2")
    assert retry.status_code == 204
    assert await messages(http) == [1]


async def test_the_content_check_survives_an_sqlite_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    for restart in range(2):
        async with (
            serve(data_dir=data_dir) as running,
            httpx.AsyncClient(base_url=running.url) as http,
        ):
            if restart == 0:
                await http.put(PATH, headers=JSON)
                await http.post(PATH, headers=producer("w", 0, 0), content=b"1")
                continue
            same = await http.post(PATH, headers=producer("w", 0, 0), content=b"1")
            assert same.status_code == 204
            reused = await http.post(PATH, headers=producer("w", 0, 0), content=b"2")
            assert (reused.status_code, reused.headers["Producer-Epoch"]) == (403, "0")
            assert await messages(http) == [1]


async def test_a_producer_stored_before_digests_keeps_plain_duplicates(tmp_path: Path) -> None:
    """Rows of the old form ``{seq: end}`` carry no digest: a duplicate stays a 204."""
    data_dir = tmp_path / "data"
    async with serve(data_dir=data_dir) as running, httpx.AsyncClient(base_url=running.url) as http:
        await http.put(PATH, headers=JSON)
        first = await http.post(PATH, headers=producer("w", 0, 0), content=b"1")
    db = sqlite3.connect(data_dir / "streams.sqlite3")
    db.execute("UPDATE producers SET landed = ?", (json.dumps({"0": 1}),))
    db.commit()
    db.close()
    async with serve(data_dir=data_dir) as running, httpx.AsyncClient(base_url=running.url) as http:
        retry = await http.post(PATH, headers=producer("w", 0, 0), content=b"2")
        assert retry.status_code == 204
        assert retry.headers["Stream-Next-Offset"] == first.headers["Stream-Next-Offset"]
        assert await messages(http) == [1]
