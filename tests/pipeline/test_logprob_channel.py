"""The logprob channel's response half: per-prompt keys in a batch, and prompt logprobs
hardened like generated ones."""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from typing import Any

import pytest

from guard_server.defences.logprobs import FLOOR, LogprobHardening
from guard_server.openai_fields import Endpoint
from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.rewrite import rewrite_for_upstream
from guard_server.pipeline.transform import transform_chunk, transform_response
from tests.pipeline.helpers import context, planned, planned_for_client


def _completion_choice(index: int) -> dict[str, Any]:
    top = {" 7": -0.2, " 8": -1.9, " 9": -2.4}
    return {
        "index": index,
        "text": " 7",
        "logprobs": {"tokens": [" 7"], "token_logprobs": [-0.2], "top_logprobs": [dict(top)]},
    }


async def _completions(prompt: Any, n: int = 1) -> RequestContext:
    body = {"model": "teacher", "prompt": prompt, "logprobs": 3, "n": n}
    return await planned(context(body, endpoint=Endpoint.COMPLETIONS))


async def test_a_prompt_gets_the_same_values_whatever_it_is_batched_with() -> None:
    alone = await _completions("P", n=2)
    batched = await _completions(["X", "P"], n=2)
    answer = {"choices": [_completion_choice(i) for i in range(2)]}
    batch_answer = {"choices": [_completion_choice(i) for i in range(4)]}
    transform_response(alone, answer)
    transform_response(batched, batch_answer)
    values = [c["logprobs"]["top_logprobs"][0] for c in batch_answer["choices"]]
    assert values[2] == values[3] == answer["choices"][0]["logprobs"]["top_logprobs"][0]
    assert values[0] != values[2]  # another prompt, another key
    assert values[0] != _completion_choice(0)["logprobs"]["top_logprobs"][0]  # hardened


def _prompt_logprobs() -> list[Any]:
    """vLLM's shape: per prompt position, token id -> value, rank, text; the prompt's token
    first. Position 0 has none."""
    return [
        None,
        {
            "84": {"logprob": -9.1, "rank": 14, "decoded_token": "q"},
            "364": {"logprob": -0.3, "rank": 1, "decoded_token": " up"},
            "370": {"logprob": -1.52, "rank": 2, "decoded_token": " them"},
        },
        {
            "224": {"logprob": -0.0004, "rank": 1, "decoded_token": " "},
            "314": {"logprob": -9.59, "rank": 2, "decoded_token": " The"},
        },
    ]


async def _with_prompt_logprobs(content: str) -> RequestContext:
    """A default-tier request whose tier also allows ``prompt_logprobs`` (hardening on)."""
    ctx = context(
        {
            "model": "teacher",
            "messages": [{"role": "user", "content": content}],
            "prompt_logprobs": 2,
        }
    )
    from guard_server.pipeline.auth import authenticate

    await authenticate(ctx)
    assert ctx.client is not None
    tier = ctx.client.tier
    tier = dataclasses.replace(tier, allowed_fields=tier.allowed_fields | {"prompt_logprobs"})
    ctx.client = dataclasses.replace(ctx.client, tier=tier)
    return await planned_for_client(ctx)


async def test_prompt_logprobs_are_hardened_under_the_prompt_key() -> None:
    first = await _with_prompt_logprobs("q")
    again = await _with_prompt_logprobs("q")
    # Other prompts: any one may land on the same 0.5 grid points by chance, not all four.
    others = [await _with_prompt_logprobs(content) for content in "rstu"]
    rewrite_for_upstream(first, "teacher", guard_plugin=False)
    assert ("hardened", "prompt_logprobs") in first.policy_actions
    bodies = []
    for ctx in (first, again, *others):
        body = {"choices": [], "prompt_logprobs": _prompt_logprobs()}
        transform_response(ctx, body)
        bodies.append(body["prompt_logprobs"])
    raw = _prompt_logprobs()
    assert bodies[0] == bodies[1] and any(bodies[0] != other for other in bodies[2:])
    position = bodies[0][1]
    values = [entry["logprob"] for entry in position.values()]
    assert values != [entry["logprob"] for entry in raw[1].values()]
    assert all(v <= 0 and math.isclose(v / 0.5, round(v / 0.5)) for v in values)  # the grid
    assert [entry["rank"] for entry in position.values()] == [14, 1, 2]  # ranks untouched
    # A confident prompt token's own value stays exact (exact_sampled_above 0.9).
    assert bodies[0][2]["224"]["logprob"] == raw[2]["224"]["logprob"]


