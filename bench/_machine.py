"""What the numbers were measured on: cores, CPU model, Python, event loop, versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def node_version() -> str | None:
    node = shutil.which("node")
    if node is None:
        return None
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def describe(loop_name: str) -> dict[str, Any]:
    """The machine and software, as JSON-ready values."""
    packages = [
        "durable-sessions",
        "durable-streams",
        "httpx",
        "websockets",
        "uvicorn",
        "uvloop",
        "pydantic",
    ]
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "loop": loop_name,
        "os": f"{platform.system()} {platform.release()}",
        "node": node_version(),
        "load_average": load_average(),
        "packages": {name: _version(name) for name in packages},
    }


def summary_line(machine: dict[str, Any]) -> str:
    load = machine.get("load_average")
    load_text = f", load {load[0]:.2f}" if load else ""
    return (
        f"machine: {machine['nproc']} cores, {machine['cpu_model']}{load_text}; "
        f"{machine['os']}; Python {machine['python']} ({machine['loop']}); "
        f"node {machine['node'] or 'absent'}"
    )
