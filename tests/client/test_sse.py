"""The SSE decoder, fed bytes in every way a network can split them."""

from __future__ import annotations

import pytest

from durable_client._sse import SSEDecoder, SSEEvent

STREAM = (
    b'event: data\ndata: [\ndata: {"k":1}\ndata: ]\n\n'
    b'event: control\ndata: {"streamNextOffset":"a_1"}\n\n'
)


def decode_all(chunks: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.close())
    return events


def test_whole_stream() -> None:
    assert decode_all([STREAM]) == [
        SSEEvent("data", '[\n{"k":1}\n]'),
        SSEEvent("control", '{"streamNextOffset":"a_1"}'),
    ]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16])
def test_any_split_gives_the_same_events(size: int) -> None:
    chunks = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    assert decode_all(chunks) == decode_all([STREAM])


@pytest.mark.parametrize("newline", [b"\r\n", b"\r", b"\n"])
def test_line_endings(newline: bytes) -> None:
    raw = b"event: data" + newline + b"data: x" + newline + newline
    assert decode_all([raw]) == [SSEEvent("data", "x")]


def test_crlf_split_between_chunks() -> None:
    assert decode_all([b"event: a\r", b"\ndata: 1\r", b"\n\r", b"\n"]) == [SSEEvent("a", "1")]


def test_comments_ids_and_unknown_fields_are_ignored() -> None:
    raw = b": keep-alive\nid: 7\nretry: 100\nfoo: bar\nevent: data\ndata:x\n\n"
    assert decode_all([raw]) == [SSEEvent("data", "x")]


def test_only_one_space_after_colon_is_dropped() -> None:
    assert decode_all([b"data:  two\n\n"]) == [SSEEvent("message", " two")]


def test_event_without_data_is_not_dispatched() -> None:
    assert decode_all([b"event: control\n\nevent: data\ndata: y\n\n"]) == [SSEEvent("data", "y")]


def test_empty_data_line_dispatches_empty_data() -> None:
    assert decode_all([b"event: control\ndata:\n\n"]) == [SSEEvent("control", "")]


def test_unterminated_last_event_is_discarded() -> None:
    assert decode_all([b"event: data\ndata: partial\n"]) == []


def test_bom_and_multibyte_utf8_across_chunks() -> None:
    raw = "\ufeffdata: héllo €\n\n".encode()
    chunks = [raw[i : i + 1] for i in range(len(raw))]
    assert decode_all(chunks) == [SSEEvent("message", "héllo €")]


def test_invalid_utf8_raises() -> None:
    with pytest.raises(UnicodeDecodeError):
        SSEDecoder().feed(b"data: \xff\xfe\n\n")


def test_any_chunking_gives_the_same_events() -> None:
    """3,000 seeded inputs of line breaks, fields and multi-byte text, cut at random
    points (inside CRLFs and UTF-8 sequences too): the events never depend on the cuts."""
    import random

    from durable_client._sse import SSEDecoder

    rng = random.Random(20261126)
    alphabet = ["a", " ", ":", "\r", "\n", "\r\n", "data", "event", "é", "data: x", "\n\n", "€"]
    for _ in range(3000):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))).encode()
        cuts = sorted(rng.sample(range(len(raw) + 1), min(len(raw) + 1, rng.randint(0, 6))))
        whole = SSEDecoder().feed(raw)
        decoder, pieces, previous = SSEDecoder(), [], 0
        for cut in [*cuts, len(raw)]:
            pieces += decoder.feed(raw[previous:cut])
            previous = cut
        assert pieces == whole, raw