async def test_a_perturbed_plan_keeps_the_tiers_prompt_logprobs_count() -> None:
    """A flagged client asks vLLM for what any client of its tier would: a smaller count, or
    a note an unflagged client does not get, would tell it that it is flagged."""
    from guard_server.detection.scoring import Assessment
    from guard_server.pipeline.plan import make_plan

    notes = []
    for assessment in (None, Assessment(0.42, {}, "perturb")):
        ctx = await _with_prompt_logprobs("q")
        assert ctx.client is not None
        ctx.plan = make_plan(b"s" * 32, ctx.client, assessment)
        body = copy.deepcopy(ctx.body)
        ctx.body = body
        rewrite_for_upstream(ctx, "teacher", guard_plugin=False)
        assert body["prompt_logprobs"] == 2
        notes.append(ctx.policy_actions)
    assert notes[0] == notes[1]


def _chat_item(rng: random.Random, position: int) -> dict[str, Any]:
    """One chat position as vLLM returns it: five top tokens, sometimes a tie or a floor
    value, and a sampled token that is most often the first and sometimes not listed."""
    values = sorted(rng.choice([-0.0, -0.05, -1.5, FLOOR, rng.uniform(-12, 0)]) for _ in range(5))
    top = [{"token": f"t{position}.{i}", "logprob": v} for i, v in enumerate(reversed(values))]
    kind = rng.random()
    sampled = top[0] if kind < 0.7 else top[3] if kind < 0.85 else {"token": "x", "logprob": -14.0}
    return {"token": sampled["token"], "logprob": sampled["logprob"], "top_logprobs": top}


def _expected_position(
    hardening: LogprobHardening,
    key: bytes,
    position: int,
    item: dict[str, Any],
) -> tuple[str, list[tuple[str, str]]]:
    """One chat position hardened alone with the per-position functions: the sampled token's
    value, and the top tokens with theirs as listed (in vLLM's order, or a reranked answer's),
    values as bits."""
    values = {item["token"]: item["logprob"]}
    for entry in item["top_logprobs"]:
        values.setdefault(entry["token"], entry["logprob"])
    tokens, raw = list(values), list(values.values())
    sampled = tokens.index(item["token"])
    if hardening.ranked is None:
        hardened = hardening.apply(key, position, tokens, raw, sampled)
        by_token = dict(zip(tokens, hardened, strict=True))
        top = [(e["token"], by_token[e["token"]].hex()) for e in item["top_logprobs"]]
        return hardened[sampled].hex(), top
    listed = any(entry["token"] == item["token"] for entry in item["top_logprobs"])
    raw, order = hardening.rerank(key, position, tokens, raw, None if listed else sampled)
    hardened = hardening.apply(key, position, tokens, raw, sampled)
    place = {i: rank for rank, i in enumerate(order)}
    listing = sorted(range(len(tokens)), key=lambda i: (-hardened[i], place[i]))
    listed_top = {entry["token"] for entry in item["top_logprobs"]}
    top = [(tokens[i], hardened[i].hex()) for i in listing if tokens[i] in listed_top]
    return hardened[sampled].hex(), top


