"""Positions, the resume tracker, the event-id guard and the offset stores."""

from __future__ import annotations

from pathlib import Path

import pytest

from durable_client import FileOffsetStore, MemoryOffsetStore, Position, ProtocolViolation
from durable_client._offsets import EventIdDeduper, ResumeTracker


def test_position_json_round_trip() -> None:
    position = Position("0000_0042", 3)
    assert Position.from_json(position.to_json()) == position
    assert str(position) == "0000_0042+3"
    assert str(Position.beginning()) == "-1"


@pytest.mark.parametrize("bad", [None, [], {"offset": 1}, {"offset": "a", "skip": "x"}])
def test_position_rejects_malformed_json(bad: object) -> None:
    with pytest.raises(ValueError, match="position"):
        Position.from_json(bad)


def test_tracker_hands_out_each_message_once_with_its_position() -> None:
    tracker = ResumeTracker(Position.beginning())
    out = tracker.accept("-1", ["a", "b", "c"], "o_3")
    assert out == [
        ("a", Position("-1", 1)),
        ("b", Position("-1", 2)),
        ("c", Position("o_3", 0)),
    ]
    assert tracker.position == Position("o_3")
    assert tracker.accept("o_3", ["d"], "o_4") == [("d", Position("o_4"))]


def test_resuming_mid_batch_skips_what_was_delivered() -> None:
    # Two of three messages at offset o_3 were delivered before a crash.
    tracker = ResumeTracker(Position("o_3", 2))
    assert tracker.accept("o_3", ["d", "e", "f"], "o_6") == [("f", Position("o_6"))]


def test_resume_survives_regrouping_into_smaller_batches() -> None:
    # The server regroups: the first batch now holds fewer messages than we skip.
    tracker = ResumeTracker(Position("o_3", 3))
    assert tracker.accept("o_3", ["d", "e"], "o_5") == []
    assert tracker.position == Position("o_5", 1)
    assert tracker.accept("o_5", ["f", "g"], "o_7") == [("g", Position("o_7"))]


def test_every_cut_point_gives_the_same_messages() -> None:
    batches = [("-1", ["a", "b"], "o_2"), ("o_2", ["c"], "o_3"), ("o_3", ["d", "e", "f"], "o_6")]
    full = ResumeTracker(Position.beginning())
    everything = [m for start, msgs, end in batches for m in full.accept(start, msgs, end)]
    for cut in range(len(everything) + 1):
        resume_at = everything[cut - 1][1] if cut else Position.beginning()
        got = [m for m, _ in everything[:cut]]
        tracker = ResumeTracker(resume_at)
        # The server answers a resume from resume_at.offset with the batches from there.
        started = False
        for start, msgs, end in batches:
            if start == resume_at.offset:
                started = True
            if started:
                got.extend(m for m, _ in tracker.accept(start, msgs, end))
        assert got == ["a", "b", "c", "d", "e", "f"], cut


def test_a_batch_that_does_not_join_up_is_a_protocol_violation() -> None:
    tracker = ResumeTracker(Position("o_2"))
    with pytest.raises(ProtocolViolation, match="starts at"):
        tracker.accept("o_3", ["x"], "o_4")


def test_offsets_going_backwards_is_a_protocol_violation() -> None:
    tracker = ResumeTracker(Position("o_5"))
    with pytest.raises(ProtocolViolation, match="backwards"):
        tracker.accept("o_5", ["x"], "o_4")


def test_messages_without_progress_is_a_protocol_violation() -> None:
    tracker = ResumeTracker(Position("o_5"))
    with pytest.raises(ProtocolViolation, match="did not advance"):
        tracker.accept("o_5", ["x"], "o_5")


def test_empty_batches_move_the_position() -> None:
    tracker = ResumeTracker(Position("o_5"))
    assert tracker.accept("o_5", [], "o_5") == []
    assert tracker.accept("o_5", [], "o_6") == []
    assert tracker.position == Position("o_6")


def test_event_id_deduper_is_bounded() -> None:
    dedupe = EventIdDeduper(capacity=2)
    assert not dedupe.seen("a")
    assert dedupe.seen("a")
    assert not dedupe.seen("b")
    assert not dedupe.seen("c")  # evicts "a"
    assert len(dedupe) == 2
    assert not dedupe.seen("a")


async def test_memory_store() -> None:
    store = MemoryOffsetStore()
    assert await store.load("k") is None
    await store.save("k", Position("o_1", 2))
    assert await store.load("k") == Position("o_1", 2)
    await store.delete("k")
    assert await store.load("k") is None


async def test_file_store_survives_a_new_instance(tmp_path: Path) -> None:
    store = FileOffsetStore(tmp_path / "offsets")
    await store.save("http://x/v1/stream/sessions/a#tui", Position("o_9", 1))
    again = FileOffsetStore(tmp_path / "offsets")
    assert await again.load("http://x/v1/stream/sessions/a#tui") == Position("o_9", 1)
    assert await again.load("other") is None
    await again.delete("http://x/v1/stream/sessions/a#tui")
    assert await store.load("http://x/v1/stream/sessions/a#tui") is None
    assert not [p for p in (tmp_path / "offsets").iterdir() if p.name.startswith(".tmp")]


async def test_file_store_rejects_a_corrupt_file(tmp_path: Path) -> None:
    store = FileOffsetStore(tmp_path)
    store.path_for("k").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        await store.load("k")
