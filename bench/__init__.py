"""Benchmarks: our server, SDK and WebSocket transport beside the peers a user would pick.

``python3 dev.py bench`` (or ``python -m bench``) runs every benchmark in one
command, prints a table with the machine, writes JSON and draws an SVG plot.
``docs/benchmarks.md`` says what each benchmark measures and how. The peers run
in the same run, on the same machine: the Node reference server
(``@durable-streams/server``, pinned in ``conformance/``) and the upstream
Python client (``durable-streams`` from PyPI).

Not part of the wheel, and not part of the test suite: ``tests/bench`` only
runs the smallest configuration to keep the harness from rotting.
"""
