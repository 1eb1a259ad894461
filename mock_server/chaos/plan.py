"""Fault plans: which fault lands where, as data.

A :class:`FaultPlan` is a seed and a list of :class:`Rule` objects, each a
(trigger, fault, count) triple. Every fault belongs to one layer:

- **proxy** faults are byte-level and applied by :class:`~mock_server.chaos.ChaosProxy`,
  a TCP proxy that can stand in front of any server: ``reset``, ``fin``,
  ``half_open``, ``latency``, ``bandwidth``, ``slicer``, ``down``;
- **server** faults are application-level and applied by
  :class:`~mock_server.chaos.ServerFaults`, a middleware around this
  project's server: ``http_error``, ``drop``, ``stall``, ``delay``,
  ``lost_ack``, ``duplicate``, ``trim``, ``ws_close``, ``crash``.

Triggers say when a rule fires. ``always`` and ``probability`` work on both
layers; ``connection`` and ``after_bytes`` on the proxy; ``request``,
``resume``, ``after_event`` and ``at_offset`` on the server. A rule fires at
most ``count`` times (``None``: every time its trigger matches).

Randomness never comes from Python's global generator: every random choice
uses a ``random.Random`` seeded by :func:`derive_seed` from the plan's seed
and the place it is made (layer, rule, stream or connection number), so a
seed replays the same faults at the same points.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "AfterBytes",
    "AfterEvent",
    "Always",
    "AtOffset",
    "Bandwidth",
    "Crash",
    "Delay",
    "Down",
    "Drop",
    "Duplicate",
    "Fault",
    "FaultPlan",
    "Fin",
    "Firings",
    "HalfOpen",
    "HttpError",
    "Latency",
    "Layer",
    "LostAck",
    "Match",
    "OnConnection",
    "OnRequest",
    "OnResume",
    "Probability",
    "Reset",
    "Rule",
    "Slicer",
    "Stall",
    "Trigger",
    "Trim",
    "derive_seed",
    "rng_for",
]

Layer = Literal["proxy", "server"]
Direction = Literal["down", "up"]
"""``down``: server to client; ``up``: client to server."""


def derive_seed(seed: int, *parts: str | int) -> int:
    """A 64-bit seed for one place in a run: SHA-256 of the seed and ``parts``.

    ``derive_seed(7, "proxy", 3)`` is the same on every machine and every run,
    and unrelated to ``derive_seed(7, "proxy", 4)``.
    """
    text = ":".join([str(seed), *(str(part) for part in parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def rng_for(seed: int, *parts: str | int) -> random.Random:
    """A private generator for one place in a run (see :func:`derive_seed`)."""
    return random.Random(derive_seed(seed, *parts))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------- triggers


class Always(_Model):
    """Every connection (proxy) or every matching request (server)."""

    kind: Literal["always"] = "always"


class OnConnection(_Model):
    """The proxy's ``k``-th accepted connection (1-based), and the following
    ones while the rule's count lasts; with ``every``, only every
    ``every``-th from the ``k``-th on (k, k + every, ...)."""

    kind: Literal["connection"] = "connection"
    k: int = Field(ge=1)
    every: int | None = Field(default=None, ge=1)

    def hits(self, number: int) -> bool:
        """Whether the ``number``-th connection matches (before the rule's count)."""
        return number >= self.k and (self.every is None or (number - self.k) % self.every == 0)


class AfterBytes(_Model):
    """Exactly after byte ``bytes`` of a proxied connection in ``direction``.

    The proxy forwards ``bytes`` bytes and then applies the fault, so
    ``reset`` or ``fin`` cut mid-frame or mid-SSE-event wherever that lands.
    Counted per connection; each connection that reaches it fires once.
    """

    kind: Literal["after_bytes"] = "after_bytes"
    bytes: int = Field(ge=0)
    direction: Direction = "down"


class OnRequest(_Model):
    """The ``k``-th request that matches the rule (1-based), and the
    following ones while the rule's count lasts; with ``every``, only every
    ``every``-th from the ``k``-th on (``k=1, every=2``: the 1st, 3rd, 5th, ...)."""

    kind: Literal["request"] = "request"
    k: int = Field(ge=1)
    every: int | None = Field(default=None, ge=1)

    def hits(self, number: int) -> bool:
        """Whether the ``number``-th matching request matches (before the rule's count)."""
        return number >= self.k and (self.every is None or (number - self.k) % self.every == 0)


class OnResume(_Model):
    """A read that resumes: its ``offset`` is a real offset, not ``-1`` or ``now``."""

    kind: Literal["resume"] = "resume"


class AfterEvent(_Model):
    """Right after the stream's ``n``-th event (1-based; ``0``: before the first).

    Events are JSON messages on a JSON stream and appends on other streams.
    On a read, the response is cut right after event ``n``: the client has
    received exactly events 1..n. On SSE the batch that holds event ``n`` is
    split so that it ends there, followed by the control event carrying the
    offset after event ``n`` unless ``control`` is false (then the client has
    the events but not the offset to resume from). When event ``n`` is inside
    a multi-message append no offset follows it, so no control event is sent.
    On an append (``lost_ack``, ``crash``) it is the append that makes event
    ``n`` exist.
    """

    kind: Literal["after_event"] = "after_event"
    n: int = Field(ge=0)
    control: bool = True


class AtOffset(_Model):
    """At an offset of this server (``<incarnation>_0000000000000042``): a
    read is cut right after the first append that ends at or past it; an append
    that reaches it fires ``lost_ack`` or ``crash``. Only the position counts:
    a plan is often written before its stream exists, so any incarnation
    (e.g. ``0000000000000000``) will do."""

    kind: Literal["at_offset"] = "at_offset"
    offset: str

    @model_validator(mode="after")
    def _parse(self) -> AtOffset:
        from .._offsets import InvalidOffset, parse_offset

        try:
            parse_offset(self.offset)
        except InvalidOffset as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def position(self) -> int:
        from .._offsets import parse_offset

        return parse_offset(self.offset)[1]


class Probability(_Model):
    """Each connection (proxy) or matching request (server) with probability ``p``,
    drawn from a generator derived from the plan's seed and the connection
    number (proxy) or the stream path and request number (server)."""

    kind: Literal["probability"] = "probability"
    p: float = Field(ge=0.0, le=1.0)


Trigger = Annotated[
    Always | OnConnection | AfterBytes | OnRequest | OnResume | AfterEvent | AtOffset | Probability,
    Field(discriminator="kind"),
]

_PROXY_TRIGGERS = {"always", "connection", "after_bytes", "probability"}
_SERVER_TRIGGERS = {"always", "request", "resume", "after_event", "at_offset", "probability"}
_POSITION_TRIGGERS = {"after_event", "at_offset"}

# ---------------------------------------------------------------------- proxy faults


class Reset(_Model):
    """TCP reset: RST to both peers (``SO_LINGER`` 0, then abort)."""

    kind: Literal["reset"] = "reset"


class Fin(_Model):
    """Close both sockets with a FIN, without any application-level goodbye
    (no WebSocket close frame: the client sees an abnormal 1006 closure)."""

    kind: Literal["fin"] = "fin"


class HalfOpen(_Model):
    """Stop forwarding both ways but keep the sockets open: a blackholed peer.

    Bytes from the client are read and dropped, so its writes succeed; only
    the client's own timeouts (read timeout, pings) can notice.
    """

    kind: Literal["half_open"] = "half_open"


class Latency(_Model):
    """Delay each chunk by ``ms`` plus or minus up to ``jitter_ms`` (order kept)."""

    kind: Literal["latency"] = "latency"
    ms: float = Field(ge=0)
    jitter_ms: float = Field(default=0, ge=0)
    direction: Direction | Literal["both"] = "down"


class Bandwidth(_Model):
    """Cap the throughput at ``bytes_per_second``."""

    kind: Literal["bandwidth"] = "bandwidth"
    bytes_per_second: int = Field(ge=1)
    direction: Direction | Literal["both"] = "down"


class Slicer(_Model):
    """Split data into small writes of ``average_size`` plus or minus
    ``size_variation`` bytes, ``delay_ms`` apart (fragmented TCP)."""

    kind: Literal["slicer"] = "slicer"
    average_size: int = Field(default=8, ge=1)
    size_variation: int = Field(default=4, ge=0)
    delay_ms: float = Field(default=0, ge=0)
    direction: Direction | Literal["both"] = "down"


class Down(_Model):
    """Refuse connections for ``duration_ms``: the proxy stops listening (clients
    get ECONNREFUSED) and resets its open connections, then listens again on
    the same port."""

    kind: Literal["down"] = "down"
    duration_ms: float = Field(ge=0)
    reset_open: bool = True


# ---------------------------------------------------------------------- server faults


class HttpError(_Model):
    """Answer with ``status`` (429, 503, ...) and ``Retry-After`` instead of
    serving the request; nothing changes on the server."""

    kind: Literal["http_error"] = "http_error"
    status: int = Field(default=503, ge=400, le=599)
    retry_after: int | None = Field(default=1, ge=0)
    message: str = "injected by the chaos plan"


class Drop(_Model):
    """Drop the connection: before the request is served (request triggers) or
    at the trigger's point in the response (``after_event``, ``at_offset``).

    ``how``: ``reset`` (TCP RST), ``fin`` (close without finishing the
    response), or ``end`` (finish the response cleanly at that point, as a
    server ending an SSE response early does; a non-SSE read gets a complete,
    shorter response and ``Connection: close``).
    """

    kind: Literal["drop"] = "drop"
    how: Literal["reset", "fin", "end"] = "reset"


class Stall(_Model):
    """Stop answering (server-side half-open): nothing more is sent, the
    connection stays open until the client gives up or the server stops."""

    kind: Literal["stall"] = "stall"


class Delay(_Model):
    """Hold the request for ``ms`` plus or minus ``jitter_ms`` before serving it."""

    kind: Literal["delay"] = "delay"
    ms: float = Field(ge=0)
    jitter_ms: float = Field(default=0, ge=0)


class LostAck(_Model):
    """Serve the request (an append commits), then drop the connection
    without sending the response: the client never learns it succeeded."""

    kind: Literal["lost_ack"] = "lost_ack"
    how: Literal["reset", "fin"] = "reset"


class Duplicate(_Model):
    """Serve a read from ``rewind`` appends before the offset it asked for,
    so the client gets events it already has (duplicate delivery)."""

    kind: Literal["duplicate"] = "duplicate"
    rewind: int = Field(default=1, ge=1)


class Trim(_Model):
    """Retention: before serving the request, drop all but the last
    ``keep_last`` appends of its stream (``StreamStore.trim``). A reader
    whose offset falls below must get ``410``, never a silent gap."""

    kind: Literal["trim"] = "trim"
    keep_last: int = Field(default=0, ge=0)


class WsClose(_Model):
    """Close a WebSocket (``/v1/ws``) with ``code`` and ``reason``: right after
    the handshake (request triggers) or right after event *N* (``after_event``,
    ``at_offset``). Use ``drop`` for a close without a close frame (1006)."""

    kind: Literal["ws_close"] = "ws_close"
    code: int = Field(default=1012, ge=1000, le=4999)
    reason: str = ""


class Crash(_Model):
    """``kill -9`` the server process at the trigger's point (after the
    append committed, before its response). Only for a server in its own
    process (``python -m mock_server --chaos``, or :class:`CrashHarness`,
    which restarts it on the same port and data directory)."""

    kind: Literal["crash"] = "crash"


Fault = Annotated[
    Reset
    | Fin
    | HalfOpen
    | Latency
    | Bandwidth
    | Slicer
    | Down
    | HttpError
    | Drop
    | Stall
    | Delay
    | LostAck
    | Duplicate
    | Trim
    | WsClose
    | Crash,
    Field(discriminator="kind"),
]

PROXY_FAULTS = frozenset({"reset", "fin", "half_open", "latency", "bandwidth", "slicer", "down"})
SERVER_FAULTS = frozenset(
    {"http_error", "drop", "stall", "delay", "lost_ack", "duplicate", "trim", "ws_close", "crash"}
)
# Faults that can land at a point inside a response or an append.
_POSITION_FAULTS = {"drop", "stall", "lost_ack", "ws_close", "crash"}


class Match(_Model):
    """Which requests a server rule applies to (all given fields must match).

    A WebSocket connection is a request with method ``WEBSOCKET``.
    """

    method: str | None = None
    path: str | None = Field(
        default=None, description="a glob on the URL path, e.g. /v1/stream/chat-*"
    )
    live: Literal["sse", "long-poll", "catch-up"] | None = Field(
        default=None, description="reads only: the read mode"
    )


class Rule(_Model):
    """One (trigger, fault) pair that fires at most ``count`` times (``None``: unlimited)."""

    trigger: Trigger
    fault: Fault
    count: int | None = Field(default=1, ge=1)
    match: Match | None = None
    name: str | None = None

    @property
    def layer(self) -> Layer:
        return "proxy" if self.fault.kind in PROXY_FAULTS else "server"

    @property
    def positional(self) -> bool:
        """Whether the rule lands at a point inside a response or an append."""
        return self.trigger.kind in _POSITION_TRIGGERS

    @model_validator(mode="after")
    def _compatible(self) -> Rule:
        trigger, fault = self.trigger.kind, self.fault.kind
        if self.layer == "proxy":
            if trigger not in _PROXY_TRIGGERS:
                raise ValueError(
                    f"proxy fault {fault!r} needs a proxy trigger"
                    f" ({', '.join(sorted(_PROXY_TRIGGERS))}), not {trigger!r}"
                )
            if self.match is not None:
                raise ValueError("'match' selects requests; the proxy sees only bytes")
        else:
            if trigger not in _SERVER_TRIGGERS:
                raise ValueError(
                    f"server fault {fault!r} needs a server trigger"
                    f" ({', '.join(sorted(_SERVER_TRIGGERS))}), not {trigger!r}"
                )
            if trigger in _POSITION_TRIGGERS and fault not in _POSITION_FAULTS:
                raise ValueError(
                    f"{trigger!r} is a point in a response or an append; it works with"
                    f" {', '.join(sorted(_POSITION_FAULTS))}, not {fault!r}"
                )
        return self

    def describe(self) -> str:
        """A one-line summary, e.g. ``after_event(n=37) -> drop(how=reset) x1``."""

        def call(model: BaseModel) -> str:
            fields = model.model_dump(exclude={"kind"}, exclude_none=True)
            args = ", ".join(f"{k}={v}" for k, v in fields.items())
            return f"{getattr(model, 'kind')}({args})"  # noqa: B009 - union member

        count = "x∞" if self.count is None else f"x{self.count}"
        where = ""
        if self.match is not None:
            parts = [f"{k}={v}" for k, v in self.match.model_dump(exclude_none=True).items()]
            where = f" [{', '.join(parts)}]"
        return f"{call(self.trigger)} -> {call(self.fault)} {count}{where}"


class Firings:
    """How often each rule of a plan has fired, against the rule's ``count``."""

    def __init__(self) -> None:
        self._fired: dict[int, int] = {}

    def __getitem__(self, index: int) -> int:
        return self._fired.get(index, 0)

    def can_fire(self, index: int, rule: Rule) -> bool:
        return rule.count is None or self[index] < rule.count

    def take(self, index: int, rule: Rule) -> bool:
        """Whether rule ``index`` may fire once more; counts the firing if so."""
        if not self.can_fire(index, rule):
            return False
        self._fired[index] = self[index] + 1
        return True

    def clear(self) -> None:
        self._fired.clear()


def _yaml() -> Any:
    try:
        return importlib.import_module("yaml")
    except ImportError:  # pragma: no cover - pyyaml is a dependency of the chaos tools
        raise RuntimeError("YAML plans need PyYAML: pip install pyyaml") from None


class FaultPlan(_Model):
    """A seed and the rules to apply. Load with :meth:`from_file`, make one
    with :meth:`random`, change a running proxy's or server's plan live."""

    seed: int = 0
    rules: list[Rule] = Field(default_factory=list)
    name: str | None = None

    # ------------------------------------------------------------ selection

    def for_layer(self, layer: Layer) -> list[tuple[int, Rule]]:
        """The rules of one layer, with their index in :attr:`rules` (used in
        logs and seed derivation, so it stays stable when the plan is split)."""
        return [(i, rule) for i, rule in enumerate(self.rules) if rule.layer == layer]

    def rng(self, *parts: str | int) -> random.Random:
        """A generator for one place in a run, derived from :attr:`seed`."""
        return rng_for(self.seed, *parts)

    def describe(self) -> str:
        head = f"fault plan{f' {self.name!r}' if self.name else ''} (seed {self.seed})"
        if not self.rules:
            return head + ": no rules"
        lines = [f"  {i}: [{r.layer}] {r.describe()}" for i, r in enumerate(self.rules)]
        return "\n".join([head + ":", *lines])

    # ------------------------------------------------------------ files

    @classmethod
    def from_json(cls, text: str | bytes) -> FaultPlan:
        return cls.model_validate_json(text)

    @classmethod
    def from_yaml(cls, text: str) -> FaultPlan:
        data = _yaml().safe_load(text)
        return cls.model_validate(data if data is not None else {})

    @classmethod
    def from_file(cls, path: str | Path) -> FaultPlan:
        """Load a plan from ``.json``, ``.yaml`` or ``.yml``.

        Raises ``ValueError`` for another suffix and
        ``pydantic.ValidationError`` for an invalid plan.
        """
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        suffix = path.suffix.lower()
        if suffix == ".json":
            return cls.from_json(text)
        if suffix in (".yaml", ".yml"):
            return cls.from_yaml(text)
        raise ValueError(f"{path}: a fault plan is .json, .yaml or .yml, not {suffix!r}")

    def to_json(self, *, indent: int | None = 2) -> str:
        return self.model_dump_json(indent=indent, exclude_defaults=False)

    def to_yaml(self) -> str:
        data = json.loads(self.model_dump_json())
        text: str = _yaml().safe_dump(data, sort_keys=False)
        return text

    # ------------------------------------------------------------ random plans

    @classmethod
    def random(
        cls,
        seed: int,
        *,
        events: int = 50,
        event_bytes: int = 60,
        layers: Sequence[Layer] = ("proxy", "server"),
        kinds: Sequence[str] | None = None,
        max_rules: int = 3,
    ) -> FaultPlan:
        """A plan drawn from ``seed`` alone: the same seed gives the same plan.

        It holds 1..``max_rules`` rules of the given ``kinds`` (by default the
        faults a correct client must ride out without losing or duplicating
        anything, and quickly: no ``half_open``/``stall``, which wait for the
        client's timeouts, no ``trim``, which loses data on purpose, no
        ``crash``). ``events`` and ``event_bytes`` size the scenario the plan
        is for, so positions land inside it.
        """
        rng = rng_for(seed, "plan")
        available = [k for k in (kinds or DEFAULT_RANDOM_KINDS) if _layer_of(k) in layers]
        if not available:
            raise ValueError("no fault kinds left for the requested layers")
        rules = [
            _random_rule(rng, rng.choice(available), events, event_bytes)
            for _ in range(rng.randint(1, max_rules))
        ]
        return cls(seed=seed, rules=rules, name=f"random-{seed}")


def _layer_of(kind: str) -> Layer:
    return "proxy" if kind in PROXY_FAULTS else "server"


DEFAULT_RANDOM_KINDS: tuple[str, ...] = (
    "reset",
    "fin",
    "latency",
    "bandwidth",
    "slicer",
    "down",
    "drop",
    "http_error",
    "lost_ack",
    "duplicate",
    "delay",
    "ws_close",
)


def _random_rule(rng: random.Random, kind: str, events: int, event_bytes: int) -> Rule:
    """One rule of ``kind`` with parameters that fit a run of ``events`` events."""
    count = rng.randint(1, 3)
    # Where a byte-level cut may land: the HTTP head plus the events as SSE.
    byte_span = 400 + events * (event_bytes + 60)
    cut_trigger: Trigger = (
        AfterBytes(bytes=rng.randrange(byte_span))
        if rng.random() < 0.7
        else OnConnection(k=rng.randint(1, 4))
    )
    shape_trigger: Trigger = OnConnection(k=rng.randint(1, 3))
    if kind == "reset":
        return Rule(trigger=cut_trigger, fault=Reset(), count=count)
    if kind == "fin":
        return Rule(trigger=cut_trigger, fault=Fin(), count=count)
    if kind == "latency":
        fault: Fault = Latency(ms=rng.uniform(0, 15), jitter_ms=rng.uniform(0, 10))
        return Rule(trigger=shape_trigger, fault=fault, count=count)
    if kind == "bandwidth":
        fault = Bandwidth(bytes_per_second=rng.randint(20_000, 200_000))
        return Rule(trigger=shape_trigger, fault=fault, count=count)
    if kind == "slicer":
        # No delay between slices: each is its own write (and segment) anyway,
        # and a delay per slice makes a run slow.
        fault = Slicer(average_size=rng.randint(4, 64), size_variation=rng.randint(0, 4))
        return Rule(trigger=shape_trigger, fault=fault, count=count)
    if kind == "down":
        fault = Down(duration_ms=rng.uniform(10, 80))
        return Rule(trigger=OnConnection(k=rng.randint(1, 4)), fault=fault, count=1)
    if kind == "drop":
        drop = Drop(how=rng.choice(["reset", "fin", "end"]))
        if rng.random() < 0.75:  # inside a read: SSE, long-poll or WebSocket
            trigger: Trigger = AfterEvent(n=rng.randint(0, events), control=rng.random() < 0.7)
            return Rule(trigger=trigger, fault=drop, count=1)
        drop = Drop(how=rng.choice(["reset", "fin"]))
        reads = Match(method="GET")
        return Rule(trigger=OnRequest(k=rng.randint(1, 6)), fault=drop, count=count, match=reads)
    if kind == "ws_close":
        fault = WsClose(code=rng.choice([1001, 1011, 1012, 1013, 4000]))
        return Rule(trigger=AfterEvent(n=rng.randint(0, events)), fault=fault, count=count)
    if kind == "http_error":
        fault = HttpError(status=rng.choice([429, 503]), retry_after=0)
        method = rng.choice(["GET", "POST"])
        trigger = OnRequest(k=rng.randint(1, 8))
        return Rule(trigger=trigger, fault=fault, count=count, match=Match(method=method))
    if kind == "lost_ack":
        trigger = (
            AfterEvent(n=rng.randint(1, max(1, events)))
            if rng.random() < 0.5
            else OnRequest(k=rng.randint(1, max(1, events)))
        )
        fault = LostAck(how=rng.choice(["reset", "fin"]))
        return Rule(trigger=trigger, fault=fault, count=count, match=Match(method="POST"))
    if kind == "duplicate":
        fault = Duplicate(rewind=rng.randint(1, 5))
        return Rule(trigger=OnResume(), fault=fault, count=count, match=Match(method="GET"))
    if kind == "delay":
        fault = Delay(ms=rng.uniform(0, 15), jitter_ms=rng.uniform(0, 5))
        trigger = OnRequest(k=rng.randint(1, 8))
        return Rule(trigger=trigger, fault=fault, count=count)
    if kind == "half_open":
        return Rule(trigger=cut_trigger, fault=HalfOpen(), count=1)
    if kind == "stall":
        trigger = AfterEvent(n=rng.randint(0, events))
        return Rule(trigger=trigger, fault=Stall(), count=1, match=Match(method="GET"))
    raise ValueError(f"no random rule for fault kind {kind!r}")
