"""Rate limits end to end: 429s like OpenAI's, global across replicas, Redis failures."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import openai
import pytest
import redis.asyncio as aioredis
import yaml

from guard_server.config.loader import ConfigError, load_settings
from guard_server.pipeline.auth import hash_key
from guard_server.state.redis import RedisStore
from guard_server.testing import (
    POLICIES,
    GuardProcess,
    RedisProcess,
    metric_value,
    write_test_config,
)
from tests.fake_upstream import FaultyUpstream

KEY = "sk-test-limited"


def _limited_guard(
    tmp_path: Path, upstream: str, limits: dict, state: dict | None = None, name: str = "g"
) -> GuardProcess:
    clients = tmp_path / "limited-clients.yaml"
    clients.write_text(
        yaml.safe_dump(
            {"clients": {"limited": {"tier": "default", "keys": [hash_key(KEY)], "limits": limits}}}
        )
    )
    overrides: dict = {"policies": [str(POLICIES / "default.yaml"), str(clients)]}
    if state:
        overrides["state"] = state
    directory = tmp_path / name
    directory.mkdir(exist_ok=True)
    config = write_test_config(directory, [upstream], **overrides)
    return GuardProcess(config, directory / "guard.log").start()


def _sdk(guard: GuardProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=guard.base_url, api_key=KEY, max_retries=0, timeout=30)


def _complete(guard: GuardProcess) -> None:
    _sdk(guard).completions.create(model="teacher", prompt="hi", max_tokens=2)


def test_429_has_retry_after_and_openai_ratelimit_headers(tmp_path: Path, vllm_url: str) -> None:
    guard = _limited_guard(
        tmp_path, vllm_url, {"requests_per_minute": 3, "tokens_per_minute": 10_000}
    )
    try:
        raw = _sdk(guard).completions.with_raw_response.create(
            model="teacher", prompt="hi", max_tokens=2
        )
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        assert raw.headers["x-ratelimit-remaining-requests"] == "2"
        assert raw.headers["x-ratelimit-limit-tokens"] == "10000"
        _complete(guard)
        _complete(guard)
        with pytest.raises(openai.RateLimitError) as caught:
            _complete(guard)
        response = caught.value.response
        assert 1 <= int(response.headers["retry-after"]) <= 20
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
        error = response.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
        assert metric_value(guard.metrics(), "guard_rate_limited_total", limit="requests") == 1
    finally:
        guard.stop()


def test_limit_holds_globally_across_three_replicas(
    tmp_path: Path, vllm_url: str, redis_server: RedisProcess
) -> None:
    limit = 30
    # Closed and patient: a Redis call slower than the default 0.25 s on a loaded machine
    # would otherwise fail open and admit past the limit (by design, but not what this tests).
    state = {
        "backend": "redis",
        "redis_url": redis_server.url,
        "key_prefix": f"g{time.time_ns()}",
        "timeout_s": 5,
        "on_failure": "closed",
    }
    guards = [
        _limited_guard(tmp_path, vllm_url, {"requests_per_minute": limit}, state, name=f"r{i}")
        for i in range(3)
    ]

    async def fire() -> tuple[list[int], float]:
        limits = httpx.Limits(max_connections=60)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            started = time.monotonic()

            async def one(i: int) -> int:
                response = await client.post(
                    guards[i % 3].base_url + "/completions",
                    json={"model": "teacher", "prompt": "hi", "max_tokens": 2},
                    headers={"Authorization": f"Bearer {KEY}"},
                )
                return response.status_code

            statuses = await asyncio.gather(*(one(i) for i in range(150)))
            return list(statuses), time.monotonic() - started

    try:
        statuses, elapsed = asyncio.run(fire())
    finally:
        for guard in guards:
            guard.stop()
    refill = limit / 60 * elapsed
    assert set(statuses) <= {200, 429}
    assert limit <= statuses.count(200) <= limit + int(refill) + 1, (statuses.count(200), elapsed)


@pytest.mark.parametrize("on_failure", ["open", "closed"])
def test_redis_stopped_mid_run(tmp_path: Path, vllm_url: str, on_failure: str) -> None:
    redis = RedisProcess().start()
    state = {"backend": "redis", "redis_url": redis.url, "on_failure": on_failure}
    guard = _limited_guard(tmp_path, vllm_url, {"requests_per_minute": 1000}, state)
    try:
        _complete(guard)
        assert metric_value(guard.metrics(), "guard_state_backend_up") == 1
        redis.stop()
        if on_failure == "open":
            for _ in range(3):
                _complete(guard)
        else:
            for _ in range(3):
                with pytest.raises(openai.InternalServerError) as caught:
                    _complete(guard)
                assert caught.value.status_code == 503
        text = guard.metrics()
        assert metric_value(text, "guard_state_backend_up") == 0
        assert metric_value(text, "guard_state_errors_total") >= 3
        assert guard.alive()
        # Redis back on the same port: the guard recovers by itself.
        restarted = RedisProcess(redis.port).start()
        try:
            _complete(guard)
            assert metric_value(guard.metrics(), "guard_state_backend_up") == 1
        finally:
            restarted.stop()
    finally:
        guard.stop()
        redis.stop()


def test_concurrency_slot_is_released_when_a_stream_client_disconnects(tmp_path: Path) -> None:
    with FaultyUpstream("slow_stream") as upstream:
        guard = _limited_guard(tmp_path, upstream.url, {"concurrent_requests": 1})
        try:
            sdk = _sdk(guard)
            stream = sdk.completions.create(model="teacher", prompt="hi", max_tokens=5, stream=True)
            next(iter(stream))
            with pytest.raises(openai.RateLimitError) as caught:
                _complete(guard)
            assert caught.value.response.json()["error"]["type"] == "concurrency"
            stream.close()
            assert upstream.cancelled.wait(5)
            deadline = time.monotonic() + 5
            while True:
                try:
                    again = sdk.completions.create(
                        model="teacher", prompt="hi", max_tokens=5, stream=True
                    )
                    break
                except openai.RateLimitError:
                    assert time.monotonic() < deadline, "the slot was never released"
                    time.sleep(0.05)
            next(iter(again))
            again.close()
        finally:
            guard.stop()


def test_the_redis_password_comes_from_a_file_and_is_never_logged(
    tmp_path: Path, vllm_url: str
) -> None:
    password = "redis-pw-" + "q" * 24
    redis = RedisProcess(password=password).start()
    (tmp_path / "redis.password").write_text(password + "\n")
    (tmp_path / "wrong.password").write_text("not-the-password\n")
    state = {"backend": "redis", "redis_url": redis.url, "key_prefix": f"pw{time.time_ns()}"}
    try:
        for name, source, limited in (
            ("right", "redis.password", True),
            ("wrong", "wrong.password", False),
        ):
            # relative to the config file, which _limited_guard writes one folder down
            guard = _limited_guard(
                tmp_path,
                vllm_url,
                {"requests_per_minute": 2},
                {**state, "redis_password": {"file": f"../{source}"}, "on_failure": "open"},
                name=name,
            )
            try:
                outcomes = []
                for _ in range(3):
                    try:
                        _complete(guard)
                        outcomes.append(200)
                    except openai.RateLimitError:
                        outcomes.append(429)
                up = metric_value(guard.metrics(), "guard_state_backend_up")
            finally:
                guard.stop()
            if limited:  # the limit holds in Redis, and the review state follows it there
                assert (outcomes, up) == ([200, 200, 429], 1)
                assert "review channel lost" not in guard.log()
                assert "review state: Redis unavailable" not in guard.log()
            else:  # refused by Redis: fail open, and say so
                assert (outcomes, up) == ([200, 200, 200], 0)
                assert "state backend unavailable" in guard.log()
            assert password not in guard.log()
    finally:
        redis.stop()


def test_a_password_in_the_redis_url_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = tmp_path / "guard.yaml"
    path.write_text(
        yaml.safe_dump({"state": {"redis_url": "redis://:hunter2hunter2@redis:6379/0"}})
    )
    with pytest.raises(ConfigError, match=r"state.redis_url: the URL holds a password") as caught:
        load_settings(path)
    assert "hunter2" not in str(caught.value)


def test_one_redis_round_trip_per_request_on_the_way_in(
    tmp_path: Path, vllm_url: str, redis_server: RedisProcess
) -> None:
    """With limits and detection on, a request's way in costs one Redis command, the
    observe-and-admit script (no admit, no readmit); its settlement is the only other one."""
    prefix = f"g{time.time_ns()}"
    state = {"backend": "redis", "redis_url": redis_server.url, "key_prefix": prefix}
    limits = {"requests_per_minute": 1000, "tokens_per_minute": 100_000, "concurrent_requests": 4}
    guard = _limited_guard(tmp_path, vllm_url, limits, state)
    scripts = RedisStore(redis_server.url)
    shas = {
        scripts._observe_admit.sha: "observe_admit",
        scripts._admit.sha: "admit",
        scripts._readmit.sha: "readmit",
        scripts._settle.sha: "settle",
    }
    requests = 6

    async def watch() -> list[str]:
        redis = aioredis.Redis.from_url(redis_server.url)
        seen: list[str] = []
        try:
            async with redis.monitor() as monitor:

                async def listen() -> None:
                    async for command in monitor.listen():
                        if command.get("client_type") != "lua":  # not those scripts run
                            seen.append(command["command"])

                listener = asyncio.create_task(listen())
                await asyncio.sleep(0.2)
                for _ in range(requests):
                    await asyncio.to_thread(_complete, guard)
                await asyncio.sleep(0.5)  # the last settlement
                listener.cancel()
        finally:
            await redis.aclose()
            await scripts.close()
        return seen

    try:
        _complete(guard)  # the scripts are loaded
        seen = asyncio.run(watch())
    finally:
        guard.stop()
    mine = [command for command in seen if f"{prefix}:{{c:limited}}" in command]
    kinds = [shas.get(command.split()[1], command.split()[0]) for command in mine]
    assert kinds.count("observe_admit") == requests, kinds
    assert kinds.count("settle") == requests, kinds
    assert len(kinds) == 2 * requests, kinds
