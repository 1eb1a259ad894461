"""Pilot tests of the chat app: real server, real demo agent, two terminals at once."""

from __future__ import annotations

import re
import sys
import time

import pytest
from textual.command import CommandList, CommandPalette
from textual.widgets import Input
from textual.widgets._footer import FooterKey
from textual.widgets.markdown import MarkdownBlock

from durable_client import Author, ConnectionState, ConnectionStatus
from durable_client.streams import DurableStream
from mock_server.chaos import ChaosProxy as Proxy
from tui_demo.app import ChatApp, ChatConfig, PromptScreen, SessionHeader
from tui_demo.widgets import ChatLog, Note, ReplyView, StatusBar, UserBubble

from .conftest import Chat, send, wait_for

QUESTION = "How do offsets make reconnects safe?"


def replies(app: ChatApp) -> list[ReplyView]:
    return [r for t in app.query_one(ChatLog).turns.values() for r in t.replies.values()]


def reply_status(app: ChatApp) -> str | None:
    views = replies(app)
    return views[-1].status if views else None


async def test_a_message_gets_a_streamed_reply(chat: Chat) -> None:
    chat.start_agent()
    app = chat.app("alice")
    async with app.run_test(size=(100, 40)) as pilot:
        await send(pilot, QUESTION)
        await wait_for(pilot, lambda: reply_status(app) == "complete")
        reply = replies(app)[-1]
        assert reply.text.startswith("You asked about **reconnects, offsets, make**")
        turn = app.transcript.turns[-1]
        assert turn.message is not None
        assert turn.message.text == QUESTION
        assert reply.text == turn.replies["assistant"].text  # the view shows what the log holds
        bar = app.query_one(StatusBar)
        await wait_for(pilot, lambda: bar.agents == "Assistant idle")  # from presence


async def test_two_terminals_show_the_same_conversation(chat: Chat) -> None:
    chat.start_agent()
    alice, bob = chat.app("alice"), chat.app("bob")
    async with alice.run_test(size=(100, 40)) as pa, bob.run_test(size=(100, 40)) as pb:
        await send(pa, QUESTION)
        await wait_for(pa, lambda: reply_status(alice) == "complete")
        await wait_for(pb, lambda: reply_status(bob) == "complete")
        await send(pb, "And presence?")
        await wait_for(pb, lambda: len(replies(bob)) == 2 and reply_status(bob) == "complete")
        await wait_for(pa, lambda: len(replies(alice)) == 2 and reply_status(alice) == "complete")
        assert [r.text for r in replies(alice)] == [r.text for r in replies(bob)]
        messages = [t.message.text for t in alice.transcript.turns if t.message is not None]
        assert messages == [QUESTION, "And presence?"]


async def test_escape_in_one_terminal_stops_the_reply_in_both(chat: Chat) -> None:
    chat.start_agent(token_rate=30.0)
    alice, bob = chat.app("alice"), chat.app("bob")
    async with alice.run_test(size=(100, 40)) as pa, bob.run_test(size=(100, 40)) as pb:
        await send(pa, QUESTION)
        await wait_for(pb, lambda: len(replies(bob)) == 1 and len(replies(bob)[0].text) > 20)
        await pb.press("escape")
        await wait_for(pa, lambda: reply_status(alice) == "cancelled")
        await wait_for(pb, lambda: reply_status(bob) == "cancelled")
        partial = replies(alice)[0].text
        assert partial  # the text so far stays
        assert replies(bob)[0].text == partial
        assert "-stopped" in replies(alice)[0].classes
    events = await chat.events()
    ends = [e for e in events if e["type"] == "turn_end"]
    assert [e["reason"] for e in ends] == ["cancelled"]  # exactly once
    assert len([e for e in events if e["type"] == "cancel"]) == 1


async def test_escape_does_nothing_when_no_reply_streams(chat: Chat) -> None:
    app = chat.app("alice")
    async with app.run_test(size=(100, 40)) as pilot:
        await wait_for(pilot, lambda: app.session is not None)
        assert app.check_action("stop", ()) is False
        await pilot.press("escape")
    assert [e["type"] for e in await chat.events()] == []


