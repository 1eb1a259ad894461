"""Application-level faults in our server, each observed by a real HTTP client."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from mock_server.chaos import (
    AfterEvent,
    Always,
    AtOffset,
    ChaosServer,
    Delay,
    Drop,
    Duplicate,
    FaultPlan,
    HttpError,
    LostAck,
    Match,
    OnRequest,
    OnResume,
    Probability,
    ProtocolReader,
    Rule,
    Stall,
    Trim,
    WsClose,
    check_history,
    rng_for,
    serve_chaos,
)
from mock_server.chaos.reader import ProtocolWriter, make_event
from tests._await import until

S = "/v1/stream"
JSON = {"Content-Type": "application/json"}


def off(position: int, incarnation: str = "0000000000000000") -> str:
    return f"{incarnation}_{position:016d}"


# One server for the module (each start and stop costs uvicorn about 0.2 s);
# every test uses its own stream and starts with no plan.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server() -> AsyncIterator[ChaosServer]:
    async with serve_chaos(long_poll_timeout=0.5) as running:
        yield running


@pytest.fixture(autouse=True)
def no_plan(server: ChaosServer) -> Iterator[None]:
    server.faults.reset()
    yield
    server.faults.reset()


@pytest_asyncio.fixture(loop_scope="module")
async def http(server: ChaosServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        yield client


@pytest.fixture
def p(request: pytest.FixtureRequest) -> str:
    """A stream path of this test's own."""
    return "s-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12]


async def fill(http: httpx.AsyncClient, path: str, n: int) -> list[str]:
    """A JSON stream with events 1..n, one append each; the offset after each."""
    await http.put(f"{S}/{path}", headers=JSON)
    offsets = []
    for i in range(1, n + 1):
        response = await http.post(f"{S}/{path}", headers=JSON, content=json.dumps({"id": i}))
        offsets.append(response.headers["Stream-Next-Offset"])
    return offsets


async def parked(server: ChaosServer, p: str) -> None:
    """Until a live reader waits at the tail of ``p``."""
    await until(lambda: server.store.waiting(f"{S}/{p}") > 0)  # no event for parked readers


def rules(*items: Rule, seed: int = 0) -> FaultPlan:
    return FaultPlan(seed=seed, rules=list(items))


async def sse_read(http: httpx.AsyncClient, url: str) -> tuple[list[Any], list[str], str]:
    """SSE until the end or a failure: (messages, control offsets, how it ended)."""
    messages: list[Any] = []
    offsets: list[str] = []
    kind, data = "", list[str]()
    try:
        async with http.stream("GET", url) as response:
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:])
                elif line == "" and data:
                    value = json.loads("\n".join(data))
                    if kind == "data":
                        messages.extend(value)
                    else:
                        offsets.append(value["streamNextOffset"])
                        if value.get("streamClosed"):
                            return messages, offsets, "closed"
                    kind, data = "", []
    except httpx.TransportError as exc:
        return messages, offsets, type(exc).__name__
    return messages, offsets, "end"


# ---------------------------------------------------------------- before serving


async def test_http_error_with_retry_after_changes_nothing(
    server: ChaosServer, http: httpx.AsyncClient, p: str
) -> None:
    await fill(http, p, 1)
    fault = HttpError(status=429, retry_after=3)
    server.set_plan(rules(Rule(trigger=OnRequest(k=2), fault=fault, match=Match(method="POST"))))
    first = await http.post(f"{S}/{p}", headers=JSON, content=b'{"id":2}')
    refused = await http.post(f"{S}/{p}", headers=JSON, content=b'{"id":3}')
    after = await http.post(f"{S}/{p}", headers=JSON, content=b'{"id":4}')
    assert (first.status_code, refused.status_code, after.status_code) == (204, 429, 204)
    assert refused.headers["Retry-After"] == "3"
    assert refused.headers["Access-Control-Allow-Origin"] == "*"
    assert (await http.get(f"{S}/{p}?offset=-1")).json() == [{"id": 1}, {"id": 2}, {"id": 4}]
    assert [str(r) for r in server.faults.log] == [f"rule 0: http_error on POST {S}/{p}"]


