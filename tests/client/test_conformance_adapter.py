"""The client-conformance adapter, driven as a subprocess over its JSON-lines protocol."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

ADAPTER = Path(__file__).resolve().parents[1] / "conformance" / "client_adapter.py"


class AdapterProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def send(self, command: dict[str, Any], timeout: float = 20.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        assert line, "the adapter exited"
        result: dict[str, Any] = json.loads(line)
        return result


@pytest.fixture
async def adapter(server_url: str) -> AsyncIterator[AdapterProcess]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ADAPTER),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    running = AdapterProcess(proc)
    try:
        init = await running.send({"type": "init", "serverUrl": server_url})
        assert init["success"] is True
        assert init["features"]["sse"] is True
        yield running
        assert await running.send({"type": "shutdown"}) == {"type": "shutdown", "success": True}
        await asyncio.wait_for(proc.wait(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_create_append_read_in_every_mode(adapter: AdapterProcess, stream_name: str) -> None:
    path = f"/v1/stream/{stream_name}"
    created = await adapter.send({"type": "create", "path": path, "contentType": "text/plain"})
    assert created["success"] is True
    assert created["status"] == 201
    again = await adapter.send({"type": "create", "path": path, "contentType": "text/plain"})
    assert again["status"] == 200
    for word in ("one", "two"):
        appended = await adapter.send({"type": "append", "path": path, "data": word})
        assert appended["success"] is True
    catch_up = await adapter.send({"type": "read", "path": path, "live": False})
    assert "".join(c["data"] for c in catch_up["chunks"]) == "onetwo"
    assert catch_up["upToDate"] is True
    sse = await adapter.send({"type": "read", "path": path, "live": "sse", "waitForUpToDate": True})
    assert "".join(c["data"] for c in sse["chunks"]) == "onetwo"
    tail = catch_up["offset"]
    poll = await adapter.send(
        {"type": "read", "path": path, "offset": tail, "live": "long-poll", "timeoutMs": 1500}
    )
    assert poll["chunks"] == []
    assert poll["upToDate"] is True


async def test_json_idempotent_producer_and_close(
    adapter: AdapterProcess, stream_name: str
) -> None:
    path = f"/v1/stream/{stream_name}"
    await adapter.send({"type": "create", "path": path, "contentType": "application/json"})
    batch = await adapter.send(
        {
            "type": "idempotent-append-batch",
            "path": path,
            "items": [json.dumps({"n": i}) for i in range(10)],
            "producerId": "p1",
            "epoch": 0,
            "autoClaim": False,
            "maxInFlight": 3,
        }
    )
    assert batch["success"] is True
    closed = await adapter.send(
        {
            "type": "idempotent-close",
            "path": path,
            "producerId": "p2",
            "epoch": 0,
            "autoClaim": False,
            "data": json.dumps({"n": "last"}),
        }
    )
    assert closed["success"] is True
    read = await adapter.send({"type": "read", "path": path, "live": "long-poll"})
    items = [item for chunk in read["chunks"] for item in json.loads(chunk["data"])]
    assert items == [{"n": i} for i in range(10)] + [{"n": "last"}]
    assert read["streamClosed"] is True
    head = await adapter.send({"type": "head", "path": path})
    assert head["streamClosed"] is True
    refused = await adapter.send({"type": "append", "path": path, "data": "[1]"})
    assert refused["errorCode"] == "STREAM_CLOSED"


async def test_errors_use_the_suite_codes(adapter: AdapterProcess, stream_name: str) -> None:
    missing = await adapter.send({"type": "read", "path": f"/v1/stream/{stream_name}"})
    assert missing["success"] is False
    assert missing["errorCode"] == "NOT_FOUND"
    assert missing["status"] == 404
    assert stream_name in missing["message"]
    invalid = await adapter.send(
        {"type": "validate", "target": {"target": "idempotent-producer", "maxBatchBytes": 0}}
    )
    assert invalid["errorCode"] == "INVALID_ARGUMENT"
    assert "maxBatchBytes" in invalid["message"]
    unknown = await adapter.send({"type": "benchmark", "iterationId": "x", "operation": {}})
    assert unknown["errorCode"] == "NOT_SUPPORTED"
