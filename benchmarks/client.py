"""The benchmarks' Python load client: paired latency, stream timing, populating clients."""

# Runs as a child process of benchmarks.run and prints one JSON object on stdout.
#
#     python -m benchmarks.client paired --targets targets.json --requests 1000
#     python -m benchmarks.client stream --targets targets.json --requests 300
#     python -m benchmarks.client populate --url URL --body body.json --keys 10000
#
# A target is ``{"name", "url", "key", "path", "body_file"}`` (``"rotate_keys": N`` sends each
# request with a random one of ``sk-bench-0000000`` .. N-1 instead of ``key``); ``{n}`` in a
# body is replaced by a request counter modulo ``--vary``, as the wrk script does. ``paired``
# and ``stream`` send to every target in turn, one request at a time (rotating which goes
# first), so all targets see the same moment of a noisy machine.

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from pathlib import Path
from typing import Any

import aiohttp

_TIMEOUT = aiohttp.ClientTimeout(total=30)


class Target:
    """One endpoint with its key (or keys), path and body."""

    def __init__(self, spec: dict[str, Any], vary: int = 64) -> None:
        self.vary = max(1, vary)
        self.name: str = spec["name"]
        self.url: str = spec["url"].rstrip("/") + spec.get("path", "/v1/chat/completions")
        self.body = Path(spec["body_file"]).read_text()
        self.key: str | None = spec.get("key")
        self.rotate_keys: int = spec.get("rotate_keys", 0)
        self.random = random.Random(1234)

    def payload(self, n: int) -> bytes:
        """The body of request ``n``."""
        return self.body.replace("{n}", str(n % self.vary)).encode()

    def headers(self) -> dict[str, str]:
        """The headers of the next request."""
        key = self.key
        if self.rotate_keys:
            key = f"sk-bench-{self.random.randrange(self.rotate_keys):07d}"
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers


async def _once(session: aiohttp.ClientSession, target: Target, n: int) -> float:
    headers = target.headers()
    started = time.perf_counter()
    async with session.post(target.url, data=target.payload(n), headers=headers) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{target.name}: HTTP {r.status}: {(await r.text())[:300]}")
    return time.perf_counter() - started


async def _stream_once(
    session: aiohttp.ClientSession, target: Target, n: int
) -> tuple[float, float, int]:
    """(time to the first data chunk, time to [DONE], data chunks before [DONE])."""
    headers = target.headers()
    started = time.perf_counter()
    first = None
    chunks = 0
    async with session.post(target.url, data=target.payload(n), headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"{target.name}: HTTP {r.status}: {(await r.text())[:300]}")
        async for line in r.content:
            if not line.startswith(b"data:"):
                continue
            if line.startswith(b"data: [DONE]"):
                break
            if first is None:
                first = time.perf_counter() - started
            chunks += 1
    total = time.perf_counter() - started
    return first if first is not None else total, total, chunks


async def paired(targets: list[Target], requests: int, warmup: int, max_s: float) -> dict:
    """Latency (seconds) of each target, one request at a time, rotating the order."""
    sessions = [aiohttp.ClientSession(timeout=_TIMEOUT) for _ in targets]
    results: dict[str, list[float]] = {t.name: [] for t in targets}
    deadline = time.monotonic() + max_s
    try:
        for i in range(warmup + requests):
            if time.monotonic() > deadline:
                break
            for j in range(len(targets)):
                k = (i + j) % len(targets)
                seconds = await _once(sessions[k], targets[k], i)
                if i >= warmup:
                    results[targets[k].name].append(seconds)
    finally:
        for session in sessions:
            await session.close()
    return {"latency_s": results}


async def stream(targets: list[Target], requests: int, warmup: int, max_s: float) -> dict:
    """Time to first chunk and total time of each target's streams, one at a time."""
    sessions = [aiohttp.ClientSession(timeout=_TIMEOUT) for _ in targets]
    results: dict[str, dict[str, list[float]]] = {
        t.name: {"first_s": [], "total_s": [], "chunks": []} for t in targets
    }
    deadline = time.monotonic() + max_s
    try:
        for i in range(warmup + requests):
            if time.monotonic() > deadline:
                break
            for j in range(len(targets)):
                k = (i + j) % len(targets)
                first, total, chunks = await _stream_once(sessions[k], targets[k], i)
                if i >= warmup:
                    row = results[targets[k].name]
                    row["first_s"].append(first)
                    row["total_s"].append(total)
                    row["chunks"].append(chunks)
    finally:
        for session in sessions:
            await session.close()
    return results


async def populate(
    url: str, body_file: Path, keys: int, prefix: str, concurrency: int, max_s: float
) -> dict:
    """Send one request per key ``prefix + i`` (i < keys), ``concurrency`` at a time."""
    body = body_file.read_text()
    statuses: dict[int, int] = {}
    next_key = 0
    deadline = time.monotonic() + max_s
    connector = aiohttp.TCPConnector(limit=concurrency)

    async with aiohttp.ClientSession(timeout=_TIMEOUT, connector=connector) as session:

        async def worker() -> None:
            nonlocal next_key
            while next_key < keys and time.monotonic() < deadline:
                i = next_key
                next_key += 1
                headers = {
                    "Content-Type": "application/json",
                    "Authorization": f"Bearer {prefix}{i:07d}",
                }
                payload = body.replace("{n}", str(i)).encode()
                async with session.post(url, data=payload, headers=headers) as r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return {"sent": next_key, "seconds": seconds, "statuses": statuses}


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["paired", "stream", "populate"])
    parser.add_argument("--targets", type=Path)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--url")
    parser.add_argument("--body", type=Path)
    parser.add_argument("--keys", type=int, default=0)
    parser.add_argument("--key-prefix", default="sk-bench-")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--vary", type=int, default=64, help="distinct prompts cycled")
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    if args.mode == "populate":
        result = asyncio.run(
            populate(
                args.url, args.body, args.keys, args.key_prefix, args.concurrency, args.max_seconds
            )
        )
    else:
        targets = [Target(spec, args.vary) for spec in json.loads(args.targets.read_text())]
        run = paired if args.mode == "paired" else stream
        result = asyncio.run(run(targets, args.requests, args.warmup, args.max_seconds))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
