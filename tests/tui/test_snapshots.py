"""SVG snapshots of the chat at a fixed size (Textual is pinned in pyproject.toml for these).

A mismatch writes ``<name>.actual.svg`` beside the stored snapshot so it can
be viewed; after checking it, accept it with ``pytest tests/tui --snapshot-update``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from textual.pilot import Pilot
from textual.widgets import Input

from tui_demo.app import ChatApp
from tui_demo.widgets import StatusBar

from .conftest import Chat, send, wait_for
from .test_app import replies, reply_status

SNAPSHOTS = Path(__file__).parent / "snapshots"
SIZE = (100, 34)


def normalized(svg: str) -> str:
    # Textual names its CSS classes after a hash of the whole screen; the
    # content below is what matters, so compare without those names.
    svg = re.sub(r"terminal-\d+-", "terminal-", svg)
    return re.sub(r"127\.0\.0\.1:\d{5}", "127.0.0.1:PORT", svg)  # the test server's port


async def check(pilot: Pilot[None], name: str, update: bool) -> None:
    app = pilot.app
    assert isinstance(app, ChatApp)
    app.query_one(StatusBar).position = "1234"  # offsets depend on event ids and clocks
    app.query_one("#composer", Input).cursor_blink = False  # a blinking cursor is never still
    await pilot.pause()
    svg = normalized(app.export_screenshot())
    stored = SNAPSHOTS / f"{name}.svg"
    actual = SNAPSHOTS / f"{name}.actual.svg"
    if update or not stored.exists():
        SNAPSHOTS.mkdir(exist_ok=True)
        stored.write_text(svg)
        actual.unlink(missing_ok=True)
        if not update:
            pytest.fail(f"no snapshot {stored.name} yet: wrote it; check it and run again")
        return
    if svg != stored.read_text():
        actual.write_text(svg)
        pytest.fail(f"{name} differs from its snapshot; see {actual}")
    actual.unlink(missing_ok=True)


async def test_snapshot_empty_session(chat: Chat, update: bool) -> None:
    app = chat.app("alice")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(
            pilot, lambda: str(app.query_one(StatusBar).connection_text()) == "● connected"
        )
        await check(pilot, "empty_session", update)


async def test_snapshot_completed_reply(chat: Chat, update: bool) -> None:
    chat.start_agent(token_rate=2000.0)
    app = chat.app("alice")
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "How do offsets make reconnects safe?")
        await wait_for(pilot, lambda: reply_status(app) == "complete")
        await wait_for(pilot, lambda: app.query_one(StatusBar).agents == "Assistant idle")
        await check(pilot, "completed_reply", update)


async def test_snapshot_stopped_reply(chat: Chat, update: bool) -> None:
    # One word every 2 s: the stop lands after exactly the first word.
    chat.start_agent(token_rate=0.5)
    app = chat.app("alice")
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "Stop this one")
        await wait_for(pilot, lambda: bool(replies(app)) and bool(replies(app)[0].text))
        await pilot.press("escape")
        await wait_for(pilot, lambda: reply_status(app) == "cancelled")
        await wait_for(pilot, lambda: app.query_one(StatusBar).agents == "Assistant idle")
        await check(pilot, "stopped_reply", update)


async def test_snapshot_status_bar_at_80_columns(chat: Chat, update: bool) -> None:
    # Two people with terminal labels do not fit beside everything else: the bar
    # gives up whole parts ("here: … +1"), never half a word.
    chat.start_agent()
    alice = chat.app("alice", label="alice (pts/3)")
    bob = chat.app("bob", label="bob (pts/4)")
    async with alice.run_test(size=(80, 24)) as pilot, bob.run_test(size=(80, 24)):
        bar = alice.query_one(StatusBar)
        await wait_for(pilot, lambda: "bob (pts/4)" in bar.people)
        await wait_for(pilot, lambda: bar.agents == "Assistant idle")
        await wait_for(pilot, lambda: str(bar.connection_text()) == "● connected")
        bar.people = "alice (pts/3), bob (pts/4)"  # presence order depends on who joined first
        await check(pilot, "status_bar_80", update)
