"""Chaos on the upstream side: an upstream process killed mid-stream and brought back, and an
upstream slower than the read timeout. Each test prints its figure (``-s``)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from guard_server.testing import GuardProcess, metric_value
from tests.chaos.helpers import (
    KEY,
    FakeUpstreamProcess,
    chat,
    client_policies,
    content_chunks,
    error_events,
    stream_events,
)
from tests.fake_upstream import FaultyUpstream

HEALTH_INTERVAL_S = 1.0
TOKENS = 30  # one chunk every 100 ms: a 3-second stream
SLOTS = 4


def _upstreams(urls: list[str], read_timeout: float = 30) -> dict:
    settings = {
        "urls": urls,
        "timeouts": {"connect": 1, "read": read_timeout, "total": 60},
        "health_interval_s": HEALTH_INTERVAL_S,
    }
    return {"teacher": settings}


async def _streams(guard: GuardProcess, count: int, kill: Callable[[], None] | None = None):  # type: ignore[no-untyped-def]
    """``count`` concurrent streams; ``kill()`` once every one has its first event."""
    started: list[int] = []
    async with httpx.AsyncClient(timeout=30) as client:
        tasks = [
            asyncio.create_task(stream_events(client, guard.base_url, chat(TOKENS, True), started))
            for _ in range(count)
        ]
        if kill is not None:
            while len(started) < count:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
            kill()
        return await asyncio.gather(*tasks)


def test_an_upstream_killed_mid_stream_then_restarted(
    tmp_path: Path, start_guard: Callable[..., GuardProcess]
) -> None:
    """Two endpoints, four streams across them, one endpoint's process SIGKILLed: its streams
    end with an error event then [DONE], the others finish; the client's four concurrency
    slots come back; the next streams go to the live endpoint; the killed endpoint, started
    again on its port, is healthy again within one health interval and takes its share."""
    doomed = FakeUpstreamProcess(tmp_path / "a.log", chunk_delay_ms=100).start()
    survivor = FakeUpstreamProcess(tmp_path / "b.log", chunk_delay_ms=100).start()
    try:
        guard = start_guard(
            [doomed.url, survivor.url],
            upstreams=_upstreams([doomed.url, survivor.url]),
            policies=client_policies(tmp_path, {"concurrent_requests": SLOTS}),
        )
        guard.wait_ready()
        results = asyncio.run(_streams(guard, SLOTS, lambda: os.kill(doomed.pid, signal.SIGKILL)))
        cut = [events for _, events in results if error_events(events)]
        whole = [events for _, events in results if not error_events(events)]
        print(f"\nkilled mid-stream: {len(cut)} streams cut, {len(whole)} finished")
        assert all(status == 200 and events[-1] == "[DONE]" for status, events in results)
        assert len(cut) == 2 and len(whole) == 2  # round robin over the two endpoints
        for events in cut:
            [error] = error_events(events)
            assert error["type"] == "upstream_error" and 0 < content_chunks(events) < TOKENS
        assert all(content_chunks(events) == TOKENS for events in whole)

        # The slots came back, and every new stream goes to the live endpoint.
        again = asyncio.run(_streams(guard, SLOTS))
        print(f"after the kill: {sum(not error_events(e) for _, e in again)}/{SLOTS} served")
        assert all(s == 200 and content_chunks(e) == TOKENS for s, e in again), again
        text = guard.metrics()
        assert metric_value(text, "guard_requests_in_flight") == 0
        assert metric_value(text, "guard_upstream_healthy", endpoint=doomed.url) == 0

        # Back on the same port (in process, to count what it serves).
        restarted = FaultyUpstream("ok")
        restarted.port = doomed.port
        with restarted:
            up_at = time.monotonic()
            while metric_value(guard.metrics(), "guard_upstream_healthy", endpoint=doomed.url) < 1:
                assert time.monotonic() - up_at < 10, "the restarted endpoint was never used"
                time.sleep(0.02)
            back_after = time.monotonic() - up_at
            statuses = [
                httpx.post(
                    guard.base_url + "/chat/completions",
                    json=chat(5, False),
                    headers={"Authorization": f"Bearer {KEY}"},
                    timeout=20,
                ).status_code
                for _ in range(6)
            ]
        print(
            f"restarted: healthy again {back_after:.2f} s after it was up (interval "
            f"{HEALTH_INTERVAL_S:g} s), served {restarted.requests} of the next 6"
        )
        assert statuses == [200] * 6
        assert back_after <= HEALTH_INTERVAL_S + 0.5  # a probe's round trip and a scrape
        assert restarted.requests == 3
    finally:
        doomed.stop()
        survivor.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_a_first_byte_after_the_read_timeout_is_a_504(
    tmp_path: Path, start_guard: Callable[..., GuardProcess], stream: bool
) -> None:
    with FaultyUpstream("hang") as upstream:
        guard = start_guard(
            [upstream.url],
            upstreams=_upstreams([upstream.url], 0.5),
            policies=client_policies(tmp_path, {}),
        )
        guard.wait_ready()
        started = time.monotonic()
        response = httpx.post(
            guard.base_url + "/chat/completions",
            json=chat(5, stream),
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=20,
        )
        seconds = time.monotonic() - started
        print(f"\nfirst byte late (stream={stream}): {response.status_code} in {seconds:.2f} s")
        assert response.status_code == 504
        assert upstream.cancelled.wait(5), "the upstream connection was left open"


def test_chunks_slower_than_the_read_timeout_end_the_stream_with_an_error_event(
    tmp_path: Path,
    start_guard: Callable[..., GuardProcess],
) -> None:
    with FaultyUpstream("stall_stream") as upstream:
        guard = start_guard(
            [upstream.url],
            upstreams=_upstreams([upstream.url], 0.5),
            policies=client_policies(tmp_path, {}),
        )
        guard.wait_ready()
        started = time.monotonic()
        response = httpx.post(
            guard.base_url + "/completions",
            json={"model": "teacher", "prompt": "hi", "max_tokens": 5, "stream": True},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=20,
        )
        seconds = time.monotonic() - started
        status = response.status_code
        events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
        print(f"\nstalled stream: {len(events)} events, ended after {seconds:.2f} s")
        assert status == 200 and events[-1] == "[DONE]"
        [error] = error_events(events)
        assert error["code"] == 504
        assert seconds < 5
        assert upstream.cancelled.wait(5), "the upstream connection was left open"
