"""What an SDK-only install (``pip install durable-sessions``, no extra) must leave working.

``python3 dev.py package`` checks the real thing in fresh venvs (CI runs it);
these tests check the same promises in this venv, with the server's and the
chat app's dependencies made unimportable (``sys.modules[name] = None`` makes
``import name`` fail and ``find_spec(name)`` find nothing, as if not installed).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import mock_server
import mock_server.chaos

ROOT = Path(__file__).resolve().parent.parent

# What the server and tui extras bring (pyproject.toml), by import name.
EXTRAS_ONLY = ("uvicorn", "httptools", "uvloop", "yaml", "textual", "rich")


def sdk_only(code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that cannot import the extras."""
    hide = f"import sys\nfor _name in {EXTRAS_ONLY!r}:\n    sys.modules[_name] = None\n"
    return subprocess.run(
        [sys.executable, "-c", hide + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_every_public_name_still_imports() -> None:
    for package in (mock_server, mock_server.chaos):
        assert sorted(package.__all__) == sorted(package._MODULES), package.__name__
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"
            assert name in dir(package)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        _ = mock_server.chaos.nope


def test_the_pytest_plugin_imports_without_the_server() -> None:
    result = sdk_only(
        """
        import mock_server.chaos.pytest_plugin
        heavy = [m for m in sys.modules if m.startswith(("mock_server._", "mock_server.chaos."))]
        print(sorted(heavy))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['mock_server._lazy', 'mock_server.chaos.pytest_plugin']"


def test_a_users_pytest_runs_with_the_sdk_alone(tmp_path: Path) -> None:
    (tmp_path / "test_theirs.py").write_text(
        textwrap.dedent(
            """
            def test_theirs():
                assert 1 + 1 == 2

            def test_history_checker_needs_no_server(history_checker):
                history_checker.published("e1")
                history_checker.seen("r", "e1")
                history_checker.assert_ok()

            async def test_chaos_server_names_the_extra(chaos_server):
                pass
            """
        )
    )
    result = sdk_only(
        """
        import pytest
        sys.exit(pytest.main([
            "-q", "-p", "no:cacheprovider", "-p", "mock_server.chaos.pytest_plugin",
            "-o", "asyncio_mode=auto", "--rootdir", ".", "test_theirs.py",
        ]))
        """,
        cwd=tmp_path,
    )
    out = result.stdout + result.stderr
    assert "2 passed, 1 error" in out, out
    assert "chaos_server needs the server extra (uvicorn is not installed): pip install" in out
    assert "ModuleNotFoundError" not in out


@pytest.mark.parametrize(
    ("command", "extra"), [("durable-server", "server"), ("durable-chat", "tui")]
)
def test_the_commands_name_their_extra(command: str, extra: str) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts[command].split(":")
    result = sdk_only(f"from {module} import {function}\nsys.exit({function}())")
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{command} needs the {extra} extra (")
    assert f"[{extra}]'" in line  # the pip command, from wherever this was installed
    assert "pip install" in line


def test_the_readme_installs_what_a_checkout_can_install() -> None:
    """The package is not published: every ``pip install`` the README shows as a
    command is the checkout (``.``) or one of its extras (``'.[server]'``)."""
    readme = (ROOT / "README.md").read_text()
    commands = [
        line.split("#", 1)[0].split()
        for block in re.findall(r"^```sh\n(.*?)^```", readme, flags=re.M | re.S)
        for line in block.splitlines()
        if line.startswith("pip install")
    ]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    targets = [command[2] for command in commands]
    assert targets == [".", "'.[server]'", "'.[tui]'"]
    for target in targets[1:]:
        assert target.strip("'.[]") in extras
