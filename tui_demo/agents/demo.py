"""The demo agent: deterministic, readable Markdown replies at a steady token rate.

The reply is built from the user's words (no model, no network), streamed a
word at a time at ``token_rate`` words per second, and it honours cancel and
steer like a real agent: a cancel stops it within one token; a steer arriving
mid-reply is acknowledged in the text and shapes the rest of it.

Two more things a real agent does, shown here: a message that asks to
*save* something makes the agent ask for approval before it runs its one
tool (``save_note``; any terminal approves or denies), and a reply left
unfinished by a host that died is continued by the restarted host exactly
where the log stops (:func:`resume`).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator

from durable_client import Agent, AgentReply, IncomingTurn, ProgressStatus, Unfinished

TOPICS = (
    "durable sessions",
    "offsets",
    "idempotent producers",
    "reconnects",
    "presence",
    "cancellation",
)


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text.lower())


def compose_reply(prompt: str) -> str:
    """The full Markdown reply to ``prompt`` (the same prompt gives the same reply)."""
    words = _words(prompt) or ["nothing"]
    digest = hashlib.sha256(prompt.encode()).digest()
    topic = TOPICS[digest[0] % len(TOPICS)]
    keywords = sorted(set(words), key=lambda w: (-len(w), w))[:3]
    quoted = " ".join(words[:12])
    lines = [
        f"You asked about **{', '.join(keywords)}** (“{quoted}”). Here is how I would "
        f"think about it, seen through {topic}:",
        "",
        f"1. **Start from the log.** Everything said here, including this reply, is an "
        f"event in one ordered stream; every terminal reads the same {len(words)} words "
        "you sent and the same tokens I write.",
        "2. **Resume, don't restart.** If a connection drops, the client continues from "
        "its last offset: no token is lost and none is shown twice.",
        "3. **Stop is a message.** Press Escape in any terminal and a `cancel` event "
        "goes into the session; I stop within one token and the text so far stays.",
        "",
        "```text",
        f"prompt words : {len(words)}",
        f"longest word : {keywords[0]}",
        f"fingerprint  : {digest.hex()[:12]}",
        "```",
        "",
        "Open a second terminal with the join command above and ask me something "
        "there: both screens show the same conversation, live.",
    ]
    return "\n".join(lines) + "\n"


async def tokens(text: str, rate: float) -> AsyncIterator[str]:
    """``text`` a word (with its trailing space or newline) at a time, ``rate`` per second."""
    interval = 1.0 / rate if rate > 0 else 0.0
    for match in re.finditer(r"\S+\s*|\s+", text):
        yield match.group(0)
        if interval:
            await asyncio.sleep(interval)


def _at_block_boundary(text: str) -> bool:
    """Whether ``text`` ends between two Markdown blocks (after a blank line, outside a
    fenced code block): where a note can go without cutting a list or a paragraph."""
    return text.endswith("\n\n") and text.count("```") % 2 == 0


def _acknowledgement(steer: str) -> str:
    return f"> Noted: *{steer}*. Adjusting as I go.\n\n"


#: The demo's one tool, run only with approval.
TOOL = "save_note"


def wants_tool(prompt: str) -> bool:
    """Whether the prompt asks the demo agent to save something (its tool)."""
    return "save" in _words(prompt)


async def _ask_to_save(reply: AgentReply, prompt: str, token_rate: float) -> None:
    async for token in tokens("I can save your message as a note. Asking first.\n\n", token_rate):
        await reply.write(token)
    decision = await reply.request_approval(
        TOOL,
        arguments={"text": prompt[:200]},
        description="save your message as a note in this session",
    )
    who = decision.author.name or decision.author.id
    if decision.approved:
        await reply.progress(TOOL, status=ProgressStatus.COMPLETED, message="note saved")
        line = f"**Saved** (approved by {who}).\n\n"
    else:
        line = f"**Not saved**: {who} said no.\n\n"
    async for token in tokens(line, token_rate):
        await reply.write(token)


async def answer(agent: Agent, turn: IncomingTurn, *, token_rate: float) -> None:
    """Stream the reply to one turn. A steer mid-reply is acknowledged at the next break
    between blocks (never inside a list, a paragraph or code) and shapes the closing;
    a cancel ends the turn as cancelled."""
    async with agent.reply(turn) as reply:
        if wants_tool(turn.text):
            await _ask_to_save(reply, turn.text, token_rate)
        steers: list[str] = []
        waiting: list[str] = []  # steers not acknowledged yet
        async for token in tokens(compose_reply(turn.text), token_rate):
            await reply.write(token)  # raises TurnCancelled once a cancel arrives
            waiting += [steer.text for steer in reply.take_steers()]
            if waiting and _at_block_boundary(reply.text):
                for text in waiting:
                    await reply.write(_acknowledgement(text))
                steers += waiting
                waiting = []
        waiting += [steer.text for steer in reply.take_steers()]
        if waiting:
            if not reply.text.endswith("\n\n"):
                await reply.write("\n" if reply.text.endswith("\n") else "\n\n")
            for text in waiting:
                await reply.write(_acknowledgement(text))
            steers += waiting
        for text in steers:
            async for token in tokens(f"\nAs you asked (*{text}*): done.\n", token_rate):
                await reply.write(token)


async def resume(agent: Agent, left: Unfinished, *, token_rate: float) -> None:
    """Continue a reply this agent left unfinished (its host died): the rest of
    the same deterministic reply, after exactly the text already in the log.

    If the text so far is not a prefix of the composed reply (a steer shaped
    it), the reply is closed with a note instead of guessing."""
    prompt = left.message.text if left.message is not None else ""
    full = compose_reply(prompt)
    async with await agent.adopt(left) as reply:
        rest = full[len(reply.text) :] if full.startswith(reply.text) else None
        if rest is None:
            rest = "\n\n*(The agent restarted here and closed this reply.)*\n"
        async for token in tokens(rest, token_rate):
            await reply.write(token)


async def research(agent: Agent, turn: IncomingTurn, *, steps: int = 3, pace: float = 0.6) -> None:
    """A sub-agent: publishes its own progress into the session while the main agent answers."""
    source = "notes-search"
    async with agent.reply(turn) as reply:
        for step in range(1, steps + 1):
            if reply.cancelled:
                await reply.progress(source, status=ProgressStatus.FAILED, message="stopped")
                return
            await reply.progress(
                source,
                message=f"searching notes ({step}/{steps})",
                fraction=step / steps,
            )
            await asyncio.sleep(pace)
        await reply.progress(
            source,
            status=ProgressStatus.COMPLETED,
            message=f"found {len(_words(turn.text))} related notes",
        )
