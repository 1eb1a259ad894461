"""Deterministic chaos: faults that land at exactly the same point on every run.

- :mod:`~mock_server.chaos.plan`: fault plans as data (:class:`FaultPlan`), from
  JSON or YAML, or drawn from a seed.
- :class:`ChaosProxy`: faults in a TCP proxy in front of any server: byte-level
  ones from a plan, and scripted ones on one HTTP message or WebSocket frame
  (:class:`HttpFault`, :class:`WsFault`).
- :class:`ServerFaults`, :func:`serve_chaos`: application-level faults in this
  project's server (also ``python -m mock_server --chaos``, with an admin endpoint).
- :func:`check_history`, :class:`HistoryRecorder`: lost, duplicated, reordered
  and unexpected events, offset issues, content hash.
- :class:`ProtocolReader`, :class:`ProtocolWriter`: reference clients for runs;
  :func:`run_scenario`: one run (writer, reader behind the proxy, plan, verdict).
- :class:`CrashHarness`: the server as a process, ``kill -9`` and restart.

See docs/chaos.md.

Every name is imported on first use (PEP 562): the pytest plugin, and a test
suite that never asks for a chaos fixture, need none of the server's
dependencies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

if TYPE_CHECKING:
    from ._serve import ChaosServer, chaos_middleware, serve_chaos
    from .checker import (
        HistoryRecorder,
        HistoryReport,
        Published,
        Seen,
        SubscriberHistory,
        SubscriberReport,
        check_history,
        content_hash,
    )
    from .crash import CrashHarness, ServerDidNotStart
    from .plan import (
        AfterBytes,
        AfterEvent,
        Always,
        AtOffset,
        Bandwidth,
        Crash,
        Delay,
        Down,
        Drop,
        Duplicate,
        FaultPlan,
        Fin,
        HalfOpen,
        HttpError,
        Latency,
        LostAck,
        Match,
        OnConnection,
        OnRequest,
        OnResume,
        Probability,
        Reset,
        Rule,
        Slicer,
        Stall,
        Trim,
        WsClose,
        derive_seed,
        rng_for,
    )
    from .proxy import ChaosProxy, ConnectionStats, HttpFault, ProxyFaultRecord, WsFault
    from .reader import ProtocolReader, ProtocolWriter, ReaderGaveUp, RetryPolicy, WriterGaveUp
    from .scenario import ScenarioResult, run_scenario
    from .server_faults import ConnectionDropped, ServerFaultRecord, ServerFaults

__all__ = [
    "AfterBytes",
    "AfterEvent",
    "Always",
    "AtOffset",
    "Bandwidth",
    "ChaosProxy",
    "ChaosServer",
    "ConnectionDropped",
    "ConnectionStats",
    "Crash",
    "CrashHarness",
    "Delay",
    "Down",
    "Drop",
    "Duplicate",
    "FaultPlan",
    "Fin",
    "HalfOpen",
    "HistoryRecorder",
    "HistoryReport",
    "HttpError",
    "HttpFault",
    "Latency",
    "LostAck",
    "Match",
    "OnConnection",
    "OnRequest",
    "OnResume",
    "Probability",
    "ProtocolReader",
    "ProtocolWriter",
    "ProxyFaultRecord",
    "Published",
    "ReaderGaveUp",
    "Reset",
    "RetryPolicy",
    "Rule",
    "ScenarioResult",
    "Seen",
    "ServerDidNotStart",
    "ServerFaultRecord",
    "ServerFaults",
    "Slicer",
    "Stall",
    "SubscriberHistory",
    "SubscriberReport",
    "Trim",
    "WriterGaveUp",
    "WsClose",
    "WsFault",
    "chaos_middleware",
    "check_history",
    "content_hash",
    "derive_seed",
    "rng_for",
    "run_scenario",
    "serve_chaos",
]

# Where each public name lives.
_MODULES = {
    "ChaosServer": "._serve",
    "chaos_middleware": "._serve",
    "serve_chaos": "._serve",
    "HistoryRecorder": ".checker",
    "HistoryReport": ".checker",
    "Published": ".checker",
    "Seen": ".checker",
    "SubscriberHistory": ".checker",
    "SubscriberReport": ".checker",
    "check_history": ".checker",
    "content_hash": ".checker",
    "CrashHarness": ".crash",
    "ServerDidNotStart": ".crash",
    "AfterBytes": ".plan",
    "AfterEvent": ".plan",
    "Always": ".plan",
    "AtOffset": ".plan",
    "Bandwidth": ".plan",
    "Crash": ".plan",
    "Delay": ".plan",
    "Down": ".plan",
    "Drop": ".plan",
    "Duplicate": ".plan",
    "FaultPlan": ".plan",
    "Fin": ".plan",
    "HalfOpen": ".plan",
    "HttpError": ".plan",
    "Latency": ".plan",
    "LostAck": ".plan",
    "Match": ".plan",
    "OnConnection": ".plan",
    "OnRequest": ".plan",
    "OnResume": ".plan",
    "Probability": ".plan",
    "Reset": ".plan",
    "Rule": ".plan",
    "Slicer": ".plan",
    "Stall": ".plan",
    "Trim": ".plan",
    "WsClose": ".plan",
    "derive_seed": ".plan",
    "rng_for": ".plan",
    "ChaosProxy": ".proxy",
    "ConnectionStats": ".proxy",
    "HttpFault": ".proxy",
    "ProxyFaultRecord": ".proxy",
    "WsFault": ".proxy",
    "ProtocolReader": ".reader",
    "ProtocolWriter": ".reader",
    "ReaderGaveUp": ".reader",
    "RetryPolicy": ".reader",
    "WriterGaveUp": ".reader",
    "ScenarioResult": ".scenario",
    "run_scenario": ".scenario",
    "ConnectionDropped": ".server_faults",
    "ServerFaultRecord": ".server_faults",
    "ServerFaults": ".server_faults",
}


__getattr__, __dir__ = lazy_names(__name__, _MODULES, globals())
