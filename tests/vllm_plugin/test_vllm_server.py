"""Real vLLM (CPU) with the plugin loaded: untouched requests, keyed noise, bounds, watermark.

The model comes from GUARD_TEST_MODEL_DIR (default: the bundled teacher); the module is
skipped when that directory does not exist. One vLLM process with the plugin serves every
test here; one test also compares against the session's plain vLLM (``vllm_url``).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from guard_server.defences.watermark import score
from guard_server.testing import model_dir_under_test, vllm_process
from guard_server.upstream.bundled_teacher import plugin_args

MODEL_DIR = model_dir_under_test()
PROMPTS = ["12+34=", "The secret is", "507+219=", "hello world", "9+9="]
WM_KEY = 918_273_645
NOISE = {"guard_noise_seed": 4242, "guard_noise_sigma": 3.0}
PORTS = range(8500, 8600)
"""The ports set aside for this module's vLLM."""

pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "config.json").exists(), reason=f"no model at {MODEL_DIR}"
)


@pytest.fixture(scope="module")
def vllm(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[openai.OpenAI]:
    """vLLM with the guard plugin, and an SDK client pointed straight at it."""
    log = tmp_path_factory.mktemp("vllm_plugin") / "vllm.log"
    process = vllm_process(MODEL_DIR, log, ports=PORTS, extra_args=plugin_args())
    process.start()
    try:
        request.getfixturevalue("vllm_url")  # the plain one, for comparison: start both at once
        process.wait_healthy(timeout_s=240)
        client = openai.OpenAI(base_url=process.url + "/v1", api_key="none", max_retries=0)
        yield client
    finally:
        process.stop()


@pytest.fixture(scope="module")
def plain(vllm: openai.OpenAI, vllm_url: str) -> openai.OpenAI:
    """An SDK client for the session's vLLM without the plugin, on the same model."""
    return openai.OpenAI(base_url=vllm_url + "/v1", api_key="none", max_retries=0)


def _complete(
    client: openai.OpenAI,
    prompt: str,
    xargs: dict[str, Any] | None = None,
    ignore_eos: bool = False,
    **kw: Any,
) -> Any:
    body: dict[str, Any] = {"return_token_ids": True, "ignore_eos": ignore_eos}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    kw.setdefault("max_tokens", 24)
    return client.completions.create(model="teacher", prompt=prompt, extra_body=body, **kw)


def _text(
    client: openai.OpenAI, prompt: str, xargs: dict[str, Any] | None = None, **kw: Any
) -> str:
    return _complete(client, prompt, xargs, **kw).choices[0].text


def _ids(client: openai.OpenAI, prompt: str, **kw: Any) -> list[int]:
    return list(_complete(client, prompt, **kw).choices[0].token_ids)


def test_plain_requests_match_vllm_without_the_plugin(
    vllm: openai.OpenAI, plain: openai.OpenAI
) -> None:
    for prompt in PROMPTS[:3]:
        assert _ids(vllm, prompt, temperature=0.0) == _ids(plain, prompt, temperature=0.0)
        sampled = {"temperature": 1.0, "seed": 77, "max_tokens": 40}
        assert _ids(vllm, prompt, **sampled) == _ids(plain, prompt, **sampled)


def test_requests_without_guard_args_are_untouched(vllm: openai.OpenAI) -> None:
    greedy = [_text(vllm, p, temperature=0.0) for p in PROMPTS[:3]]
    assert greedy == [_text(vllm, p, temperature=0.0) for p in PROMPTS[:3]]
    assert greedy == [_text(vllm, p, {"unrelated": 1}, temperature=0.0) for p in PROMPTS[:3]]
    seeded = _text(vllm, PROMPTS[1], temperature=1.0, seed=123)
    assert seeded == _text(vllm, PROMPTS[1], temperature=1.0, seed=123)
    # In a batch with guarded requests, the plain request's rows are left alone.
    with ThreadPoolExecutor(6) as pool:
        guarded = [
            pool.submit(_text, vllm, p, {**NOISE, "guard_wm_key": WM_KEY, "guard_top_k": 5})
            for p in PROMPTS
        ]
        plain = pool.submit(_text, vllm, PROMPTS[1], temperature=1.0, seed=123)
        assert plain.result() == seeded
        assert all(isinstance(future.result(), str) for future in guarded)


def test_noise_is_keyed_by_the_guard_seed(vllm: openai.OpenAI) -> None:
    for prompt in PROMPTS[:2]:
        first = _text(vllm, prompt, NOISE, temperature=0.0)
        assert first == _text(vllm, prompt, NOISE, temperature=0.0)
        sampled = _text(vllm, prompt, NOISE, temperature=1.0, seed=5)
        assert sampled == _text(vllm, prompt, NOISE, temperature=1.0, seed=5)
    noisy = [_text(vllm, p, NOISE, temperature=0.0) for p in PROMPTS]
    reseeded = [
        _text(vllm, p, {**NOISE, "guard_noise_seed": 4243}, temperature=0.0) for p in PROMPTS
    ]
    greedy = [_text(vllm, p, temperature=0.0) for p in PROMPTS]
    assert noisy != reseeded
    assert noisy != greedy


def test_top_k_one_forces_the_greedy_token(vllm: openai.OpenAI) -> None:
    for prompt in PROMPTS[:3]:
        greedy = _text(vllm, prompt, temperature=0.0)
        assert _text(vllm, prompt, {"guard_top_k": 1}, temperature=1.0, seed=9) == greedy


def test_invalid_guard_args_are_rejected_with_400(vllm: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="guard_noise_kind"):
        _text(vllm, "x", {**NOISE, "guard_noise_kind": "laplace"})


def _sequences(vllm: openai.OpenAI, xargs: dict[str, Any] | None) -> list[list[int]]:
    """Prompt's last token + completion ids, 150 sampled tokens per prompt.

    Temperature 1.5: the teacher is nearly deterministic at 1.0, and its repeated
    (previous, next) pairs count once, which left too few scored tokens for a clear z.
    """
    sequences = []
    for i, prompt in enumerate(PROMPTS):
        response = _complete(
            vllm, prompt, xargs, ignore_eos=True, temperature=1.5, max_tokens=150, seed=1000 + i
        )
        choice = response.choices[0]
        prompt_ids = choice.prompt_token_ids  # type: ignore[attr-defined]
        sequences.append([prompt_ids[-1], *choice.token_ids])  # type: ignore[attr-defined]
    return sequences


def test_watermark_is_detected_only_with_its_key(vllm: openai.OpenAI) -> None:
    marked = _sequences(
        vllm, {"guard_wm_key": WM_KEY, "guard_wm_gamma": 0.25, "guard_wm_delta": 2.0}
    )
    assert sum(len(s) - 1 for s in marked) == 150 * len(PROMPTS)
    right = score(marked, WM_KEY, gamma=0.25)
    assert right.scored >= 200
    assert right.z > 4, right
    wrong = [score(marked, key, gamma=0.25).z for key in (1, 2, 3, 4, 5)]
    assert all(abs(z) < 2 for z in wrong), wrong
    plain = score(_sequences(vllm, None), WM_KEY, gamma=0.25)
    assert abs(plain.z) < 3, plain
