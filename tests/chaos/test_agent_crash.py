"""No stuck turn, with real processes: kill -9 the agent host mid-reply, partition it,
freeze a reader, race twenty readers to end one reply (issue 18).

tests/client/test_leases.py plays a dead agent by writing what it would have
left; here the agent host is the real thing (``python -m tui_demo.agents``),
killed with SIGKILL by its pid at a point a seed picks, and the subscribers
are SDK sessions over WebSocket, SSE and long-poll, each with the default
reader watchdog (``leases="end"``).

- :func:`test_kill_9_mid_reply`: per seed, kill the host after the k-th
  ``text_delta`` a chosen subscriber saw; then either restart it with the
  same ``--state-dir`` (it adopts the reply and completes it) or not (the
  subscribers' watchdogs end it ``abandoned``). Every subscriber sees one
  end, no text after it, and the text the log holds. A failure names its
  seed; ``AGENT_CRASH_SEED=<n>`` replays that seed alone, and
  ``AGENT_CRASH_SEEDS=1000`` is the soak (docs/chaos.md).
- :func:`test_a_restart_racing_the_watchdog_gives_one_outcome`: a restart
  against the short lease: adopted or abandoned, one outcome either way.
- :func:`test_a_partitioned_host_is_ended_and_fenced_when_it_returns`: the
  host behind a chaos proxy is cut off mid-reply for longer than its lease
  (its connections cut, or silently dead); the subscribers end the reply,
  and once the network is back the host's retried writes are refused:
  nothing lands after the end, and the host answers the next turn.
- :func:`test_a_frozen_reader_rechecks_the_tail_and_gets_the_end`: a reader
  whose live connection goes half-open right after the reply started still
  gets the end, through its watchdog's re-check and reconnect.
- :func:`test_twenty_watchers_racing_write_one_end`: one end, whoever wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

import httpx
import pytest

from durable_client import (
    Agent,
    AnyEvent,
    Author,
    EndReason,
    ReconnectPolicy,
    ReplyStatus,
    RetryPolicy,
    Session,
    Subscription,
    TextDelta,
    Transcript,
    TurnAdopt,
    TurnEnd,
    TurnStart,
    UserMessage,
)
from durable_client._core.leases import reply_producer_id
from durable_client.transports import HttpTransport
from mock_server.chaos import ChaosProxy
from mock_server.testing import serve
from tests._await import finished
from tui_demo._index import announce
from tui_demo.agents import demo
from tui_demo.agents.host import ASSISTANT

#: The demo agent's pace: its reply (about 140 words, about 35 ``text_delta``
#: at the SDK's 40 ms rollup) takes about 1.4 s.
TOKEN_RATE = 100.0
#: The lease of a host that stays dead: readers end its reply 0.5 s after its last word.
HOST_TTL = 0.5
#: The lease of a host that is restarted. A restart is a new Python process
#: (about 0.35 s of imports on an idle machine, seconds with a dozen seeds on two
#: cores) that must adopt the reply before the readers' watchdogs end it: with
#: 0.5 s the readers win that race on a loaded machine, as they should. So the
#: first host of a restart seed promises the SDK's default, 10 s
#: (test_a_restart_racing_the_watchdog_gives_one_outcome keeps 0.5 s and
#: accepts either outcome).
RESTART_TTL = 10.0
#: Slack on every "the end arrives within" bound: asserted loosely (a loaded
#: machine must not fail it; never waiting forever is the point).
MARGIN = 5.0
#: The kill lands after the k-th delta, k in 1..KILL_MAX: well inside the
#: reply (about 35 deltas), so the host is always killed mid-reply.
KILL_MAX = 12
#: Seeds of the normal run (AGENT_CRASH_SEEDS for a soak), run CONCURRENCY at a
#: time, CHUNK per test (each test stays far below pytest's 120 s timeout).
SEEDS = int(os.environ.get("AGENT_CRASH_SEEDS", "100"))
ONLY = os.environ.get("AGENT_CRASH_SEED")
CONCURRENCY = int(os.environ.get("AGENT_CRASH_CONCURRENCY", "12"))
CHUNK = 50
#: Bounds of single steps (only a failure waits this long).
STEP_TIMEOUT = 30.0

FAST_RECONNECT = ReconnectPolicy(initial_delay=0.01, max_delay=0.1)
FAST_RETRY = RetryPolicy(initial_delay=0.01, max_delay=0.1, max_attempts=5)
ANN = Author.user("ann", "Ann")
BOT = Author.agent("bot", "Bot")
#: A message addressed to no agent: every reader stops once it has read it, so
#: each view holds everything written before it (nothing after an end escapes).
MARKER = "end of test"
NOBODY = ("nobody",)

TransportKind = str  # "websocket", "sse" or "long-poll"


def transport_of(kind: TransportKind) -> Literal["websocket"] | HttpTransport:
    if kind == "websocket":
        return "websocket"
    if kind == "sse":
        return HttpTransport(live="sse")
    return HttpTransport(live="long-poll")


def session_at(
    base: str, session_id: str, author: Author, kind: TransportKind = "websocket"
) -> Session:
    return Session(
        base,
        session_id,
        author=author,
        transport=transport_of(kind),
        retry=FAST_RETRY,
        reconnect=FAST_RECONNECT,
    )


# --- reading ----------------------------------------------------------------------------


@dataclass
class Watcher:
    """One subscriber: its own Session and subscription, and everything it read."""

    name: str
    kind: TransportKind
    session: Session
    subscription: Subscription
    events: list[AnyEvent] = field(default_factory=list)
    #: loop time at which each turn's reply end was read, by turn id.
    ended_at: dict[str, float] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __str__(self) -> str:
        return f"{self.name} ({self.kind})"

    async def read(self, on_event: Callable[[Watcher, AnyEvent], None] | None = None) -> None:
        """Read until the marker message (bounded by the caller)."""
        loop = asyncio.get_running_loop()
        async for event in self.subscription:
            self.events.append(event)
            if isinstance(event, TurnEnd):
                self.ended_at.setdefault(event.turn_id, loop.time())
            if on_event is not None:
                on_event(self, event)
            self.changed.set()
            if isinstance(event, UserMessage) and event.text == MARKER:
                return

    async def wait_end(self, turn_id: str) -> None:
        while turn_id not in self.ended_at:
            self.changed.clear()
            await self.changed.wait()

    @property
    def ended(self) -> int:
        return self.subscription.leases.ended if self.subscription.leases is not None else 0

    @property
    def rechecks(self) -> int:
        return self.subscription.leases.rechecks if self.subscription.leases is not None else 0


async def watchers_on(
    stack: contextlib.AsyncExitStack, url: str, session_id: str, kinds: list[TransportKind]
) -> list[Watcher]:
    watchers = []
    for i, kind in enumerate(kinds):
        name = f"watcher-{i}"
        session = await stack.enter_async_context(
            session_at(url, session_id, Author.user(name), kind)
        )
        subscription = await stack.enter_async_context(session.subscribe("beginning"))
        watchers.append(Watcher(name, kind, session, subscription))
    return watchers


async def whole_log(session: Session) -> list[AnyEvent]:
    """Every event in the session now: a fresh reader, no watchdog."""
    events: list[AnyEvent] = []
    async with session.subscribe("beginning", leases="off") as sub:
        tail = await session._transport.tail()
        async with asyncio.timeout(STEP_TIMEOUT):
            while sub.position is None or sub.position.offset != tail:
                events.append(await anext(sub))
    return events


def ends_of(events: list[AnyEvent], turn_id: str) -> list[TurnEnd]:
    return [e for e in events if isinstance(e, TurnEnd) and e.turn_id == turn_id]


def text_of(events: list[AnyEvent], turn_id: str, author_id: str) -> str:
    turn = Transcript.fold(events).turn(turn_id)
    reply = turn.reply_of(author_id) if turn is not None else None
    return reply.text if reply is not None else ""


async def ask(session: Session, text: str) -> str:
    """Send a user message; its turn id."""
    message = (await session.send_message(text)).event
    assert isinstance(message, UserMessage)
    return message.turn_id


async def all_of(*steps: Awaitable[object], timeout: float = STEP_TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        await asyncio.gather(*steps)


# --- the agent host as a process -----------------------------------------------------------


def _make_dir(path: Path) -> None:
    path.mkdir(parents=True)


def _open_log(path: Path) -> BinaryIO:
    return path.open("wb")


def _read(path: Path) -> str:
    return path.read_text(errors="replace")


async def start_host(
    server_url: str, state_dir: Path, ttl: float, log_file: Path
) -> asyncio.subprocess.Process:
    """``python -m tui_demo.agents`` with its output in ``log_file``."""
    with _open_log(log_file) as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tui_demo.agents",
            "--server",
            server_url,
            "--lease-ttl",
            str(ttl),
            "--token-rate",
            str(TOKEN_RATE),
            "--no-helper",
            "--state-dir",
            str(state_dir),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )


async def stop_host(process: asyncio.subprocess.Process) -> int:
    """Stop a host this test started (SIGTERM by its handle, SIGKILL if it overruns)."""
    if process.returncode is None:
        process.terminate()
    await finished(process, timeout=15)
    assert process.returncode is not None
    return process.returncode


# --- 1. kill -9 at a seeded point -------------------------------------------------------


@dataclass(frozen=True)
class CrashPlan:
    seed: int
    kill_after: int  # kill after the k-th text_delta the trigger watcher read
    restart: bool
    kinds: tuple[TransportKind, ...]
    trigger: int  # which watcher's k-th delta fires the kill
    #: Restart with the short lease: the restart races the watchdogs.
    race: bool = False

    @classmethod
    def of(cls, seed: int, *, race: bool = False) -> CrashPlan:
        rng = random.Random(seed)
        kinds = ["websocket", "websocket", "sse", "long-poll"]
        rng.shuffle(kinds)
        return cls(
            seed=seed,
            kill_after=rng.randint(1, KILL_MAX),
            restart=rng.random() < 0.5 or race,
            kinds=tuple(kinds),
            trigger=rng.randrange(len(kinds)),
            race=race,
        )

    def __str__(self) -> str:
        then = "restart" if self.restart else "no restart"
        if self.race:
            then = f"restart racing a {HOST_TTL} s lease"
        return (
            f"seed {self.seed}: kill after delta {self.kill_after} seen by watcher-"
            f"{self.trigger}, {then}, watchers {'/'.join(self.kinds)} "
            + ("" if self.race else f" (replay: AGENT_CRASH_SEED={self.seed})")
        )

    @property
    def prompt(self) -> str:
        return f"tell me about crash number {self.seed}"


@dataclass
class CrashOutcome:
    plan: CrashPlan
    killed_after_s: float  # from the message to the kill
    end_after_kill_s: float  # the slowest watcher's end, after the kill
    text_at_end: int  # characters of reply text the log holds
    adopted: bool


async def run_crash_seed(plan: CrashPlan, workdir: Path) -> CrashOutcome:
    seed = plan.seed
    _make_dir(workdir)
    state_dir = workdir / "state"
    loop = asyncio.get_running_loop()
    ttl = RESTART_TTL if plan.restart and not plan.race else HOST_TTL
    session_id = f"crash-{seed}"
    hosts: list[asyncio.subprocess.Process] = []
    killed = asyncio.Event()
    kill_at = 0.0
    async with serve() as server, contextlib.AsyncExitStack() as stack:
        user = await stack.enter_async_context(session_at(server.url, session_id, ANN))
        await user.create()
        await announce(server.url, session_id, title=plan.prompt, created_by=ANN.id)
        watchers = await watchers_on(stack, server.url, session_id, list(plan.kinds))
        trigger = watchers[plan.trigger]
        deltas = 0

        def on_event(watcher: Watcher, event: AnyEvent) -> None:
            nonlocal deltas, kill_at
            if watcher is trigger and isinstance(event, TextDelta):
                deltas += 1
                if deltas == plan.kill_after:
                    hosts[0].kill()  # SIGKILL, by the pid of the process this test started
                    kill_at = loop.time()
                    killed.set()

        try:
            hosts.append(await start_host(server.url, state_dir, ttl, workdir / "host-1.log"))
            holder_file = state_dir / "holder"
            reading = [asyncio.ensure_future(w.read(on_event)) for w in watchers]
            stack.push_async_callback(_cancel_all, reading)
            asked_at = loop.time()
            turn_id = await ask(user, plan.prompt)
            await all_of(killed.wait())
            assert await hosts[0].wait() == -9, f"{plan}: the host was not killed by SIGKILL"
            holder = _read(holder_file).strip()
            if plan.restart:
                hosts.append(await start_host(server.url, state_dir, ttl, workdir / "host-2.log"))
            await all_of(*(w.wait_end(turn_id) for w in watchers))
            await user.send_message(MARKER, to=NOBODY)
            await all_of(*reading)
            log = await whole_log(user)
        finally:
            for host in hosts:
                await stop_host(host)
    adopted = check_crash(plan, watchers, log, turn_id, holder, kill_at)
    if plan.restart:
        said = [line for line in _read(workdir / "host-2.log").splitlines() if turn_id in line]
        # The restarted host may say nothing of the turn; if it lost the race it says
        # so: fenced (it tried), or already answered (the watchdogs' end came first).
        assert all(
            "no longer this agent's" in line or "already answered" in line for line in said
        ), f"{plan}: {said}"
    return CrashOutcome(
        plan,
        killed_after_s=kill_at - asked_at,
        end_after_kill_s=max(w.ended_at[turn_id] for w in watchers) - kill_at,
        text_at_end=len(text_of(log, turn_id, ASSISTANT.id)),
        adopted=adopted,
    )


async def _cancel_all(tasks: Sequence[asyncio.Future[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def check_crash(
    plan: CrashPlan,
    watchers: list[Watcher],
    log: list[AnyEvent],
    turn_id: str,
    holder: str,
    kill_at: float,
) -> bool:
    """Everything one seed must show (every message names the seed); whether the
    reply was adopted."""
    logged = ends_of(log, turn_id)
    assert len(logged) == 1, f"{plan}: the log holds {len(logged)} ends: {logged}"
    (end,) = logged
    assert end.reply_author == ASSISTANT.id, f"{plan}: {end}"
    text = text_of(log, turn_id, ASSISTANT.id)
    full = demo.compose_reply(plan.prompt)
    adopts = [e for e in log if isinstance(e, TurnAdopt) and e.turn_id == turn_id]
    # A restart within the lease adopts; racing a short one, either may win.
    adopted = plan.restart and (not plan.race or bool(adopts))
    # Racing a 0.5 s lease, the restarted host may adopt the reply and then itself go
    # quiet for a lease on a loaded machine: the watchers end the adopted reply
    # (generation 2). Still one end, by one watcher, and no text after it.
    relapsed = adopted and plan.race and end.reason is EndReason.ABANDONED
    if relapsed:
        assert end.generation == 2, f"{plan}: adopted, then ended in generation {end.generation}"
        assert end.author.id in {w.name for w in watchers}, f"{plan}: ended by {end.author.id}"
        assert len(adopts) == 1, f"{plan}: {len(adopts)} adoptions in the log"
        assert full.startswith(text), f"{plan}: kept {text!r}"
        bound = HOST_TTL + len(full.split()) / TOKEN_RATE + MARGIN
    elif adopted:
        assert end.reason is EndReason.COMPLETE, f"{plan}: ended {end.reason}: {end.error}"
        assert end.author.id == ASSISTANT.id, f"{plan}: ended by {end.author.id}"
        assert len(adopts) == 1, f"{plan}: {len(adopts)} adoptions in the log"
        assert adopts[0].holder == holder, f"{plan}: adopted by {adopts[0].holder}, not {holder}"
        # The demo continues after exactly the text in the log: the whole reply, once.
        assert text == full, f"{plan}: the adopted reply is not the composed one: {text!r}"
        ttl = HOST_TTL if plan.race else RESTART_TTL
        bound = ttl + len(full.split()) / TOKEN_RATE + MARGIN
    else:
        assert end.reason is EndReason.ABANDONED, f"{plan}: ended {end.reason}: {end.error}"
        assert end.author.id in {w.name for w in watchers}, f"{plan}: ended by {end.author.id}"
        assert not adopts, f"{plan}: adopted, yet ended abandoned: {adopts}"
        assert text, f"{plan}: no text kept"
        assert full.startswith(text), f"{plan}: kept {text!r}"
        assert text != full, f"{plan}: the host finished before the kill"
        bound = HOST_TTL + MARGIN
    enders = [w.name for w in watchers if w.ended]
    expected_enders = [] if adopted and not relapsed else [end.author.id]
    assert enders == expected_enders, f"{plan}: ended by the watchdogs of {enders}"
    for w in watchers:
        seen = ends_of(w.events, turn_id)
        assert [e.event_id for e in seen] == [end.event_id], f"{plan}: {w} saw ends {seen}"
        after = w.events[w.events.index(seen[0]) + 1 :]
        late = [e for e in after if isinstance(e, TextDelta) and e.turn_id == turn_id]
        assert not late, f"{plan}: {w} read text after the end: {late}"
        before = w.events[: w.events.index(seen[0])]
        adoption = [e for e in before if isinstance(e, TurnAdopt) and e.turn_id == turn_id]
        assert len(adoption) == (1 if adopted else 0), f"{plan}: {w} saw {adoption}"
        reply = Transcript.fold(w.events).turn(turn_id).reply_of(ASSISTANT.id)  # type: ignore[union-attr]
        assert reply is not None, f"{plan}: {w} folded no reply"
        assert reply.text == text, f"{plan}: {w} folded {reply.text!r}, the log holds {text!r}"
        status = ReplyStatus.COMPLETE if adopted and not relapsed else ReplyStatus.ABANDONED
        assert reply.status is status, f"{plan}: {w} folded {reply.status}"
        assert reply.adoptions == len(adoption), f"{plan}: {w} folded {reply.adoptions} adoptions"
        took = w.ended_at[turn_id] - kill_at
        assert took < bound, f"{plan}: {w} read the end {took:.2f} s after the kill (> {bound})"
    return adopted


def crash_seeds() -> list[int]:
    return [int(ONLY)] if ONLY is not None else list(range(SEEDS))


def crash_chunks() -> list[list[int]]:
    seeds = crash_seeds()
    return [seeds[i : i + CHUNK] for i in range(0, len(seeds), CHUNK)]


async def run_crash_plans(
    plans: list[CrashPlan], workdir: Path, concurrency: int = CONCURRENCY
) -> list[CrashOutcome]:
    """Run ``plans``, ``concurrency`` at a time; fail naming every failed seed."""
    gate = asyncio.Semaphore(concurrency)

    async def one(plan: CrashPlan) -> CrashOutcome | str:
        async with gate:
            try:
                return await run_crash_seed(plan, workdir / f"seed-{plan.seed}")
            except Exception as exc:  # a check, a hang, a crash of the test: name the seed
                said = str(exc)
                return said if said.startswith(f"{plan}") else f"{plan}: {exc!r}"

    results = await asyncio.gather(*(one(plan) for plan in plans))
    failures = [r for r in results if isinstance(r, str)]
    outcomes = [r for r in results if isinstance(r, CrashOutcome)]
    print(f"\n{len(outcomes)}/{len(plans)} seeds passed")
    for adopted, kind in ((True, "restarted, adopted, complete"), (False, "abandoned")):
        some = [o for o in outcomes if o.adopted is adopted]
        if some:
            slowest = max(o.end_after_kill_s for o in some)
            kept = sorted(o.text_at_end for o in some)
            print(
                f"  {len(some)} {kind}: end read by every watcher at most {slowest:.2f} s "
                f"after the kill; kill {min(o.killed_after_s for o in some):.2f}-"
                f"{max(o.killed_after_s for o in some):.2f} s after the message; "
                f"reply text in the log {kept[0]}-{kept[-1]} chars"
            )
    assert not failures, f"{len(failures)} of {len(plans)} seeds failed:\n" + "\n".join(failures)
    return outcomes


@pytest.mark.parametrize(
    "seeds", crash_chunks(), ids=lambda s: f"seeds{s[0]}-{s[-1]}" if s else "none"
)
async def test_kill_9_mid_reply(seeds: list[int], tmp_path: Path) -> None:
    """kill -9 of the host at a seeded point: adopted and completed after a restart,
    ended abandoned by the watchers otherwise; one end, no late text, the log's text."""
    await run_crash_plans([CrashPlan.of(seed) for seed in seeds], tmp_path)


