"""The stages on ``/v1/embeddings`` requests: validation, the canonical identity of each input,
the tier's input cap, admission's estimate and the vector hardening of the answer."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from guard_server.canonical import canonical_input
from guard_server.defences.embeddings import decode_base64
from guard_server.detection.scoring import Assessment
from guard_server.errors import GuardError
from guard_server.metrics import GuardMetrics
from guard_server.openai_fields import Endpoint
from guard_server.pipeline.admit import estimate_tokens
from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.embedding_channel import (
    MalformedEmbeddings,
    harden_embeddings,
    vector_hardening,
)
from guard_server.pipeline.plan import Planner
from guard_server.testing import TRUSTED_KEY
from tests.pipeline.helpers import context, planned

EMBED = Endpoint.EMBEDDINGS
DIMENSIONS = 32


async def _planned(body: dict[str, Any], key: str | None = None) -> RequestContext:
    ctx = context({"model": "teacher", **body}, endpoint=EMBED, **({"key": key} if key else {}))
    return await planned(ctx)


def _identities(body: dict[str, Any]) -> tuple[bytes, ...]:
    return canonical_input(EMBED, {"model": "teacher", **body}).identities


def test_each_input_has_its_own_identity_whatever_else_the_request_says() -> None:
    alone = _identities({"input": "a"})
    assert _identities({"input": ["a"]}) == alone
    batch = _identities({"input": ["b", "a"], "encoding_format": "base64", "user": "u"})
    assert batch[1] == alone[0] and batch[0] != alone[0]
    assert _identities({"input": "a", "dimensions": 8}) == alone
    assert _identities({"input": "a", "add_special_tokens": False}) != alone
    assert _identities({"input": [[1, 2], [3]]})[0] == _identities({"input": [1, 2]})[0]
    completions = canonical_input(Endpoint.COMPLETIONS, {"model": "teacher", "prompt": "a"})
    assert completions.identities != alone  # another endpoint: another identity


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [1, "a"]}, "input"),
        ({"input": [[1], []]}, "input"),
        ({"input": 5}, "input"),
        ({"input": "a", "encoding_format": "bytes"}, "encoding_format"),
        ({"input": "a", "dimensions": 0}, "dimensions"),
        ({"input": "a", "stream": True}, "stream"),
        ({"input": "a", "messages": []}, "messages"),
        ({"prompt": "a"}, "prompt"),
    ],
)
async def test_malformed_embedding_requests_are_rejected(body: dict, param: str) -> None:
    with pytest.raises(GuardError) as caught:
        await _planned(body)
    assert caught.value.status == 400 and caught.value.param == param


async def test_the_tier_caps_the_inputs_and_each_counts_as_a_prompt() -> None:
    with pytest.raises(GuardError) as caught:
        await _planned({"input": ["x"] * 257})
    assert caught.value.param == "input" and caught.value.code == "value_out_of_range"
    ctx = await _planned({"input": ["What is 1 + 2?"] * 256})
    assert ctx.canonical is not None and ctx.canonical.prompts == 256
    assert estimate_tokens(ctx) == 256 * (len("What is 1 + 2?") // 4 + 1)  # no completion
    trusted = await _planned({"input": ["x"] * 2048}, key=TRUSTED_KEY)
    assert trusted.canonical is not None and trusted.canonical.prompts == 2048


def _answer(count: int) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((count, DIMENSIONS))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    data = [{"index": i, "object": "embedding", "embedding": row.tolist()} for i, row in
            enumerate(rows)]  # fmt: skip
    return {"object": "list", "data": data, "model": "served", "usage": {"prompt_tokens": 3}}


def _served(payload: dict[str, Any]) -> np.ndarray:
    rows = [item["embedding"] for item in payload["data"]]
    return np.asarray([decode_base64(r) if isinstance(r, str) else r for r in rows])


async def test_vectors_are_hardened_per_client_and_input() -> None:
    ctx = await _planned({"input": ["a", "b"]})
    true = _answer(2)
    payload = _answer(2)
    harden_embeddings(ctx, payload)
    served = _served(payload)
    assert not np.allclose(served, _served(true))
    assert np.allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-6)
    # the same input in another batch, at another index: the same vector
    again = await _planned({"input": ["b", "c"], "encoding_format": "base64"})
    reordered = _answer(2)
    reordered["data"][0]["embedding"] = true["data"][1]["embedding"]
    harden_embeddings(again, reordered)
    assert np.array_equal(_served(reordered)[0], served[1].astype(np.float32))
    # another client: other noise
    alice = await _planned({"input": ["a", "b"]})
    assert alice.client is not None
    alice.client = dataclasses.replace(alice.client, id="alice")
    other = _answer(2)
    harden_embeddings(alice, other)
    assert not np.allclose(_served(other), served)


async def test_the_trusted_tier_gets_the_vectors_untouched() -> None:
    ctx = await _planned({"input": ["a", "b"]}, key=TRUSTED_KEY)
    payload = _answer(2)
    harden_embeddings(ctx, payload)
    assert payload == _answer(2)
    ctx.body["encoding_format"] = "base64"
    harden_embeddings(ctx, payload)
    assert np.array_equal(_served(payload), _served(_answer(2)).astype(np.float32))


async def test_a_flagged_client_gets_the_flagged_noise() -> None:
    ctx = await _planned({"input": "a"})
    policy = ctx.client.tier.embeddings if ctx.client else None
    assert policy is not None and policy.flagged_noise > policy.noise > 0
    assert vector_hardening(ctx).noise == policy.noise
    assert ctx.client is not None and ctx.canonical is not None
    for action in ("perturb", "decoy"):
        ctx.assessment = Assessment(0.5, {}, action)
        await Planner(GuardMetrics(CollectorRegistry()))(ctx)
        assert ctx.plan is not None and ctx.plan.action == action
        assert ctx.plan.decoy is None  # no text to replace: the flagged noise instead
        assert vector_hardening(ctx).noise == policy.flagged_noise


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        [{"index": 0, "embedding": [0.1]}, {"index": 1, "embedding": [0.1]}],
        [{"index": 5, "embedding": [0.1, 0.2]}],
        [{"index": 0, "embedding": "AAAA"}],
        [{"index": 0, "embedding": [[0.1], [0.2]]}],
        [{"index": 0, "embedding": ["x"]}],
    ],
)
async def test_a_malformed_answer_is_refused(data: object) -> None:
    ctx = await _planned({"input": "a"})
    with pytest.raises(MalformedEmbeddings):
        harden_embeddings(ctx, {"object": "list", "data": data})
