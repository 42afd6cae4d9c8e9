"""Red team: ``/metrics`` (decoys served, flagged clients) is not readable on the API port.

By default it has a port of its own; served on the API port it needs its own token, which no
API key opens."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import yaml

from guard_server.pipeline.auth import hash_key
from guard_server.testing import DEMO_KEY, REPO, TRUSTED_KEY, GuardProcess, write_test_config

METRICS_TOKEN = "metrics-token-for-tests"


def _get(url: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(url, headers=headers, timeout=10)


def test_metrics_are_not_served_on_the_api_port_by_default(tmp_path: Path, vllm_url: str) -> None:
    guard = GuardProcess(write_test_config(tmp_path, [vllm_url]), tmp_path / "guard.log").start()
    try:
        for key in (None, DEMO_KEY, TRUSTED_KEY):
            response = _get(guard.url + "/metrics", key)
            assert response.status_code == 404, response.text
            assert "guard_" not in response.text
        assert guard.metrics_url != guard.url + "/metrics"
        assert "guard_decoys_served_total" in guard.metrics()
    finally:
        guard.stop()


def test_metrics_on_the_api_port_need_their_token(tmp_path: Path, vllm_url: str) -> None:
    metrics = {"port": None, "token_hash": hash_key(METRICS_TOKEN)}
    guard = GuardProcess(
        write_test_config(tmp_path, [vllm_url], metrics=metrics), tmp_path / "guard.log"
    ).start()
    try:
        for key in (None, DEMO_KEY, TRUSTED_KEY, "not-the-token"):
            response = _get(guard.url + "/metrics", key)
            assert response.status_code == 401, response.text
            assert "guard_" not in response.text
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        response = _get(guard.url + "/metrics", METRICS_TOKEN)
        assert response.status_code == 200
        assert "guard_decoys_served_total" in response.text
    finally:
        guard.stop()


def test_metrics_on_the_api_port_without_a_token_is_refused_at_load(tmp_path: Path) -> None:
    config = yaml.safe_load(write_test_config(tmp_path, ["http://127.0.0.1:9"]).read_text())
    config["metrics"] = {"port": None}
    path = tmp_path / "open-metrics.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "guard_server", "check-config", str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "metrics" in result.stderr and "token_hash" in result.stderr
