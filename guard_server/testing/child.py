"""A child process on loopback: started in its own session, logging to a file, stopped whole."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

from guard_server.upstream.vllm_process import die_with_parent, stop_process_group
from guard_server.upstream.vllm_process import free_port as _ephemeral_port

REPO = Path(__file__).resolve().parents[2]
"""The repository root: the working directory of every child process."""


def free_port(ports: range | None = None) -> int:
    """A TCP port on 127.0.0.1 that is free right now.

    Without ``ports``, one the kernel picks from its ephemeral range. With ``ports``, a free
    one of that range, tried in random order: a range outside the ephemeral one cannot be
    taken, between this call and the server's bind, by a socket that some other process
    (vLLM's own internal ones, say) opened on an ephemeral port.
    """
    if ports is None:
        return _ephemeral_port()
    candidates = list(ports)
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


def child_setup(cpus: set[int] | None = None) -> Callable[[], None]:
    """The ``preexec_fn`` of a child: SIGTERM when the thread that starts it dies (even by
    SIGKILL, Linux), and pinned to ``cpus`` when given."""

    def setup() -> None:
        die_with_parent()
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


class ChildProcess:
    """One child process: its own session (so :meth:`stop` ends all it started), output to
    ``log_path`` (or nowhere; stderr to ``stderr_path`` when given), optionally pinned to
    ``cpus``, and sent SIGTERM when the thread that started it dies, even by SIGKILL (Linux).

    :meth:`spawn` only starts it; :meth:`start` also waits until it is up (what "up" means
    is the subclass's :meth:`wait_up`). As a context manager it is started and stopped.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path | None,
        *,
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
        cpus: set[int] | None = None,
        stderr_path: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env or {}
        self.cwd = cwd
        self.cpus = cpus
        self.stderr_path = stderr_path
        self.process: subprocess.Popen[bytes] | None = None

    def spawn(self) -> Self:
        """Start the process without waiting for anything."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        errors: int | BinaryIO = subprocess.STDOUT
        if self.stderr_path is not None:
            errors = open(self.stderr_path, "ab")  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=errors,
                cwd=self.cwd,
                env=env,
                start_new_session=True,
                preexec_fn=child_setup(self.cpus),
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
            if not isinstance(errors, int):
                errors.close()
        return self

    def wait_up(self, timeout_s: float) -> None:
        """Block until the process serves (here: nothing to wait for)."""

    def start(self, timeout_s: float = 60.0) -> Self:
        """Start the process and wait until it is up; stop it if it does not come up."""
        self.spawn()
        try:
            self.wait_up(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int:
        """The process id."""
        assert self.process is not None, "spawn() first"
        return self.process.pid

    def alive(self) -> bool:
        """Whether the process runs."""
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        """Everything the process wrote so far."""
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 3000) -> str:
        """The end of :meth:`log`."""
        return self.log()[-chars:]

    def wait_http(self, url: str, timeout_s: float) -> float:
        """Poll ``url`` until it answers 200; return the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            self._check_alive()
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not answer {url} in {timeout_s:.0f} s")

    def wait_log(self, text: str, timeout_s: float) -> str:
        """Block until ``text`` appears in the log; return the log."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            self._check_alive()
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not log {text!r} in {timeout_s:.0f} s")

    def _check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the process itself (not to what it started)."""
        assert self.process is not None, "spawn() first"
        self.process.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        """Wait for the process to exit; return its exit status."""
        assert self.process is not None, "spawn() first"
        return self.process.wait(timeout_s)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the process and all it started, then SIGKILL them after ``grace_s``."""
        stop_process_group(self.process, grace_s)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
