"""The pytest plugin: its fixtures in a test suite, and the seed in a failure report."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from mock_server.chaos import (
    AfterEvent,
    ChaosServer,
    Drop,
    FaultPlan,
    HistoryRecorder,
    OnConnection,
    ProtocolReader,
    ProtocolWriter,
    Reset,
    Rule,
    derive_seed,
)
from mock_server.chaos.pytest_plugin import ProxyFactory, ServerFactory
from mock_server.chaos.reader import make_event

from .conftest import _plugin_registered


async def test_the_fixtures_work_together(
    chaos_server: ChaosServer,
    chaos_proxy: ProxyFactory,
    history_checker: HistoryRecorder,
    chaos_seed: int,
) -> None:
    async with ProtocolWriter(chaos_server.url, "f") as writer:
        await writer.create()
        for n in range(20):
            offset = await writer.append(make_event("f", n))
            history_checker.published(f"f#{n:05d}", offset=offset)
        await writer.close_stream()
    chaos_server.set_plan(
        FaultPlan(seed=chaos_seed, rules=[Rule(trigger=AfterEvent(n=7), fault=Drop())])
    )
    proxy = await chaos_proxy(
        chaos_server.url, FaultPlan(rules=[Rule(trigger=OnConnection(k=2), fault=Reset())])
    )
    reader = ProtocolReader(proxy.url, "f")
    await reader.run(timeout=10)
    for seen in reader.seen:
        history_checker.seen("reader", seen.id, offset=seen.offset)
    history_checker.assert_ok()
    assert chaos_server.faults.fired() == 1
    assert proxy.fired() == 1


def test_the_seed_is_derived_from_the_test_id(
    chaos_seed: int, request: pytest.FixtureRequest
) -> None:
    assert chaos_seed == derive_seed(0, request.node.nodeid) % 2**32


SUITE = """
import httpx
from mock_server.chaos import AfterEvent, Drop, FaultPlan, Rule

async def test_fails(chaos_server, chaos_proxy, history_checker, chaos_seed):
    rule = Rule(trigger=AfterEvent(n=3), fault=Drop())
    chaos_server.set_plan(FaultPlan(seed=chaos_seed, rules=[rule]))
    proxy = await chaos_proxy(chaos_server.url)
    async with httpx.AsyncClient(base_url=proxy.url) as http:
        await http.put("/v1/stream/x", headers={"Content-Type": "application/json"})
    history_checker.published("a")
    history_checker.seen("reader", "b")
    print("SEED", chaos_seed)
    history_checker.assert_ok()

def test_passes(chaos_seed):
    print("SEED", chaos_seed)
"""


def run_suite(tmp_path: Path, *args: str, suite: str = SUITE) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_suite.py").write_text(textwrap.dedent(suite))
    plugin = [] if _plugin_registered() else ["-p", "mock_server.chaos.pytest_plugin"]
    return subprocess.run(
        [
            sys.executable, "-m", "pytest", str(tmp_path), *plugin,
            "-o", "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function",
            "-p", "no:cacheprovider", "-q", "-s", "--rootdir", str(tmp_path), *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )  # fmt: skip


def test_a_failing_test_reports_its_seed_plans_faults_and_history(tmp_path: Path) -> None:
    result = run_suite(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    seed = int(out.split("SEED ", 1)[1].split()[0])
    assert "chaos" in out
    assert f"chaos seed: {seed}" in out
    assert f"replay: pytest --chaos-seed {seed} 'test_suite.py::test_fails'" in out
    assert "after_event(n=3, control=True) -> drop(how=reset) x1" in out
    assert "1 connection(s)" in out
    assert "lost: a" in out
    assert "unexpected: b" in out
    assert "1 failed, 1 passed" in out


def test_the_seed_option_replays(tmp_path: Path) -> None:
    result = run_suite(tmp_path, "--chaos-seed", "4242", "-k", "passes")
    assert "SEED 4242" in result.stdout
    assert result.returncode == 0


FAILS_BEFORE_ANY_HISTORY = """
def test_fails_early(history_checker, chaos_seed):
    raise RuntimeError("the app under test did not start")
"""


def test_a_history_that_recorded_nothing_is_not_reported_ok(tmp_path: Path) -> None:
    result = run_suite(tmp_path, suite=FAILS_BEFORE_ANY_HISTORY)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "chaos seed:" in result.stdout
    assert "history check: nothing recorded (not checked)" in result.stdout
    assert "history check OK" not in result.stdout


async def test_the_server_factory_takes_options(
    chaos_server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = await chaos_server_factory(data_dir=tmp_path / "data")
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (
            await http.put("/v1/stream/s", headers={"Content-Type": "text/plain"})
        ).status_code == 201
    assert (tmp_path / "data" / "streams.sqlite3").exists()
