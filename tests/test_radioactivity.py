"""The plugin's watermark, sent by a real guard, is traced back to the right client key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from guard_server.teacher import task
from guard_server.testing import GuardProcess, model_dir_under_test
from load_tests import radioactivity as rt

PROMPTS = 96


@pytest.fixture(scope="module")
def wm_guard(
    vllm_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GuardProcess, Path]]:
    """A guard whose ``attacker`` tier watermarks (γ=0.25) and ``clean`` tier does not.

    δ=20, not the policy's 2: on this low-entropy teacher δ=2 (and 4) leaves no detectable
    trace in 300 answers (docs/evaluation.md), so this tests the chain guard → plugin →
    trace, not the strength of the default watermark.
    """
    directory = tmp_path_factory.mktemp("radioactivity")
    with rt.watermark_guard(directory, vllm_url, delta=20.0) as running:
        yield running


def _answers(guard: GuardProcess, client: str) -> list[str]:
    problems = task.make_problems(PROMPTS, seed=5, split="heldout")
    prompts = [task.completion_prompt(p.question) for p in problems]
    return rt.complete(guard.base_url, rt.clients()[client], prompts, 1.0, workers=16)


def _tokenizer_dir() -> Path:
    return model_dir_under_test()


def test_watermarked_answers_name_their_client(wm_guard: tuple[GuardProcess, Path]) -> None:
    guard, config = wm_guard
    result = rt.trace_texts(config, _answers(guard, "attacker"), _tokenizer_dir())
    assert result["attacker"]["scored"] >= 200, result
    assert result["attacker"]["z"] > 4, result
    assert result["others_max_abs_z"] < 4, result
    assert result["named"] == "attacker", result


def test_unwatermarked_answers_name_nobody(wm_guard: tuple[GuardProcess, Path]) -> None:
    guard, config = wm_guard
    result = rt.trace_texts(config, _answers(guard, "clean"), _tokenizer_dir())
    assert result["named"] is None, result
    assert abs(result["attacker"]["z"]) < 4, result
