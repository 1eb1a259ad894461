"""Pilot tests of the chat app: real server, real demo agent, two terminals at once."""

from __future__ import annotations

from mock_server.chaos import ChaosProxy as Proxy
from tui_demo.app import ChatApp
from tui_demo.widgets import ChatLog, ReplyView, StatusBar

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
