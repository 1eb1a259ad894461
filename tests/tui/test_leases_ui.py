"""The chat app and reply leases: abandoned replies, retries, adoption, approvals.

A dead agent is played as tests/client/test_leases.py plays it: the log a
``kill -9`` leaves (a message, a leased ``turn_start``, some text, then
silence), written with the reply's own producer over plain HTTP. The app's
subscription then ends the reply itself once the lease lapses (its watchdog),
exactly as it would for a real agent host that died. Approvals use the real
demo agent: a prompt with the word "save" makes it ask before it runs its
tool.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from textual.command import CommandPalette
from textual.widgets import Markdown
from textual.widgets._footer import FooterKey
from textual.widgets.markdown import MarkdownBlock

from durable_client import (
    AnyEvent,
    ApprovalStatus,
    Author,
    Session,
    TextDelta,
    TurnStart,
)
from durable_client._core.leases import reply_producer_id
from tui_demo.agents import demo
from tui_demo.agents.host import ASSISTANT
from tui_demo.app import ChatApp
from tui_demo.widgets import ApprovalView, ChatLog, Note, StatusBar, UserBubble

from .conftest import Chat, send, wait_for
from .test_app import palette_entries, replies, reply_status
from .test_snapshots import check

SIZE = (100, 40)
PROMPT = "Why do leases end a stuck reply?"
SAVE_PROMPT = "Please save this: leases keep replies honest"


async def raw_append(url: str, turn_id: str, epoch: int, seq: int, event: AnyEvent) -> None:
    """Append as the assistant's reply producer does (what a dead agent had written)."""
    headers = {
        "Producer-Id": reply_producer_id(turn_id, ASSISTANT.id),
        "Producer-Epoch": str(epoch),
        "Producer-Seq": str(seq),
    }
    async with httpx.AsyncClient() as http:
        answer = await http.post(url, json=[event.to_json()], headers=headers)
    assert answer.status_code == 200, answer.text


async def dead_agent_reply(
    chat: Chat,
    *,
    prompt: str = PROMPT,
    text: str = "Leases are how a reply ",
    ttl: float = 0.5,
    holder: str = "dead-host",
) -> str:
    """Alice asks; the assistant starts a leased reply, writes ``text`` and dies. The turn id."""
    alice = Author.user("alice-id", "alice")
    async with Session(chat.server.url, chat.session_id, author=alice) as session:
        turn_id = (await session.send_message(prompt)).event.turn_id
        url = session.url
    start = TurnStart(author=ASSISTANT, turn_id=turn_id, lease_ttl=ttl, holder=holder)
    await raw_append(url, turn_id, 0, 0, start)
    await raw_append(url, turn_id, 0, 1, TextDelta(author=ASSISTANT, turn_id=turn_id, text=text))
    return turn_id


def abandoned_note(app: ChatApp) -> str:
    return " ".join(str(n.render()) for n in app.query(".abandoned-note").results(Note))


def approvals(app: ChatApp) -> list[ApprovalView]:
    return list(app.query(ApprovalView).results(ApprovalView))


def approval_line(app: ChatApp) -> str:
    """The last line of the (one) approval block: how to answer, or how it was decided."""
    (view,) = approvals(app)
    return view.approval_text().plain.rsplit("\n", 1)[-1]


def footer_keys(app: ChatApp) -> set[tuple[str, str]]:
    return {(k.key, k.description) for k in app.query(FooterKey)}


# ---------------------------------------------------------------------------- abandoned


async def test_a_reply_whose_agent_died_is_shown_abandoned_in_every_terminal(chat: Chat) -> None:
    alice, bob = chat.app("alice"), chat.app("bob")
    async with alice.run_test(size=SIZE) as pa, bob.run_test(size=SIZE) as pb:
        await wait_for(pa, lambda: alice.session is not None and bob.session is not None)
        turn_id = await dead_agent_reply(chat)
        await wait_for(pa, lambda: reply_status(alice) == "abandoned")
        await wait_for(pb, lambda: reply_status(bob) == "abandoned")
        for app in (alice, bob):
            (reply,) = replies(app)
            assert reply.text == "Leases are how a reply "  # the text so far stays
            assert "-abandoned" in reply.classes
            assert reply.header_text() == "Assistant · stopped responding"
            assert "the agent stopped responding (no word for 0.5 s)" in abandoned_note(app)
            assert app.transcript.turns[-1].replies["assistant"].status.value == "abandoned"
        events = await chat.events()
        (end,) = [e for e in events if e["type"] == "turn_end"]  # one end, however many readers
        assert end["reason"] == "abandoned"
        assert end["turn_id"] == turn_id
        ender = end["author"]["name"]  # type: ignore[index]
        assert ender in ("alice", "bob")
        other = bob if ender == "alice" else alice
        this = alice if ender == "alice" else bob
        # Who ended it is said, as each terminal names them.
        assert abandoned_note(this).endswith("; ended by you")
        assert abandoned_note(other).endswith(f"; ended by {ender}")


