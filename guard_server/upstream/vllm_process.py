"""Run real vLLM (its OpenAI server) as a managed child process on loopback."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:
    """In a child (``preexec_fn``): get SIGTERM when its parent dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class VllmProcess:
    """A vLLM OpenAI server for one local model directory, started and stopped by us."""

    def __init__(
        self,
        model_dir: str | Path,
        served_model_name: str,
        *,
        port: int = 0,
        max_logprobs: int = 20,
        max_model_len: int = 256,
        dtype: str = "float32",
        extra_args: list[str] | None = None,
        log_path: str | Path | None = None,
        env: dict[str, str] | None = None,
        log_stats: bool = False,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.served_model_name = served_model_name
        self.port = port or free_port()
        self.max_logprobs = max_logprobs
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.extra_args = extra_args or []
        self.log_path = Path(log_path) if log_path else None
        self.env = env or {}
        self.log_stats = log_stats  # vLLM's request tracing needs its stats
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's base URL (without ``/v1``)."""
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The command line that starts the server."""
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", self.served_model_name,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len),
            "--max-logprobs", str(self.max_logprobs),
            *([] if self.log_stats else ["--disable-log-stats"]),
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> None:
        """Start the server in its own process group; it dies with us."""
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            **self.env,
        }
        output = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        log.info("starting vLLM on %s: %s", self.url, " ".join(self.command()))
        self._process = subprocess.Popen(
            self.command(),
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        if output is not subprocess.DEVNULL:
            output.close()

    def wait_healthy(self, timeout_s: float = 300.0) -> float:
        """Block until ``/health`` answers 200; return the seconds it took."""
        assert self._process is not None, "start() first"
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"vLLM exited with code {self._process.returncode} before it was healthy"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vLLM was not healthy within {timeout_s:.0f} s")

    def stop(self, grace_s: float = 15.0) -> None:
        """Stop the server and everything it started."""
        stop_process_group(self._process, grace_s)


def stop_process_group(process: subprocess.Popen[bytes] | None, grace_s: float) -> None:
    """SIGTERM the group led by ``process`` (started with ``start_new_session``), then
    SIGKILL it if it is still running after ``grace_s``."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
