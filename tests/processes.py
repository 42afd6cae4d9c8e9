"""Test helpers: run a guard as a real subprocess with a config written for the test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from guard_server.upstream.vllm_process import free_port

REPO = Path(__file__).resolve().parents[1]
POLICIES = REPO / "policies"
DEMO_KEY = "sk-guard-demo"
TRUSTED_KEY = "sk-guard-trusted"
ALICE_KEY = "sk-test-alice"
BOB_KEY = "sk-test-bob"
TEST_CLIENTS = REPO / "tests" / "data" / "test-clients.yaml"


def write_config(directory: Path, upstream_urls: list[str], **overrides: Any) -> Path:
    """Write a guard config for the repo's policies in front of ``upstream_urls``."""
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "reload_interval_s": 0.2},
        "upstreams": {
            "teacher": {
                "urls": upstream_urls,
                "timeouts": {"connect": 2, "read": 30, "total": 120},
                "health_interval_s": 0.5,
            }
        },
        "policies": [
            str(POLICIES / "default.yaml"),
            str(POLICIES / "demo-clients.yaml"),
            str(TEST_CLIENTS),
        ],
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = directory / "guard.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class GuardProcess:
    """``guard-server serve`` in a child process, as an operator would run it."""

    def __init__(self, config: Path, log_path: Path, extra_args: list[str] | None = None) -> None:
        self.config = config
        self.port = free_port()
        self.log_path = log_path
        self.extra_args = extra_args or []
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def start(self, timeout_s: float = 90.0) -> GuardProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "guard_server", "serve", "--config", str(self.config),
                 "--port", str(self.port), *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"guard exited early:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1):
                    return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise TimeoutError(f"guard did not start:\n{self.log()}")

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise TimeoutError("guard did not become ready")

    def send_signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            return response.read().decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text output (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        metric, _, label_text = series.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total


class RedisProcess:
    """A real ``redis-server`` on loopback, without persistence (with ``password``: it
    requires AUTH)."""

    def __init__(self, password: str | None = None) -> None:
        self.port = free_port()
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        auth = ["--requirepass", self.password] if self.password else []
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", *auth],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        import socket

        hello = f"AUTH {self.password}\r\n".encode() if self.password else b""
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(hello + b"PING\r\n")
                    if sock.recv(32).endswith(b"+PONG\r\n"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
