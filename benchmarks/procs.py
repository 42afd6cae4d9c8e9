"""Child processes of the benchmark: start pinned to CPUs, wait until they answer, stop them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import psutil

from guard_server.upstream.vllm_process import stop_process_group

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
_PR_SET_PDEATHSIG = 1


class Proc:
    """One child process (in its own session, so its whole group can be stopped), logging
    to a file and optionally pinned to ``cpus``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        cpus: set[int] | None = None,
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.cpus = cpus
        self.env = env
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        """Start the process."""
        cpus = self.cpus

        def pin() -> None:
            die_with_parent()
            if cpus:
                os.sched_setaffinity(0, cpus)

        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})},
                start_new_session=True,
                preexec_fn=pin,
            )
        return self

    @property
    def pid(self) -> int:
        """The process id."""
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the process's log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_http(self, url: str, timeout_s: float) -> float:
        """Poll ``url`` until it answers 200; return the seconds since the call."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not answer {url} in {timeout_s:.0f} s")

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the process group, then SIGKILL it after ``grace_s``."""
        stop_process_group(self.process, grace_s)

    def tree(self) -> list[psutil.Process]:
        """This process and all its descendants."""
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) used so far by the process tree."""
        total = 0.0
        for proc in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def rss_bytes(self) -> int:
        """Resident memory of the process tree."""
        total = 0
        for proc in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += proc.memory_info().rss
        return total


def die_with_parent() -> None:
    """In a child: get SIGTERM when the benchmark process dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fake_upstream(port: int, log_path: Path, cpus: set[int] | None, **options: float) -> Proc:
    """The fake OpenAI upstream (``benchmarks.fake_upstream``)."""
    argv = [PYTHON, "-m", "benchmarks.fake_upstream", "--port", str(port)]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return Proc("fake upstream", argv, log_path, cpus)


def guard(
    config: Path,
    port: int,
    log_path: Path,
    cpus: set[int] | None,
    workers: int = 1,
    env: dict[str, str] | None = None,
) -> Proc:
    """``guard-server serve`` as an operator runs it."""
    argv = [
        PYTHON, "-m", "guard_server", "serve", "--config", str(config), "--port", str(port),
        "--workers", str(workers), "--log-level", "WARNING",
    ]  # fmt: skip
    return Proc(f"guard ({workers} worker(s))", argv, log_path, cpus, env)


def redis_server(port: int, log_path: Path, cpus: set[int] | None) -> Proc:
    """A ``redis-server`` on loopback without persistence."""
    argv = [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no",
    ]  # fmt: skip
    return Proc("redis", argv, log_path, cpus)


def wait_redis(port: int, timeout_s: float = 10.0) -> None:
    """Block until redis answers PING."""
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("redis-server did not start")


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
