"""The machine and software a run measured on."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.run.options import BENCH_VENV
from benchmarks.run.profiling import py_spy_path
from guard_server.testing import (
    REPO,
)


def _version(module: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def machine_info() -> dict[str, Any]:
    """CPU, memory and software versions."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import psutil

    litellm = "not installed"
    if (BENCH_VENV / "bin" / "python").exists():
        litellm = _tool_version(
            [str(BENCH_VENV / "bin" / "python"), "-c",
             "import importlib.metadata as m; print(m.version('litellm'))"]
        )  # fmt: skip
    commit = _tool_version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = bool(
        subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    )
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": _version("aiohttp"),
        "uvloop": _version("uvloop"),
        "orjson": _version("orjson"),
        "pydantic": _version("pydantic"),
        "prometheus_client": _version("prometheus-client"),
        "redis_py": _version("redis"),
        "litellm": litellm,
        "wrk": " ".join(_tool_version(["wrk", "--version"]).split()[:2]),
        "hey": "hey (no version flag)" if shutil.which("hey") else "not installed",
        "redis_server": " ".join(_tool_version(["redis-server", "--version"]).split()[:3]),
        "py_spy": _tool_version([py_spy_path() or "py-spy", "--version"]),
        "git_commit": commit + ("-dirty" if dirty else ""),
    }
