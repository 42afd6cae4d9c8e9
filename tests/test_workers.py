"""Several worker processes on one port: shared limits via Redis, aggregated metrics, drain."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import yaml

from guard_server.pipeline.auth import hash_key
from guard_server.testing import (
    POLICIES,
    GuardProcess,
    RedisProcess,
    metric_value,
    write_test_config,
)

KEY = "sk-test-workers"


def test_two_workers_share_limits_and_metrics(
    tmp_path: Path, vllm_url: str, redis_server: RedisProcess
) -> None:
    clients = tmp_path / "clients.yaml"
    limits = {"requests_per_minute": 20}
    clients.write_text(
        yaml.safe_dump(
            {"clients": {"w": {"tier": "default", "keys": [hash_key(KEY)], "limits": limits}}}
        )
    )
    state = {"backend": "redis", "redis_url": redis_server.url, "key_prefix": f"w{time.time_ns()}"}
    config = write_test_config(
        tmp_path,
        [vllm_url],
        policies=[str(POLICIES / "default.yaml"), str(clients)],
        state=state,
        secret={"env": "GUARD_TEST_SECRET"},
    )
    env = {"GUARD_TEST_SECRET": "x" * 40}
    process = GuardProcess(config, tmp_path / "guard.log", workers=2, env=env).start()
    port = process.port
    try:
        statuses = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1") as client:
            for _ in range(40):
                # A new connection each time, so the kernel spreads them over both workers.
                response = httpx.post(
                    f"http://127.0.0.1:{port}/v1/completions",
                    json={"model": "teacher", "prompt": "hi", "max_tokens": 2},
                    headers={"Authorization": f"Bearer {KEY}"},
                )
                statuses.append(response.status_code)
            metrics_port = yaml.safe_load(config.read_text())["metrics"]["port"]
            text = client.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert statuses.count(200) in (20, 21)  # one may refill in the test's seconds
        assert statuses.count(429) == 40 - statuses.count(200)
        assert metric_value(text, "guard_requests_total", status="200") == statuses.count(200)
        assert metric_value(text, "guard_requests_total", status="429") == statuses.count(429)
        assert metric_value(text, "guard_worker_up") == 2  # one series per worker pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(30) == 0
        finally:
            process.stop()
