"""The rule book: which server rules of a fault plan apply to a request, HTTP or WebSocket.

One :class:`RuleBook` per server holds the plan, each rule's counters (how
often it was seen and fired) and the log of the faults applied. Every
request, an HTTP one or a WebSocket handshake (method ``WEBSOCKET``), goes
through :meth:`RuleBook.select` once, which says which rules fire on it now
and which positional rules may land inside it later.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl

from pydantic import BaseModel

from durable_client import wire as P

from ._changes import Changes
from ._triggers import request_fires
from .plan import Drop, Duplicate, FaultPlan, Firings, LostAck, Match, Rule

__all__ = ["Landing", "RequestView", "RuleBook", "Selection", "ServerFaultRecord"]

# The faults that can land inside each kind of request (at a positional trigger),
# and the ones a WebSocket handshake can get before it is served.
_POINT_FAULTS: dict[str, frozenset[str]] = {
    "GET": frozenset({"drop", "stall", "crash"}),
    "POST": frozenset({"lost_ack", "crash"}),
    "WEBSOCKET": frozenset({"drop", "stall", "ws_close", "crash"}),
}
_HANDSHAKE_FAULTS = frozenset({"delay", "http_error", "drop", "stall", "ws_close", "crash"})

Landing = Literal["reset", "fin", "end", "stall", "crash"]
"""What a positional fault does to the connection where it lands."""


class ServerFaultRecord(BaseModel):
    """A fault the server applied."""

    rule: int
    fault: str
    method: str
    path: str
    detail: str = ""
    at: float

    def __str__(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return f"rule {self.rule}: {self.fault} on {self.method} {self.path}{detail}"


class RequestView:
    """What the rules look at in a request (a WebSocket handshake has method ``WEBSOCKET``)."""

    def __init__(self, scope: MutableMapping[str, Any]) -> None:
        websocket = scope["type"] == "websocket"
        self.method: str = "WEBSOCKET" if websocket else scope["method"].upper()
        self.path: str = scope["path"]
        self.query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        self.offset = self.query.get(P.OFFSET_PARAM)
        live = self.query.get(P.LIVE_PARAM)
        self.live = live if live in (P.LIVE_SSE, P.LIVE_LONG_POLL) else "catch-up"
        self.is_read = self.method == "GET"
        self.is_resume = self.is_read and self.offset not in (
            None,
            P.OFFSET_BEGINNING,
            P.OFFSET_NOW,
        )

    def matches(self, match: Match | None) -> bool:
        if match is None:
            return True
        if match.method is not None and match.method.upper() != self.method:
            return False
        if match.path is not None and not fnmatch.fnmatchcase(self.path, match.path):
            return False
        return match.live is None or (self.is_read and match.live == self.live)


@dataclass
class Selection:
    """The rules of one request: those that fired on it, in plan order, and the
    positional ones that may land inside it (each fires when its point is reached)."""

    fired: list[tuple[int, Rule]] = field(default_factory=list)
    positional: list[tuple[int, Rule]] = field(default_factory=list)


class RuleBook:
    """A server's fault plan, the rules' counters and the log of the faults applied.

    ``allow_crash`` permits plans with the ``crash`` fault (a server in a
    process of its own).
    """

    def __init__(self, plan: FaultPlan | None = None, *, allow_crash: bool = False) -> None:
        self.allow_crash = allow_crash
        self.plan = FaultPlan()
        self.log: list[ServerFaultRecord] = []
        self.requests = 0
        self._firings = Firings()
        self._seen: dict[int, int] = {}  # requests each rule matched
        self._seen_on_path: dict[tuple[int, str], int] = {}
        self._changes = Changes()
        if plan is not None:
            self.set_plan(plan)

    # ------------------------------------------------------------ control

    def set_plan(self, plan: FaultPlan) -> None:
        """Apply ``plan`` from the next request on; counters restart.

        Raises ``ValueError`` for a ``crash`` fault when crashes are not allowed.
        """
        if not self.allow_crash and any(
            r.fault.kind == "crash" for _, r in plan.for_layer("server")
        ):
            raise ValueError(
                "the crash fault kills the server process: run the server in its own"
                " process (python -m mock_server --chaos, or CrashHarness)"
            )
        self.plan = plan
        self._clear_counts()
        self._changes.changed()

    def reset(self) -> None:
        """No plan, no counters, an empty log."""
        self.plan = FaultPlan()
        self._clear_counts()
        self.log.clear()
        self.requests = 0
        self._changes.changed()

    def _clear_counts(self) -> None:
        self._firings.clear()
        self._seen.clear()
        self._seen_on_path.clear()

    def fired(self, fault: str | None = None) -> int:
        """How many faults (of kind ``fault``) were applied."""
        return sum(1 for r in self.log if fault is None or r.fault == fault)

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``condition()`` holds, re-checked after each request and fault."""
        await self._changes.wait_for(condition, timeout)

    # ------------------------------------------------------------ requests

    def select(self, req: RequestView) -> Selection:
        """Count ``req`` and pick its rules (see :class:`Selection`).

        A rule that fires is spent (its count goes down) only if its fault can
        do something to this request.
        """
        self.requests += 1
        self._changes.changed()
        selection = Selection()
        point_faults = _POINT_FAULTS.get(req.method, frozenset())
        for index, rule in self.plan.for_layer("server"):
            if not req.matches(rule.match):
                continue
            if rule.positional:
                if rule.fault.kind in point_faults:
                    selection.positional.append((index, rule))
            elif (
                self._triggered(index, rule, req)
                and self._applicable(rule, req)
                and self.take(index, rule)
            ):
                selection.fired.append((index, rule))
        return selection

    def _triggered(self, index: int, rule: Rule, req: RequestView) -> bool:
        seen = self._seen[index] = self._seen.get(index, 0) + 1
        key = (index, req.path)
        n = self._seen_on_path[key] = self._seen_on_path.get(key, 0) + 1
        return request_fires(
            rule.trigger,
            seen=seen,
            is_resume=req.is_resume,
            draw=lambda: self.plan.rng("server", index, req.path, n).random(),
        )

    @staticmethod
    def _applicable(rule: Rule, req: RequestView) -> bool:
        """Whether the fault can do anything to this request (else it is not spent on it)."""
        if req.method == "WEBSOCKET":
            return rule.fault.kind in _HANDSHAKE_FAULTS
        if isinstance(rule.fault, Duplicate):
            return req.is_resume
        return True

    def can_fire(self, index: int, rule: Rule) -> bool:
        return self._firings.can_fire(index, rule)

    def take(self, index: int, rule: Rule) -> bool:
        """Whether ``rule`` may fire once more; counts the firing if so."""
        return self._firings.take(index, rule)

    def times_fired(self, index: int) -> int:
        return self._firings[index]

    def record(self, index: int, rule: Rule, req: RequestView, detail: str = "") -> None:
        """Log a fault applied to ``req``."""
        self.log.append(
            ServerFaultRecord(
                rule=index,
                fault=rule.fault.kind,
                method=req.method,
                path=req.path,
                detail=detail,
                at=time.monotonic(),
            )
        )
        self._changes.changed()

    def land(self, index: int, rule: Rule, req: RequestView, detail: str) -> Landing:
        """Fire a positional rule at its point: count it, log it, say what it does."""
        self.take(index, rule)
        self.record(index, rule, req, detail)
        fault = rule.fault
        if fault.kind == "crash":
            return "crash"
        if isinstance(fault, Drop | LostAck):
            return fault.how
        return "stall"
