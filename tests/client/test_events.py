"""The session event schema: wire form, validation, forward compatibility."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from durable_client import (
    Author,
    Cancel,
    CancelScope,
    EndReason,
    Progress,
    Steer,
    TextDelta,
    TurnEnd,
    TurnStart,
    UnknownEvent,
    UserMessage,
    parse_event,
)

ANN = Author.user("ann", "Ann")
BOT = Author.agent("bot")


def test_every_event_carries_author_turn_and_event_ids() -> None:
    message = UserMessage(author=ANN, text="hi")
    events = [
        message,
        TurnStart(author=BOT, turn_id=message.turn_id, in_reply_to=message.event_id),
        TextDelta(author=BOT, turn_id=message.turn_id, text="he", index=0),
        TurnEnd(author=BOT, turn_id=message.turn_id, reason=EndReason.COMPLETE),
        Cancel(author=ANN, turn_id=message.turn_id),
        Steer(author=ANN, turn_id=message.turn_id, text="shorter"),
        Progress(author=Author.tool("search"), turn_id=message.turn_id, source="search"),
    ]
    for event in events:
        wire = event.to_json()
        assert {"type", "event_id", "author", "turn_id", "ts"} <= wire.keys()
        assert wire["author"]["id"]
        # The wire form is plain JSON and decodes to an equal event.
        assert parse_event(json.loads(json.dumps(wire))) == event
    assert len({e.event_id for e in events}) == len(events)


def test_wire_form_of_a_user_message() -> None:
    message = UserMessage(
        author=ANN, text="hello", event_id="e1", turn_id="t1", ts=1.5, to=("bot",)
    )
    assert message.to_json() == {
        "type": "user_message",
        "event_id": "e1",
        "author": {"id": "ann", "kind": "user", "name": "Ann"},
        "turn_id": "t1",
        "ts": 1.5,
        "text": "hello",
        "to": ["bot"],
    }


def test_cancel_scopes() -> None:
    turn = Cancel(author=ANN, turn_id="t1")
    assert turn.scope is CancelScope.TURN
    assert turn.target_turn_id == "t1"
    assert Cancel(author=ANN, target_turn_id="t2").turn_id == "t2"
    assert turn.applies_to("t1", "bot", "ann")
    assert not turn.applies_to("t2", "bot", "ann")

    by_author = Cancel(author=ANN, scope=CancelScope.AUTHOR, target_author_id="bot")
    assert by_author.applies_to("t9", "bot", "zed")  # the reply's author
    assert not by_author.applies_to("t9", "other", "zed")
    mine = Cancel(author=ANN, scope=CancelScope.AUTHOR, target_author_id="ann")
    assert mine.applies_to("t9", "bot", "ann")  # the turn's opener

    everything = Cancel(author=ANN, scope=CancelScope.ALL)
    assert everything.applies_to("any", "any", None)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scope": "turn"},
        {"scope": "author"},
    ],
)
def test_cancel_needs_its_target(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        Cancel(author=ANN, **kwargs)  # type: ignore[arg-type]


def test_unknown_types_are_kept_not_dropped() -> None:
    raw = {"type": "reaction", "event_id": "e7", "emoji": "+1"}
    event = parse_event(raw)
    assert isinstance(event, UnknownEvent)
    assert event.type == "reaction"
    assert event.event_id == "e7"
    assert event.raw == raw
    assert event.error is None


@pytest.mark.parametrize(
    "raw",
    [
        "just a string",
        [1, 2],
        {"no": "type"},
        {"type": "user_message", "event_id": "e8"},  # missing author, text
        {"type": "text_delta", "author": {"id": "", "kind": "agent"}, "turn_id": "t", "text": ""},
        {
            "type": "turn_end",
            "author": {"id": "b", "kind": "agent"},
            "turn_id": "t",
            "reason": "exploded",
        },
    ],
)
def test_invalid_messages_become_unknown_events(raw: object) -> None:
    event = parse_event(raw)
    assert isinstance(event, UnknownEvent)
    assert event.raw == raw
    assert event.error


def test_extra_fields_from_newer_writers_are_ignored() -> None:
    raw = UserMessage(author=ANN, text="x").to_json() | {"mood": "happy"}
    assert isinstance(parse_event(raw), UserMessage)