@pytest.mark.parametrize("how", ["reset", "fin"])
async def test_drop_before_serving(
    server: ChaosServer, http: httpx.AsyncClient, how: Literal["reset", "fin"], p: str
) -> None:
    await fill(http, p, 1)
    server.set_plan(rules(Rule(trigger=Always(), fault=Drop(how=how), match=Match(method="POST"))))
    with pytest.raises(httpx.TransportError):
        await http.post(f"{S}/{p}", headers=JSON, content=b'{"id":2}')
    assert (await http.get(f"{S}/{p}?offset=-1")).json() == [{"id": 1}]  # not served


async def test_delay_holds_the_request(
    server: ChaosServer, http: httpx.AsyncClient, p: str
) -> None:
    await fill(http, p, 1)
    server.set_plan(rules(Rule(trigger=Always(), fault=Delay(ms=150))))
    started = time.monotonic()
    assert (await http.get(f"{S}/{p}?offset=-1")).status_code == 200
    assert time.monotonic() - started >= 0.15


async def test_stall_answers_nothing_until_the_client_gives_up(
    server: ChaosServer, http: httpx.AsyncClient, p: str
) -> None:
    await fill(http, p, 1)
    server.set_plan(rules(Rule(trigger=OnRequest(k=1), fault=Stall())))
    with pytest.raises(httpx.ReadTimeout):
        await http.get(f"{S}/{p}?offset=-1", timeout=0.2)
    assert (await http.get(f"{S}/{p}?offset=-1")).status_code == 200  # the server is fine


async def test_health_and_admin_are_never_faulted(
    server: ChaosServer, http: httpx.AsyncClient
) -> None:
    server.set_plan(rules(Rule(trigger=Always(), fault=HttpError(status=503), count=None)))
    assert (await http.get("/health")).status_code == 200
    assert (await http.get("/_chaos/plan")).status_code == 200
    assert (await http.get(f"{S}/x")).status_code == 503


async def test_resume_trigger_hits_only_reads_that_resume(
    server: ChaosServer, http: httpx.AsyncClient, p: str
) -> None:
    offsets = await fill(http, p, 3)
    server.set_plan(rules(Rule(trigger=OnResume(), fault=HttpError(), count=None)))
    assert (await http.get(f"{S}/{p}?offset=-1")).status_code == 200
    assert (await http.get(f"{S}/{p}?offset=now")).status_code == 200
    assert (await http.get(f"{S}/{p}?offset={offsets[0]}")).status_code == 503


async def test_probability_is_replayed_from_the_seed(
    server: ChaosServer, http: httpx.AsyncClient, p: str
) -> None:
    await fill(http, p, 1)
    rule = Rule(trigger=Probability(p=0.5), fault=HttpError(), count=None)
    expected = [rng_for(9, "server", 0, f"{S}/{p}", n).random() < 0.5 for n in range(1, 21)]
    for _ in range(2):
        server.set_plan(rules(rule, seed=9))
        statuses = [(await http.get(f"{S}/{p}?offset=-1")).status_code for _ in range(20)]
        assert [s == 503 for s in statuses] == expected
    assert 0 < sum(expected) < 20


# ---------------------------------------------------------------- lost acknowledgements


async def test_lost_ack_commits_but_never_answers(
    server: ChaosServer, http: httpx.AsyncClient, p: str
) -> None:
    await fill(http, p, 0)
    server.set_plan(rules(Rule(trigger=Always(), fault=LostAck(), match=Match(method="POST"))))
    producer = {**JSON, "Producer-Id": "p", "Producer-Epoch": "0", "Producer-Seq": "0"}
    with pytest.raises(httpx.TransportError):
        await http.post(f"{S}/{p}", headers=producer, content=b'{"id":1}')
    assert (await http.get(f"{S}/{p}?offset=-1")).json() == [{"id": 1}]  # it committed
    retry = await http.post(f"{S}/{p}", headers=producer, content=b'{"id":1}')
    assert retry.status_code == 204  # the retry is recognised as a duplicate
    assert (await http.get(f"{S}/{p}?offset=-1")).json() == [{"id": 1}]


