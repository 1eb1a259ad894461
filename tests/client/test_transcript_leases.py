"""The fold of leases, abandoned ends, adoption, approvals and retries; and the
reader's lease table (pure: events and a clock in, decisions out)."""

from __future__ import annotations

import pytest

from durable_client import (
    Approval,
    ApprovalRequest,
    ApprovalStatus,
    Author,
    EndReason,
    ReplyStatus,
    TextDelta,
    Transcript,
    TurnAdopt,
    TurnEnd,
    TurnLease,
    TurnStart,
    UserMessage,
    parse_event,
)
from durable_client._core.leases import LeaseTable, reply_producer_id

ANN = Author.user("ann")
BEN = Author.user("ben")
BOT = Author.agent("bot")


def started(ttl: float | None = 2.0) -> list:
    return [
        UserMessage(author=ANN, text="hi", turn_id="t1"),
        TurnStart(author=BOT, turn_id="t1", lease_ttl=ttl, holder="host-a"),
        TextDelta(author=BOT, turn_id="t1", text="Hel"),
    ]


def test_an_abandoned_end_by_a_reader_ends_the_agents_reply_with_its_text() -> None:
    end = TurnEnd(
        author=BEN,
        turn_id="t1",
        reason=EndReason.ABANDONED,
        reply_author_id="bot",
        error="the agent stopped responding",
        generation=1,
    )
    transcript = Transcript.fold([*started(), end])
    turn = transcript.turn("t1")
    assert turn is not None
    assert list(turn.replies) == ["bot"]  # no reply invented for the reader
    reply = turn.reply_of("bot")
    assert reply is not None
    assert (reply.status, reply.text, reply.end) == (ReplyStatus.ABANDONED, "Hel", end)
    assert reply.end is not None
    assert reply.end.author == BEN
    assert not turn.open


def test_only_the_first_end_counts_and_later_text_is_ignored() -> None:
    events = [
        *started(),
        TurnEnd(author=BEN, turn_id="t1", reason=EndReason.ABANDONED, reply_author_id="bot"),
        TextDelta(author=BOT, turn_id="t1", text="lo"),
        TurnEnd(author=BOT, turn_id="t1", reason=EndReason.COMPLETE),
    ]
    reply = Transcript.fold(events).replies[0]
    assert (reply.status, reply.text) == (ReplyStatus.ABANDONED, "Hel")


def test_an_adoption_hands_the_reply_to_a_new_owner_who_continues_it() -> None:
    events = [
        *started(),
        TurnAdopt(author=BOT, turn_id="t1", generation=1, ttl=3.0, holder="host-b"),
        TextDelta(author=BOT, turn_id="t1", text="lo"),
        TurnEnd(author=BOT, turn_id="t1", reason=EndReason.COMPLETE, generation=2),
    ]
    reply = Transcript.fold(events).replies[0]
    assert (reply.text, reply.status) == ("Hello", ReplyStatus.COMPLETE)
    assert (reply.generation, reply.holder, reply.adoptions, reply.lease_ttl) == (
        1,
        "host-b",
        1,
        3.0,
    )


def test_a_lease_renewal_keeps_the_reply_streaming() -> None:
    events = [*started(), TurnLease(author=BOT, turn_id="t1", ttl=2.0, holder="host-a")]
    reply = Transcript.fold(events).replies[0]
    assert reply.status is ReplyStatus.STREAMING
    assert (reply.lease_ttl, reply.generation) == (2.0, 0)


def test_approvals_first_answer_wins_and_pending_ones_expire_with_the_reply() -> None:
    first = ApprovalRequest(author=BOT, turn_id="t1", tool="save_note", request_id="r1")
    second = ApprovalRequest(author=BOT, turn_id="t1", tool="save_note", request_id="r2")
    yes = Approval(author=ANN, turn_id="t1", request_id="r1", approved=True)
    no = Approval(author=BEN, turn_id="t1", request_id="r1", approved=False)
    transcript = Transcript.fold([*started(), first, yes, no, second])
    turn = transcript.turn("t1")
    assert turn is not None
    state = turn.approvals["r1"]
    assert (state.status, state.decision) == (ApprovalStatus.APPROVED, yes)
    assert [a.request_id for a in turn.pending_approvals] == ["r2"]
    transcript.apply(
        TurnEnd(author=BEN, turn_id="t1", reason=EndReason.ABANDONED, reply_author_id="bot")
    )
    assert turn.approvals["r2"].status is ApprovalStatus.EXPIRED
    late = Approval(author=ANN, turn_id="t1", request_id="r2", approved=True)
    transcript.apply(late)
    assert turn.approvals["r2"].status is ApprovalStatus.EXPIRED
    assert transcript.approval("r1") is state


