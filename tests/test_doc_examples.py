"""Every ``python`` block of the docs runs as pasted, as a new user would run it.

Each block is saved in an empty directory outside the repository (no
``pyproject.toml`` or ``conftest.py`` above it, so no ``asyncio_mode`` is
inherited) and run with the project's ``.venv`` interpreter against a real
server this test starts: a program with ``python file.py``, a block whose
first line names a test file (``# test_reconnects.py``) with ``pytest``. A
program must exit 0 with nothing on stderr (no "Task was destroyed", no
traceback from a generator closed at shutdown); a ``text`` block right after
it is its exact output, on a first and a second run in the same directory.
A block whose first line is ``# fragment: ...`` is not a program and is not
run. README.md is read too.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from mock_server.testing import serve
from tests._await import finished

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"
DOC_URL = "http://127.0.0.1:4437"
FENCE = re.compile(r"^```(\w*)[^\n]*$")
#: How many lines may stand between a program and the ``text`` block of its output.
OUTPUT_GAP = 3
#: Environment a user's shell would not have, or that would change what runs.
UNSET = ("PYTHONPATH", "PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTHONASYNCIODEBUG")


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    language: str
    source: str
    end: int

    @property
    def first_line(self) -> str:
        return self.source.split("\n", 1)[0].strip()

    @property
    def fragment(self) -> bool:
        return self.first_line.startswith("# fragment")

    @property
    def test_file(self) -> str | None:
        match = re.fullmatch(r"# (test_\w+\.py)", self.first_line)
        return match.group(1) if match else None


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def fenced_blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").split("\n")
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        name = str(path.relative_to(ROOT))
        blocks.append(Block(name, start + 1, match.group(1), "\n".join(body) + "\n", i + 1))
        i += 1
    return blocks


def programs() -> list[tuple[Block, str | None]]:
    """Every python block that is not a fragment, with its stated output, if any."""
    found: list[tuple[Block, str | None]] = []
    for path in doc_files():
        blocks = fenced_blocks(path)
        for index, block in enumerate(blocks):
            if block.language != "python" or block.fragment:
                continue
            after = blocks[index + 1] if index + 1 < len(blocks) else None
            output = None
            near = after is not None and after.line - block.end <= OUTPUT_GAP + 1
            if after is not None and near and after.language == "text":
                output = after.source
            found.append((block, output))
    return found


PROGRAMS = programs()


def test_the_docs_have_programs_and_mark_their_fragments() -> None:
    docs = {block.doc for block, _ in PROGRAMS}
    assert {"README.md", "docs/sdk-quickstart.md", "docs/chaos.md"} <= docs
    assert any(block.test_file for block, _ in PROGRAMS)
    assert any(output for _, output in PROGRAMS)
    # The resume example states what it prints, so a second run is checked too.
    (resume,) = [output for block, output in PROGRAMS if "FileOffsetStore(" in block.source]
    assert resume is not None, "the resume example must state its output in a text block"
    # A fragment says what it needs: "# fragment: <why>".
    for path in doc_files():
        for block in fenced_blocks(path):
            if block.language == "python" and block.fragment:
                assert re.match(r"# fragment: \S", block.first_line), (block.doc, block.line)


def _user_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _plugin_registered() -> bool:
    return any(ep.value.startswith("mock_server.chaos") for ep in entry_points(group="pytest11"))


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


async def _run(args: list[str], cwd: Path, timeout: float = 90) -> Run:
    proc = await asyncio.create_subprocess_exec(
        *args,
        cwd=cwd,
        env=_user_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await finished(proc, timeout)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


@pytest.fixture
async def server_url() -> AsyncIterator[str]:
    async with serve(long_poll_timeout=1.0) as server:
        yield server.url


@pytest.fixture
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("doc-example")
    # The scratch directory is a fresh project: nothing above it configures pytest.
    for parent in [directory, *directory.parents]:
        assert parent != ROOT, "the scratch directory must be outside the repository"
        for name in ("pyproject.toml", "pytest.ini", "conftest.py", "setup.cfg", "tox.ini"):
            assert not (parent / name).exists(), parent / name
    return directory


def test_the_project_interpreter_exists() -> None:
    assert PYTHON.exists(), f"{PYTHON} is missing: run `python3 dev.py lint` to create .venv"


@pytest.mark.parametrize(
    ("block", "output"), PROGRAMS, ids=[f"{b.doc}:{b.line}" for b, _ in PROGRAMS]
)
async def test_the_doc_example_runs_as_pasted(
    block: Block, output: str | None, server_url: str, scratch: Path
) -> None:
    source = block.source.replace(DOC_URL, server_url)
    if block.test_file is not None:
        (scratch / block.test_file).write_text(source, encoding="utf-8")
        plugin = [] if _plugin_registered() else ["-p", "mock_server.chaos.pytest_plugin"]
        args = [str(PYTHON), "-m", "pytest", *plugin, "-q", "-p", "no:cacheprovider"]
        run = await _run([*args, "--rootdir", str(scratch), block.test_file], scratch)
        report = run.stdout + run.stderr
        assert run.returncode == 0, report
        assert re.search(r"\b1 passed\b", run.stdout), report
        assert "warning" not in run.stdout.lower(), report
        return
    program = scratch / "example.py"
    program.write_text(source, encoding="utf-8")
    runs = 2 if output is not None else 1
    for number in range(1, runs + 1):
        run = await _run([str(PYTHON), str(program)], scratch)
        where = f"{block.doc}:{block.line}, run {number}"
        assert run.returncode == 0, f"{where}\n{run.stdout}{run.stderr}"
        assert run.stderr == "", f"{where}: stderr is not clean\n{run.stderr}"
        if output is not None:
            assert run.stdout == output, f"{where}: not the output the doc states"