async def test_lost_ack_on_the_append_that_makes_event_n(
    server: ChaosServer, http: httpx.AsyncClient, p: str
) -> None:
    await fill(http, p, 2)
    rule = Rule(trigger=AfterEvent(n=4), fault=LostAck(how="fin"), match=Match(method="POST"))
    server.set_plan(rules(rule))
    assert (await http.post(f"{S}/{p}", headers=JSON, content=b'{"id":3}')).status_code == 204
    with pytest.raises(httpx.TransportError):
        await http.post(f"{S}/{p}", headers=JSON, content=b'[{"id":4},{"id":5}]')
    assert (await http.post(f"{S}/{p}", headers=JSON, content=b'{"id":6}')).status_code == 204
    assert len((await http.get(f"{S}/{p}?offset=-1")).json()) == 6


# ---------------------------------------------------------------- cuts inside a read


@pytest.mark.parametrize("n", [0, 1, 5, 9, 10])
@pytest.mark.parametrize("how", ["reset", "fin", "end"])
async def test_sse_cut_right_after_event_n(
    server: ChaosServer,
    http: httpx.AsyncClient,
    n: int,
    how: Literal["reset", "fin", "end"],
    p: str,
) -> None:
    offsets = await fill(http, p, 10)
    await http.post(f"{S}/{p}", headers={"Stream-Closed": "true"})
    server.set_plan(rules(Rule(trigger=AfterEvent(n=n), fault=Drop(how=how))))
    messages, controls, ended = await sse_read(http, f"{S}/{p}?offset=-1&live=sse")
    if n == 10:  # the last event: the cut lands after it, with its (closing) control
        assert (messages, ended) == ([{"id": i} for i in range(1, 11)], "closed")
        return
    assert messages == [{"id": i} for i in range(1, n + 1)]
    assert controls == ([offsets[n - 1]] if n else [])
    assert ended == (
        "end" if how == "end" else "RemoteProtocolError" if how == "fin" else "ReadError"
    )
    # Resuming from the last control gets the rest, exactly once.
    rest, _, ended = await sse_read(
        http, f"{S}/{p}?offset={controls[-1] if controls else -1}&live=sse"
    )
    assert messages + rest == [{"id": i} for i in range(1, 11)]
    assert ended == "closed"


async def test_sse_cut_can_withhold_the_control_event(
    server: ChaosServer, http: httpx.AsyncClient, p: str
) -> None:
    await fill(http, p, 10)
    server.set_plan(rules(Rule(trigger=AfterEvent(n=4, control=False), fault=Drop())))
    messages, controls, ended = await sse_read(http, f"{S}/{p}?offset=-1&live=sse")
    assert messages == [{"id": i} for i in range(1, 5)]
    assert controls == []  # the client has the events but not where to resume
    assert ended == "ReadError"
    assert "control withheld" in server.faults.log[0].detail


async def test_sse_cut_inside_a_multi_event_append_has_no_offset(
    server: ChaosServer, http: httpx.AsyncClient, p: str
) -> None:
    await http.put(f"{S}/{p}", headers=JSON)
    await http.post(f"{S}/{p}", headers=JSON, content=b'[{"id":1},{"id":2},{"id":3}]')
    server.set_plan(rules(Rule(trigger=AfterEvent(n=2), fault=Drop(how="fin"))))
    messages, controls, _ = await sse_read(http, f"{S}/{p}?offset=-1&live=sse")
    assert messages == [{"id": 1}, {"id": 2}]
    assert controls == []


async def test_sse_cut_lands_on_live_events_too(
    server: ChaosServer, http: httpx.AsyncClient, p: str
) -> None:
    await fill(http, p, 2)
    server.set_plan(rules(Rule(trigger=AfterEvent(n=5), fault=Drop())))
    reading = asyncio.ensure_future(sse_read(http, f"{S}/{p}?offset=-1&live=sse"))
    await parked(server, p)
    for i in range(3, 9):
        await http.post(f"{S}/{p}", headers=JSON, content=json.dumps({"id": i}))
    messages, _, ended = await reading
    assert messages == [{"id": i} for i in range(1, 6)]
    assert ended == "ReadError"


