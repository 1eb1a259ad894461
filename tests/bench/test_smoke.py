"""The benchmark harness still runs: its smallest configuration, over real sockets.

This checks structure and sanity only (every benchmark produced rows, every
case completed, the JSON and the plot were written), never speed: speed goals
live in ``python -m bench``, not in timed tests.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

BENCHES = {
    "latency",
    "append",
    "fan-out",
    "flood",
    "catch-up",
    "resume",
    "storm",
    "memory",
}


def test_the_smallest_configuration_runs_every_benchmark(tmp_path: Path) -> None:
    out_json = tmp_path / "results.json"
    out_svg = tmp_path / "results.svg"
    out_md = tmp_path / "results.md"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--smoke",
            "--no-pin",  # the test suite may share the machine with anything
            "--quiet",
            "--json",
            str(out_json),
            "--plot",
            str(out_svg),
            "--markdown",
            str(out_md),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    document = json.loads(out_json.read_text())

    assert document["failures"] == []
    assert document["machine"]["nproc"] >= 1
    assert document["machine"]["cpu_model"]
    rows = document["rows"]
    assert {row["bench"] for row in rows} == BENCHES
    for row in rows:
        dist = row["dist"]
        assert dist["n"] >= 1, row
        assert dist["median"] is not None, row
        assert math.isfinite(dist["median"]), row
        if row["bench"] != "memory":  # a tiny memory delta may be negative (GC)
            assert dist["median"] >= 0, row
    # Every latency case delivered its events (the harness waits for all of
    # them): a case that lost one would have failed, not produced a row.
    latency = [r for r in rows if r["bench"] == "latency"]
    assert all(r["dist"]["n"] > 0 for r in latency)
    servers = {row["server"] for row in rows}
    assert "ours" in servers
    if "node" in servers:  # the peer ran: ratios to it are there
        assert any("node" in row["ratios"] for row in rows)

    assert "== latency" in completed.stdout
    assert "machine:" in completed.stdout
    assert out_svg.read_text().startswith("<svg")
    assert out_md.read_text().startswith("| benchmark |")