async def test_a_late_joiner_sees_the_history_then_the_live_tail(chat: Chat) -> None:
    chat.start_agent(token_rate=60.0)
    alice = chat.app("alice")
    async with alice.run_test(size=(100, 40)) as pa:
        await send(pa, "first question")
        await wait_for(pa, lambda: reply_status(alice) == "complete")
        await send(pa, QUESTION)
        await wait_for(pa, lambda: len(replies(alice)) == 2 and len(replies(alice)[1].text) > 50)
        carol = chat.app("carol")  # joins mid-reply
        async with carol.run_test(size=(100, 40)) as pc:
            await wait_for(pc, lambda: len(replies(carol)) == 2)
            await wait_for(pc, lambda: reply_status(carol) == "complete", timeout=20)
            await wait_for(pa, lambda: reply_status(alice) == "complete", timeout=20)
            shown = [r.text for r in replies(carol)]
            assert shown == [r.text for r in replies(alice)]
    log_text = "".join(str(e["text"]) for e in await chat.events() if e["type"] == "text_delta")
    assert "".join(shown) == log_text  # nothing repeated or missing


async def test_typing_while_a_reply_streams_steers_it(chat: Chat) -> None:
    chat.start_agent(token_rate=40.0)
    app = chat.app("alice")
    async with app.run_test(size=(100, 40)) as pilot:
        await send(pilot, QUESTION)
        await wait_for(pilot, lambda: len(replies(app)) == 1 and len(replies(app)[0].text) > 10)
        await send(pilot, "keep it short")
        await wait_for(pilot, lambda: "Noted: *keep it short*" in replies(app)[0].text, timeout=15)
        await pilot.press("escape")
        await wait_for(pilot, lambda: reply_status(app) == "cancelled")
    steers = [e for e in await chat.events() if e["type"] == "steer"]
    assert [s["text"] for s in steers] == ["keep it short"]


async def test_a_dropped_connection_shows_reconnecting_and_the_reply_continues(chat: Chat) -> None:
    chat.start_agent(token_rate=50.0)
    async with Proxy(chat.server.url) as proxy:
        app = chat.app("alice", server_url=proxy.url)
        async with app.run_test(size=(100, 40)) as pilot:
            await send(pilot, QUESTION)
            await wait_for(pilot, lambda: len(replies(app)) == 1 and len(replies(app)[0].text) > 30)
            await proxy.offline()
            bar = app.query_one(StatusBar)
            await wait_for(pilot, lambda: "reconnecting" in str(bar.connection_text()))
            await proxy.online()
            await wait_for(pilot, lambda: str(bar.connection_text())[2:] == "connected")
            await wait_for(pilot, lambda: reply_status(app) == "complete", timeout=20)
            shown = replies(app)[0].text
    log_text = "".join(str(e["text"]) for e in await chat.events() if e["type"] == "text_delta")
    assert shown == log_text  # nothing repeated or missing across the drop


async def test_joining_a_missing_session_says_so(chat: Chat) -> None:
    chat.session_id = "no-such-session"
    app = chat.app("alice")
    async with app.run_test(size=(100, 40)) as pilot:
        chat_log = app.query_one(ChatLog)
        await wait_for(
            pilot, lambda: "was not found" in " ".join(str(n.render()) for n in chat_log.children)
        )


async def test_each_terminal_sees_who_else_is_here(chat: Chat) -> None:
    chat.start_agent()
    alice, bob = chat.app("alice"), chat.app("bob")
    async with alice.run_test(size=(100, 40)) as pa, bob.run_test(size=(100, 40)) as pb:
        bar_a, bar_b = alice.query_one(StatusBar), bob.query_one(StatusBar)
        await wait_for(pa, lambda: bar_a.people == "alice, bob" or bar_a.people == "bob, alice")
        await wait_for(pb, lambda: sorted(bar_b.people.split(", ")) == ["alice", "bob"])
        await wait_for(pa, lambda: bar_a.agents == "Assistant idle")  # the agent's presence
        assert alice.session is not None
        assert alice.session.transport_name == "websocket"
    # bob's app closed: alice's would show bob leaving (covered in the SDK and server tests)


# --- issue 11: the rough edges a new user hits -------------------------------------------

APP_COMMANDS = [
    "New session",
    "Join session…",
    "Recent sessions…",
    "Copy session id",
    "Simulate a disconnect",
    "Rename yourself…",
]