@pytest.mark.parametrize("live", ["", "&live=long-poll"])
async def test_plain_read_cut_after_event_n_is_a_truncated_body(
    server: ChaosServer, http: httpx.AsyncClient, live: str, p: str
) -> None:
    await fill(http, p, 10)
    server.set_plan(rules(Rule(trigger=AfterEvent(n=3), fault=Drop(how="fin"))))
    async with http.stream("GET", f"{S}/{p}?offset=-1{live}") as response:
        body = bytearray()

        async def read() -> None:
            async for chunk in response.aiter_raw():
                body.extend(chunk)

        with pytest.raises(httpx.RemoteProtocolError):
            await read()
    assert bytes(body) == b'[{"id":1},{"id":2},{"id":3}'
    assert "body cut after event 3" in server.faults.log[0].detail


async def test_plain_read_ended_after_event_n_is_a_shorter_response(
    server: ChaosServer, http: httpx.AsyncClient, p: str
) -> None:
    offsets = await fill(http, p, 10)
    server.set_plan(rules(Rule(trigger=AfterEvent(n=3), fault=Drop(how="end"))))
    response = await http.get(f"{S}/{p}?offset=-1")
    assert response.json() == [{"id": 1}, {"id": 2}, {"id": 3}]
    assert response.headers["Stream-Next-Offset"] == offsets[2]
    assert response.headers["Connection"] == "close"
    assert "Stream-Up-To-Date" not in response.headers
    rest = await http.get(f"{S}/{p}?offset={offsets[2]}")
    assert [m["id"] for m in rest.json()] == list(range(4, 11))


async def test_at_offset_cuts_after_the_append_that_reaches_it(
    server: ChaosServer, http: httpx.AsyncClient, p: str
) -> None:
    offsets = await fill(http, p, 10)
    server.set_plan(rules(Rule(trigger=AtOffset(offset=offsets[6]), fault=Drop())))
    messages, controls, _ = await sse_read(http, f"{S}/{p}?offset=-1&live=sse")
    assert [m["id"] for m in messages] == list(range(1, 8))
    assert controls == [offsets[6]]


async def test_a_read_past_the_point_is_not_cut(
    server: ChaosServer, http: httpx.AsyncClient, p: str
) -> None:
    offsets = await fill(http, p, 10)
    server.set_plan(rules(Rule(trigger=AfterEvent(n=3), fault=Drop())))
    response = await http.get(f"{S}/{p}?offset={offsets[4]}")
    assert [m["id"] for m in response.json()] == list(range(6, 11))
    assert server.faults.log == []


# ---------------------------------------------------------------- duplicates and retention


async def test_duplicate_serves_a_resume_from_an_earlier_offset(
    server: ChaosServer, http: httpx.AsyncClient, p: str
) -> None:
    offsets = await fill(http, p, 6)
    server.set_plan(rules(Rule(trigger=OnResume(), fault=Duplicate(rewind=2))))
    response = await http.get(f"{S}/{p}?offset={offsets[3]}")
    assert [m["id"] for m in response.json()] == [3, 4, 5, 6]  # 3 and 4 again
    assert server.faults.log[0].detail == f"offset {offsets[3]} served from {offsets[1]}"


async def test_duplicates_reach_a_reader_that_does_not_dedupe(server: ChaosServer, p: str) -> None:
    async with ProtocolWriter(server.url, p) as writer:
        await writer.create()
        for i in range(10):
            await writer.append(make_event(p, i))
        await writer.close_stream()
    server.set_plan(rules(Rule(trigger=AfterEvent(n=5), fault=Drop())))
    plan = FaultPlan(
        rules=[
            Rule(trigger=AfterEvent(n=5), fault=Drop()),
            Rule(trigger=OnResume(), fault=Duplicate(rewind=3)),
        ]
    )
    naive_reader = ProtocolReader(server.url, p, dedupe=False)
    server.set_plan(plan)
    await naive_reader.run(timeout=10)
    naive = check_history(writer.published, [naive_reader.history()]).subscribers[0]
    assert sorted(naive.duplicated) == [f"{p}#00002", f"{p}#00003", f"{p}#00004"]

    server.set_plan(plan)
    careful = ProtocolReader(server.url, p)
    await careful.run(timeout=10)
    assert check_history(writer.published, [careful.history()]).ok
    assert careful.duplicates_dropped == 3


