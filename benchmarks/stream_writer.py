"""Cost of the slow-reader guard on the streaming write path: ``ClientWriter.write`` against
aiohttp's ``StreamResponse.write``, per chunk, in one run.

    .venv/bin/python -m benchmarks.stream_writer --rounds 40 --chunks 4000

One aiohttp server streams ``--chunks`` SSE-sized chunks per request, either written directly
or through ``ClientWriter`` (the guard's writer, with its write timeout); a client on the same
event loop reads them as fast as it can. The two are interleaved, alternating which goes
first; the figure is the median time per chunk of each, and the median of per-round ratios
(which cancels the machine's drift).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp
from aiohttp import web

from guard_server.generation import ClientWriter

CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":" x"}}]}\n\n'


def _app(chunks: int) -> web.Application:
    async def direct(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse()
        await out.prepare(request)
        for _ in range(chunks):
            await out.write(CHUNK)
        await out.write_eof()
        return out

    async def guarded(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse()
        await out.prepare(request)
        writer = ClientWriter(request, out, 30.0)
        for _ in range(chunks):
            await writer.write(CHUNK)
        await writer.finish()
        return out

    app = web.Application()
    app.router.add_get("/direct", direct)
    app.router.add_get("/guarded", guarded)
    return app


async def _measure(rounds: int, chunks: int) -> dict[str, list[float]]:
    runner = web.AppRunner(_app(chunks), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    seconds: dict[str, list[float]] = {"direct": [], "guarded": []}
    async with aiohttp.ClientSession() as session:
        for index in range(rounds + 2):  # the first two rounds warm up
            order = ("direct", "guarded") if index % 2 else ("guarded", "direct")
            for path in order:
                started = time.perf_counter()
                async with session.get(f"http://127.0.0.1:{port}/{path}") as response:
                    await response.read()
                if index >= 2:
                    seconds[path].append(time.perf_counter() - started)
    await runner.cleanup()
    return seconds


def main() -> None:
    """Print µs per chunk, direct and guarded, and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--chunks", type=int, default=4000)
    args = parser.parse_args()
    try:
        import uvloop

        seconds = uvloop.run(_measure(args.rounds, args.chunks))
    except ImportError:
        seconds = asyncio.run(_measure(args.rounds, args.chunks))
    direct, guarded = seconds["direct"], seconds["guarded"]
    per_chunk = {k: statistics.median(v) / args.chunks * 1e6 for k, v in seconds.items()}
    ratios = [g / d for d, g in zip(direct, guarded, strict=True)]
    print(
        f"direct {per_chunk['direct']:.2f} µs/chunk, ClientWriter {per_chunk['guarded']:.2f} "
        f"µs/chunk; ratio of medians {per_chunk['guarded'] / per_chunk['direct']:.3f}, median "
        f"per-round ratio {statistics.median(ratios):.3f} ({args.rounds} rounds)"
    )


if __name__ == "__main__":
    main()