async def test_retry_asks_again_and_the_agent_answers(chat: Chat) -> None:
    app = chat.app("alice")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.session is not None)
        assert app.check_action("retry", ()) is False  # nothing to retry yet
        turn_id = await dead_agent_reply(chat)
        await wait_for(pilot, lambda: reply_status(app) == "abandoned")
        await wait_for(pilot, lambda: ("ctrl+r", "Retry") in footer_keys(app))
        await pilot.press("ctrl+p")
        await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette))
        await wait_for(pilot, lambda: "Retry last reply" in palette_entries(app))
        await pilot.press("escape")
        chat.start_agent()  # a live agent host again: it leaves the abandoned turn alone
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: len(replies(app)) == 2 and reply_status(app) == "complete")
        _first, retry = app.transcript.turns
        assert retry.retry_of == turn_id
        assert retry.message is not None
        assert retry.message.text == PROMPT
        assert retry.message.to is None
        assert retry.message.author.id == "alice-id"
        assert replies(app)[1].text == demo.compose_reply(PROMPT)
        bubbles = [str(b.render()) for b in app.query(UserBubble)]
        assert "↻ asks again" in bubbles[-1]
        assert "↻ asks again" not in bubbles[0]
        assert any("↻ asked again below by you" in str(n.render()) for n in app.query(Note))
        await wait_for(pilot, lambda: app.check_action("retry", ()) is False)  # answered now
    events = await chat.events()
    messages = [e for e in events if e["type"] == "user_message"]
    assert [m.get("retry_of") for m in messages] == [None, turn_id]


# ---------------------------------------------------------------------------- adoption


async def test_a_reply_adopted_by_a_restarted_host_continues_marked_resumed(chat: Chat) -> None:
    full = demo.compose_reply(PROMPT)
    half = full[: len(full) // 2]
    app = chat.app("alice")
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.session is not None)
        # A long lease: the host comes back (same holder name) well before it lapses.
        await dead_agent_reply(chat, text=half, ttl=60.0, holder="test-host")
        await wait_for(pilot, lambda: bool(replies(app)) and replies(app)[0].text == half)
        assert "resumed" not in replies(app)[0].header_text()
        chat.start_agent(holder="test-host", resume=True)
        await wait_for(pilot, lambda: reply_status(app) == "complete")
        (reply,) = replies(app)
        assert reply.text == full  # continued after exactly the text in the log
        assert reply.header_text() == "Assistant · resumed after a restart"
        assert app.transcript.turns[0].replies["assistant"].adoptions == 1


# ---------------------------------------------------------------------------- approvals


