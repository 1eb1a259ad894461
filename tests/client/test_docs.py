"""Every Python program in the SDK docs runs, against both servers."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from tests._await import finished

DOCS = Path(__file__).resolve().parents[2] / "docs"
ROOT = DOCS.parent
DOC_URL = "http://127.0.0.1:4437"


def python_blocks(name: str) -> list[str]:
    text = (DOCS / name).read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_the_quickstart_has_programs() -> None:
    assert len(python_blocks("sdk-quickstart.md")) >= 5


DRIVER = """
import sys
for number, path in enumerate(sys.argv[1:]):
    print(f"=== program {number}", flush=True)
    source = open(path, encoding="utf-8").read()
    exec(compile(source, path, "exec"), {"__name__": "__main__"})
"""


async def test_quickstart_programs_run(server_url: str, server_kind: str, tmp_path: Path) -> None:
    """Each program, as a reader would run it, one after the other in one process."""
    originals = python_blocks("sdk-quickstart.md")
    paths = []
    for index, original in enumerate(originals):
        source = original.replace(DOC_URL, server_url)
        # Fresh names, so reruns against one long-lived server agree.
        run = tmp_path.name
        for name, fresh in {
            '"demo"': f'"demo-{run}"',
            '"chat"': f'"chat-{run}"',
            '"resume-demo"': f'"resume-{run}"',
            "quickstart-log": f"log-{run}",
        }.items():
            source = source.replace(name, fresh)
        path = tmp_path / f"program_{index}.py"
        path.write_text(source, encoding="utf-8")
        paths.append(str(path))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(driver),
        *paths,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await finished(proc, 60)
    output = out.decode()
    assert proc.returncode == 0, output
    sections = output.split("=== program ")[1:]
    assert len(sections) == len(originals), output
    for original, section in zip(originals, sections, strict=True):
        if "resume-demo" in original:
            assert "second run handled message 1" in section
        if "echo this" in original:
            assert "cancelled" in section
        if "MemoryTransport()" in original:
            assert "agent tested: complete HELLO" in section, section
        if "quickstart-log" in original:
            assert "line 4" in section
        if "status_changes" in original:
            assert "connection: connected" in section
        if "presence_changes" in original:
            if server_kind == "reference":  # HTTP only
                assert "no presence over sse" in section, section
            else:
                assert "join helper thinking" in section, section
                assert "over websocket" in section, section


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