async def test_a_restart_racing_the_watchdog_gives_one_outcome(tmp_path: Path) -> None:
    """Restarted with the 0.5 s lease, the host races the watchers' watchdogs: whichever
    takes the lease's next slot first decides, adopted and complete or abandoned, and
    the loser writes nothing (a host that lost says so, if it says anything)."""
    plans = [CrashPlan.of(seed, race=True) for seed in range(1000, 1008)]
    # Four at a time: on two cores a restart then takes about the lease (alone it
    # adopts every time, eight at a time it never does): a real race.
    outcomes = await run_crash_plans(plans, tmp_path, concurrency=4)
    assert len(outcomes) == len(plans)


# --- 2. a partition past the lease ------------------------------------------------------


@pytest.mark.parametrize(("mode", "seed"), [("cut", 0), ("cut", 1), ("cut", 2), ("silent", 0)])
async def test_a_partitioned_host_is_ended_and_fenced_when_it_returns(
    mode: str, seed: int, tmp_path: Path
) -> None:
    """The host reaches the server through a chaos proxy; the watchers do not. Cut off
    mid-reply for longer than its lease, its reply is ended abandoned; back online,
    its retried writes are refused (a stale epoch), it stands down and answers the
    next turn: one end, no text after it.

    ``cut``: the host's connections end and new ones are refused (it knows at once).
    ``silent``: they stay open and carry nothing, as behind a dead NAT, and new ones
    are refused; after the partition they stay dead, so the host finds out by its
    own keepalive (the WebSocket ping: about 10 s)."""
    rng = random.Random(seed)
    kill_after = rng.randint(1, KILL_MAX)
    kinds: list[TransportKind] = ["websocket", "sse", "long-poll", "websocket"]
    rng.shuffle(kinds)
    tag = f"{mode} partition seed {seed} (after delta {kill_after}, watchers {'/'.join(kinds)})"
    cut = asyncio.Event()
    async with (
        serve() as server,
        ChaosProxy(server.url) as proxy,
        contextlib.AsyncExitStack() as stack,
    ):
        session_id = f"partition-{seed}"
        user = await stack.enter_async_context(session_at(server.url, session_id, ANN))
        await user.create()
        await announce(server.url, session_id, title="partition", created_by=ANN.id)
        watchers = await watchers_on(stack, server.url, session_id, kinds)
        deltas = 0

        def on_event(watcher: Watcher, event: AnyEvent) -> None:
            nonlocal deltas
            if watcher is watchers[0] and isinstance(event, TextDelta) and not cut.is_set():
                deltas += 1
                if deltas == kill_after:
                    # At this exact point nothing more gets through, either way.
                    proxy.freeze_all()
                    cut.set()

        host = await start_host(proxy.url, tmp_path / "state", HOST_TTL, tmp_path / "host.log")
        try:
            reading = [asyncio.ensure_future(w.read(on_event)) for w in watchers]
            stack.push_async_callback(_cancel_all, reading)
            turn_id = await ask(user, "tell me about partitions")
            await all_of(cut.wait())
            if mode == "cut":
                await proxy.offline()  # new connections are refused, the frozen ones end
            else:
                await proxy.down(reset_open=False)  # refused; the frozen ones stay frozen
            loop = asyncio.get_running_loop()
            cut_at = loop.time()
            await all_of(*(w.wait_end(turn_id) for w in watchers))
            assert max(w.ended_at[turn_id] for w in watchers) - cut_at < HOST_TTL + MARGIN, tag
            assert host.returncode is None, f"{tag}: the host died"
            await proxy.online()
            # The host is back: it learns its reply was ended (its writes of the old
            # lease are refused), stands down, and answers the next turn.
            second = await ask(user, "and after the partition?")
            await all_of(*(w.wait_end(second) for w in watchers))
            await user.send_message(MARKER, to=NOBODY)
            await all_of(*reading)
            log = await whole_log(user)
        finally:
            code = await stop_host(host)
    output = _read(tmp_path / "host.log")
    assert code == 0, f"{tag}: the host exited {code}:\n{output}"
    (end,) = ends_of(log, turn_id)
    assert end.reason is EndReason.ABANDONED, f"{tag}: {end}"
    assert end.author.id in {w.name for w in watchers}, f"{tag}: {end}"
    assert sum(w.ended for w in watchers) == 1, tag
    text = text_of(log, turn_id, ASSISTANT.id)
    after = log[log.index(end) + 1 :]
    late = [e for e in after if isinstance(e, TextDelta) and e.turn_id == turn_id]
    assert not late, f"{tag}: the fenced host's text landed after the end: {late}"
    (answered,) = ends_of(log, second)
    assert answered.reason is EndReason.COMPLETE, f"{tag}: {answered}"
    assert text_of(log, second, ASSISTANT.id) == demo.compose_reply("and after the partition?")
    for w in watchers:
        assert [e.event_id for e in ends_of(w.events, turn_id)] == [end.event_id], f"{tag}: {w}"
        assert text_of(w.events, turn_id, ASSISTANT.id) == text, f"{tag}: {w}"
    assert proxy.connections, tag
    fenced = [line for line in output.splitlines() if turn_id in line]
    # The host may say nothing about it; whatever it says about that turn says it was fenced.
    assert all("no longer this agent's" in line for line in fenced), f"{tag}: {fenced}"


