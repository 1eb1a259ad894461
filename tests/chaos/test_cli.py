"""The command line: python -m mock_server.chaos audit | run | soak | plan."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mock_server.chaos import AfterBytes, FaultPlan, OnResume, Reset, Rule, Trim, serve_chaos
from mock_server.chaos.__main__ import main
from mock_server.chaos.audit import Unreachable, reach


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def chaos_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """The CLI's main() in this process (a subprocess costs a second of imports)."""

    def run(*args: str) -> Result:
        code = main(list(args))
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


async def chaos_cli_async(*args: str) -> tuple[int, str]:
    """The CLI as a subprocess while this event loop keeps serving."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mock_server.chaos",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode()


def test_plan_prints_what_a_seed_draws(chaos_cli: Callable[..., Result]) -> None:
    result = chaos_cli("plan", "--random", "137")
    assert result.returncode == 0
    assert FaultPlan.from_yaml(result.stdout) == FaultPlan.random(137, events=30)
    as_json = chaos_cli("plan", "--random", "137", "--json", "--events", "80")
    assert FaultPlan.from_json(as_json.stdout) == FaultPlan.random(137, events=80)


async def test_audit_prints_a_table_and_passes_on_our_server() -> None:
    async with serve_chaos(long_poll_timeout=0.5) as server:
        code, out = await chaos_cli_async(
            "audit", "--url", server.url, "--events", "20", "--transports", "sse,long-poll",
            "--only", "baseline", "reset-mid-stream", "cut-after-event", "lost-ack",
        )  # fmt: skip
    assert code == 0, out
    assert "check" in out
    assert "transport" in out
    for name in ("baseline", "reset-mid-stream", "cut-after-event", "lost-ack"):
        assert f"\n{name}" in out
    assert "8 of 8 passed" in out


async def test_audit_without_admin_runs_the_proxy_checks_only() -> None:
    async with serve_chaos(long_poll_timeout=0.5, admin=False) as server:
        code, out = await chaos_cli_async(
            "audit", "--url", server.url, "--events", "10", "--transports", "sse",
            "--only", "baseline", "lost-ack", "--json",
        )  # fmt: skip
    assert code == 0, out
    assert '"check": "baseline"' in out
    assert "lost-ack" not in out


def test_audit_lists_its_checks(chaos_cli: Callable[..., Result]) -> None:
    result = chaos_cli("audit", "--url", "http://127.0.0.1:9", "--list")
    assert result.returncode == 0
    assert "half-open" in result.stdout
    assert "[server]" in result.stdout


def test_run_a_plan_file_on_our_server(chaos_cli: Callable[..., Result], tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "seed: 3\n"
        "rules:\n"
        "  - {trigger: {kind: after_event, n: 10}, fault: {kind: drop, how: fin}}\n"
        "  - {trigger: {kind: after_bytes, bytes: 700}, fault: {kind: reset}}\n"
    )
    result = chaos_cli("run", str(plan), "--events", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("history check OK") == 2  # SSE, then long-poll


def test_run_exits_non_zero_when_events_are_lost(
    chaos_cli: Callable[..., Result], tmp_path: Path
) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(
        FaultPlan.model_validate(
            {
                "rules": [
                    {
                        "trigger": {"kind": "after_event", "n": 5},
                        "fault": {"kind": "drop", "how": "end"},
                    },
                    {"trigger": {"kind": "resume"}, "fault": {"kind": "trim", "keep_last": 2}},
                ]
            }
        ).to_json()
    )
    result = chaos_cli("run", str(plan), "--events", "20", "--transports", "long-poll", "--replay")
    assert result.returncode == 1
    assert "reported lost (explicit gap)" in result.stdout


def test_a_bad_plan_is_a_clear_error(chaos_cli: Callable[..., Result], tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("rules: [{trigger: {kind: sometimes}, fault: {kind: reset}}]\n")
    result = chaos_cli("run", str(plan))
    assert result.returncode == 2
    assert "invalid fault plan" in result.stderr
    assert "Traceback" not in result.stderr


def test_soak_runs_seeded_plans(chaos_cli: Callable[..., Result]) -> None:
    result = chaos_cli("soak", "--plans", "4", "--events", "10")
    assert result.returncode == 0, result.stdout
    assert "soak OK: 4 plans, 40 events checked; lost 0, duplicated 0, reordered 0" in result.stdout


async def test_a_server_that_drops_what_readers_resume_from_fails(tmp_path: Path) -> None:
    """A server that loses history under resuming readers fails the run (exit 1).

    Deterministic: ``--replay`` writes all 200 events before the reader starts, the
    proxy resets the reader after byte 1500 (past the headers and the first events),
    and the server trims everything but the last event when the reader resumes,
    so the resume offset is always gone.
    """
    forgetful = FaultPlan(rules=[Rule(trigger=OnResume(), fault=Trim(keep_last=1), count=None)])
    cut = tmp_path / "cut.json"
    cut.write_text(FaultPlan(rules=[Rule(trigger=AfterBytes(bytes=1500), fault=Reset())]).to_json())
    async with serve_chaos(forgetful, long_poll_timeout=0.5, admin=False) as server:
        # Small read chunks: the catch-up comes in many pieces, so the reset lands after
        # some were taken and the reader resumes from an offset, not from the start.
        server.store.max_read_bytes = 256
        code, out = await chaos_cli_async(
            "run", str(cut), "--url", server.url, "--events", "200", "--transports", "sse",
            "--replay",
        )  # fmt: skip
    assert code == 1, out


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A loopback port where nothing listens: bound (so nobody else takes it), never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize(
    "command",
    [["audit"], ["run", "PLAN"], ["soak", "--plans", "1"]],
    ids=["audit", "run", "soak"],
)
def test_nothing_listening_fails_at_once(
    chaos_cli: Callable[..., Result], dead_url: str, tmp_path: Path, command: list[str]
) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("rules: []\n")
    args = [str(plan) if arg == "PLAN" else arg for arg in command]
    started = time.monotonic()
    result = chaos_cli(*args, "--url", dead_url)
    assert time.monotonic() - started < 10
    assert result.returncode == 2
    assert result.stderr == f"error: cannot reach {dead_url}: Connection refused\n"
    assert "admin" not in result.stdout


@pytest.mark.parametrize("url", ["localhost:9", "127.0.0.1:9", "ws://127.0.0.1:9"])
@pytest.mark.parametrize("command", [["audit"], ["soak"]], ids=["audit", "soak"])
def test_a_url_without_http_is_refused(
    chaos_cli: Callable[..., Result], url: str, command: list[str]
) -> None:
    result = chaos_cli(*command, "--url", url)
    assert result.returncode == 2
    assert result.stderr == (
        f"error: {url!r} is not a server URL: it needs http:// or https:// and a host,"
        " e.g. http://127.0.0.1:4437\n"
    )
    assert result.stdout == ""


async def test_a_server_that_never_answers_is_unreachable() -> None:
    hung_up = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes
        writer.close()
        await writer.wait_closed()
        hung_up.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        with pytest.raises(Unreachable, match=r"cannot reach .*: no answer in 0.2 s"):
            await reach(url, timeout=0.2)
        async with asyncio.timeout(5):
            await hung_up.wait()  # no connection left open when the loop closes
