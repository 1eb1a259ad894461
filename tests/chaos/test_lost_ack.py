"""Lost acknowledgements: 1,000 appends whose responses are lost produce 0 duplicates."""

from __future__ import annotations

import httpx

from mock_server.chaos import (
    FaultPlan,
    LostAck,
    Match,
    OnRequest,
    ProtocolReader,
    ProtocolWriter,
    Rule,
    check_history,
    serve_chaos,
)
from mock_server.chaos.reader import RetryPolicy, make_event

APPENDS = 1000


async def test_a_thousand_lost_acks_make_no_duplicate() -> None:
    # Every other POST loses its response: the first attempt of each append
    # commits and is never answered; the retry (same producer seq) is a 204.
    lose_every_first_attempt = Rule(
        trigger=OnRequest(k=1, every=2),
        fault=LostAck(),
        count=None,
        match=Match(method="POST", path="/v1/stream/acks"),
    )
    async with serve_chaos(long_poll_timeout=0.5) as server:
        async with ProtocolWriter(
            server.url, "acks", retry=RetryPolicy(initial=0.0, maximum=0.0)
        ) as writer:
            await writer.create()
            server.set_plan(FaultPlan(rules=[lose_every_first_attempt]))
            for n in range(APPENDS):
                await writer.append(make_event("acks", n, size=40))
            server.set_plan(FaultPlan())
            await writer.close_stream()
        assert server.faults.fired("lost_ack") == APPENDS
        assert writer.duplicate_acks == APPENDS  # every retry found its append already there
        assert writer.retries == APPENDS

        reader = ProtocolReader(server.url, "acks", dedupe=False)  # count what is stored
        await reader.run(timeout=30)
        report = check_history(writer.published, [reader.history()])
        assert report.ok, str(report)
        totals = report.totals()
        assert (totals["seen"], totals["duplicated"], totals["lost"]) == (APPENDS, 0, 0)
        async with httpx.AsyncClient() as http:
            stored = (await http.get(f"{server.url}/v1/stream/acks?offset=-1")).json()
        assert [event["n"] for event in stored] == list(range(APPENDS))
