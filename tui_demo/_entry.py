"""The ``durable-chat`` command: ``python -m tui_demo``, once its extra is known to be there."""

from __future__ import annotations

import sys

# The extras are checked in one place, beside the server's command (in every install).
from mock_server._entry import missing_extra

__all__ = ["main"]


def main() -> None:
    problem = missing_extra("durable-chat", "tui")
    if problem is not None:
        print(problem, file=sys.stderr)
        sys.exit(2)
    from .__main__ import main as chat

    chat()
