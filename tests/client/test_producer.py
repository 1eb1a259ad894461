"""The idempotent producer's asyncio driver against an in-memory model of the server's rules.

No sockets: ``ModelServer`` applies the protocol's producer rules (PROTOCOL.md
section 5.2.1) to an in-memory log, and lets a test reorder requests, lose
answers after the write, or fence the producer, at exact points. The rules
themselves, fed by hand and explored in every order, are in
``tests/client/core/test_producer_core.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from durable_client import (
    BadRequest,
    ClientClosed,
    ConnectionLost,
    RetryPolicy,
    SequenceGap,
    ServerError,
    StaleEpoch,
    StreamClosed,
)
from durable_client.streams import AppendResult, IdempotentProducer, ProducerStamp

FAST = RetryPolicy(initial_delay=0.001, max_delay=0.002, max_attempts=5)


class ModelServer:
    url = "http://model/v1/stream/s"

    def __init__(self) -> None:
        self.log: list[bytes] = []
        self.producers: dict[str, tuple[int, int]] = {}
        self.closed_by: tuple[str, int, int] | None = None
        self.calls: list[tuple[ProducerStamp | None, list[bytes], bool]] = []
        self.lose_answer: set[int] = set()  # call numbers: write, then lose the answer
        self.fail_before: dict[int, Exception] = {}  # call numbers: fail without writing
        self.ticks: dict[int, int] = {}  # call numbers: yield this often before applying
        self.in_flight = 0
        self.max_in_flight = 0
        self.gaps = 0

    async def send_batch(
        self, items: Sequence[bytes], *, stamp: ProducerStamp | None, close: bool = False
    ) -> AppendResult:
        call = len(self.calls)
        self.calls.append((stamp, list(items), close))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            for _ in range(self.ticks.get(call, 0)):
                await asyncio.sleep(0)
            if call in self.fail_before:
                raise self.fail_before[call]
            result = self.apply(list(items), stamp, close)
            if call in self.lose_answer:
                raise ConnectionLost("answer lost", url=self.url)
            return result
        finally:
            self.in_flight -= 1

    def offset(self) -> str:
        return f"{len(self.log):016d}"

    def apply(self, items: list[bytes], stamp: ProducerStamp | None, close: bool) -> AppendResult:
        assert stamp is not None
        key = (stamp.producer_id, stamp.epoch, stamp.seq)
        if self.closed_by is not None:
            if self.closed_by == key:
                return AppendResult(self.offset(), True, True, 204, stamp.epoch, stamp.seq)
            raise StreamClosed("closed", status=409, final_offset=self.offset())
        state = self.producers.get(stamp.producer_id)
        if state is None:
            if stamp.seq != 0:
                self.gaps += 1
                raise SequenceGap("gap", status=409, expected_seq=0, received_seq=stamp.seq)
        else:
            epoch, last = state
            if stamp.epoch < epoch:
                raise StaleEpoch("stale", status=403, current_epoch=epoch)
            if stamp.epoch == epoch:
                if stamp.seq <= last:
                    return AppendResult(None, False, True, 204, epoch, last)
                if stamp.seq > last + 1:
                    self.gaps += 1
                    raise SequenceGap(
                        "gap", status=409, expected_seq=last + 1, received_seq=stamp.seq
                    )
            elif stamp.seq != 0:
                raise BadRequest("new epoch must start at seq 0", status=400)
        self.log.extend(items)
        self.producers[stamp.producer_id] = (stamp.epoch, stamp.seq)
        if close:
            self.closed_by = key
        return AppendResult(self.offset(), close, False, 200, stamp.epoch, stamp.seq)


def items(n: int) -> list[bytes]:
    return [f"m{i:02d}".encode() for i in range(n)]


async def test_appends_in_one_loop_iteration_share_a_request() -> None:
    server = ModelServer()
    async with IdempotentProducer(server, "p", linger=0) as producer:
        futures = [producer.append(m) for m in items(10)]
        await producer.flush()
    assert len(server.calls) == 1
    assert server.log == items(10)
    results = [f.result() for f in futures]
    assert all(r is results[0] for r in results)


async def test_batch_limits_split_requests_in_order() -> None:
    server = ModelServer()
    async with IdempotentProducer(server, "p", linger=0, max_batch_items=3) as producer:
        for m in items(10):
            producer.append(m)
    assert [len(batch) for _, batch, _ in server.calls] == [3, 3, 3, 1]
    assert [stamp.seq for stamp, _, _ in server.calls if stamp] == [0, 1, 2, 3]
    assert server.log == items(10)

    server = ModelServer()
    async with IdempotentProducer(server, "p", linger=0, max_batch_bytes=7) as producer:
        for m in items(5):  # 3 bytes each: two per batch
            producer.append(m)
    assert [len(batch) for _, batch, _ in server.calls] == [2, 2, 1]


async def test_first_batch_of_an_epoch_travels_alone() -> None:
    server = ModelServer()
    server.ticks = {0: 20, 1: 5, 2: 5, 3: 5, 4: 5, 5: 5}
    async with IdempotentProducer(
        server, "p", linger=0, max_batch_items=1, max_in_flight=5
    ) as producer:
        for m in items(6):
            producer.append(m)
        await asyncio.sleep(0)
        for _ in range(10):
            await asyncio.sleep(0)
            assert len(server.calls) == 1  # seq 0 not acknowledged yet
    assert server.log == items(6)
    assert server.max_in_flight > 1  # pipelined after seq 0


async def test_overtaking_requests_are_resent_in_order_without_duplicates() -> None:
    server = ModelServer()
    # Later requests reach the server first: seq 1 is slowest, seq 5 fastest.
    server.ticks = {1: 50, 2: 40, 3: 30, 4: 20, 5: 10}
    async with IdempotentProducer(
        server, "p", linger=0, max_batch_items=1, max_in_flight=5, retry=FAST
    ) as producer:
        futures = [producer.append(m) for m in items(20)]
    assert server.gaps > 0
    assert server.log == items(20)
    assert all(f.result().status in (200, 204) for f in futures)


async def test_a_lost_answer_is_retried_without_a_duplicate() -> None:
    server = ModelServer()
    server.lose_answer = {1}
    retries: list[int] = []
    async with IdempotentProducer(
        server, "p", linger=0, retry=FAST, on_retry=lambda n, d, e: retries.append(n)
    ) as producer:
        first = producer.append(b"a")
        await producer.flush()
        second = producer.append(b"b")
        await producer.flush()
    assert server.log == [b"a", b"b"]
    assert retries == [1]
    assert second.result().duplicate
    assert first.result().offset == f"{1:016d}"
    # The retry carried the same stamp.
    assert server.calls[1][0] == server.calls[2][0]


async def test_retryable_errors_before_the_write_are_retried() -> None:
    server = ModelServer()
    server.fail_before = {0: ServerError("busy", status=503), 1: ConnectionLost("reset")}
    async with IdempotentProducer(server, "p", linger=0, retry=FAST) as producer:
        producer.append(b"x")
    assert server.log == [b"x"]
    assert len(server.calls) == 3


async def test_giving_up_fails_the_producer() -> None:
    server = ModelServer()
    server.fail_before = {i: ServerError("down", status=503) for i in range(10)}
    producer = IdempotentProducer(server, "p", linger=0, retry=FAST)
    fut = producer.append(b"x")
    with pytest.raises(ServerError):
        await producer.flush()
    with pytest.raises(ServerError):
        await fut
    with pytest.raises(ServerError):
        producer.append(b"y")
    assert len(server.calls) == FAST.max_attempts


async def test_auto_claim_takes_over_a_fenced_producer_id() -> None:
    server = ModelServer()
    server.producers["p"] = (5, 3)  # another instance holds epoch 5
    async with IdempotentProducer(
        server, "p", auto_claim=True, linger=0, max_batch_items=2, max_in_flight=3
    ) as producer:
        for m in items(7):
            producer.append(m)
        await producer.flush()
        assert producer.epoch == 6
    assert server.log == items(7)
    assert server.producers["p"] == (6, 3)


async def test_a_zombie_without_auto_claim_is_fenced() -> None:
    server = ModelServer()
    server.producers["p"] = (1, 0)
    producer = IdempotentProducer(server, "p", epoch=0, linger=0)
    fut = producer.append(b"x")
    with pytest.raises(StaleEpoch) as info:
        await producer.flush()
    assert info.value.current_epoch == 1
    assert fut.exception() is info.value
    assert server.log == []


async def test_restart_with_a_higher_epoch_fences_the_old_instance() -> None:
    server = ModelServer()
    async with IdempotentProducer(server, "p", linger=0) as old:
        old.append(b"old")
    async with IdempotentProducer(server, "p", epoch=1, linger=0) as new:
        new.append(b"new")
    zombie = IdempotentProducer(server, "p", epoch=0, linger=0)
    zombie.append(b"zombie")
    with pytest.raises(StaleEpoch):
        await zombie.flush()
    assert server.log == [b"old", b"new"]


async def test_closed_stream_fails_pending_appends() -> None:
    server = ModelServer()
    server.closed_by = ("someone", 0, 0)
    producer = IdempotentProducer(server, "p", linger=0)
    futures = [producer.append(m) for m in items(3)]
    with pytest.raises(StreamClosed):
        await producer.flush()
    assert all(isinstance(f.exception(), StreamClosed) for f in futures)


async def test_close_appends_the_final_message_once_and_is_idempotent() -> None:
    server = ModelServer()
    producer = IdempotentProducer(server, "p", linger=0)
    producer.append(b"a")
    result = await producer.close(b"bye")
    assert result.closed
    assert await producer.close(b"bye") is result
    assert server.log == [b"a", b"bye"]
    assert server.calls[-1][2] is True
    with pytest.raises(ClientClosed):
        producer.append(b"late")


async def test_detach_leaves_the_stream_open_and_refuses_more() -> None:
    server = ModelServer()
    producer = IdempotentProducer(server, "p", linger=0.01)
    producer.append(b"a")
    await producer.detach()
    assert server.log == [b"a"]
    assert server.closed_by is None
    with pytest.raises(ClientClosed):
        producer.append(b"b")


async def test_aclose_fails_what_is_pending() -> None:
    server = ModelServer()
    producer = IdempotentProducer(server, "p", linger=10)
    fut = producer.append(b"a")
    await producer.aclose()
    assert isinstance(fut.exception(), ClientClosed)
    assert server.calls == []


def test_invalid_options_are_rejected() -> None:
    server = ModelServer()
    for kwargs in (
        {"linger": -1},
        {"max_batch_bytes": 0},
        {"max_batch_items": 0},
        {"max_in_flight": 0},
    ):
        with pytest.raises(ValueError, match="must be"):
            IdempotentProducer(server, "p", **kwargs)  # type: ignore[arg-type]


async def test_restart_bumps_the_epoch_past_the_fence_and_recovers() -> None:
    server = ModelServer()
    server.producers["p"] = (4, 0)  # a newer instance took over
    producer = IdempotentProducer(server, "p", epoch=1, linger=0)
    producer.append(b"zombie")
    with pytest.raises(StaleEpoch):
        await producer.flush()
    assert producer.restart() == 5
    assert producer.error is None
    producer.append(b"back")
    await producer.detach()
    assert server.log == [b"back"]
    assert server.producers["p"] == (5, 0)


async def test_restart_needs_an_idle_producer() -> None:
    server = ModelServer()
    producer = IdempotentProducer(server, "p", linger=10)
    producer.append(b"queued")
    with pytest.raises(ValueError, match="flush"):
        producer.restart()
    await producer.flush()
    assert producer.restart() == 1
    await producer.detach()
    with pytest.raises(ClientClosed):
        producer.restart()
