"""The WebSocket wire without a socket: frames in, events out; close codes to errors.

Plain functions, no event loop: each test feeds ``ClientWire`` or
``SubscriptionFrames`` the text a server would send and reads what it decided.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from websockets.datastructures import Headers
from websockets.exceptions import InvalidMessage, InvalidStatus, InvalidUpgrade, InvalidURI
from websockets.frames import Close
from websockets.http11 import Response

from durable_client import (
    ConnectError,
    ConnectionLost,
    DurableError,
    Forbidden,
    Member,
    PayloadTooLarge,
    ProtocolViolation,
    RateLimited,
    RequestTimeout,
    SequenceGap,
    ServerError,
    StreamNotFound,
    Unauthorized,
    UsageError,
)
from durable_client._core.wire import (
    CLOSE_ERRORS,
    Answer,
    ClientWire,
    FellBehind,
    ForSubscription,
    HandshakeRefused,
    PresenceHeard,
    SubscriptionFrames,
    close_error,
    connect_error,
    handshake_error,
    pending_request_error,
    presence_changes,
)
from durable_client.wire import Ack, Data, Error, Pong, Subscribed

URL = "http://127.0.0.1:1/v1/stream/sessions/s"


def frame(**fields: Any) -> str:
    return json.dumps(fields)


def data(sub: str, offset: str, *messages: Any, **flags: Any) -> str:
    return frame(type="data", sub=sub, offset=offset, messages=list(messages), **flags)


def wire(max_frames: int = 100, max_bytes: int = 10_000) -> ClientWire:
    return ClientWire(url=URL, max_queued_frames=max_frames, max_queued_bytes=max_bytes)


# --- routing ---------------------------------------------------------------------


def test_frames_go_to_their_subscription_and_answers_to_their_request() -> None:
    w = wire()
    w.open("s1")
    text = data("s1", "o_1", {"n": 1})
    event = w.receive(text)
    assert isinstance(event, ForSubscription)
    assert (event.sub, event.size) == ("s1", len(text))
    assert isinstance(event.frame, Data)
    ack = w.receive(frame(type="ack", req="a1", offset="o_2"))
    assert isinstance(ack, Answer)
    assert (ack.req, type(ack.frame)) == ("a1", Ack)
    pong = w.receive(frame(type="pong", req="p1"))
    assert isinstance(pong, Answer)
    assert isinstance(pong.frame, Pong)
    refused = w.receive(frame(type="error", status=409, code="conflict", message="x", req="a2"))
    assert isinstance(refused, Answer)
    assert isinstance(refused.frame, Error)


def test_presence_frames_are_heard() -> None:
    event = wire().receive(
        frame(
            type="presence",
            stream="/v1/stream/sessions/s",
            event="snapshot",
            members=[{"client_id": "ann", "kind": "user"}],
        )
    )
    assert isinstance(event, PresenceHeard)
    assert [m.client_id for m in event.frame.members] == ["ann"]


def test_frames_nobody_waits_for_are_dropped() -> None:
    w = wire()
    assert w.receive(data("unknown", "o_1")) is None  # unsubscribed meanwhile
    assert w.receive(frame(type="pong")) is None  # a pong without req
    assert w.receive(frame(type="ack", req="a9", offset="o_1")) is not None  # the glue decides


def test_a_subscription_error_ends_the_subscription_once() -> None:
    w = wire()
    w.open("s1")
    error = frame(type="error", status=404, code="not_found", message="no", sub="s1")
    event = w.receive(error)
    assert isinstance(event, ForSubscription)
    assert isinstance(event.frame, Error)
    assert w.subscriptions == 0
    assert w.receive(error) is None  # already over
    assert w.receive(data("s1", "o_1")) is None
    assert w.close("s1") is False  # nothing left to unsubscribe


@pytest.mark.parametrize(("max_frames", "max_bytes"), [(2, 10_000), (100, 200)])
def test_a_subscription_that_falls_behind_is_ended_not_queued(
    max_frames: int, max_bytes: int
) -> None:
    w = wire(max_frames, max_bytes)
    w.open("s1")
    w.open("s2")
    texts = [data("s1", f"o_{i}", {"pad": "x" * 20}) for i in range(3)]
    first = w.receive(texts[0])
    second = w.receive(texts[1])
    assert isinstance(first, ForSubscription)
    assert isinstance(second, ForSubscription)
    behind = w.receive(texts[2])
    assert isinstance(behind, FellBehind)
    assert behind.sub == "s1"
    assert isinstance(behind.error, ConnectionLost)
    assert behind.error.retryable  # it resumes from its position
    assert w.subscriptions == 1
    assert w.receive(texts[0]) is None  # frames still in flight for it are dropped
    assert isinstance(w.receive(data("s2", "o_9")), ForSubscription)  # the others go on


def test_taking_frames_makes_room_again() -> None:
    w = wire(max_frames=1)
    w.open("s1")
    one = w.receive(data("s1", "o_1"))
    assert isinstance(one, ForSubscription)
    w.taken("s1", one.size)
    assert isinstance(w.receive(data("s1", "o_2")), ForSubscription)
    assert w.close("s1") is True
    w.taken("s1", 10)  # after close: ignored


def test_a_subscription_error_is_delivered_past_the_bound() -> None:
    w = wire(max_frames=1)
    w.open("s1")
    assert isinstance(w.receive(data("s1", "o_1")), ForSubscription)
    error = frame(type="error", status=410, code="gone", message="old", sub="s1")
    assert isinstance(w.receive(error), ForSubscription)


def test_a_refusal_without_req_or_sub_waits_for_the_next_barrier() -> None:
    w = wire()
    assert w.take_stray_error("set presence") is None
    for _ in range(ClientWire.MAX_STRAY_ERRORS + 5):
        assert w.receive(frame(type="error", status=400, code="bad_frame", message="x")) is None
    error = w.take_stray_error("set presence")
    assert isinstance(error, DurableError)
    assert error.status == 400
    assert "set presence" in str(error)
    assert w.take_stray_error("set presence") is None  # reported once


@pytest.mark.parametrize(
    "message",
    [b'{"type": "pong"}', "not json", frame(type="teleport"), frame(type="data", sub="s")],
)
def test_binary_or_malformed_frames_break_the_protocol(message: str | bytes) -> None:
    with pytest.raises(ProtocolViolation):
        wire().receive(message)


# --- one subscription's frames -----------------------------------------------------


def test_data_frames_become_batches_that_join_up() -> None:
    frames = SubscriptionFrames("-1", url=URL)
    subscribed = Subscribed(
        sub="s1", stream="/v1/stream/x", offset="-1", content_type="application/json"
    )
    assert frames.receive(subscribed.model_copy(update={"incarnation": "i1"})) is None
    first = frames.receive(Data(sub="s1", offset="o_2", messages=[1, 2], up_to_date=True))
    second = frames.receive(Data(sub="s1", offset="o_3", messages=[3], closed=True))
    assert first is not None
    assert second is not None
    assert (first.messages, first.start_offset, first.offset) == ((1, 2), "-1", "o_2")
    assert (first.up_to_date, first.closed, first.incarnation) == (True, False, "i1")
    assert (second.start_offset, second.offset, second.closed) == ("o_2", "o_3", True)


def test_a_subscription_error_frame_raises_what_http_raises() -> None:
    frames = SubscriptionFrames("-1", url=URL)
    with pytest.raises(StreamNotFound):
        frames.receive(Error(status=404, code="not_found", message="no", sub="s1"))
    gap = Error(
        status=409,
        code="sequence_gap",
        message="gap",
        sub="s1",
        headers={"Producer-Expected-Seq": "1", "Producer-Received-Seq": "3"},
    )
    with pytest.raises(SequenceGap) as raised:
        frames.receive(gap)
    assert (raised.value.expected_seq, raised.value.received_seq) == (1, 3)


def test_a_data_frame_of_a_json_stream_needs_messages() -> None:
    with pytest.raises(ProtocolViolation):
        SubscriptionFrames("-1", url=URL).receive(Data(sub="s1", offset="o_1", text="hi"))


# --- endings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (1000, ConnectionLost),
        (1001, ConnectionLost),
        (1011, ConnectionLost),
        (4008, ConnectionLost),
        (1008, Forbidden),
        (4002, ProtocolViolation),
        (4029, UsageError),
    ],
)
def test_close_codes_are_retryable_or_fatal(code: int, expected: type[Exception]) -> None:
    error = close_error(Close(code, "why"), None, url="ws://x")
    assert type(error) is expected
    assert error.retryable is (expected is ConnectionLost)
    lost = close_error(None, Close(1011, "keepalive ping timeout"), url="ws://x")
    assert isinstance(lost, ConnectionLost)
    assert "keepalive" in str(lost)


RETRYABLE = {1000, 1001, 1006, 1009, 1011, 1012, 1013, 1014, 4008, 4001}
FATAL = {1002: ProtocolViolation, 1003: ProtocolViolation, 1007: ProtocolViolation}
FATAL |= {4002: ProtocolViolation, 1008: Forbidden, 4029: UsageError}


@pytest.mark.parametrize("code", [*range(1000, 1016), *range(4000, 4100)])
def test_every_close_code_has_one_meaning(code: int) -> None:
    """The whole policy: the documented codes, and every other code means a lost link."""
    error = close_error(Close(code, ""), None, url="ws://x")
    assert error.url == "ws://x"
    assert str(code) in str(error)
    if code in FATAL:
        assert type(error) is FATAL[code]
        assert not error.retryable
    else:
        assert type(error) is ConnectionLost
        assert error.retryable
    assert set(CLOSE_ERRORS) == RETRYABLE | set(FATAL)


def test_a_frame_too_big_fails_the_pending_appends_for_good() -> None:
    received = Close(1009, "frame too big")
    lost = close_error(received, None, url="ws://x")
    assert isinstance(lost, ConnectionLost)  # the subscriptions resume
    failed = pending_request_error(lost, received, url="ws://x")
    assert isinstance(failed, PayloadTooLarge)
    assert str(lost.message) in str(failed)
    assert pending_request_error(lost, Close(1001, ""), url="ws://x") is lost
    assert pending_request_error(lost, None, url="ws://x") is lost


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (401, Unauthorized),
        (429, RateLimited),
        (503, ServerError),
        (403, HandshakeRefused),
        (404, HandshakeRefused),
        (426, HandshakeRefused),
    ],
)
def test_a_refused_handshake_means_what_http_means_or_no_websocket_here(
    status: int, expected: type[DurableError]
) -> None:
    error = handshake_error(status, {"Retry-After": "2"}, url=URL, ws_url="ws://x/v1/ws")
    assert type(error) is expected
    assert error.status == status
    if isinstance(error, RateLimited):
        assert error.retry_after == 2.0


def test_a_failed_handshake_maps_onto_the_tree() -> None:
    def failed(exc: Exception) -> DurableError:
        return connect_error(exc, url=URL, ws_url="ws://x/v1/ws")  # type: ignore[arg-type]

    refused = failed(InvalidStatus(Response(404, "Not Found", Headers())))
    assert type(refused) is HandshakeRefused
    assert refused.status == 404
    busy = failed(InvalidStatus(Response(503, "Unavailable", Headers({"Retry-After": "1"}))))
    assert isinstance(busy, ServerError)
    assert busy.retry_after == 1.0
    assert type(failed(InvalidUpgrade("Upgrade", "h2c"))) is HandshakeRefused  # not WebSocket
    assert type(failed(InvalidMessage("cut"))) is ConnectionLost  # decides nothing
    assert type(failed(InvalidURI("ws:/x", "bad"))) is UsageError
    assert type(failed(TimeoutError())) is RequestTimeout
    assert type(failed(ConnectionRefusedError(111, "refused"))) is ConnectError
    for error in (failed(InvalidMessage("cut")), failed(TimeoutError())):
        assert error.retryable
        assert error.url == URL


# --- presence ------------------------------------------------------------------------


def test_a_snapshot_after_a_reconnect_reports_what_changed() -> None:
    ann = Member(client_id="ann", kind="user")
    bob = Member(client_id="bob", kind="user")
    bob_away = Member(client_id="bob", kind="user", status="away")
    bot = Member(client_id="bot", kind="agent")
    changes = presence_changes((ann, bob), (bob_away, bot))
    assert [(c.event, c.member.client_id) for c in changes] == [
        ("leave", "ann"),
        ("update", "bob"),
        ("join", "bot"),
    ]
    assert changes[0].members == (bob,)
    assert changes[-1].members == (bob_away, bot)
    assert presence_changes((ann,), (ann,)) == []
