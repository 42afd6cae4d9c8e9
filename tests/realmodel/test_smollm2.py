"""SmolLM2-135M-Instruct through the guard: answers, logprob hardening, plugin noise, watermark.

One guard (``serve --teacher smollm2``, the lab's tiers) for the whole module; every request
goes through the official openai SDK.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from guard_server.config.loader import load_settings
from guard_server.trace import tokenize, trace
from guard_server.upstream import smollm2
from load_tests.realmodel import stack
from load_tests.realmodel.questions import Item, items
from tests.realmodel.conftest import sdk

pytestmark = pytest.mark.smollm2

QUESTIONS = items()
OPEN_PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Describe your favourite season and why.",
    "Explain how a bicycle works to a child.",
    "Write a letter to a friend about a trip to the sea.",
    "What makes a good breakfast? Explain.",
    "Tell me about the history of bread.",
    "Describe a walk through a forest in autumn.",
    "Why do people keep pets? Give some reasons.",
]


def _chat(client: openai.OpenAI, content: str, **kwargs):  # type: ignore[no-untyped-def]
    return client.chat.completions.create(
        model=stack.MODEL, messages=[{"role": "user", "content": content}], **kwargs
    )


def test_serve_teacher_smollm2_answers_through_the_sdk(smollm2_lab: stack.Lab) -> None:
    client = sdk(smollm2_lab, "default")
    assert [m.id for m in client.models.list().data] == [stack.MODEL]
    reply = _chat(client, "What is the capital of France?", temperature=0, max_tokens=16)
    assert "Paris" in (reply.choices[0].message.content or "")


def _logprobs(client: openai.OpenAI, top: int):  # type: ignore[no-untyped-def]
    reply = _chat(
        client,
        "Write one sentence about the weather today.",
        temperature=0,
        max_tokens=24,
        logprobs=True,
        top_logprobs=top,
    )
    return reply.choices[0].logprobs.content


def test_default_tier_hardens_logprobs_on_the_49k_vocabulary(smollm2_lab: stack.Lab) -> None:
    """Clamped to 5, on the 0.5 grid, a sub-distribution in the true order; confident sampled
    tokens exact; the tokens themselves are the true top tokens."""
    trusted = _logprobs(sdk(smollm2_lab, "trusted"), 20)
    default = _logprobs(sdk(smollm2_lab, "default"), 20)
    assert [p.token for p in trusted] == [p.token for p in default]
    assert all(len(p.top_logprobs) == 20 for p in trusted)
    unsure = exact = 0
    for true, hardened in zip(trusted, default, strict=True):
        assert len(hardened.top_logprobs) == 5
        assert [t.token for t in hardened.top_logprobs] == [t.token for t in true.top_logprobs[:5]]
        values = [t.logprob for t in hardened.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-6
        if math.exp(true.logprob) >= 0.9:
            exact += 1
            assert hardened.logprob == pytest.approx(true.logprob, abs=1e-5)
        else:
            unsure += 1
            assert all(abs(v * 2 - round(v * 2)) < 1e-9 for v in values)
    assert unsure >= 3, "the sentence should have uncertain positions"
    assert exact >= 1


def test_default_tier_refuses_the_logit_recovery_requests(smollm2_lab: stack.Lab) -> None:
    client = sdk(smollm2_lab, "default")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(
            model=stack.MODEL,
            prompt="The capital of France is",
            max_tokens=1,
            logprobs=5,
            logit_bias={"1000": 100},
        )
    with pytest.raises(openai.BadRequestError):
        client.completions.create(
            model=stack.MODEL,
            prompt="The capital of France is",
            max_tokens=1,
            logprobs=1,
            extra_body={"logprob_token_ids": list(range(128))},
        )


def _continuations(client: str, lab: stack.Lab, n: int) -> list[str]:
    """Greedy continuations of the first ``n`` questions' stems (8 tokens), in order."""
    headers = {"Authorization": f"Bearer {stack.key(client)}"}
    with httpx.Client(base_url=lab.base_url, headers=headers, timeout=300) as http:

        def one(item: Item) -> str:
            body = {
                "model": stack.MODEL,
                "messages": [
                    {"role": "user", "content": item.question},
                    {"role": "assistant", "content": item.stem},
                ],
                "continue_final_message": True,
                "add_generation_prompt": False,
                "max_tokens": 8,
                "temperature": 0,
            }
            response = http.post("/chat/completions", json=body)
            response.raise_for_status()
            return response.json()["choices"][0]["message"]["content"]

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(one, QUESTIONS[:n]))


def test_plugin_noise_changes_greedy_answers_and_repeats_exactly(smollm2_lab: stack.Lab) -> None:
    plain = _continuations("trusted", smollm2_lab, 24)
    noisy = _continuations("noise1", smollm2_lab, 24)
    assert noisy == _continuations("noise1", smollm2_lab, 24), "the noise is keyed, not fresh"
    changed = sum(a != b for a, b in zip(plain, noisy, strict=True))
    assert changed >= 3, (plain, noisy)
    right = sum(q.check(a) for q, a in zip(QUESTIONS, noisy, strict=False))
    assert right >= 12, noisy  # sigma 1 at T=0 still answers most of these


def _stories(lab: stack.Lab, client: str) -> list[str]:
    """Eight answers of up to 64 tokens at T = 1, seeded (the text repeats run to run)."""
    client_sdk = sdk(lab, client)

    def one(indexed: tuple[int, str]) -> str:
        i, prompt = indexed
        reply = _chat(client_sdk, prompt, temperature=1, max_tokens=64, seed=i)
        return reply.choices[0].message.content or ""

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, enumerate(OPEN_PROMPTS)))


def test_watermark_on_real_text_names_its_client_and_no_one_else(smollm2_lab: stack.Lab) -> None:
    settings = load_settings(smollm2_lab.config)
    tokenizer = smollm2.model_dir() if smollm2.is_converted() else None
    assert tokenizer is not None
    marked = trace(settings, tokenize(_stories(smollm2_lab, "attacker"), tokenizer), 0.25, 1e-6)
    by_client = {s.client: s.score for s in marked.scores}
    assert marked.named == "attacker", by_client["attacker"]
    assert by_client["attacker"].z > 5  # measured about 14 on ~400 tokens (docs/evaluation.md)
    others = [s.z for c, s in by_client.items() if c != "attacker"]
    assert max(abs(z) for z in others) < 4.5
    clean = trace(settings, tokenize(_stories(smollm2_lab, "clean"), tokenizer), 0.25, 1e-6)
    assert clean.named is None
