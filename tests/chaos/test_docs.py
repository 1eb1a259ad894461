"""docs/chaos.md stays true: its plans parse, its programs run, its test passes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from mock_server.chaos import FaultPlan

from .conftest import _plugin_registered

DOC = Path(__file__).resolve().parents[2] / "docs" / "chaos.md"
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(DOC.read_text()) if lang == language]


def test_the_json_and_yaml_plans_are_valid_and_the_same() -> None:
    (json_plan,) = blocks("json")
    (yaml_plan,) = blocks("yaml")
    assert FaultPlan.from_json(json_plan) == FaultPlan.from_yaml(yaml_plan)


def test_the_python_snippets_run() -> None:
    snippets = [b for b in blocks("python") if not b.startswith("# test_")]
    assert len(snippets) >= 3
    for snippet in snippets:
        exec(compile(snippet, str(DOC), "exec"), {})  # defines functions, runs the checker


def test_the_pytest_example_passes(tmp_path: Path) -> None:
    (example,) = [b for b in blocks("python") if b.startswith("# test_reconnects.py")]
    (tmp_path / "test_reconnects.py").write_text(example)
    plugin = [] if _plugin_registered() else ["-p", "mock_server.chaos.pytest_plugin"]
    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", str(tmp_path), *plugin,
            # No asyncio_mode: a user's project may not set it, and the example
            # must pass in pytest-asyncio's default (strict) mode too.
            "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
