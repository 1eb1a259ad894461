"""Helpers for tests: run the bundled server inside the test's event loop."""

from ._server import RunningServer, serve

__all__ = ["RunningServer", "serve"]
