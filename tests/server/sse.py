"""A small SSE reader for tests: events as (type, data) until a predicate holds."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx


async def read_sse(
    client: httpx.AsyncClient,
    url: str,
    until: Callable[[list[tuple[str, str]]], bool],
    headers: dict[str, str] | None = None,
) -> tuple[httpx.Response, list[tuple[str, str]]]:
    """Read events from ``url`` until ``until(events)`` is true or the server ends the response."""
    events: list[tuple[str, str]] = []
    async with client.stream("GET", url, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            return response, events
        kind, data = "", []
        async for line in response.aiter_lines():
            if line == "":
                if kind:
                    events.append((kind, "\n".join(data)))
                    if until(events):
                        break
                kind, data = "", []
            elif line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(" ") else value)
        return response, events


def controls(events: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [json.loads(data) for kind, data in events if kind == "control"]


def datas(events: list[tuple[str, str]]) -> list[str]:
    return [data for kind, data in events if kind == "data"]