async def test_trim_below_a_resuming_reader_is_an_explicit_gap(server: ChaosServer, p: str) -> None:
    async with ProtocolWriter(server.url, p) as writer:
        await writer.create()
        for i in range(10):
            await writer.append(make_event(p, i))
        await writer.close_stream()
    server.set_plan(
        rules(
            Rule(trigger=AfterEvent(n=3), fault=Drop(how="end")),
            Rule(trigger=OnResume(), fault=Trim(keep_last=4)),
        )
    )
    reader = ProtocolReader(server.url, p, transport="long-poll")
    await reader.run(timeout=10)
    report = check_history(writer.published, [reader.history()])
    sub = report.subscribers[0]
    assert sub.lost == []  # nothing silently lost ...
    assert sub.reported_lost == [f"{p}#00003", f"{p}#00004", f"{p}#00005"]  # ... the reader said so
    assert reader.gaps == [(writer.published[2].offset, writer.published[5].offset)]


# ---------------------------------------------------------------- plans and the admin endpoint


async def test_crash_needs_a_server_process(server: ChaosServer) -> None:
    with pytest.raises(ValueError, match="own process"):
        server.set_plan(
            FaultPlan.model_validate(
                {"rules": [{"trigger": {"kind": "always"}, "fault": {"kind": "crash"}}]}
            )
        )


async def test_admin_endpoint(server: ChaosServer, http: httpx.AsyncClient, p: str) -> None:
    await fill(http, p, 6)
    assert (await http.get("/_chaos/plan")).json() == {"seed": 0, "rules": [], "name": None}
    plan = rules(Rule(trigger=OnRequest(k=1), fault=HttpError(status=503)), seed=5)
    put = await http.put("/_chaos/plan", content=plan.to_json())
    assert put.status_code == 200
    assert FaultPlan.model_validate(put.json()) == plan == server.faults.plan
    assert (await http.get(f"{S}/{p}?offset=-1")).status_code == 503
    log = (await http.get("/_chaos/log")).json()
    assert [(r["fault"], r["path"]) for r in log] == [("http_error", f"{S}/{p}")]

    yaml_plan = "seed: 6\nrules:\n  - {trigger: {kind: always}, fault: {kind: delay, ms: 1}}\n"
    put = await http.put(
        "/_chaos/plan", content=yaml_plan, headers={"Content-Type": "application/yaml"}
    )
    assert put.status_code == 200
    assert server.faults.plan.seed == 6

    bad = await http.put("/_chaos/plan", content=b'{"rules": [{"trigger": {"kind": "x"}}]}')
    assert bad.status_code == 400
    assert "invalid fault plan" in bad.text
    assert server.faults.plan.seed == 6  # unchanged

    trimmed = await http.post("/_chaos/trim", json={"path": p, "keep_last": 2})
    incarnation = (await http.head(f"{S}/{p}")).headers["Stream-Incarnation"]
    floor = off(len(b'{"id":1}') * 4, incarnation)
    assert trimmed.json() == {"path": f"{S}/{p}", "trimmed_to": floor}
    # Below the floor is gone; the beginning is now the floor (the two retained records).
    assert (await http.get(f"{S}/{p}?offset={off(0, incarnation)}")).status_code == 410
    assert len((await http.get(f"{S}/{p}?offset=-1")).json()) == 2
    assert (await http.post("/_chaos/trim", json={"path": "nope"})).status_code == 404
    assert (await http.post("/_chaos/trim", content=b"?")).status_code == 400

    assert (await http.delete("/_chaos/plan")).status_code == 204
    assert server.faults.plan.rules == []
    assert (await http.post("/_chaos/reset")).status_code == 204
    assert (await http.get("/_chaos/log")).json() == []
    assert (await http.get("/_chaos/reset")).status_code == 405


