"""Every Python program in the SDK docs runs, against both servers."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
ROOT = DOCS.parent
DOC_URL = "http://127.0.0.1:4437"


def python_blocks(name: str) -> list[str]:
    text = (DOCS / name).read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_the_quickstart_has_programs() -> None:
    assert len(python_blocks("sdk-quickstart.md")) >= 5


@pytest.mark.parametrize("index", range(len(python_blocks("sdk-quickstart.md"))))
async def test_quickstart_program_runs(index: int, server_url: str, tmp_path: Path) -> None:
    original = python_blocks("sdk-quickstart.md")[index]
    source = original.replace(DOC_URL, server_url)
    # Each run gets fresh session names, so reruns against one server agree.
    source = source.replace('"demo"', f'"demo-{tmp_path.name}"')
    source = source.replace('"chat"', f'"chat-{tmp_path.name}"')
    source = source.replace('"resume-demo"', f'"resume-{tmp_path.name}"')
    source = source.replace("quickstart-log", f"log-{tmp_path.name}")
    script = tmp_path / "program.py"
    script.write_text(source, encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = out.decode()
    assert proc.returncode == 0, output
    if "resume-demo" in original:
        assert "second run handled message 1" in output
    if "echo this" in original:
        assert "cancelled" in output
    if "quickstart-log" in original:
        assert "line 4" in output


def test_session_events_example_runs() -> None:
    for block in python_blocks("session-events.md"):
        exec(compile(block, "session-events.md", "exec"), {})


def test_the_documented_error_tree_is_the_code_tree() -> None:
    from durable_client import _errors

    text = (DOCS / "errors.md").read_text(encoding="utf-8")
    drawn = re.search(r"```\n(DurableError.*?)```", text, flags=re.DOTALL)
    assert drawn is not None
    doc = _errors.__doc__ or ""
    in_code = [line.strip() for line in doc.splitlines() if "──" in line or "DurableError " in line]
    in_docs = [line.strip() for line in drawn.group(1).splitlines() if line.strip()]
    assert in_docs == in_code


def test_the_guarantees_cite_tests_that_exist() -> None:
    text = (DOCS / "guarantees.md").read_text(encoding="utf-8")
    here = Path(__file__).parent
    names = re.findall(r"`(?:(test_\w+)\.py::)?(test_\w+)`", text)
    assert len(names) > 10
    source = "\n".join(p.read_text(encoding="utf-8") for p in here.glob("test_*.py"))
    for _, name in names:
        assert f"def {name}(" in source, name
