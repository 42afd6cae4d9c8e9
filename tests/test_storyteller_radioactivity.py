"""Radioactivity, small: the δ=2 watermark marks the storyteller's text and survives distillation.

Real vLLM (CPU) serves the lab's storyteller with the guard's plugin; a real guard watermarks
the ``attacker`` tier at the policy's γ=0.25, δ=2. Requests are seeded, so every run sees the
same text.

Bystanders: 22 other client keys. Under no watermark a key's z is standard normal, so "every
one of 22 has |z| < 2" would fail by chance in about two runs of three (0.954^22 = 0.35);
the tests ask what chance breaks in fewer than 1 run in 500: every |z| < 4, and at least 17
of the 22 within 2 (21 expected).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from guard_server.testing import GuardProcess
from load_tests import radioactivity as rt
from load_tests.lab import lm, student
from load_tests.lab.train_storyteller import STORYTELLER_DIR

WORKLOAD = rt.WORKLOADS["storyteller"]
COLLECT = 200
STUDENT = student.StudentConfig(layers=2, steps=200, batch=64)


@pytest.fixture(scope="module")
def story_guard(
    storyteller_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GuardProcess, Path]]:
    """A guard whose ``attacker`` tier watermarks at δ=2 and ``clean`` tier does not."""
    directory = tmp_path_factory.mktemp("story-radioactivity")
    with rt.watermark_guard(directory, storyteller_url, delta=2.0) as running:
        yield running


def _stories(guard: GuardProcess, client: str, prompts: list[str]) -> list[str]:
    key = rt.clients()[client]
    return rt.complete(
        guard.base_url, key, prompts, 1.0, workers=16, max_tokens=WORKLOAD.max_tokens, seeded=True
    )


def test_teacher_text_at_delta_2_names_its_client(story_guard: tuple[GuardProcess, Path]) -> None:
    guard, config = story_guard
    heldout = WORKLOAD.heldout(20)
    texts = _stories(guard, "attacker", heldout.prompts)
    assert heldout.score(texts)["valid"] > 0.9
    result = rt.trace_texts(config, texts, STORYTELLER_DIR)
    assert result["attacker"]["scored"] >= 200, result
    assert result["attacker"]["z"] > 4, result
    _assert_bystanders_clear(result)
    assert result["named"] == "attacker", result


def _assert_bystanders_clear(result: dict) -> None:
    assert result["others_max_abs_z"] < 4, result
    assert result["others_abs_z_lt_2"] >= 17, result


def _student_trace(guard: GuardProcess, config: Path, client: str) -> dict:
    train = WORKLOAD.train(COLLECT)
    answers = _stories(guard, client, train.prompts)
    tokenizer = student.load_tokenizer(STORYTELLER_DIR)
    net = student.train_student(
        list(zip(train.prompts, answers, strict=True)), tokenizer, STUDENT, log_every=100
    )
    prompts = WORKLOAD.heldout(100).prompts
    generated = lm.generate(
        net, tokenizer, prompts, temperature=1.0, max_new_tokens=WORKLOAD.max_tokens
    )
    return rt.trace_texts(config, generated, STORYTELLER_DIR)


@pytest.mark.slow
def test_student_of_watermarked_stories_is_attributed(
    story_guard: tuple[GuardProcess, Path],
) -> None:
    guard, config = story_guard
    result = _student_trace(guard, config, "attacker")
    assert result["named"] == "attacker", result
    assert result["attacker"]["p"] < 1e-6, result
    assert result["others_p_gt_0.01"] >= 20, result
    _assert_bystanders_clear(result)


@pytest.mark.slow
def test_student_of_clean_stories_is_attributed_to_nobody(
    story_guard: tuple[GuardProcess, Path],
) -> None:
    guard, config = story_guard
    result = _student_trace(guard, config, "clean")
    assert result["named"] is None, result
    assert result["attacker"]["p"] > 0.01, result
    _assert_bystanders_clear(result)
