"""The benchmark's own child processes (the fake upstream) and CPU accounting of processes."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import psutil

from guard_server.testing import ChildProcess


def fake_upstream(
    port: int, log_path: Path, cpus: set[int] | None, **options: float
) -> ChildProcess:
    """The fake OpenAI upstream (``benchmarks.fake_upstream``)."""
    argv = [sys.executable, "-m", "benchmarks.fake_upstream", "--port", str(port)]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return ChildProcess("fake upstream", argv, log_path, cpus=cpus)


def cpu_seconds(proc: ChildProcess) -> float:
    """CPU seconds (user + system) used so far by ``proc`` and all its descendants."""
    try:
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def system_busy_seconds() -> float:
    """CPU seconds all processes of the machine have used (user + system + irq...)."""
    times = psutil.cpu_times()
    fields = ("user", "nice", "system", "irq", "softirq", "steal")
    return sum(getattr(times, name, 0.0) for name in fields)


def own_cpu_seconds() -> float:
    """CPU seconds used by this process, its finished children and its live descendants."""
    own = os.times()
    total = own.user + own.system + own.children_user + own.children_system
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total