# --- 3. a reader whose live connection froze ---------------------------------------------


@pytest.mark.parametrize(
    ("kind", "opened"),
    [
        ("websocket", False),
        ("sse", False),
        ("long-poll", False),
        # The session was created first, so that PUT's keep-alive connection sits in
        # httpx's pool, frozen with the socket: the tail check must not hang on it.
        pytest.param("websocket", True, id="websocket-created-first"),
        ("sse", True),
        ("long-poll", True),
    ],
)
async def test_a_frozen_reader_rechecks_the_tail_and_gets_the_end(
    kind: TransportKind, opened: bool
) -> None:
    """The reader's live connection goes half-open right after it read the reply's
    start: everything after reaches it only because its watchdog, once the lease
    ran out on its side, asked the server for the tail, found it behind and
    reconnected. It ends nothing (the agent is alive)."""
    ttl = 0.5
    froze = asyncio.Event()
    async with (
        serve() as server,
        ChaosProxy(server.url) as proxy,
        contextlib.AsyncExitStack() as stack,
    ):
        session_id = f"frozen-{kind}"
        user = await stack.enter_async_context(session_at(server.url, session_id, ANN))
        await user.create()
        # The frozen reader is a terminal that opened the session first (create: an
        # HTTP connection it may keep alive), then subscribed: both through the proxy.
        frozen_session = await stack.enter_async_context(
            session_at(proxy.url, session_id, Author.user("frozen"), kind)
        )
        if opened:
            await frozen_session.create()
        frozen = Watcher(
            "frozen",
            kind,
            frozen_session,
            await stack.enter_async_context(frozen_session.subscribe("beginning")),
        )
        (direct,) = await watchers_on(stack, server.url, session_id, [kind])

        def on_event(watcher: Watcher, event: AnyEvent) -> None:
            if isinstance(event, TurnStart) and not froze.is_set():
                proxy.freeze_all()
                froze.set()

        bot = await stack.enter_async_context(session_at(server.url, session_id, BOT))
        agent = await stack.enter_async_context(Agent(bot, lease_ttl=ttl))

        async def answer() -> None:
            async for turn in agent.turns():
                async with agent.reply(turn) as reply:
                    await froze.wait()
                    for word in ("all ", "of ", "this ", "after ", "the ", "freeze"):
                        await reply.write(word)
                return

        answering = asyncio.ensure_future(answer())
        stack.push_async_callback(_cancel_all, [answering])
        reading = [
            asyncio.ensure_future(frozen.read(on_event)),
            asyncio.ensure_future(direct.read()),
        ]
        stack.push_async_callback(_cancel_all, reading)
        turn_id = await ask(user, "hello")
        await all_of(answering)
        await all_of(direct.wait_end(turn_id))
        direct_end_at = direct.ended_at[turn_id]
        with contextlib.suppress(TimeoutError):
            await all_of(frozen.wait_end(turn_id), timeout=ttl + MARGIN)
        assert turn_id in frozen.ended_at, (
            f"{kind}: the frozen reader has no end {ttl + MARGIN} s after the live one read"
            f" it (watchdog re-checks: {frozen.rechecks})"
        )
        took = frozen.ended_at[turn_id] - direct_end_at
        await user.send_message(MARKER, to=NOBODY)
        await all_of(*reading)
        log = await whole_log(user)
        assert froze.is_set()
        assert any("freeze_all" in c.faults for c in proxy.connections)
    (end,) = ends_of(log, turn_id)
    assert end.reason is EndReason.COMPLETE, end
    assert end.author.id == BOT.id, end
    assert frozen.rechecks >= 1, f"{kind}: the watchdog never re-checked"
    assert frozen.ended == 0
    assert direct.ended == 0
    text = text_of(log, turn_id, BOT.id)
    assert text == "all of this after the freeze"
    for w in (frozen, direct):
        assert [e.event_id for e in ends_of(w.events, turn_id)] == [end.event_id], w
        assert text_of(w.events, turn_id, BOT.id) == text, w
    assert took < ttl + MARGIN, f"{kind}: the frozen reader got the end {took:.2f} s late"


