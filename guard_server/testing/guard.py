"""``guard-server serve`` as a child process, as an operator runs it, and its metrics."""

from __future__ import annotations

import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import yaml

from guard_server.testing.child import REPO, ChildProcess, free_port


class GuardProcess(ChildProcess):
    """A guard serving ``config`` on ``port`` (a free one by default) of 127.0.0.1.

    :meth:`start` returns once ``/healthz`` answers, :meth:`wait_ready` once ``/readyz``
    does (an upstream is healthy). As a context manager it waits for both, and stops the
    guard on exit. Its output goes to ``log_path`` (stderr to ``stderr_path`` when given:
    the audit log may be on stdout). ``workers`` and ``log_level`` become ``serve`` options
    when given, and ``extra_args`` are appended (``["--teacher", "smollm2"]``, say). ``cwd``
    and ``env`` (``PYTHONPATH``) can run another checkout's guard (``load_tests.checkout``).
    """

    def __init__(
        self,
        config: Path,
        log_path: Path,
        *,
        port: int | None = None,
        workers: int | None = None,
        log_level: str | None = None,
        env: dict[str, str] | None = None,
        cpus: set[int] | None = None,
        name: str = "guard",
        extra_args: Sequence[str] = (),
        stderr_path: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.config = config
        self.port = port or free_port()
        argv = [sys.executable, "-m", "guard_server", "serve", "--config", str(config),
                "--port", str(self.port)]  # fmt: skip
        if workers is not None:
            argv += ["--workers", str(workers)]
        if log_level is not None:
            argv += ["--log-level", log_level]
        argv += extra_args
        super().__init__(
            name,
            argv,
            log_path,
            env=env,
            cwd=cwd or REPO,
            cpus=cpus,
            stderr_path=stderr_path,
        )

    @property
    def url(self) -> str:
        """The guard's root URL (``/healthz``, ``/metrics``, ``/admin``)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (``…/v1``), for the SDK."""
        return self.url + "/v1"

    def wait_up(self, timeout_s: float) -> None:
        """Block until ``/healthz`` answers."""
        self.wait_http(self.url + "/healthz", timeout_s)

    def start(self, timeout_s: float = 90.0) -> Self:
        """Start the guard and wait until it serves (its upstream may not be healthy yet)."""
        return super().start(timeout_s)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until ``/readyz`` answers: an upstream is healthy."""
        self.wait_http(self.url + "/readyz", timeout_s)

    @property
    def metrics_url(self) -> str:
        """Where this guard serves ``/metrics``: its metrics port, else the API port."""
        port = (yaml.safe_load(self.config.read_text()).get("metrics") or {}).get("port")
        return f"http://127.0.0.1:{port}/metrics" if port else self.url + "/metrics"

    def metrics(self, token: str | None = None) -> str:
        """The Prometheus text of ``/metrics`` (``token``: when it is on the API port)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(self.metrics_url, headers=headers)
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.read().decode()

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` in Prometheus text whose labels include ``labels``
    (0 when there is none)."""
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
