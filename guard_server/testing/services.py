"""What a guard stands on, as child processes: real Redis, and real vLLM on a local model."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from guard_server.teacher import EMBEDDING_MODEL_NAME, EMBEDDING_VLLM_ARGS, SERVED_MODEL_NAME
from guard_server.testing.child import ChildProcess, free_port
from guard_server.upstream.vllm_process import VllmProcess


class RedisProcess(ChildProcess):
    """A ``redis-server`` on loopback, without persistence, on ``port`` (a free one by default);
    with ``password`` it requires AUTH.

    :meth:`start` returns once it answers PING.
    """

    def __init__(
        self,
        port: int | None = None,
        log_path: Path | None = None,
        cpus: set[int] | None = None,
        password: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.password = password
        auth = ["--requirepass", password] if password else []
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", *auth]  # fmt: skip
        super().__init__("redis", argv, log_path, cpus=cpus)

    @property
    def url(self) -> str:
        """The URL a guard's ``state.redis_url`` takes (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def wait_up(self, timeout_s: float = 10.0) -> None:
        """Block until the server answers PING."""
        hello = f"AUTH {self.password}\r\n".encode() if self.password else b""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(hello + b"PING\r\n")
                    if sock.recv(32).endswith(b"+PONG\r\n"):
                        return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"redis-server did not answer PING in {timeout_s:.0f} s")

    def start(self, timeout_s: float = 10.0) -> RedisProcess:
        """Start the server and wait until it answers PING."""
        return super().start(timeout_s)


def vllm_process(
    model_dir: Path,
    log_path: Path | None,
    *,
    ports: range | None = None,
    max_model_len: int = 256,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    embeddings: bool = False,
) -> VllmProcess:
    """Real vLLM (not started yet) serving ``model_dir`` as ``teacher`` on a free port (of
    ``ports`` if given), its context length ``max_model_len`` capped by the model's own.
    With ``embeddings``, converted to a pooling model and served as ``teacher-embed`` on
    ``/v1/embeddings`` instead."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    positions = int(config.get("max_position_embeddings") or max_model_len)
    name = EMBEDDING_MODEL_NAME if embeddings else SERVED_MODEL_NAME
    convert = list(EMBEDDING_VLLM_ARGS) if embeddings else []
    return VllmProcess(
        model_dir,
        name,
        port=free_port(ports),
        max_model_len=min(max_model_len, positions),
        extra_args=[*convert, *(extra_args or [])],
        log_path=log_path,
        env=env,
    )


@contextlib.contextmanager
def running_vllm(process: VllmProcess, timeout_s: float = 600.0) -> Iterator[float]:
    """Start ``process``, wait until it is healthy and give the seconds that took; stop it on
    exit (also when it never became healthy)."""
    process.start()
    try:
        yield process.wait_healthy(timeout_s)
    finally:
        process.stop()


@contextlib.contextmanager
def serving_vllm(
    model_dir: Path, log_path: Path, reuse_env: str, *, embeddings: bool = False
) -> Iterator[str]:
    """The base URL (no ``/v1``) of real vLLM serving ``model_dir`` (as an embedding model
    with ``embeddings``, see :func:`vllm_process`): the one the environment variable
    ``reuse_env`` names when it is set (to reuse one you run), else one started here and
    stopped on exit."""
    external = os.environ.get(reuse_env)
    if external:
        yield external.rstrip("/")
        return
    process = vllm_process(model_dir, log_path, embeddings=embeddings)
    with running_vllm(process, timeout_s=300):
        yield process.url