def palette_entries(app: ChatApp) -> list[str]:
    """The first line of every entry the open command palette lists."""
    listed = app.screen.query_one(CommandList)
    prompts = (listed.get_option_at_index(i).prompt for i in range(listed.option_count))
    return [str(p).split("\n", 1)[0] for p in prompts]


def notes(app: ChatApp) -> list[str]:
    return [str(n.render()) for n in app.query(Note)]


def notifications(app: ChatApp) -> list[str]:
    return [n.message for n in app._notifications]


async def test_the_command_palette_lists_the_apps_commands_when_it_opens(chat: Chat) -> None:
    app = chat.app("alice")
    async with app.run_test(size=(100, 40)) as pilot:
        await wait_for(pilot, lambda: app.session is not None)
        await pilot.press("ctrl+p")
        await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette))
        # Nothing typed: the app's own commands are listed beside Textual's.
        await wait_for(pilot, lambda: set(APP_COMMANDS) <= set(palette_entries(app)))
        assert app.screen.query_one("#--input Input", Input).value == ""


def list_items(reply: ReplyView) -> list[str]:
    """The items of each ordered list the reply's Markdown shows."""
    return [
        f"{len(block.query('MarkdownBullet'))} items"
        for block in reply.query("MarkdownOrderedList")
    ]


async def test_a_steer_leaves_the_replys_markdown_layout_as_the_agent_meant_it(
    chat: Chat,
) -> None:
    chat.start_agent(token_rate=40.0)
    alice, bob = chat.app("alice"), chat.app("bob")
    async with alice.run_test(size=(100, 40)) as pa, bob.run_test(size=(100, 40)) as pb:
        await send(pa, QUESTION)
        # Steer while the reply is in the middle of its numbered list.
        await wait_for(pa, lambda: bool(replies(alice)) and "1. **Start" in replies(alice)[0].text)
        await send(pa, "keep it short")
        await wait_for(pa, lambda: reply_status(alice) == "complete", timeout=20)
        await wait_for(pb, lambda: reply_status(bob) == "complete", timeout=20)
        for app in (alice, bob):
            reply = replies(app)[0]
            # One list of three items, as written; not a list cut by the acknowledgement
            # and the rest folded into a paragraph.
            assert list_items(reply) == ["3 items"], reply.text
            top = reply.query("Markdown > MarkdownParagraph").results(MarkdownBlock)
            paragraphs = [str(p.source) for p in top]
            assert not any("2. **" in p or "3. **" in p for p in paragraphs), paragraphs
            assert "Noted: *keep it short*" in reply.text  # the agent still says so
        # The steer itself shows as a note of its own, outside the reply's Markdown.
        assert "↳ you (steer): keep it short" in notes(alice)
        assert "↳ alice (steer): keep it short" in notes(bob)


async def test_each_terminal_names_who_asked_to_stop(chat: Chat) -> None:
    # The same person in two terminals: the other one names the terminal that asked.
    chat.start_agent(token_rate=20.0)
    one = chat.app("ada", user_id="ada-1", label="ada (pts/3)")
    two = chat.app("ada", user_id="ada-2", label="ada (pts/4)")
    async with one.run_test(size=(100, 40)) as p1, two.run_test(size=(100, 40)) as p2:
        bar = one.query_one(StatusBar)
        await wait_for(p1, lambda: "ada (pts/4)" in bar.people and "ada (pts/3)" in bar.people)
        await send(p1, QUESTION)
        await wait_for(p2, lambda: bool(replies(two)) and bool(replies(two)[0].text))
        await p2.press("escape")
        await wait_for(p1, lambda: reply_status(one) == "cancelled")
        await wait_for(p2, lambda: reply_status(two) == "cancelled")
        assert "■ stop requested by you" in notes(two)
        assert "■ stop requested by ada (pts/4)" in notes(one)
        assert "■ stop requested by you" not in notes(one)


async def test_a_participant_named_you_is_never_called_you_elsewhere(chat: Chat) -> None:
    # "you" was the default name when $USER was unset, and such events stay in the logs.
    chat.start_agent(token_rate=20.0)
    one = chat.app("you", user_id="you-1")
    two = chat.app("you", user_id="you-2")
    async with one.run_test(size=(100, 40)) as p1, two.run_test(size=(100, 40)) as p2:
        await send(p1, QUESTION)
        await wait_for(p2, lambda: bool(replies(two)) and bool(replies(two)[0].text))
        await p2.press("escape")
        await wait_for(p1, lambda: reply_status(one) == "cancelled")
        await wait_for(p2, lambda: reply_status(two) == "cancelled")
        assert "■ stop requested by you" in notes(two)
        mine = [n for n in notes(one) if n.startswith("■")]
        assert mine == ["■ stop requested by another participant (you-2)"]


