"""An agent backed by any OpenAI-compatible chat-completions endpoint, streamed with httpx.

Configuration: ``--base-url`` (e.g. ``https://api.openai.com/v1`` or a local
server), ``--model``, and the API key from ``--api-key-env`` (default
``OPENAI_API_KEY``). A cancel closes the HTTP response at once, so the model
stops being billed for tokens nobody will read.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from durable_client import Agent, IncomingTurn, ReplyStatus


class ModelError(Exception):
    """The endpoint refused or broke the request; the message says why, briefly."""


@dataclass(frozen=True)
class ModelConfig:
    base_url: str
    model: str
    api_key: str | None = None
    system_prompt: str = "You are a helpful assistant in a terminal chat. Answer in Markdown."
    timeout: float = 60.0


def conversation(agent: Agent, turn: IncomingTurn, system_prompt: str) -> list[dict[str, str]]:
    """The chat history to send: earlier turns of this session, then this message."""
    messages = [{"role": "system", "content": system_prompt}]
    for past in agent.transcript:
        if past.turn_id == turn.turn_id:
            break
        if past.message is not None:
            messages.append({"role": "user", "content": past.message.text})
        reply = past.reply_of(agent.author.id)
        if reply is not None and reply.text and reply.status is not ReplyStatus.ERROR:
            messages.append({"role": "assistant", "content": reply.text})
    messages.append({"role": "user", "content": turn.text})
    return messages


async def completion_tokens(
    client: httpx.AsyncClient, config: ModelConfig, messages: list[dict[str, str]]
) -> AsyncIterator[str]:
    """The streamed content of one chat completion, fragment by fragment."""
    headers = {"Accept": "text/event-stream"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    body: dict[str, Any] = {"model": config.model, "messages": messages, "stream": True}
    url = config.base_url.rstrip("/") + "/chat/completions"
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:200]
                raise ModelError(f"the model endpoint answered {response.status_code}: {detail}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    chunk = json.loads(data)
                    choices = chunk.get("choices") or [{}]
                    content = (choices[0].get("delta") or {}).get("content")
                except (ValueError, AttributeError, IndexError) as exc:
                    raise ModelError(f"unreadable chunk from the model endpoint: {exc}") from None
                if content:
                    yield content
    except httpx.TransportError as exc:
        raise ModelError(f"cannot reach the model endpoint {url}: {exc}") from None


async def answer(
    agent: Agent, turn: IncomingTurn, client: httpx.AsyncClient, config: ModelConfig
) -> None:
    """Stream the model's reply to one turn; a cancel stops it at once, an error ends the turn."""
    messages = conversation(agent, turn, config.system_prompt)
    async with agent.reply(turn) as reply:
        await reply.stream(completion_tokens(client, config, messages))
