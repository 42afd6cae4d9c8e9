"""Issue 16, item 2: batched prompts were one request.

`/v1/completions` with `prompt` as a list of 64 prompts and `n: 4` returned 256 answers and
counted as one request with one distinct prompt. Now the default tier takes at most 4
prompts a request; each counts as a request for detection (its identity folded into the
profile) and for requests/min, and tokens are reserved for prompts x n x max_tokens.

`n` multiplies the tokens, not the detector's request count: `n` answers share one prompt,
and counting them as `n` requests with one distinct prompt would dilute the client's
novelty, a way to look less like a collector.
"""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from guard_server.teacher.task import completion_prompt, make_problems
from guard_server.testing import GuardProcess
from tests.redteam.conftest import profile, sdk, upstream_calls

PROMPTS = [completion_prompt(p.question) for p in make_problems(64, seed=41, split="heldout")]


def test_a_batch_above_the_tier_bound_is_refused_before_vllm(rt_guard: GuardProcess) -> None:
    before = upstream_calls(rt_guard)
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(rt_guard, "rt-batcher").completions.create(
            model="teacher", prompt=PROMPTS, n=4, max_tokens=4
        )
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "prompt"
    assert "64 prompts" in error["message"] and "at most 4" in error["message"]
    assert upstream_calls(rt_guard) == before


def test_each_prompt_of_a_batch_counts_in_the_profile(rt_guard: GuardProcess) -> None:
    client = sdk(rt_guard, "rt-batcher")
    start = (profile(rt_guard, "rt-batcher")["profile"] or {}).get("total", 0)
    reply = client.completions.create(model="teacher", prompt=PROMPTS[:4], n=2, max_tokens=4)
    assert len(reply.choices) == 8 and sorted(c.index for c in reply.choices) == list(range(8))
    report = profile(rt_guard, "rt-batcher")["profile"]
    assert report["total"] == start + 4 and report["distinct_prompts"] >= 4
    distinct = report["distinct_prompts"]
    client.completions.create(model="teacher", prompt=PROMPTS[:4], n=2, max_tokens=4)
    report = profile(rt_guard, "rt-batcher")["profile"]
    assert report["total"] == start + 8 and report["distinct_prompts"] == distinct  # repeats


def test_the_audit_line_records_prompts_and_n(rt_guard: GuardProcess) -> None:
    sdk(rt_guard, "rt-batcher").completions.create(
        model="teacher", prompt=PROMPTS[8:11], n=3, max_tokens=2
    )
    audit = Path(rt_guard.config).parent / "audit.jsonl"
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    mine = [line for line in lines if line["client"] == "rt-batcher" and line["status"] == 200]
    assert (mine[-1]["prompts"], mine[-1]["n"]) == (3, 3)


def test_requests_per_minute_count_prompts(rt_guard: GuardProcess) -> None:
    """6 requests a minute: one batch of 4 passes, a second batch of 4 is refused."""
    client = sdk(rt_guard, "rt-limited")
    client.completions.create(model="teacher", prompt=PROMPTS[20:24], max_tokens=2)
    with pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model="teacher", prompt=PROMPTS[24:28], max_tokens=2)
    assert caught.value.response.headers["x-ratelimit-limit-requests"] == "6"