async def test_the_status_bar_fits_80_columns_by_whole_parts(chat: Chat) -> None:
    chat.start_agent()
    alice = chat.app("alice", label="alice (pts/3)")
    bob = chat.app("bob", label="bob (pts/4)")
    async with alice.run_test(size=(80, 30)) as pa, bob.run_test(size=(80, 30)):
        bar = alice.query_one(StatusBar)
        await wait_for(pa, lambda: "bob (pts/4)" in bar.people and "connected" in str(bar.render()))
        await wait_for(pa, lambda: bar.agents == "Assistant idle")
        await send(pa, "hello")
        await wait_for(pa, lambda: reply_status(alice) == "complete")
        await wait_for(pa, lambda: bar.position != "" and bar.agents == "Assistant idle")
        bar.refresh_text()
        shown = str(bar.render())
        assert len(shown) <= bar.content_size.width == 78, shown  # nothing cut off the edge
        assert shown.endswith("agent: Assistant idle"), shown
        full = str(bar.status_text(10_000))
        allowed = {w.rstrip(",") for w in full.split()} | {"…"}
        for width in range(8, 120):
            fitted = str(bar.status_text(width))
            assert len(fitted) <= width, (width, fitted)
            # Every word shown is a whole word of the full bar (or a count of people).
            extra = [w for w in fitted.split() if w.rstrip(",") not in allowed]
            assert all(re.fullmatch(r"\+\d+|\d+|here|\S*…", w) for w in extra), (width, fitted)


async def test_the_reconnect_countdown_never_says_in_0_s(chat: Chat) -> None:
    app = chat.app("alice")
    async with app.run_test(size=(100, 40)) as pilot:
        await wait_for(pilot, lambda: app.session is not None)
        bar = StatusBar()  # a bar of its own: the live one follows the real connection
        await app.mount(bar)
        now = time.monotonic()
        bar.connection = ConnectionStatus(
            ConnectionState.RECONNECTING, attempt=2, delay=0.4, at=now
        )
        assert re.fullmatch(
            r"◌ reconnecting in 0\.[1-4] s \(attempt 2\)", str(bar.connection_text())
        )
        bar.connection = ConnectionStatus(
            ConnectionState.RECONNECTING, attempt=3, delay=0.0, at=now
        )
        assert str(bar.connection_text()) == "◌ reconnecting… (attempt 3)"
        bar.connection = ConnectionStatus(ConnectionState.OFFLINE, attempt=4, delay=2.6, at=now)
        assert re.fullmatch(
            r"◌ offline, retrying in [23] s \(attempt 4\)", str(bar.connection_text())
        )