async def test_admin_endpoint_is_off_unless_asked_for() -> None:
    async with (
        serve_chaos(admin=False) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        assert (await http.get("/_chaos/plan")).status_code == 404


async def test_trimming_everything_keeps_the_tail(
    server: ChaosServer, http: httpx.AsyncClient, p: str
) -> None:
    offsets = await fill(http, p, 3)
    server.set_plan(
        rules(Rule(trigger=Always(), fault=Trim(keep_last=0), match=Match(method="HEAD")))
    )
    await http.head(f"{S}/{p}")
    server.set_plan(rules())
    after = await http.post(f"{S}/{p}", headers=JSON, content=b'{"id":4}')
    assert after.headers["Stream-Next-Offset"] > offsets[-1]


# ---------------------------------------------------------------- WebSocket (/v1/ws)


async def ws_subscribe(server: ChaosServer, p: str) -> tuple[list[Any], list[str], int | None]:
    """Subscribe over /v1/ws until the socket ends: (messages, offsets, close code)."""
    messages: list[Any] = []
    offsets: list[str] = []
    url = "ws" + server.url.removeprefix("http") + "/v1/ws"
    async with ws_connect(url, close_timeout=0.5) as socket:
        try:
            await socket.send(json.dumps({"op": "subscribe", "sub": "s", "stream": p}))
            async for raw in socket:
                frame = json.loads(raw)
                if frame["type"] == "data":
                    messages.extend(frame["messages"])
                    offsets.append(frame["offset"])
                    if frame.get("closed"):
                        break
        except ConnectionClosed:
            pass
    received = socket.protocol.close_rcvd
    return messages, offsets, received.code if received is not None else None


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        (WsClose(code=4000, reason="chaos"), 4000),
        (Drop(how="reset"), None),
        (Drop(how="end"), 1000),
    ],
    ids=["ws_close", "reset", "end"],
)
async def test_websocket_cut_right_after_event_n(
    server: ChaosServer, http: httpx.AsyncClient, p: str, fault: WsClose | Drop, code: int | None
) -> None:
    offsets = await fill(http, p, 10)
    await http.post(f"{S}/{p}", headers={"Stream-Closed": "true"})
    server.set_plan(rules(Rule(trigger=AfterEvent(n=4), fault=fault)))
    messages, seen_offsets, closed_with = await ws_subscribe(server, p)
    assert messages == [{"id": i} for i in range(1, 5)]
    assert seen_offsets[-1] == offsets[3]  # resume right after event 4
    assert closed_with == code  # None: no close frame at all (1006)
    assert server.faults.log[0].detail == "WebSocket cut after event 4"


async def test_websocket_handshake_refused_with_503_and_retry_after(
    server: ChaosServer, p: str
) -> None:
    refuse = HttpError(status=503, retry_after=2)
    server.set_plan(rules(Rule(trigger=Always(), fault=refuse, match=Match(method="WEBSOCKET"))))
    with pytest.raises(InvalidStatus) as refused:
        await ws_subscribe(server, p)
    assert refused.value.response.status_code == 503
    assert refused.value.response.headers["Retry-After"] == "2"


async def test_websocket_closed_with_a_code_right_after_the_handshake(
    server: ChaosServer, http: httpx.AsyncClient, p: str
) -> None:
    await fill(http, p, 3)
    server.set_plan(rules(Rule(trigger=OnRequest(k=1), fault=WsClose(code=1012, reason="restart"))))
    messages, _, code = await ws_subscribe(server, p)
    assert (messages, code) == ([], 1012)


async def test_a_live_websocket_subscriber_learns_that_the_stream_closed(
    server: ChaosServer, http: httpx.AsyncClient, p: str
) -> None:
    await fill(http, p, 2)
    reading = asyncio.ensure_future(ws_subscribe(server, p))
    await parked(server, p)
    await http.post(f"{S}/{p}", headers={"Stream-Closed": "true"})
    async with asyncio.timeout(1):
        messages, _, _ = await reading
    assert messages == [{"id": 1}, {"id": 2}]