@pytest.mark.parametrize("action", ["pass", "perturb"])
async def test_a_response_hardens_as_each_position_alone_and_streamed_alike(action: str) -> None:
    """All positions of a response are hardened at once; each gets the values the
    per-position functions give it, bit for bit, and a stream's chunks get the same."""
    from guard_server.detection.scoring import Assessment
    from guard_server.pipeline.plan import make_plan

    body = {"model": "teacher", "messages": [{"role": "user", "content": "q"}], "logprobs": True}
    contexts = []
    for _ in range(2):
        ctx = await planned(context({**body, "top_logprobs": 5}))
        assert ctx.client is not None
        assessment = Assessment(0.42, {}, "perturb") if action == "perturb" else None
        ctx.plan = make_plan(b"s" * 32, ctx.client, assessment)
        contexts.append(ctx)
    whole_ctx, stream_ctx = contexts
    assert (whole_ctx.plan.hardening.ranked is not None) == (action == "perturb")
    rng = random.Random(7)
    items = [_chat_item(rng, position) for position in range(40)]
    whole = {"choices": [{"index": 0, "logprobs": {"content": copy.deepcopy(items)}}]}
    transform_response(whole_ctx, whole)
    hardened = whole["choices"][0]["logprobs"]["content"]
    key = whole_ctx.logprob_keys[0]
    for position, (item, got) in enumerate(zip(items, hardened, strict=True)):
        expected = _expected_position(whole_ctx.plan.hardening, key, position, item)
        top = [(e["token"], e["logprob"].hex()) for e in got["top_logprobs"]]
        assert (got["logprob"].hex(), top) == expected
    streamed = []
    for start in range(0, 40, 3):  # chunks of three positions
        chunk_items = copy.deepcopy(items[start : start + 3])
        chunk = {"choices": [{"index": 0, "delta": {}, "logprobs": {"content": chunk_items}}]}
        transform_chunk(stream_ctx, chunk)
        streamed += chunk["choices"][0]["logprobs"]["content"]
    assert streamed == hardened


async def test_streamed_completions_harden_as_the_whole_response() -> None:
    ctx_whole = await _completions("P")
    ctx_stream = await _completions("P")
    rng = random.Random(3)
    choice = {
        "index": 0,
        "text": "",
        "logprobs": {"tokens": [], "token_logprobs": [], "top_logprobs": []},
    }
    for position in range(30):
        values = sorted((rng.uniform(-9, 0) for _ in range(3)), reverse=True)
        top = {f" {position}.{i}": v for i, v in enumerate(values)}
        choice["logprobs"]["tokens"].append(f" {position}.0")
        choice["logprobs"]["token_logprobs"].append(values[0])
        choice["logprobs"]["top_logprobs"].append(top)
    logprobs = choice["logprobs"]
    whole = {"choices": [copy.deepcopy(choice)]}
    transform_response(ctx_whole, whole)
    streamed: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
    for start in range(0, 30, 4):
        part = {name: copy.deepcopy(seq[start : start + 4]) for name, seq in logprobs.items()}
        chunk = {"choices": [{"index": 0, "text": "", "logprobs": part}]}
        transform_chunk(ctx_stream, chunk)
        for name, seq in chunk["choices"][0]["logprobs"].items():
            streamed[name] += seq
    assert streamed == whole["choices"][0]["logprobs"]
    assert streamed["token_logprobs"] != choice["logprobs"]["token_logprobs"]  # hardened


async def test_a_long_prompts_logprobs_harden_as_each_position_alone() -> None:
    ctx = await _with_prompt_logprobs("q")
    assert ctx.plan is not None
    rng = random.Random(5)
    positions: list[Any] = [None]
    for position in range(1, 40):
        values = [rng.choice([-0.0, -0.01, rng.uniform(-12, 0)]) for _ in range(3)]
        positions.append(
            {f"{position}.{i}": {"logprob": v, "rank": i + 1} for i, v in enumerate(values)}
        )
    raw = copy.deepcopy(positions)
    body = {"choices": [], "prompt_logprobs": positions}
    transform_response(ctx, body)
    key = ctx.logprob_keys[-1]  # the first prompt's prompt-logprob key
    for position, (entries, before) in enumerate(zip(positions[1:], raw[1:], strict=True), start=1):
        tokens = list(before)
        values = [entry["logprob"] for entry in before.values()]
        expected = ctx.plan.hardening.apply(key, position, tokens, values, 0)
        assert [entries[t]["logprob"].hex() for t in tokens] == [v.hex() for v in expected]