async def test_a_joining_terminal_never_shows_offset_minus_one(
    chat: Chat, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown: list[tuple[str, str]] = []
    watch = StatusBar.watch_position

    def recording(bar: StatusBar) -> None:
        app = bar.app
        assert isinstance(app, ChatApp)
        shown.append((app.config.user.name or "", bar.position))
        watch(bar)

    monkeypatch.setattr(StatusBar, "watch_position", recording)
    chat.start_agent(token_rate=60.0)
    alice = chat.app("alice")
    async with alice.run_test(size=(100, 40)) as pa:
        await send(pa, "first question")
        await wait_for(pa, lambda: reply_status(alice) == "complete")
        await send(pa, QUESTION)
        await wait_for(pa, lambda: len(replies(alice)) == 2 and len(replies(alice)[1].text) > 50)
        carol = chat.app("carol")  # joins mid-reply
        async with carol.run_test(size=(100, 40)) as pc:
            await wait_for(pc, lambda: reply_status(carol) == "complete", timeout=20)
            await wait_for(pa, lambda: reply_status(alice) == "complete", timeout=20)
            await wait_for(pc, lambda: carol.query_one(StatusBar).position != "")
            final = carol.query_one(StatusBar).position
    carols = [p for who, p in shown if who == "carol"]
    assert carols  # the bar was updated as events arrived
    assert all(p == "" or p.isdigit() for p in carols), carols  # never the "-1" sentinel
    assert final.isdigit()
    assert int(final) > 0


async def test_rename_yourself_from_the_palette(chat: Chat) -> None:
    alice, bob = chat.app("alice", label="alice (pts/3)"), chat.app("bob")
    async with alice.run_test(size=(100, 40)) as pa, bob.run_test(size=(100, 40)) as pb:
        bar_b = bob.query_one(StatusBar)
        await wait_for(pb, lambda: "alice (pts/3)" in bar_b.people)
        await pa.press("ctrl+p")
        await wait_for(pa, lambda: isinstance(alice.screen, CommandPalette))
        await pa.press(*"rename")
        await wait_for(pa, lambda: palette_entries(alice)[:1] == ["Rename yourself…"])
        await pa.press("enter")
        await wait_for(pa, lambda: isinstance(alice.screen, PromptScreen))
        await pa.press(*"Alicia", "enter")
        # Presence changes in the other terminal; the terminal part of the label stays.
        await wait_for(pb, lambda: "Alicia (pts/3)" in bar_b.people)
        assert "alice" not in bar_b.people
        await send(pa, "hi from a new name")
        await wait_for(
            pb,
            lambda: any(
                "Alicia\nhi from a new name" in str(u.render()) for u in bob.query(UserBubble)
            ),
        )
        # Bad names change nothing and say why.
        alice.rename("   ")
        alice.rename("x" * 41)
        await wait_for(
            pa, lambda: len([n for n in notifications(alice) if "not renamed" in n]) == 2
        )
        assert alice.user.name == "Alicia"
    messages = [e for e in await chat.events() if e["type"] == "user_message"]
    assert messages[-1]["author"] == {"id": "alice-id", "kind": "user", "name": "Alicia"}


async def test_typing_in_a_missing_session_says_it_does_not_exist(chat: Chat) -> None:
    chat.session_id = "no-such-session"
    app = chat.app("alice")
    async with app.run_test(size=(100, 40)) as pilot:
        await wait_for(pilot, lambda: any("was not found" in n for n in notes(app)))
        await send(pilot, "hello?")
        await wait_for(pilot, lambda: bool(notifications(app)))
        (message,) = notifications(app)
        assert "closed" not in message
        assert message.startswith("not sent: there is no session 'no-such-session'")
        assert "Ctrl+N" in message
    # Nothing was written anywhere, and the session was not created.
    async with DurableStream(f"{chat.server.url}/v1/stream/sessions/no-such-session") as s:
        assert not await s.exists()


async def test_ctrl_n_is_in_the_footer(chat: Chat) -> None:
    app = chat.app("alice")
    async with app.run_test(size=(100, 40)) as pilot:
        await wait_for(pilot, lambda: app.session is not None)
        await wait_for(
            pilot,
            lambda: (
                ("ctrl+n", "New session") in {(k.key, k.description) for k in app.query(FooterKey)}
            ),
        )


def test_the_join_hint_names_the_command_that_started_the_app(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tui_demo.app import default_launcher  # new in issue 11: here, so the file loads before it

    monkeypatch.delenv("DURABLE_CHAT_LAUNCHER", raising=False)
    assert default_launcher("/home/ada/.venv/bin/durable-chat") == "durable-chat"
    assert default_launcher("/work/main/tui_demo/__main__.py") == "python -m tui_demo"
    monkeypatch.setenv("DURABLE_CHAT_LAUNCHER", "python3 dev.py chat")
    assert default_launcher("/home/ada/.venv/bin/durable-chat") == "python3 dev.py chat"


async def test_the_installed_app_tells_others_to_run_durable_chat(
    chat: Chat, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DURABLE_CHAT_LAUNCHER", raising=False)
    monkeypatch.setattr(sys, "argv", ["/home/ada/.venv/bin/durable-chat"])
    config = ChatConfig(
        server=chat.server.url,
        session_id=chat.session_id,
        user=Author.user("a-1", "ada"),
        new=False,
    )
    app = ChatApp(config)
    async with app.run_test(size=(100, 40)) as pilot:
        header = app.query_one(SessionHeader)
        await wait_for(
            pilot, lambda: "durable-chat --session amber-otter-0042" in str(header.render())
        )
        assert "python -m tui_demo" not in str(header.render())
