"""Several worker processes on one port: shared limits via Redis, aggregated metrics, drain."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import yaml

from guard_server.pipeline.auth import hash_key
from guard_server.testing import (
    POLICIES,
    REPO,
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
    # a relative audit path (resolved against the config's folder, not the working
    # directory), rotated early so that both workers rotate while the test runs
    audit = {"path": "audit.jsonl", "max_bytes": 4096, "backups": 50}
    process = _two_workers(tmp_path, vllm_url, redis_server, clients, audit)
    try:
        started = time.monotonic()
        statuses = _send(process.port, 40)
        refilled = (time.monotonic() - started) * limits["requests_per_minute"] / 60
        text = process.metrics()
        # the burst of 20, and what refilled (one every 3 s) while the test ran
        assert 20 <= statuses.count(200) <= 20 + int(refilled) + 1
        assert statuses.count(429) == 40 - statuses.count(200)
        assert metric_value(text, "guard_requests_total", status="200") == statuses.count(200)
        assert metric_value(text, "guard_requests_total", status="429") == statuses.count(429)
        assert metric_value(text, "guard_worker_up") == 2  # one series per worker pid
    finally:
        _stop(process)
    # One writer per file: each worker rotated its own; no line lost, none torn.
    assert not (tmp_path / "audit.jsonl").exists() and not (REPO / "audit.w0.jsonl").exists()
    files = sorted(tmp_path.glob("audit.w*.jsonl*"))
    assert {f.name for f in files} >= {"audit.w0.jsonl", "audit.w1.jsonl", "audit.w0.jsonl.1"}
    records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert sorted(r["status"] for r in records) == sorted(statuses)


def test_two_workers_can_write_the_audit_log_to_stdout(
    tmp_path: Path, vllm_url: str, redis_server: RedisProcess
) -> None:
    clients = tmp_path / "clients.yaml"
    clients.write_text(
        yaml.safe_dump({"clients": {"w": {"tier": "default", "keys": [hash_key(KEY)]}}})
    )
    process = _two_workers(
        tmp_path, vllm_url, redis_server, clients, {"path": "-", "include_prompts": True}
    )
    try:
        statuses = _send(process.port, 12, prompt="hi " * 40)
    finally:
        _stop(process)
    # stdout holds nothing but the audit records (the banner went to stderr)
    records = [json.loads(line) for line in (tmp_path / "stdout").read_text().splitlines()]
    assert [r["status"] for r in records] == statuses == [200] * 12
    assert all(r["prompt"] == "hi " * 40 for r in records)


def _two_workers(
    tmp_path: Path, vllm_url: str, redis: RedisProcess, clients: Path, audit: dict
) -> GuardProcess:
    state = {"backend": "redis", "redis_url": redis.url, "key_prefix": f"w{time.time_ns()}"}
    config = write_test_config(
        tmp_path,
        [vllm_url],
        policies=[str(POLICIES / "default.yaml"), str(clients)],
        state=state,
        secret={"env": "GUARD_TEST_SECRET"},
        audit=audit,
    )
    return GuardProcess(
        config,
        tmp_path / "stdout",
        stderr_path=tmp_path / "stderr",
        workers=2,
        env={"GUARD_TEST_SECRET": "x" * 40},
    ).start()


def _stop(process: GuardProcess) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(30) == 0
    finally:
        process.stop()


def _send(port: int, count: int, prompt: str = "hi") -> list[int]:
    statuses = []
    for _ in range(count):
        # A new connection each time, so the kernel spreads them over both workers.
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": "teacher", "prompt": prompt, "max_tokens": 2},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
        )
        statuses.append(response.status_code)
    return statuses