async def test_an_approval_asked_in_the_reply_is_approved_by_key_in_every_terminal(
    chat: Chat,
) -> None:
    chat.start_agent()
    alice, bob = chat.app("alice"), chat.app("bob")
    async with alice.run_test(size=SIZE) as pa, bob.run_test(size=SIZE) as pb:
        await send(pa, SAVE_PROMPT)
        await wait_for(pa, lambda: len(approvals(alice)) == 1)
        await wait_for(pb, lambda: len(approvals(bob)) == 1)
        (asking,) = approvals(alice)
        body = asking.approval_text().plain
        assert "Assistant asks to run save_note" in body
        assert "save your message as a note in this session" in body
        assert f"text: {SAVE_PROMPT}" in body
        assert (
            approval_line(alice) == "Ctrl+Y approve  ·  Ctrl+T deny  ·  or Ctrl+P: Approve / Deny"
        )
        await wait_for(
            pa, lambda: {("ctrl+y", "Approve"), ("ctrl+t", "Deny")} <= footer_keys(alice)
        )
        assert reply_status(alice) == "streaming"  # the reply waits for the answer
        await pa.press("ctrl+y")
        await wait_for(pa, lambda: reply_status(alice) == "complete")
        await wait_for(pb, lambda: reply_status(bob) == "complete")
        assert approval_line(alice) == "approved by you"
        assert approval_line(bob) == "approved by alice"
        assert "-approved" in approvals(bob)[0].classes
        # The reply continued after the block, in a Markdown segment of its own.
        assert "**Saved** (approved by alice)" in replies(bob)[0].text
        assert replies(alice)[0].text == replies(bob)[0].text
        assert ("ctrl+y", "Approve") not in footer_keys(alice)
    decisions = [e for e in await chat.events() if e["type"] == "approval"]
    assert [(d["approved"], d["author"]["name"]) for d in decisions] == [(True, "alice")]  # type: ignore[index]


async def test_two_terminals_answering_at_once_show_the_first_answer_in_the_log(
    chat: Chat,
) -> None:
    chat.start_agent()
    alice, bob = chat.app("alice"), chat.app("bob")
    async with alice.run_test(size=SIZE) as pa, bob.run_test(size=SIZE) as pb:
        await send(pa, SAVE_PROMPT)
        await wait_for(pa, lambda: alice.pending_approval() is not None)
        await wait_for(pb, lambda: bob.pending_approval() is not None)
        # Both answer before either has seen the other's answer.
        await asyncio.gather(alice.action_approve(), bob.action_deny())
        await wait_for(pa, lambda: reply_status(alice) == "complete")
        await wait_for(pb, lambda: reply_status(bob) == "complete")
        decisions = [e for e in await chat.events() if e["type"] == "approval"]
        assert len(decisions) == 2
        first = decisions[0]
        winner = first["author"]["name"]  # type: ignore[index]
        status = ApprovalStatus.APPROVED if first["approved"] else ApprovalStatus.DENIED
        for app in (alice, bob):
            (view,) = approvals(app)
            assert view.status is status
            state = app.transcript.approval(view.request_id)
            assert state is not None
            assert state.status is status
        verb = "approved" if first["approved"] else "denied"
        winner_app = alice if winner == "alice" else bob
        loser_app = bob if winner == "alice" else alice
        assert approval_line(winner_app) == f"{verb} by you"
        assert approval_line(loser_app) == f"{verb} by {winner}"
        said = "**Saved**" if first["approved"] else "**Not saved**"
        assert said in replies(alice)[0].text
        assert said in replies(bob)[0].text


async def test_an_approval_whose_reply_ended_is_no_longer_needed(chat: Chat) -> None:
    chat.start_agent()
    app = chat.app("alice")
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, SAVE_PROMPT)
        await wait_for(pilot, lambda: app.pending_approval() is not None)
        await pilot.press("escape")  # stop the reply while it waits for an answer
        await wait_for(pilot, lambda: reply_status(app) == "cancelled")
        (view,) = approvals(app)
        await wait_for(pilot, lambda: view.status is ApprovalStatus.EXPIRED)
        assert approval_line(app) == "no longer needed: the reply ended before anyone answered"
        assert app.pending_approval() is None
        assert app.check_action("approve", ()) is False


# ---------------------------------------------------------------------------- history


async def test_a_terminal_joining_later_shows_the_same_final_states(chat: Chat) -> None:
    alice = chat.app("alice")
    async with alice.run_test(size=SIZE) as pa:
        await wait_for(pa, lambda: alice.session is not None)
        await dead_agent_reply(chat)
        await wait_for(pa, lambda: reply_status(alice) == "abandoned")
        chat.start_agent()
        await send(pa, SAVE_PROMPT)
        await wait_for(pa, lambda: alice.pending_approval() is not None)
        await pa.press("ctrl+y")
        await wait_for(pa, lambda: len(replies(alice)) == 2 and reply_status(alice) == "complete")
        carol = chat.app("carol")  # everything above reaches carol as history
        async with carol.run_test(size=SIZE) as pc:
            final = ["abandoned", "complete"]
            await wait_for(pc, lambda: [r.status for r in replies(carol)] == final)
            assert [r.text for r in replies(carol)] == [r.text for r in replies(alice)]
            assert abandoned_note(carol).endswith("; ended by alice")
            assert approval_line(carol) == "approved by alice"

            def rendered() -> list[int]:
                """Blocks in each Markdown part of the reply that asked (before and after)."""
                parts = replies(carol)[1].query(Markdown).results(Markdown)
                return [len(part.query(MarkdownBlock)) for part in parts]

            # History is rendered once it has all arrived: text before and after the block.
            await wait_for(pc, lambda: len(rendered()) == 2 and all(rendered()))