# --- 4. twenty watchers racing -----------------------------------------------------------


async def raw_append(url: str, turn_id: str, seq: int, event: AnyEvent) -> int:
    """Append as the bot's reply producer (lease generation 0) would."""
    headers = {
        "Producer-Id": reply_producer_id(turn_id, BOT.id),
        "Producer-Epoch": "0",
        "Producer-Seq": str(seq),
    }
    async with httpx.AsyncClient() as http:
        answer = await http.post(url, json=[event.to_json()], headers=headers)
    return answer.status_code


@pytest.mark.parametrize("seed", range(10))
async def test_twenty_watchers_racing_write_one_end(seed: int) -> None:
    """A dead agent's reply (what a kill -9 leaves, written by hand so all twenty
    watchers read its last word within milliseconds and lapse together): twenty
    Sessions over WebSocket, SSE and long-poll race to end it; one end is written,
    every watcher reads that one, and one watchdog counts it as its own."""
    rng = random.Random(seed)
    kinds: list[TransportKind] = [("websocket", "sse", "long-poll")[i % 3] for i in range(20)]
    rng.shuffle(kinds)
    words = [f"w{i} " for i in range(rng.randint(1, 6))]
    tag = f"race seed {seed} ({len(words)} words, watchers {'/'.join(kinds)})"
    async with serve() as server, contextlib.AsyncExitStack() as stack:
        session_id = f"race-{seed}"
        user = await stack.enter_async_context(session_at(server.url, session_id, ANN))
        await user.create()
        watchers = await watchers_on(stack, server.url, session_id, kinds)
        reading = [asyncio.ensure_future(w.read()) for w in watchers]
        stack.push_async_callback(_cancel_all, reading)
        turn_id = await ask(user, "hello")
        start = TurnStart(author=BOT, turn_id=turn_id, lease_ttl=0.3, holder="dead-host")
        assert await raw_append(user.url, turn_id, 0, start) == 200
        for seq, word in enumerate(words, 1):
            delta = TextDelta(author=BOT, turn_id=turn_id, text=word)
            assert await raw_append(user.url, turn_id, seq, delta) == 200
        await all_of(*(w.wait_end(turn_id) for w in watchers))
        await user.send_message(MARKER, to=NOBODY)
        await all_of(*reading)
        log = await whole_log(user)
    (end,) = ends_of(log, turn_id)
    assert end.reason is EndReason.ABANDONED, f"{tag}: {end}"
    assert end.generation == 1, f"{tag}: {end}"
    winners = [w.name for w in watchers if w.ended]
    assert winners == [end.author.id], f"{tag}: ended by {winners}, the log says {end.author.id}"
    for w in watchers:
        assert w.ended <= 1, f"{tag}: {w} ended {w.ended}"
        assert [e.event_id for e in ends_of(w.events, turn_id)] == [end.event_id], f"{tag}: {w}"
        assert text_of(w.events, turn_id, BOT.id) == "".join(words), f"{tag}: {w}"
