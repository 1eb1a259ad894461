"""The subscription core's decisions: batches and failures in, decisions out.

No socket and no event loop: the tests feed :class:`SubscriptionState` and
:class:`HttpReadState` what a transport would have read, and check what they
decide (deliver, resume at, restart, fail, end), over every cut point of a
few batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from durable_client import (
    Author,
    BadRequest,
    ConnectError,
    ConnectionLost,
    DurableError,
    NoProgress,
    OffsetGone,
    Position,
    ProtocolViolation,
    RateLimited,
    ReconnectPolicy,
    RequestTimeout,
    ServerError,
    StreamReplaced,
    UnexpectedStatus,
    UsageError,
    UserMessage,
)
from durable_client._core.subscription import (
    Connected,
    Deliver,
    End,
    Fail,
    HttpReadState,
    NextRead,
    Restart,
    ResumeAt,
    SubscriptionState,
    sse_refused,
)

ANN = Author.user("ann")


def msg(n: int, event_id: str | None = None) -> dict[str, Any]:
    data = UserMessage(author=ANN, text=f"m{n}", turn_id="t").to_json()
    data["event_id"] = event_id or f"e{n}"
    return data


@dataclass(frozen=True)
class Batch:
    messages: tuple[Any, ...]
    start_offset: str
    offset: str
    up_to_date: bool = False
    closed: bool = False
    incarnation: str | None = None


# The log: 7 messages in 3 appends (batches), at offsets o_1, o_2, o_3.
APPENDS = [(0, 1, 2), (3,), (4, 5, 6)]
OFFSETS = ["-1", "o_1", "o_2", "o_3"]


def log_batches(start: str, *, regroup: bool = False) -> list[Batch]:
    """What a server sends from ``start``: each append as a batch, or all of it
    in one batch (a server may regroup; messages after an offset keep their order)."""
    first = OFFSETS.index(start)
    batches = [
        Batch(tuple(msg(n) for n in APPENDS[i]), OFFSETS[i], OFFSETS[i + 1])
        for i in range(first, len(APPENDS))
    ]
    if regroup and batches:
        messages = tuple(m for b in batches for m in b.messages)
        batches = [Batch(messages, batches[0].start_offset, batches[-1].offset)]
    last = batches[-1] if batches else Batch((), start, start)
    batches[-1:] = [Batch(last.messages, last.start_offset, last.offset, True, True)]
    return batches


def texts(actions: list[Any]) -> list[str]:
    return [a.event.text for a in actions if isinstance(a, Deliver) and a.event is not None]


def run(state: SubscriptionState, batches: list[Batch]) -> list[Any]:
    state.connect()
    out: list[Any] = []
    for batch in batches:
        out.extend(state.batch_received(batch))
    return out


# --- SubscriptionState -------------------------------------------------------------


def test_each_message_comes_out_once_with_the_position_after_it() -> None:
    state = SubscriptionState(Position.beginning())
    out = run(state, log_batches("-1"))
    assert isinstance(out[0], Connected)
    deliveries = [a for a in out if isinstance(a, Deliver)]
    assert texts(out) == [f"m{n}" for n in range(7)]
    assert [d.position for d in deliveries] == [
        Position("-1", 1),
        Position("-1", 2),
        Position("o_1"),
        Position("o_2"),
        Position("o_2", 1),
        Position("o_2", 2),
        Position("o_3"),
    ]
    assert isinstance(out[-1], End)
    assert state.closed


@pytest.mark.parametrize("regroup", [False, True])
def test_resuming_from_every_cut_point_loses_and_repeats_nothing(regroup: bool) -> None:
    """A consumer saved the position after message k (every k) and restarted:
    the rest comes out, exactly once, whether or not the server regroups."""
    full = [a for a in run(SubscriptionState(Position.beginning()), log_batches("-1"))]
    positions = [Position.beginning()] + [
        a.position for a in full if isinstance(a, Deliver) and a.event is not None
    ]
    for k, saved in enumerate(positions):
        state = SubscriptionState(saved)
        assert state.connect() == saved
        out = run(state, log_batches(saved.offset, regroup=regroup))
        assert texts(out) == [f"m{n}" for n in range(k, 7)], f"resumed at {saved}"
        assert state.position == Position("o_3")


def test_a_cut_after_any_batch_resumes_where_the_batches_ended() -> None:
    batches = log_batches("-1")
    for cut in range(len(batches) + 1):
        state = SubscriptionState(Position.beginning())
        first = run(state, batches[:cut])
        decision = state.failure(ConnectionLost("cut"))
        assert decision == ResumeAt(Position(OFFSETS[cut]))
        assert state.connect() == Position(OFFSETS[cut])
        rest = run(state, log_batches(OFFSETS[cut]) if cut < len(batches) else [])
        assert texts(first) + texts(rest) == [f"m{n}" for n in range(7)]


def test_skip_inside_a_batch_drops_what_was_delivered() -> None:
    state = SubscriptionState(Position("-1", 2))
    out = run(state, [Batch((msg(0), msg(1), msg(2)), "-1", "o_1")])
    assert texts(out) == ["m2"]
    assert state.position == Position("o_1")


def test_a_skip_past_a_shorter_batch_carries_over() -> None:
    # The server regrouped: two messages per batch now, three were delivered.
    state = SubscriptionState(Position("-1", 3))
    assert texts(run(state, [Batch((msg(0), msg(1)), "-1", "o_x")])) == []
    assert state.position == Position("o_x", 1)
    assert texts(state.batch_received(Batch((msg(2), msg(3)), "o_x", "o_y"))) == ["m3"]


@pytest.mark.parametrize(
    "batch",
    [
        Batch((msg(1),), "o_5", "o_6"),  # does not start where the reader stands
        Batch((msg(1),), "o_2", "o_1"),  # offsets go backwards
        Batch((msg(1),), "o_2", "o_2"),  # messages without a new offset
    ],
)
def test_batches_that_do_not_join_up_are_a_protocol_violation(batch: Batch) -> None:
    state = SubscriptionState(Position("o_2"))
    state.connect()
    with pytest.raises(ProtocolViolation):
        state.batch_received(batch)
    assert state.position == Position("o_2")  # nothing of the batch was taken


@pytest.mark.parametrize(
    "error", [OffsetGone("retention", status=410), ProtocolViolation("bad"), BadRequest("no")]
)
def test_a_failure_retrying_cannot_fix_fails(error: Any) -> None:
    state = SubscriptionState(Position("o_1", incarnation="i1"))
    decision = state.failure(error)
    assert isinstance(decision, Fail)
    assert decision.error is error


@pytest.mark.parametrize(
    "error", [ConnectionLost("cut"), ServerError("busy", status=503, retry_after=1.0)]
)
def test_a_retryable_failure_resumes_at_the_position(error: Any) -> None:
    state = SubscriptionState(Position("o_1", 2))
    assert state.failure(error) == ResumeAt(Position("o_1", 2))


def test_a_connection_that_ends_before_any_data_is_a_failure() -> None:
    state = SubscriptionState(Position.beginning())
    state.connect()
    with pytest.raises(ConnectionLost, match="before any data"):
        state.connection_ended()
    run(state, [Batch((msg(0),), "-1", "o_1")])
    state.connection_ended()  # ended after data: resume at once
    state.connect()
    with pytest.raises(ConnectionLost):
        state.connection_ended()


def test_connected_is_said_once_per_connection() -> None:
    state = SubscriptionState(Position.beginning())
    out = run(state, log_batches("-1")[:2])
    assert sum(isinstance(a, Connected) for a in out) == 1
    out = run(state, log_batches("o_2"))
    assert sum(isinstance(a, Connected) for a in out) == 1


def test_caught_up_is_said_exactly_once() -> None:
    for cut in range(4):
        state = SubscriptionState(Position.beginning())
        state.connect()
        batches = [
            Batch((msg(0),), "-1", "o_1"),
            Batch((), "o_1", "o_1", up_to_date=True),  # caught up, nothing new
            Batch((msg(1),), "o_1", "o_2", up_to_date=True),
            Batch((msg(2), msg(3)), "o_2", "o_3", up_to_date=True),
        ]
        flagged: list[Deliver] = []
        for i, batch in enumerate(batches):
            if i == cut:  # a reconnect in between changes nothing
                state.failure(ConnectionLost("cut"))
                state.connect()
            flagged += [
                a for a in state.batch_received(batch) if isinstance(a, Deliver) and a.caught_up
            ]
        assert flagged == [Deliver(None, Position("o_1"), caught_up=True)]


def test_caught_up_marks_the_last_delivery_of_the_first_up_to_date_batch() -> None:
    state = SubscriptionState(Position.beginning())
    state.connect()
    out = state.batch_received(Batch((msg(0), msg(1)), "-1", "o_1", up_to_date=True))
    deliveries = [a for a in out if isinstance(a, Deliver)]
    assert [d.caught_up for d in deliveries] == [False, True]
    assert deliveries[-1].position == Position("o_1")


def test_duplicates_in_the_log_only_move_the_position() -> None:
    state = SubscriptionState(Position.beginning(), dedupe_capacity=2)
    out = run(state, [Batch((msg(0), msg(1, "e0"), msg(2)), "-1", "o_1")])
    deliveries = [a for a in out if isinstance(a, Deliver)]
    assert texts(out) == ["m0", "m2"]
    assert deliveries[1] == Deliver(None, Position("-1", 2))


def test_the_first_incarnation_seen_is_adopted() -> None:
    state = SubscriptionState(Position("o_1"))
    state.connect()
    out = state.batch_received(Batch((msg(1),), "o_1", "o_2", incarnation="i1"))
    assert out[1] == Deliver(None, Position("o_1", incarnation="i1"))
    assert state.position == Position("o_2", incarnation="i1")


def test_a_batch_of_another_incarnation_raises_replaced() -> None:
    state = SubscriptionState(Position("o_1", incarnation="i1"))
    state.connect()
    with pytest.raises(StreamReplaced) as info:
        state.batch_received(Batch((msg(1),), "o_1", "o_2", incarnation="i2"))
    assert (info.value.expected, info.value.actual) == ("i1", "i2")
    assert state.position == Position("o_1", incarnation="i1")


def test_a_batch_of_another_incarnation_restarts_at_its_beginning() -> None:
    state = SubscriptionState(Position("o_1", incarnation="i1"), on_replaced="restart")
    run(state, [Batch((msg(0),), "o_1", "o_2", incarnation="i1")])
    state.connect()
    out = state.batch_received(Batch((msg(0),), "o_2", "o_3", incarnation="i2"))
    assert out[-1] == Restart(Position.beginning("i2"))
    assert texts(out) == []
    assert state.replacements == 1
    assert state.connect() == Position.beginning("i2")
    # Dedupe starts over too: the new stream's e0 is a new event.
    again = state.batch_received(Batch((msg(0),), "-1", "n_1", incarnation="i2"))
    assert texts(again) == ["m0"]


def test_a_400_naming_another_incarnation_is_replaced() -> None:
    refusal = BadRequest("old offset", status=400, headers={"Stream-Incarnation": "i2"})
    raising = SubscriptionState(Position("o_1", incarnation="i1"))
    decision = raising.failure(refusal)
    assert isinstance(decision, Fail)
    assert isinstance(decision.error, StreamReplaced)
    restarting = SubscriptionState(Position("o_1", incarnation="i1"), on_replaced="restart")
    assert restarting.failure(refusal) == Restart(Position.beginning("i2"))
    assert restarting.replacements == 1


@pytest.mark.parametrize(
    ("position", "headers"),
    [
        (Position("o_1"), {"Stream-Incarnation": "i2"}),  # the position names none
        (Position("o_1", incarnation="i1"), {}),  # the server names none
        (Position("o_1", incarnation="i1"), {"Stream-Incarnation": "i1"}),  # the same one
    ],
)
def test_a_400_without_another_incarnation_is_just_a_400(
    position: Position, headers: dict[str, str]
) -> None:
    refusal = BadRequest("bad offset", status=400, headers=headers)
    state = SubscriptionState(position, on_replaced="restart")
    assert state.failure(refusal) == Fail(refusal)


# --- HttpReadState -------------------------------------------------------------------


@dataclass(frozen=True)
class Read:
    offset: str
    data: bytes = b""
    status: int = 200
    up_to_date: bool = False
    closed: bool = False
    cursor: str | None = None


def test_follow_catches_up_then_tails_with_sse() -> None:
    state = HttpReadState("-1", live="sse", fallback=True)
    assert state.next_read() == NextRead("catch-up", "-1", None)
    assert state.batch_received(Read("o_1", b"[1]", cursor="c1"))
    assert state.next_read() == NextRead("catch-up", "o_1", "c1")
    assert state.batch_received(Read("o_2", b"[2]", up_to_date=True))
    assert state.next_read() == NextRead("sse", "o_2", "c1")
    assert state.batch_received(Read("o_3", b"[3]", cursor="c2"))
    state.connection_ended()  # after data: again at once
    assert state.next_read() == NextRead("sse", "o_3", "c2")
    assert state.batch_received(Read("o_4", b"[4]", closed=True))
    assert state.done


def test_a_catch_up_read_that_makes_no_progress_counts_as_the_tail() -> None:
    state = HttpReadState("o_1", live="long-poll")
    state.batch_received(Read("o_1"))
    assert state.next_read().mode == "long-poll"


def test_a_finite_read_stops_at_the_tail_or_the_end() -> None:
    state = HttpReadState("-1", live=None)
    state.batch_received(Read("o_1", b"[1]"))
    assert not state.done
    state.batch_received(Read("o_2", b"[2]", up_to_date=True))
    assert state.done
    closed = HttpReadState("-1", live=None)
    closed.batch_received(Read("o_1", b"[1]", closed=True))
    assert closed.done


def test_a_refused_sse_falls_back_to_long_poll_once_and_for_good() -> None:
    state = HttpReadState("o_1", catch_up=False, live="sse", fallback=True)
    assert state.next_read().mode == "sse"
    assert state.falls_back(BadRequest("no sse", status=400))
    assert state.next_read() == NextRead("long-poll", "o_1", None)
    assert not state.falls_back(BadRequest("no sse", status=400))  # not SSE any more


@pytest.mark.parametrize(
    "error",
    [
        BadRequest("bad offset", status=400, headers={"Stream-Incarnation": "i1"}),
        ServerError("busy", status=503),
        OffsetGone("old", status=410),
    ],
)
def test_only_a_refusal_of_sse_itself_falls_back(error: Any) -> None:
    state = HttpReadState("o_1", catch_up=False, live="sse", fallback=True)
    state.next_read()
    assert not state.falls_back(error)
    assert state.next_read().mode == "sse"


def test_no_fallback_after_data_or_when_not_allowed() -> None:
    state = HttpReadState("o_1", catch_up=False, live="sse", fallback=True)
    state.next_read()
    state.batch_received(Read("o_2", b"[1]"))
    assert not state.falls_back(UnexpectedStatus("html", status=200))
    strict = HttpReadState("o_1", catch_up=False, live="sse")
    strict.next_read()
    assert not strict.falls_back(UnexpectedStatus("html", status=200))


def test_an_sse_response_that_ends_before_any_data_is_a_failure() -> None:
    state = HttpReadState("o_1", catch_up=False, live="sse")
    state.next_read()
    with pytest.raises(ConnectionLost, match="before any data"):
        state.connection_ended()


def test_a_long_poll_answer_without_progress_is_one_failure_then_the_same_read() -> None:
    state = HttpReadState("o_1", catch_up=False, live="long-poll")
    assert state.next_read() == NextRead("long-poll", "o_1", None)
    assert state.batch_received(Read("o_1", status=204))  # timed out: fine
    assert state.next_read() == NextRead("long-poll", "o_1", None)
    assert not state.batch_received(Read("o_1", status=200))  # nothing new: a stall
    with pytest.raises(ConnectionLost, match="no progress"):
        state.next_read()
    assert state.next_read() == NextRead("long-poll", "o_1", None)
    assert state.batch_received(Read("o_2", b"[1]"))


@pytest.mark.parametrize(
    ("error", "got_any", "refused"),
    [
        (BadRequest("x", status=400), False, True),
        (UnexpectedStatus("x", status=200), False, True),
        (BadRequest("x", status=400), True, False),
        (UnexpectedStatus("x", status=200), True, False),
        (BadRequest("x", status=400, headers={"Stream-Incarnation": "i"}), False, False),
        (ServerError("x", status=500), False, False),
        (ConnectionLost("x"), False, False),
    ],
)
def test_what_counts_as_a_refusal_of_sse(error: Any, got_any: bool, refused: bool) -> None:
    assert sse_refused(error, got_any=got_any) is refused


# --- no progress is bounded ----------------------------------------------------------


def _one_batch() -> Batch:
    return Batch((msg(0),), "-1", "o_1", up_to_date=True)


def test_a_reader_failing_at_one_offset_stops_after_the_bound() -> None:
    state = SubscriptionState(Position.beginning(), max_no_progress=3)
    state.connect()
    state.batch_received(_one_batch())
    state.connection_ended()  # a live read ended after data: fine
    decisions = []
    for _ in range(3):
        state.connect()
        decisions.append(state.failure(ServerError("cannot encode", status=500)))
    assert decisions[:2] == [ResumeAt(Position("o_1")), ResumeAt(Position("o_1"))]
    fail = decisions[2]
    assert isinstance(fail, Fail)
    assert isinstance(fail.error, NoProgress)
    assert fail.error.offset == "o_1"
    assert fail.error.attempts == 3
    assert "o_1" in str(fail.error)
    assert "cannot encode" in str(fail.error)
    assert isinstance(fail.error.__cause__, ServerError)


def test_a_batch_starts_the_no_progress_count_again() -> None:
    state = SubscriptionState(Position.beginning(), max_no_progress=2)
    state.connect()
    assert isinstance(state.failure(ConnectionLost("cut")), ResumeAt)
    state.connect()
    state.batch_received(_one_batch())  # delivered: the reader is not stuck
    assert isinstance(state.failure(ConnectionLost("cut")), ResumeAt)
    state.connect()
    assert isinstance(state.failure(ConnectionLost("cut")), ResumeAt)
    state.connect()
    assert isinstance(state.failure(ConnectionLost("cut")), Fail)


def test_connections_that_end_before_data_count_as_no_progress() -> None:
    state = SubscriptionState(Position("o_1"), max_no_progress=2)
    state.connect()
    with pytest.raises(ConnectionLost):
        state.connection_ended()
    state.connect()
    with pytest.raises(NoProgress) as raised:
        state.connection_ended()
    assert raised.value.offset == "o_1"


@pytest.mark.parametrize(
    "outage",
    [
        ConnectError("refused"),
        RequestTimeout("connect timeout"),
        RateLimited("slow down", status=429),
        ServerError("restarting", status=503, retry_after=2),
    ],
)
def test_an_outage_is_not_a_stuck_reader(outage: DurableError) -> None:
    state = SubscriptionState(Position("o_1"), max_no_progress=1)
    for _ in range(50):
        state.connect()
        assert state.failure(outage) == ResumeAt(Position("o_1"))
    assert state.no_progress == 0


def test_without_a_bound_a_reader_retries_forever() -> None:
    state = SubscriptionState(Position("o_1"))
    for _ in range(1000):
        state.connect()
        assert isinstance(state.failure(ServerError("x", status=500)), ResumeAt)


def test_the_reconnect_policy_bounds_no_progress_by_default() -> None:
    assert ReconnectPolicy().max_no_progress == 20
    assert ReconnectPolicy(max_no_progress=None).max_no_progress is None
    with pytest.raises(UsageError):
        ReconnectPolicy(max_no_progress=0)


# --- the beginning of a trimmed stream ------------------------------------------------


def _gone(next_offset: str | None) -> OffsetGone:
    headers = {"stream-next-offset": next_offset} if next_offset else {}
    return OffsetGone("not retained", status=410, headers=headers)


def test_reading_from_the_beginning_of_a_trimmed_stream_starts_at_the_earliest_retained() -> None:
    state = SubscriptionState(Position.beginning())
    state.connect()
    assert state.failure(_gone("o_2")) == Restart(Position("o_2"))
    assert state.connect() == Position("o_2")
    deliveries = state.batch_received(Batch((msg(5),), "o_2", "o_3", up_to_date=True))
    assert [d.event.text for d in deliveries if isinstance(d, Deliver) and d.event] == ["m5"]


@pytest.mark.parametrize(
    ("start", "error"),
    [
        (Position("o_1"), _gone("o_2")),  # a real offset: events were missed, say so
        (Position("-1", skip=1), _gone("o_2")),
        (Position.beginning(), _gone(None)),  # nowhere named to start
    ],
)
def test_any_other_offset_gone_is_raised(start: Position, error: OffsetGone) -> None:
    state = SubscriptionState(start)
    state.connect()
    assert state.failure(error) == Fail(error)


def test_follow_stops_after_the_bound_of_failed_reads_at_one_offset() -> None:
    state = HttpReadState("-1", live="sse", max_no_progress=3)
    state.next_read()
    assert state.batch_received(Read("o_1", b"[1]", up_to_date=True))
    failures = []
    for _ in range(3):
        assert state.next_read() == NextRead("sse", "o_1", None)
        failures.append(state.failure(ServerError("cannot encode", status=500)))
    assert all(isinstance(f, ServerError) for f in failures[:2])
    stuck = failures[2]
    assert isinstance(stuck, NoProgress)
    assert stuck.offset == "o_1"
    assert isinstance(stuck.__cause__, ServerError)


def test_follow_counts_again_after_a_successful_read_and_not_for_an_outage() -> None:
    state = HttpReadState("o_1", live="long-poll", catch_up=False, max_no_progress=2)
    lost = ConnectionLost("cut")
    assert state.failure(lost) is lost
    state.next_read()
    assert state.batch_received(Read("o_1", status=204))  # a long-poll timing out: fine
    assert state.failure(lost) is lost
    refused = ConnectError("refused")
    for _ in range(10):
        assert state.failure(refused) is refused
    assert isinstance(state.failure(lost), NoProgress)


def test_a_long_poll_that_never_progresses_is_bounded_too() -> None:
    state = HttpReadState("o_1", live="long-poll", catch_up=False, max_no_progress=2)
    errors = []
    for _ in range(2):
        state.next_read()
        assert not state.batch_received(Read("o_1"))  # 200, no data, same offset
        with pytest.raises(ConnectionLost) as raised:
            state.next_read()
        errors.append(state.failure(raised.value))
    assert isinstance(errors[0], ConnectionLost)
    assert isinstance(errors[1], NoProgress)


def test_follow_from_the_beginning_of_a_trimmed_stream_reads_from_the_earliest_retained() -> None:
    state = HttpReadState("-1", live="sse")
    assert state.next_read().offset == "-1"
    assert state.from_earliest(_gone("o_2"))
    assert state.next_read() == NextRead("catch-up", "o_2", None)
    assert state.batch_received(Read("o_3", b"[5]", up_to_date=True))
    assert not state.from_earliest(_gone("o_3"))  # from a real offset: events were missed


def test_follow_raises_a_410_that_names_no_earliest_offset() -> None:
    state = HttpReadState("-1", live="sse")
    state.next_read()
    assert not state.from_earliest(_gone(None))
    assert not state.from_earliest(ServerError("x", status=500))
