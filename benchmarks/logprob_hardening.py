"""Cost of hardening a whole response's logprobs: one position at a time (``apply`` and
``rerank`` per position, the channel's path before) against all positions at once with numpy
(``guard_server.defences.logprob_batch``), in one run.

    nice -n 5 .venv/bin/python -m benchmarks.logprob_hardening --rounds 15

Each row times ``LogprobChannel.response`` on one vLLM-shaped response (the default tier's
hardening: noise 1.0, order kept, normalized, grid 0.5, exact sampled value above 0.9; the
``perturb`` rows add its ranked tail), JSON reading and writing back included, with the
channel's ``BATCH_FROM`` set so that the whole response goes one way or the other. The two are
interleaved, alternating which goes first; the figures are medians over ``--rounds`` rounds
of the time per response, and the median of per-round ratios (which cancels the machine's
drift). The "break-even" rows show where the batch starts to pay (the channel's
``BATCH_FROM``).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import random
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from guard_server.config.loader import load_settings
from guard_server.detection.scoring import Assessment
from guard_server.openai_fields import Endpoint
from guard_server.pipeline import logprob_channel
from guard_server.pipeline.auth import authenticate
from guard_server.pipeline.canonicalize import canonicalize
from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.logprob_channel import LogprobChannel
from guard_server.pipeline.plan import make_plan
from guard_server.pipeline.policy import apply_tier_policy
from guard_server.pipeline.validate import validate_request
from guard_server.testing.config import DEMO_KEY, POLICIES

PER_POSITION = 1 << 30  # BATCH_FROM: never batch
BATCHED = 1  # BATCH_FROM: always batch


async def _context(endpoint: Endpoint, count: int, perturb: bool) -> RequestContext:
    """A planned default-tier request asking for ``count`` logprobs."""
    if endpoint is Endpoint.CHAT:
        body: dict[str, Any] = {
            "model": "teacher",
            "messages": [{"role": "user", "content": "q"}],
            "logprobs": True,
            "top_logprobs": count,
        }
    else:
        body = {"model": "teacher", "prompt": "q", "logprobs": count}
    settings = load_settings(POLICIES / "guard.yaml")
    headers = CIMultiDictProxy(CIMultiDict({"Authorization": f"Bearer {DEMO_KEY}"}))
    ctx = RequestContext(endpoint, settings, headers, time.perf_counter())
    ctx.body = body
    for stage in (authenticate, validate_request, apply_tier_policy, canonicalize):
        await stage(ctx)
    assert ctx.client is not None
    assessment = Assessment(0.42, {}, "perturb") if perturb else None
    ctx.plan = make_plan(settings.secret, ctx.client, assessment)
    ctx.body[("top_logprobs" if endpoint is Endpoint.CHAT else "logprobs")] = count
    return ctx


def _position(rng: random.Random, position: int, count: int) -> list[tuple[str, float]]:
    """``count`` tokens and sorted logprobs, the first one most often confident."""
    values = sorted((rng.uniform(-12, -0.5) for _ in range(count - 1)), reverse=True)
    first = rng.choice([-0.02, -0.3, -0.7])
    return [(f"tok{position}.{i}", v) for i, v in enumerate([first, *values])]


def _payload(endpoint: Endpoint, positions: int, count: int) -> dict[str, Any]:
    rng = random.Random(positions * 100 + count)
    rows = [_position(rng, position, count) for position in range(positions)]
    if endpoint is Endpoint.CHAT:
        content = [
            {
                "token": row[0][0],
                "logprob": row[0][1],
                "top_logprobs": [{"token": t, "logprob": v} for t, v in row],
            }
            for row in rows
        ]
        return {"choices": [{"index": 0, "logprobs": {"content": content}}]}
    logprobs = {
        "tokens": [row[0][0] for row in rows],
        "token_logprobs": [row[0][1] for row in rows],
        "top_logprobs": [dict(row) for row in rows],
    }
    return {"choices": [{"index": 0, "text": "", "logprobs": logprobs}]}


@contextmanager
def _batch_from(value: int) -> Iterator[None]:
    saved = logprob_channel.BATCH_FROM
    logprob_channel.BATCH_FROM = value
    try:
        yield
    finally:
        logprob_channel.BATCH_FROM = saved


def _seconds(ctx: RequestContext, payload: dict[str, Any], calls: int, batch_from: int) -> float:
    """Seconds per response over ``calls`` fresh copies of ``payload`` (copies not timed)."""
    channel = LogprobChannel()
    copies = [copy.deepcopy(payload) for _ in range(calls)]
    with _batch_from(batch_from):
        start = time.perf_counter()
        for body in copies:
            ctx.logprob_positions.clear()
            channel.response(ctx, body, False)
        return (time.perf_counter() - start) / calls


def _row(name: str, ctx: RequestContext, payload: dict[str, Any], args: argparse.Namespace) -> str:
    before, after, ratios = [], [], []
    calls = max(1, args.values // sum(len(p) for p in _rows(payload)))
    _seconds(ctx, payload, 1, PER_POSITION), _seconds(ctx, payload, 1, BATCHED)  # warm up
    for round_ in range(args.rounds):
        if round_ % 2:
            b = _seconds(ctx, payload, calls, PER_POSITION)
            a = _seconds(ctx, payload, calls, BATCHED)
        else:
            a = _seconds(ctx, payload, calls, BATCHED)
            b = _seconds(ctx, payload, calls, PER_POSITION)
        before.append(b)
        after.append(a)
        ratios.append(b / a)
    spread = f"{min(ratios):.2f}–{max(ratios):.2f}"
    return (
        f"| {name} | {statistics.median(before) * 1e6:,.0f} | "
        f"{statistics.median(after) * 1e6:,.0f} | {statistics.median(ratios):.2f} | {spread} |"
    )


def _rows(payload: dict[str, Any]) -> list[Any]:
    """The positions of the payload's first choice (for sizing the calls)."""
    logprobs = payload["choices"][0]["logprobs"]
    return logprobs.get("content") or logprobs["top_logprobs"]


async def _main(args: argparse.Namespace) -> None:
    print(f"batch from {logprob_channel.BATCH_FROM} positions in the channel")
    print("| response | per position (µs) | batched (µs) | ratio | ratio range |")
    print("|---|---:|---:|---:|---:|")
    cases = [
        (endpoint, args.positions, count, perturb)
        for endpoint in (Endpoint.CHAT, Endpoint.COMPLETIONS)
        for count in (5, 20)
        for perturb in (False, True)
    ]
    cases += [(Endpoint.CHAT, positions, 5, False) for positions in (4, 8, 16, 32)]
    for endpoint, positions, count, perturb in cases:
        ctx = await _context(endpoint, count, perturb)
        name = (
            f"{'chat' if endpoint is Endpoint.CHAT else 'completions'} {positions} × {count}"
            + (", perturb (ranked)" if perturb else "")
            + (" (break-even)" if positions != args.positions else "")
        )
        print(_row(name, ctx, _payload(endpoint, positions, count), args), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=128, help="positions per response")
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds per row")
    parser.add_argument(
        "--values", type=int, default=20_000, help="logprob values hardened per side per round"
    )
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
