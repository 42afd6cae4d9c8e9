"""Chaos in the guard itself: SIGTERM with 100 streams in flight, and a config reload every
second under load. Each test prints its figure (``-s``)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml

from guard_server.pipeline.auth import hash_key
from guard_server.testing import POLICIES, GuardProcess, metric_value
from tests.chaos.helpers import (
    KEY,
    FakeUpstreamProcess,
    chat,
    client_policies,
    content_chunks,
    stream_events,
)

STREAMS = 100
TOKENS = 40  # a chunk every 50 ms: 2 seconds a stream
DRAIN_S = 15


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_sigterm_with_100_streams_in_flight(
    tmp_path: Path, start_guard: Callable[..., GuardProcess]
) -> None:
    """Every stream in flight at SIGTERM finishes whole; new connections are refused at
    once; the guard exits 0 within the drain timeout."""
    with FakeUpstreamProcess(tmp_path / "upstream.log", chunk_delay_ms=50) as upstream:
        guard = start_guard(
            [upstream.url],
            policies=client_policies(tmp_path, {}, tier="trusted"),
            server={"drain_timeout_s": DRAIN_S},
        )
        guard.wait_ready()

        async def run() -> tuple[list[tuple[int, list[str]]], float, float | None]:
            started: list[int] = []
            limits = httpx.Limits(max_connections=STREAMS)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                tasks = [
                    asyncio.create_task(
                        stream_events(client, guard.base_url, chat(TOKENS, True), started)
                    )
                    for _ in range(STREAMS)
                ]
                while len(started) < STREAMS:
                    await asyncio.sleep(0.02)
                    assert not any(t.done() for t in tasks), "a stream ended before SIGTERM"
                signalled = time.monotonic()
                guard.send_signal(signal.SIGTERM)
                refused_after = None
                while refused_after is None and time.monotonic() - signalled < 5:
                    if await asyncio.to_thread(_refused, guard.port):
                        refused_after = time.monotonic() - signalled
                    await asyncio.sleep(0.05)
                results = await asyncio.gather(*tasks)
            return results, signalled, refused_after

        results, signalled, refused_after = asyncio.run(run())
        code = guard.wait(DRAIN_S + 10)
        exited_after = time.monotonic() - signalled
        whole = sum(
            s == 200 and e[-1] == "[DONE]" and content_chunks(e) == TOKENS for s, e in results
        )
        print(
            f"\nSIGTERM with {STREAMS} streams: {whole} finished whole, new connections "
            f"refused after {refused_after:.2f} s, exit {code} after {exited_after:.1f} s"
        )
        assert whole == STREAMS
        assert refused_after is not None and refused_after < 2
        assert code == 0 and exited_after < DRAIN_S
        assert "unhandled error" not in guard.log()


def _policy(version: int) -> str:
    """Version ``version`` of the reloaded policy: tier ``v<version>`` caps ``n`` at
    ``version`` and clamps ``max_tokens`` to ``3 - version``, and the client is in it. A
    request for ``n: 2, max_tokens: 2`` is a 400 under version 1, and under version 2 a 200
    of one token whose ``x-guard-policy`` names the tier and the clamp."""
    tier = {
        "models": ["*"],
        "allow_fields": ["@openai", "@vllm_sampling"],
        "bounds": {
            "n": {"max": version, "on_exceed": "reject"},
            "max_tokens": {"max": 3 - version, "on_exceed": "clamp"},
        },
        "detection": {"enabled": False},
    }
    policy = {
        "tiers": {f"v{version}": tier},
        "clients": {"chaos": {"tier": f"v{version}", "keys": [hash_key(KEY)]}},
    }
    return yaml.safe_dump(policy)


def test_a_config_reload_every_second_under_load(
    tmp_path: Path, start_guard: Callable[..., GuardProcess]
) -> None:
    """The policy file is swapped (written aside, then renamed over, as a ConfigMap or an
    editor does) between two versions every second while eight clients send requests: every
    answer matches one whole version: a 200 from tier v2, or v1's refusal of ``n: 2``."""
    policy = tmp_path / "reloaded.yaml"
    policy.write_text(_policy(1))
    with FakeUpstreamProcess(tmp_path / "upstream.log") as upstream:
        guard = start_guard([upstream.url], policies=[str(POLICIES / "default.yaml"), str(policy)])
        guard.wait_ready()
        tally: Counter[str] = Counter()
        body = {**chat(2, False), "n": 2}

        async def client_loop(client: httpx.AsyncClient, stop: asyncio.Event) -> None:
            while not stop.is_set():
                response = await client.post(
                    guard.base_url + "/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {KEY}"},
                )
                tier = response.headers.get("x-guard-policy", "")
                whole = response.status_code == 200 and response.json()["choices"][0]
                if (
                    whole
                    and tier == "tier=v2; clamped=max_tokens"
                    and whole["message"]["content"] == " t0"
                ):
                    tally["v2: 200"] += 1
                elif response.status_code == 400 and "`n`" in response.text:
                    tally["v1: 400 (n)"] += 1
                else:
                    tally[f"neither: {response.status_code} {tier} {response.text[:200]}"] += 1

        async def run() -> None:
            stop = asyncio.Event()
            async with httpx.AsyncClient(timeout=30) as client:
                tasks = [asyncio.create_task(client_loop(client, stop)) for _ in range(8)]
                for second in range(8):
                    await asyncio.sleep(1)
                    aside = tmp_path / f"aside-{second}.yaml"
                    aside.write_text(_policy(2 - second % 2))
                    os.replace(aside, policy)
                await asyncio.sleep(1)
                stop.set()
                await asyncio.gather(*tasks)

        asyncio.run(run())
        reloads = guard.metrics()
        print(f"\nreload every second: {dict(tally)}")
        succeeded = metric_value(reloads, "guard_config_reloads_total", result="success")
        print(f"reloads: {succeeded:g} succeeded")
        assert set(tally) == {"v2: 200", "v1: 400 (n)"}, tally
        assert succeeded >= 6
