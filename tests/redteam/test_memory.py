"""Found by reading the code: the scaffold-line cache kept whole message texts (about twice
the body per request) and was filled for requests later refused, so a 1 GiB pod could be
pushed into an OOM kill. Now caches hold fixed-size hashes, and nothing is kept for a request
before it is known to be valid.

Target (issue 16): 4,096 requests of 200 kB each answered 404 grow the guard's RSS by less
than 50 MB. The same for 4,096 answered 429 after scoring, each with a new 200 kB system
prompt (the path that filled the old cache). The figures are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from guard_server.pipeline.auth import hash_key
from guard_server.testing import POLICIES, GuardProcess, write_test_config

REQUESTS = 4096
BODY_BYTES = 200_000
LIMIT_MB = 50.0
CONCURRENCY = 8
KEY = "sk-rt-memory"


@pytest.fixture(scope="module")
def fresh_guard(vllm_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuardProcess]:
    """A guard of its own (nothing else grows its memory), with a client whose token bucket
    holds one token a minute: once it has spent it, it is refused for many minutes."""
    directory = tmp_path_factory.mktemp("memory")
    policy = directory / "memory.yaml"
    client = {"tier": "default", "keys": [hash_key(KEY)], "limits": {"tokens_per_minute": 1}}
    policy.write_text(yaml.safe_dump({"clients": {"rt-memory": client}}))
    policies = [str(POLICIES / "default.yaml"), str(policy)]
    config = write_test_config(directory, [vllm_url], policies=policies)
    guard = GuardProcess(config, directory / "guard.log").start()
    guard.wait_ready()
    try:
        yield guard
    finally:
        guard.stop()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _body(i: int, model: str) -> bytes:
    """A 200 kB chat request whose system prompt is new every time."""
    system = f"{i:08d} " + "rules " * (BODY_BYTES // 6)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": f"q {i}"}]
    return orjson.dumps({"model": model, "messages": messages})


async def _flood(guard: GuardProcess, model: str, expected: int, start: int, count: int) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = f"{guard.base_url}/chat/completions"
    queue = iter(range(start, start + count))

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in queue:
            async with session.post(url, data=_body(i, model), headers=headers) as response:
                await response.read()
                assert response.status == expected, await response.text()

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))


async def _spend(guard: GuardProcess) -> None:
    body = {"model": "teacher", "messages": [{"role": "user", "content": "1"}], "max_tokens": 2}
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession() as session:
        url = f"{guard.base_url}/chat/completions"
        async with session.post(url, json=body, headers=headers) as response:
            assert response.status == 200, await response.text()


@pytest.mark.parametrize(
    ("model", "status"), [("no-such-model", 404), ("teacher", 429)], ids=["404", "429"]
)
def test_large_refused_requests_do_not_grow_memory(
    fresh_guard: GuardProcess, model: str, status: int
) -> None:
    assert fresh_guard.process is not None
    pid = fresh_guard.process.pid
    if status == 429:  # spend the client's token: every later request is refused
        asyncio.run(_spend(fresh_guard))
    warm = 64
    before = _rss_mb(pid)
    asyncio.run(_flood(fresh_guard, model, status, 10**6, warm))
    warmed = _rss_mb(pid)
    asyncio.run(_flood(fresh_guard, model, status, 2 * 10**6, REQUESTS))
    after = _rss_mb(pid)
    print(
        f"\n{REQUESTS} x {BODY_BYTES // 1000} kB answered {status}: RSS {before:.1f} MB before, "
        f"{warmed:.1f} MB after {warm} warm-up requests, {after:.1f} MB after; "
        f"growth {after - before:.1f} MB ({after - warmed:.1f} MB past the warm-up)"
    )
    assert after - before < LIMIT_MB
