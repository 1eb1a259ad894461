"""``python -m bench``: every benchmark, beside the peers, in one command.

    python -m bench                 the full run (a few minutes)
    python -m bench --quick         the same benchmarks, smaller (under a minute)
    python -m bench --only latency,catchup --json out.json --plot out.svg
    python -m bench --quick --only fanout --profile prof/   # py-spy on our server

Prints the machine and a table, writes JSON (``--json``) and an SVG plot
(``--plot``). Progress goes to stderr. Exits 1 if any case failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from ._benchmarks import BENCHMARKS, SIZES, Context
from ._clients import upstream_unavailable
from ._machine import describe, summary_line
from ._procs import NODE, OURS, Pinning, ServerProcess, node_unavailable
from ._report import Row, add_ratios, markdown, table, write_json
from ._svg import plot

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmarks against the peers, in one command."
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes: under a minute")
    size.add_argument(
        "--smoke", action="store_true", help="the smallest sizes (seconds; for the smoke test)"
    )
    parser.add_argument(
        "--only",
        default="",
        metavar="NAMES",
        help=f"comma-separated subset of: {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--json", type=Path, default=RESULTS / "latest.json", help="JSON output")
    parser.add_argument("--plot", type=Path, default=RESULTS / "latest.svg", help="SVG output")
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown here")
    parser.add_argument(
        "--no-peers", action="store_true", help="ours only: no Node server, no upstream client"
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the servers and the load generator to separate cores",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record our server with py-spy during the run (DIR/server.speedscope.json)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    args.names = names or list(BENCHMARKS)
    args.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    return args


def _start_py_spy(directory: Path, pid: int) -> tuple[subprocess.Popen[bytes], Path]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "server.speedscope.json"
    recorder = subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--format", "speedscope", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return recorder, out


def _stop_py_spy(recorder: subprocess.Popen[bytes]) -> None:
    recorder.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    try:
        recorder.wait(30)
    except subprocess.TimeoutExpired:
        recorder.kill()
        recorder.wait(5)


@contextlib.asynccontextmanager
async def _profiling(directory: Path | None, server: ServerProcess, ctx: Context) -> Any:
    """py-spy, recording ``server`` until the block ends (nothing if ``directory`` is None)."""
    if directory is None:
        yield
        return
    recorder, out = await asyncio.to_thread(_start_py_spy, directory, server.pid)
    try:
        yield
    finally:
        await asyncio.to_thread(_stop_py_spy, recorder)
        ctx.say(f"server profile: {out}")


def _loop() -> tuple[str, Any]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return "asyncio", asyncio.run
    return f"uvloop {getattr(uvloop, '__version__', '?')}", uvloop.run


async def _run(args: argparse.Namespace, pinning: Pinning, loop_name: str) -> int:
    started = time.perf_counter()
    machine = describe(loop_name)
    skipped: list[str] = []
    servers: dict[str, ServerProcess] = {}
    upstream = False
    if args.no_peers:
        skipped.append("peers: --no-peers")
    else:
        reason = upstream_unavailable()
        upstream = reason is None
        if reason:
            skipped.append(f"upstream client: {reason}")
    ctx = Context(
        sizes=SIZES[args.mode],
        servers=servers,
        pinning=pinning,
        upstream=upstream,
        skipped=skipped,
        verbose=not args.quiet,
    )
    rows: list[Row] = []
    try:
        wanted = [ServerProcess(OURS, pinning)]
        if not args.no_peers:
            reason = node_unavailable()
            if reason:
                skipped.append(f"Node reference server: {reason}")
            else:
                wanted.append(ServerProcess(NODE, pinning))
        for server in wanted:
            servers[server.kind] = server  # stopped in the finally even if it failed to start
        await asyncio.gather(*(asyncio.to_thread(server.start) for server in wanted))
        ctx.say(summary_line(machine))
        ctx.say(f"mode {args.mode}; {pinning.describe()}")
        async with _profiling(args.profile, servers[OURS], ctx):
            for name in args.names:
                ctx.say(f"{name}:")
                rows += await BENCHMARKS[name](ctx)
    finally:
        for server in servers.values():
            await asyncio.to_thread(server.stop)
    add_ratios(rows)
    wall = time.perf_counter() - started
    print(summary_line(machine))
    print(f"mode {args.mode}, {pinning.describe()}, wall time {wall:.1f} s")
    print()
    print(table(rows))
    for note in skipped:
        print(f"skipped: {note}")
    for failure in ctx.failures:
        print(f"FAILED: {failure}")
    settings = {
        "mode": args.mode,
        "benchmarks": args.names,
        "pinning": pinning.describe(),
        "sizes": SIZES[args.mode].__dict__,
    }
    write_json(
        args.json,
        machine=machine,
        settings=settings,
        rows=rows,
        skipped=skipped,
        failures=ctx.failures,
        wall_seconds=wall,
    )
    print(f"wrote {args.json}")
    if rows:
        title = (
            f"durable sessions benchmarks ({args.mode}): "
            f"{machine['nproc']} cores, {machine['cpu_model']}"
        )
        plot(rows, args.plot, title=title)
        print(f"wrote {args.plot}")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(rows) + "\n")
        print(f"wrote {args.markdown}")
    return 1 if ctx.failures else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pinning = Pinning() if args.no_pin else Pinning.split()
    if pinning.client is not None:
        os.sched_setaffinity(0, pinning.client)
    loop_name, runner = _loop()
    coroutine: Coroutine[Any, Any, int] = _run(args, pinning, loop_name)
    result: int = runner(coroutine)
    return result


if __name__ == "__main__":
    sys.exit(main())
