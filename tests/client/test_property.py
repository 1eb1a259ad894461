"""A property test of "acknowledged means in the log": seeded random sequences of
publishes, producer restarts (same id, new id), retries under dropped
connections, delete-and-recreate, and resumes from a saved position, checked
against a model of what the log must hold and what each resume must deliver.

Each seed's plan is printed on failure; rerun one with
``pytest tests/client/test_property.py -k "seed-17"``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from durable_client import (
    AnyEvent,
    Author,
    FileOffsetStore,
    ReconnectPolicy,
    RetryPolicy,
    Session,
    StreamReplaced,
    UserMessage,
    new_id,
)
from durable_client.streams import DurableStream
from mock_server.chaos import HistoryRecorder

pytestmark = pytest.mark.both_transports

SEEDS = range(12)
STEPS = 12
FAST_RECONNECT = ReconnectPolicy(initial_delay=0.01, max_delay=0.05, offline_after=3)
FAST_RETRY = RetryPolicy(initial_delay=0.01, max_delay=0.05, max_attempts=4)
ADA = Author.user("ada")
OPS = ("publish", "publish", "retry", "restart-same-id", "restart-new-id", "recreate", "resume")


def session_at(base: str, session_id: str, **kwargs: object) -> Session:
    return Session(
        base,
        session_id,
        author=ADA,
        retry=FAST_RETRY,
        reconnect=FAST_RECONNECT,
        **kwargs,  # type: ignore[arg-type]
    )


class Model:
    """What must be in the log now, and what the resuming reader has seen."""

    def __init__(self) -> None:
        self.log: list[str] = []  # event ids of the current incarnation, in order
        self.generation = 0  # how many times the stream was re-created
        self.reader_seen = 0  # events of the reader's generation it has taken
        self.reader_generation: int | None = None  # None: no saved position


async def _publish(session: Session, model: Model, count: int, *, drop: bool) -> None:
    events = [
        UserMessage(author=ADA, text=f"m{len(model.log) + i}", turn_id=new_id())
        for i in range(count)
    ]
    pending = [session.publish_nowait(event) for event in events]
    if drop:
        await asyncio.sleep(0)  # let the first request leave, then cut it
        session.drop_connections()
    acks = await asyncio.wait_for(asyncio.gather(*pending), 15)
    for ack in acks:
        assert not ack.duplicate, "a new event is never acknowledged as a duplicate"
    model.log.extend(event.event_id for event in events)


async def _resume(base: str, session_id: str, store: FileOffsetStore, model: Model) -> None:
    async with session_at(base, session_id) as reader:
        subscription = reader.subscribe("beginning", offset_store=store, consumer="reader")
        async with subscription:
            if model.reader_generation is not None and model.reader_generation != model.generation:
                with pytest.raises(StreamReplaced):
                    async with asyncio.timeout(10):
                        await subscription.__anext__()
                await store.delete(subscription.key)
                model.reader_generation, model.reader_seen = None, 0
                return
            expected = model.log[model.reader_seen :]
            got: list[AnyEvent] = []
            async with asyncio.timeout(10):
                while len(got) < len(expected):
                    got.append(await subscription.__anext__())
            assert [e.event_id for e in got] == expected, "a resume skips and repeats nothing"
            model.reader_generation, model.reader_seen = model.generation, len(model.log)


async def _read_all(base: str, session_id: str) -> list[str]:
    ids: list[str] = []
    async with session_at(base, session_id, transport="http") as reader:
        subscription = reader.subscribe("beginning")
        async with subscription, asyncio.timeout(10):
            await subscription.start()
            if not await _empty(reader):
                async for event in subscription:
                    ids.append(event.event_id)
                    if subscription.caught_up.is_set():
                        break
    return ids


async def _empty(session: Session) -> bool:
    async with DurableStream(session.url) as stream:
        return not (await stream.read()).messages


@pytest.mark.ours_only  # re-creation is invisible on the Node server (no incarnation)
@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed-{s}")
async def test_random_histories_keep_every_acknowledged_event(
    server_url: str,
    seed: int,
    tmp_path: Path,
    unique: Callable[[str], str],
) -> None:
    rng = random.Random(seed)
    plan = [rng.choice(OPS) for _ in range(STEPS)] + ["resume"]
    session_id = unique(f"prop{seed}")
    store = FileOffsetStore(tmp_path / "offsets")
    model = Model()
    done: list[str] = []
    publisher = session_at(server_url, session_id, producer_id="stable-writer")
    try:
        await publisher.create()
        for op in plan:
            if op in ("publish", "retry"):
                await _publish(publisher, model, rng.randint(1, 8), drop=op == "retry")
            elif op == "restart-same-id":
                await publisher.aclose()
                publisher = session_at(server_url, session_id, producer_id="stable-writer")
            elif op == "restart-new-id":
                await publisher.aclose()
                publisher = session_at(server_url, session_id)
            elif op == "recreate":
                await publisher.aclose()
                async with DurableStream(publisher.url) as stream:
                    await stream.delete()
                publisher = session_at(server_url, session_id, producer_id="stable-writer")
                assert await publisher.create() is True
                model.log, model.generation = [], model.generation + 1
            else:
                await _resume(server_url, session_id, store, model)
            done.append(op)
    except BaseException as exc:
        raise AssertionError(f"seed {seed}: failed at step {len(done)} of {plan}") from exc
    finally:
        await publisher.aclose()
    history = HistoryRecorder()
    for event_id in model.log:
        history.published(event_id)
    for event_id in await _read_all(server_url, session_id):
        history.seen("log", event_id)
    report = history.check()
    assert report.ok, f"seed {seed}, plan {plan}:\n{report}"
