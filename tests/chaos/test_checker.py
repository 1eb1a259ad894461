"""The history checker on crafted histories: each kind of wrong is found and named."""

from __future__ import annotations

import pytest

from mock_server.chaos import (
    HistoryRecorder,
    HistoryReport,
    Published,
    Seen,
    SubscriberHistory,
    SubscriberReport,
    check_history,
    content_hash,
)


def off(n: int) -> str:
    return f"0000000000000000_{n:016d}"


PUBLISHED = [Published(id=f"e{i}", offset=off(10 * i)) for i in range(1, 7)]


def seen(*ids: int, offsets: list[int] | None = None) -> list[Seen]:
    marks = offsets or [10 * i for i in ids]
    return [Seen(id=f"e{i}", offset=off(o)) for i, o in zip(ids, marks, strict=True)]


def one(
    history: list[Seen], gaps: list[tuple[str, str]] | None = None
) -> tuple[HistoryReport, SubscriberReport]:
    sub = SubscriberHistory(name="r", seen=history, reported_gaps=gaps or [])
    report = check_history(PUBLISHED, [sub])
    return report, report.subscribers[0]


def test_a_perfect_history_is_ok_and_hashes_equal() -> None:
    report, sub = one(seen(1, 2, 3, 4, 5, 6))
    assert report.ok
    assert sub.ok
    assert sub.hash_matches
    assert report.totals()["lost"] == 0
    assert "history check OK" in str(report)


def test_batches_share_an_offset_without_complaint() -> None:
    report, _sub = one(seen(1, 2, 3, 4, 5, 6, offsets=[30, 30, 30, 60, 60, 60]))
    assert report.ok, str(report)


def test_lost_events_and_the_offset_gap() -> None:
    report, sub = one(seen(1, 2, 5, 6))
    assert sub.lost == ["e3", "e4"]
    assert not report.ok
    assert not sub.hash_matches
    (gap,) = sub.offset_gaps
    assert (gap.after_id, gap.first_id, gap.last_id, gap.count) == ("e2", "e3", "e4", 2)
    assert (gap.from_offset, gap.to_offset) == (off(20), off(50))
    text = str(report)
    assert "lost: e3, e4" in text
    assert "gap: 2 event(s) e3..e4 skipped after e2" in text


def test_duplicates_are_counted() -> None:
    report, sub = one(seen(1, 2, 3, 3, 3, 4, 5, 6, offsets=[10, 20, 30, 30, 30, 40, 50, 60]))
    assert sub.duplicated == {"e3": 3}
    assert report.totals()["duplicated"] == 2
    assert not sub.lost
    assert not sub.reordered


def test_reordering_is_found() -> None:
    report, sub = one(seen(1, 3, 2, 4, 5, 6, offsets=[10, 30, 30, 40, 50, 60]))
    assert sub.reordered == ["e2"]
    assert not sub.lost
    assert not report.ok


def test_unexpected_events_are_found() -> None:
    history = [*seen(1, 2, 3, 4, 5, 6), Seen(id="ghost", offset=off(60))]
    report, sub = one(history)
    assert sub.unexpected == ["ghost"]
    assert not report.ok


def test_an_offset_that_goes_back_is_a_regression() -> None:
    report, sub = one(seen(1, 2, 3, 4, 5, 6, offsets=[10, 20, 30, 25, 50, 60]))
    kinds = [(i.kind, i.id) for i in sub.offset_issues]
    assert ("regression", "e4") in kinds
    assert ("before_ack", "e4") in kinds  # 25 is before e4 was acknowledged at 40
    assert not report.ok


def test_unacknowledged_events_may_be_missing_but_not_doubled() -> None:
    published = [*PUBLISHED, Published(id="maybe", acked=False)]
    ok = check_history(published, [SubscriberHistory(name="r", seen=seen(1, 2, 3, 4, 5, 6))])
    assert ok.ok
    doubled = [*seen(1, 2, 3, 4, 5, 6), Seen(id="maybe"), Seen(id="maybe")]
    assert not check_history(published, [SubscriberHistory(name="r", seen=doubled)]).ok


def test_a_reported_gap_is_an_explicit_loss_not_a_silent_one() -> None:
    report, sub = one(seen(1, 5, 6), gaps=[(off(10), off(40))])
    assert sub.reported_lost == ["e2", "e3", "e4"]
    assert sub.lost == []
    assert report.ok  # explicit; tests that forbid it look at reported_lost
    assert report.totals()["reported_lost"] == 3


def test_several_subscribers_are_judged_separately() -> None:
    report = check_history(
        PUBLISHED,
        [
            SubscriberHistory(name="good", seen=seen(1, 2, 3, 4, 5, 6)),
            SubscriberHistory(name="bad", seen=seen(1, 2, 3)),
        ],
    )
    assert [s.ok for s in report.subscribers] == [True, False]
    assert not report.ok
    assert "good: ok" in str(report)
    assert "bad: FAILED" in str(report)


def test_recorder_collects_as_it_goes() -> None:
    history = HistoryRecorder()
    for i in range(3):
        history.published(f"x{i}", offset=off(i + 1))
        history.seen("a", f"x{i}", offset=off(i + 1))
    history.seen("b", "x0")
    assert history.check().subscribers[0].ok
    with pytest.raises(AssertionError, match="b: FAILED") as failure:
        history.assert_ok()
    assert "lost: x1, x2" in str(failure.value)


def test_content_hash_is_order_sensitive() -> None:
    assert content_hash(["a", "b"]) != content_hash(["b", "a"])
    assert content_hash(["ab"]) != content_hash(["a", "b"])


def test_a_check_that_saw_nothing_does_not_say_ok() -> None:
    empty = HistoryRecorder().check()
    assert not empty.checked
    assert str(empty) == "history check: nothing recorded (not checked)"
    unread = HistoryRecorder()
    unread.published("e1", offset=off(10))
    assert str(unread.check()) == (
        "history check: not checked: 1 published (1 acknowledged), no subscriber recorded"
    )
    silent = check_history([], [SubscriberHistory(name="r")])
    assert str(silent) == "history check: not checked: nothing published, nothing seen"
    for report in (empty, unread.check(), silent):
        assert "OK" not in str(report)


def test_a_check_that_saw_something_is_checked() -> None:
    report, _sub = one(seen(1, 2, 3, 4, 5, 6))
    assert report.checked
    stray = check_history([], [SubscriberHistory(name="r", seen=[Seen(id="x")])])
    assert stray.checked
    assert "history check FAILED" in str(stray)