# ---------------------------------------------------------------------------- snapshots


async def test_snapshot_abandoned_reply(chat: Chat, update: bool) -> None:
    app = chat.app("alice")
    async with app.run_test(size=(100, 34)) as pilot:
        await wait_for(pilot, lambda: app.session is not None)
        await dead_agent_reply(chat)
        await wait_for(pilot, lambda: reply_status(app) == "abandoned")
        await wait_for(pilot, lambda: ("ctrl+r", "Retry") in footer_keys(app))
        await wait_for(pilot, lambda: app.query_one(StatusBar).agents == "idle")
        await check(pilot, "abandoned_reply", update)


async def test_snapshot_retried_reply(chat: Chat, update: bool) -> None:
    app = chat.app("alice")
    async with app.run_test(size=(100, 34)) as pilot:
        await wait_for(pilot, lambda: app.session is not None)
        await dead_agent_reply(chat)
        await wait_for(pilot, lambda: reply_status(app) == "abandoned")
        chat.start_agent(token_rate=2000.0)
        await wait_for(pilot, lambda: app.check_action("retry", ()) is True)
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: len(replies(app)) == 2 and reply_status(app) == "complete")
        await wait_for(pilot, lambda: app.query_one(StatusBar).agents == "Assistant idle")
        app.query_one(ChatLog).scroll_home(animate=False)  # the retry's bubble and the old reply
        await check(pilot, "retried_reply", update)


async def test_snapshot_resumed_reply(chat: Chat, update: bool) -> None:
    full = demo.compose_reply(PROMPT)
    app = chat.app("alice")
    async with app.run_test(size=(100, 34)) as pilot:
        await wait_for(pilot, lambda: app.session is not None)
        await dead_agent_reply(chat, text=full[: len(full) // 2], ttl=60.0, holder="test-host")
        await wait_for(pilot, lambda: bool(replies(app)) and bool(replies(app)[0].text))
        chat.start_agent(token_rate=2000.0, holder="test-host", resume=True)
        await wait_for(pilot, lambda: reply_status(app) == "complete")
        await wait_for(pilot, lambda: app.query_one(StatusBar).agents == "Assistant idle")
        await check(pilot, "resumed_reply", update)


async def test_snapshot_approved_reply(chat: Chat, update: bool) -> None:
    chat.start_agent(token_rate=2000.0)
    app = chat.app("alice")
    async with app.run_test(size=(100, 34)) as pilot:
        await send(pilot, SAVE_PROMPT)
        await wait_for(pilot, lambda: app.pending_approval() is not None)
        await pilot.press("ctrl+y")
        await wait_for(pilot, lambda: reply_status(app) == "complete")
        await wait_for(pilot, lambda: app.query_one(StatusBar).agents == "Assistant idle")
        app.query_one(ChatLog).scroll_home(animate=False)  # the approval block, not the tail
        await check(pilot, "approved_reply", update)


@pytest.mark.parametrize("width", [80, 60])
async def test_snapshot_pending_approval(chat: Chat, update: bool, width: int) -> None:
    # Under 80 columns the chat drops its indents so the text keeps the room.
    chat.start_agent()
    app = chat.app("alice")
    async with app.run_test(size=(width, 24)) as pilot:
        await send(pilot, SAVE_PROMPT)
        await wait_for(pilot, lambda: app.pending_approval() is not None)
        await wait_for(pilot, lambda: ("ctrl+y", "Approve") in footer_keys(app))
        await wait_for(pilot, lambda: app.query_one(StatusBar).agents == "Assistant streaming")
        assert ("-narrow" in app.query_one(ChatLog).classes) == (width < 80)
        await check(pilot, f"approval_pending_{width}", update)
