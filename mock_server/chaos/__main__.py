"""Command line: ``python -m mock_server.chaos {audit,run,soak,plan} ...``.

- ``audit --url URL``: the standard battery against any Durable Streams
  server; a table of counts and PASS/FAIL; exit status 1 on any failure.
- ``run PLAN [--url URL]``: one plan (.json/.yaml) against a server (ours,
  in-process, without ``--url``); the history report; exit 1 on failure.
- ``soak [--plans N] [--events N]``: seeded random plans, the long run.
- ``plan --random SEED``: print the plan a seed draws (to read or edit a replay).

A ``--url`` without ``http://`` or ``https://``, or one where nothing answers,
is a one-line error and exit status 2, before anything runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .audit import (
    AuditRow,
    audit,
    check_url,
    format_header,
    format_row,
    format_table,
    has_admin,
    has_websocket,
    reach,
    to_json,
)
from .plan import FaultPlan
from .scenario import ScenarioResult, Transport, run_scenario, summary
from .server_faults import ServerFaults


def _transports(value: str) -> list[Transport]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    allowed: dict[str, Transport] = {"sse": "sse", "long-poll": "long-poll", "ws": "ws"}
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError("transports are sse, long-poll and ws, comma-separated")
    return [allowed[name] for name in names]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mock_server.chaos",
        description="Deterministic chaos for Durable Streams servers and clients (docs/chaos.md).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    audit_cmd = commands.add_parser(
        "audit", help="run the standard fault battery against a server and print a report"
    )
    audit_cmd.add_argument(
        "--url", required=True, help="the server's base URL (streams at /v1/stream/)"
    )
    audit_cmd.add_argument("--events", type=int, default=40, help="events per run (default 40)")
    audit_cmd.add_argument(
        "--transports",
        type=_transports,
        default=None,
        help="sse,long-poll,ws (default: sse and long-poll, and ws if the server has /v1/ws)",
    )
    audit_cmd.add_argument(
        "--only", nargs="*", default=[], metavar="CHECK", help="run only these checks"
    )
    audit_cmd.add_argument(
        "--idle-timeout",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="the reader's read timeout: how long before it gives up on a silent connection",
    )
    audit_cmd.add_argument("--json", action="store_true", help="print the results as JSON")
    audit_cmd.add_argument("--list", action="store_true", help="list the checks and exit")

    run_cmd = commands.add_parser("run", help="run one fault plan and print the history report")
    run_cmd.add_argument("plan", type=Path, help="a fault plan, .json or .yaml")
    run_cmd.add_argument("--url", help="the server's base URL (default: our server, in-process)")
    run_cmd.add_argument("--events", type=int, default=50, help="events to publish (default 50)")
    run_cmd.add_argument(
        "--transports",
        type=_transports,
        default=["sse", "long-poll"],
        help="sse,long-poll,ws (default sse,long-poll)",
    )
    run_cmd.add_argument("--seed", type=int, help="use this seed instead of the plan's")
    run_cmd.add_argument(
        "--replay",
        action="store_true",
        help="write everything before reading (fully deterministic)",
    )
    run_cmd.add_argument("--idle-timeout", type=float, default=2.0, metavar="SECONDS")

    soak_cmd = commands.add_parser("soak", help="run many seeded random plans (the long run)")
    soak_cmd.add_argument("--plans", type=int, default=1000, help="how many seeds (default 1000)")
    soak_cmd.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0)")
    soak_cmd.add_argument("--events", type=int, default=100, help="events per plan (default 100)")
    soak_cmd.add_argument("--url", help="a server with /_chaos (default: ours, in-process)")

    plan_cmd = commands.add_parser("plan", help="print the plan a seed draws")
    plan_cmd.add_argument("--random", type=int, required=True, metavar="SEED")
    plan_cmd.add_argument("--events", type=int, default=30, help="the run size it is drawn for")
    plan_cmd.add_argument("--json", action="store_true", help="JSON instead of YAML")
    return parser


@asynccontextmanager
async def _target(url: str | None) -> AsyncIterator[tuple[str, ServerFaults | None, bool]]:
    """(base URL, in-process faults or None, admin endpoint available)."""
    if url is None:
        from ._serve import serve_chaos

        async with serve_chaos(long_poll_timeout=1.0) as server:
            yield server.url, server.faults, False
        return
    await reach(url)
    yield url, None, await has_admin(url)


def _say(*parts: Any) -> None:
    print(*parts, flush=True)


async def _audit(args: argparse.Namespace) -> int:
    if args.list:
        from .audit import battery

        for check in battery(args.events):
            _say(f"{check.name:26} [{check.layer}] {check.description}")
        return 0
    await reach(args.url)
    admin = await has_admin(args.url)
    if args.transports is None:
        args.transports = ["sse", "long-poll"]
        if await has_websocket(args.url):
            args.transports.append("ws")
    if not args.json:
        _say(
            f"chaos audit of {args.url}: {args.events} events per run over"
            f" {', '.join(args.transports)}; reference reader and writer behind a chaos proxy"
        )
        if not admin:
            _say("(no /_chaos admin endpoint: server-side checks skipped; proxy checks only)")
        _say("")
        _say(format_header())

    def progress(row: AuditRow) -> None:
        if not args.json:
            _say(format_row(row))

    rows = await audit(
        args.url,
        events=args.events,
        transports=args.transports,
        only=args.only,
        idle_timeout=args.idle_timeout,
        server_checks=admin,
        progress=progress,
    )
    if args.json:
        _say(to_json(rows))
    else:
        table = format_table(rows)
        _say(table.split("\n", len(rows) + 1)[-1])  # the verdict and the failures
    if not rows:
        _say("no check matched")
        return 2
    return 0 if all(row.passed for row in rows) else 1


async def _run(args: argparse.Namespace) -> int:
    plan = FaultPlan.from_file(args.plan)
    if args.seed is not None:
        plan = plan.model_copy(update={"seed": args.seed})
    async with _target(args.url) as (url, faults, admin):
        if plan.for_layer("server") and faults is None and not admin:
            _say(
                f"warning: {url} has no /_chaos admin endpoint; the plan's server rules are skipped"
            )
        _say(plan.describe())
        failed = False
        for transport in args.transports:
            result = await run_scenario(
                url,
                plan,
                events=args.events,
                transport=transport,
                live=not args.replay,
                faults=faults,
                admin=admin,
                idle_timeout=args.idle_timeout,
                timeout=120,
            )
            _say("")
            _say(result.describe().replace(plan.describe() + "\n", ""))
            failed |= not result.ok
    return 1 if failed else 0


# As in tests/chaos/test_seeded.py: the seed picks the transport, then live or replay.
_ROTATION: tuple[Transport, ...] = ("sse", "long-poll", "ws")


async def _soak(args: argparse.Namespace) -> int:
    started = time.monotonic()
    results: list[ScenarioResult] = []
    async with _target(args.url) as (url, faults, admin):
        if faults is None and not admin:
            _say(f"warning: {url} has no /_chaos admin endpoint; only proxy faults will run")
        for seed in range(args.first_seed, args.first_seed + args.plans):
            transport = _ROTATION[seed % 3]
            result = await run_scenario(
                url,
                FaultPlan.random(seed, events=args.events),
                path=f"soak-{seed}-{int(started)}",
                events=args.events,
                transport=transport,
                live=(seed // 3) % 2 == 0,
                faults=faults,
                admin=admin,
                timeout=120,
            )
            results.append(result)
            if not result.ok:
                _say(f"\nseed {seed} FAILED\n{result.describe()}\n")
            done = len(results)
            if done % 100 == 0 or done == args.plans:
                elapsed = time.monotonic() - started
                _say(f"{done}/{args.plans} plans, {elapsed:.0f}s: {summary(results)}")
    totals = summary(results)
    ok = totals["failed"] == 0
    _say(
        f"soak {'OK' if ok else 'FAILED'}: {totals['runs']} plans, {totals['events_checked']}"
        f" events checked; lost {totals['lost']}, duplicated {totals['duplicated']},"
        f" reordered {totals['reordered']}; {totals['faults']} faults applied"
    )
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "plan":
        plan = FaultPlan.random(args.random, events=args.events)
        _say(plan.to_json() if args.json else plan.to_yaml().rstrip())
        return 0
    try:
        if args.url is not None:
            check_url(args.url)
        if args.command == "audit":
            return asyncio.run(_audit(args))
        if args.command == "run":
            return asyncio.run(_run(args))
        return asyncio.run(_soak(args))
    except (OSError, ValueError, ValidationError) as exc:
        if isinstance(exc, ValidationError):
            print(f"error: invalid fault plan:\n{exc}", file=sys.stderr)
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