def test_a_retry_names_the_turn_it_asks_again() -> None:
    retry = UserMessage(author=ANN, text="hi", turn_id="t2", retry_of="t1")
    transcript = Transcript.fold([*started(), retry])
    turn = transcript.turn("t2")
    assert turn is not None
    assert turn.retry_of == "t1"


def test_the_new_events_round_trip_through_the_wire_form() -> None:
    for event in [
        TurnStart(author=BOT, turn_id="t", lease_ttl=1.5, holder="h"),
        TurnLease(author=BOT, turn_id="t", generation=2, ttl=1.5),
        TurnAdopt(author=BOT, turn_id="t", generation=1, ttl=1.5, holder="h"),
        TurnEnd(author=BEN, turn_id="t", reason=EndReason.ABANDONED, reply_author_id="bot"),
        ApprovalRequest(author=BOT, turn_id="t", tool="x", arguments={"a": 1}),
        Approval(author=ANN, turn_id="t", request_id="r", approved=False, note="no"),
    ]:
        assert parse_event(event.to_json()) == event


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "turn_lease", "author": {"id": "b", "kind": "agent"}, "turn_id": "t", "ttl": 0},
        {"type": "turn_adopt", "author": {"id": "b", "kind": "agent"}, "turn_id": "t", "ttl": 1},
        {"type": "approval", "author": {"id": "a", "kind": "user"}, "turn_id": "t"},
    ],
    ids=["zero-ttl", "adopt-without-generation", "approval-without-answer"],
)
def test_invalid_lease_and_approval_events_are_kept_as_unknown(raw: dict) -> None:
    assert parse_event(raw).type == raw["type"]
    assert type(parse_event(raw)).__name__ == "UnknownEvent"


def test_the_lease_table_lapses_a_silent_reply_and_renews_a_talking_one() -> None:
    table = LeaseTable()
    for event in started(ttl=2.0):
        table.observe(event, now=10.0)
    assert table.next_deadline() == 12.0
    assert table.lapsed(11.9) == []
    table.observe(TextDelta(author=BOT, turn_id="t1", text="lo"), now=11.5)
    assert table.lapsed(12.0) == []
    (lease,) = table.lapsed(13.5)
    assert (lease.turn_id, lease.author_id, lease.generation) == ("t1", "bot", 0)
    table.observe(TurnAdopt(author=BOT, turn_id="t1", generation=1, ttl=5.0), now=14.0)
    assert table.next_deadline() == 19.0
    table.observe(
        TurnEnd(author=BEN, turn_id="t1", reason=EndReason.ABANDONED, reply_author_id="bot"),
        now=15.0,
    )
    assert len(table) == 0
    assert table.next_deadline() is None


def test_an_unleased_reply_is_not_watched_and_text_by_others_renews_nothing() -> None:
    table = LeaseTable()
    for event in started(ttl=None):
        table.observe(event, now=0.0)
    assert len(table) == 0
    for event in started(ttl=1.0):
        table.observe(event, now=0.0)
    table.observe(TextDelta(author=ANN, turn_id="t1", text="not the bot"), now=0.9)
    assert [lease.key for lease in table.lapsed(1.0)] == [("t1", "bot")]


def test_every_participant_names_a_reply_producer_the_same_way() -> None:
    assert reply_producer_id("t1", "bot") == reply_producer_id("t1", "bot")
    assert reply_producer_id("t1", "bot") != reply_producer_id("t1", "bot2")
    assert reply_producer_id("t1\x00", "bot") != reply_producer_id("t1", "\x00bot")
    long = reply_producer_id("t" * 256, "b" * 256)
    assert long.startswith("reply-")
    assert len(long) == len("reply-") + 32
