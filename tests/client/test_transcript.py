"""The transcript fold: events in, conversation state out."""

from __future__ import annotations

import itertools

from durable_client import (
    Author,
    Cancel,
    CancelScope,
    EndReason,
    Progress,
    ReplyStatus,
    Steer,
    TextDelta,
    Transcript,
    TurnEnd,
    TurnStart,
    UnknownEvent,
    UserMessage,
)

ANN = Author.user("ann")
BEN = Author.user("ben")
BOT = Author.agent("bot")
HELPER = Author.agent("helper")


def conversation() -> list:
    message = UserMessage(author=ANN, text="hi", turn_id="t1")
    return [
        message,
        TurnStart(author=BOT, turn_id="t1", in_reply_to=message.event_id),
        TextDelta(author=BOT, turn_id="t1", text="Hel", index=0),
        TextDelta(author=BOT, turn_id="t1", text="lo", index=1),
        TurnEnd(author=BOT, turn_id="t1", reason=EndReason.COMPLETE),
    ]


def test_a_complete_turn() -> None:
    transcript = Transcript.fold(conversation())
    (turn,) = transcript.turns
    assert turn.message is not None
    assert turn.message.text == "hi"
    reply = turn.reply_of("bot")
    assert reply is not None
    assert (reply.text, reply.status, reply.deltas) == ("Hello", ReplyStatus.COMPLETE, 2)
    assert not turn.open
    assert transcript.active_replies == []


def test_applying_an_event_twice_changes_nothing() -> None:
    events = conversation()
    once = Transcript.fold(events)
    twice = Transcript.fold(itertools.chain(events, events))
    assert [r.text for r in twice.replies] == [r.text for r in once.replies] == ["Hello"]
    assert twice.applied == once.applied


def test_dedupe_is_bounded_and_shared_with_subscriptions() -> None:
    from durable_client._offsets import EventIdDeduper

    transcript = Transcript(dedupe_capacity=2)
    assert isinstance(transcript._dedupe, EventIdDeduper)
    a, b, c = (TextDelta(author=BOT, turn_id="t1", text=x) for x in "abc")
    assert [transcript.apply(e) for e in (a, b, a)] == [True, True, False]
    assert transcript.apply(c)  # a is now the oldest id of three: forgotten
    assert len(transcript._dedupe) == 2


def test_one_cancel_routing_rule_for_replies_and_unanswered_turns() -> None:
    transcript = Transcript.fold(
        [
            UserMessage(author=ANN, text="a", turn_id="t1"),
            TurnStart(author=BOT, turn_id="t1"),
            UserMessage(author=BEN, text="b", turn_id="t2"),
        ]
    )
    by_ann = Cancel(author=ANN, scope=CancelScope.AUTHOR, target_author_id="ann")
    by_bot = Cancel(author=ANN, scope=CancelScope.AUTHOR, target_author_id="bot")
    turn2 = Cancel(author=BEN, turn_id="t2")
    everything = Cancel(author=BEN, scope=CancelScope.ALL)
    table = {
        # (cancel, turn, reply author or None for the unanswered turn): applies
        (by_ann, "t1", "bot"): True,  # answers ann's message
        (by_ann, "t2", None): False,
        (by_bot, "t1", "bot"): True,
        (by_bot, "t1", "helper"): False,
        (turn2, "t2", None): True,
        (turn2, "t1", "bot"): False,
        (everything, "t1", "bot"): True,
        (everything, "t2", None): True,
        (by_ann, "unknown", "bot"): False,  # a turn it has not seen has no opener
    }
    for (cancel, turn_id, author_id), applies in table.items():
        assert transcript.cancel_applies(cancel, turn_id, author_id) is applies


def test_cancel_keeps_partial_text_and_ends_once() -> None:
    events = [
        *conversation()[:3],
        Cancel(author=ANN, turn_id="t1"),
        TextDelta(author=BOT, turn_id="t1", text="l", index=1),  # in flight before the stop
        TurnEnd(author=BOT, turn_id="t1", reason=EndReason.CANCELLED),
        TextDelta(author=BOT, turn_id="t1", text="late", index=2),  # after the end: ignored
        TurnEnd(author=BOT, turn_id="t1", reason=EndReason.COMPLETE),  # second end: ignored
    ]
    reply = Transcript.fold(events).replies[0]
    assert reply.status is ReplyStatus.CANCELLED
    assert reply.cancel_requested
    assert reply.text == "Hell"


def test_only_an_explicit_cancel_requests_a_stop() -> None:
    transcript = Transcript.fold(conversation()[:3])
    assert transcript.active_replies[0].cancel_requested is False


def test_cancel_scopes_pick_the_right_replies() -> None:
    base = [
        UserMessage(author=ANN, text="a", turn_id="t1"),
        TurnStart(author=BOT, turn_id="t1"),
        TurnStart(author=HELPER, turn_id="t1"),
        UserMessage(author=BEN, text="b", turn_id="t2"),
        TurnStart(author=BOT, turn_id="t2"),
    ]

    def requested(cancel: Cancel) -> set[tuple[str, str]]:
        transcript = Transcript.fold([*base, cancel])
        return {(r.turn_id, r.author.id) for r in transcript.replies if r.cancel_requested}

    assert requested(Cancel(author=ANN, turn_id="t1")) == {("t1", "bot"), ("t1", "helper")}
    assert requested(Cancel(author=ANN, scope=CancelScope.AUTHOR, target_author_id="helper")) == {
        ("t1", "helper")
    }
    assert requested(Cancel(author=BEN, scope=CancelScope.AUTHOR, target_author_id="ben")) == {
        ("t2", "bot")
    }
    assert len(requested(Cancel(author=ANN, scope=CancelScope.ALL))) == 3


def test_cancel_before_any_reply_marks_the_turn() -> None:
    transcript = Transcript.fold(
        [UserMessage(author=ANN, text="a", turn_id="t1"), Cancel(author=ANN, turn_id="t1")]
    )
    turn = transcript.turn("t1")
    assert turn is not None
    assert turn.cancel_requested
    assert not turn.open
    assert transcript.cancels_for("t1", "bot")


def test_deltas_without_a_start_open_the_reply() -> None:
    transcript = Transcript.fold([TextDelta(author=BOT, turn_id="t5", text="x")])
    assert transcript.replies[0].text == "x"


def test_several_agents_answer_one_turn() -> None:
    transcript = Transcript.fold(
        [
            UserMessage(author=ANN, text="q", turn_id="t1"),
            TextDelta(author=BOT, turn_id="t1", text="one"),
            TextDelta(author=HELPER, turn_id="t1", text="two"),
            TurnEnd(author=HELPER, turn_id="t1", reason=EndReason.ERROR, error="boom"),
        ]
    )
    turn = transcript.turn("t1")
    assert turn is not None
    assert list(turn.replies) == ["bot", "helper"]
    assert turn.replies["helper"].status is ReplyStatus.ERROR
    assert turn.replies["helper"].error == "boom"
    assert turn.open  # bot still streams


def test_steer_progress_and_unknown_events_are_recorded() -> None:
    transcript = Transcript.fold(
        [
            UserMessage(author=ANN, text="q", turn_id="t1"),
            Steer(author=ANN, turn_id="t1", text="be brief"),
            Progress(author=Author.tool("search"), turn_id="t1", source="search", fraction=0.5),
            UnknownEvent(type="reaction", raw={"type": "reaction"}),
        ]
    )
    turn = transcript.turn("t1")
    assert turn is not None
    assert [s.text for s in turn.steers] == ["be brief"]
    assert turn.progress[0].fraction == 0.5
    assert len(transcript.unknown) == 1
