"""The logprob channel's response half: per-prompt keys in a batch, and prompt logprobs
hardened like generated ones."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

from guard_server.openai_fields import Endpoint
from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.rewrite import rewrite_for_upstream
from guard_server.pipeline.transform import transform_response
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
