"""Soft labels of a teacher with dark knowledge (the storyteller), small: what each tier hands over.

Too small to train students in a test: checks the targets a student would learn from, at the
positions where the storyteller chooses its next word (``word_start_divergence``: KL from the
chain's true distribution, nats). docs/evaluation.md has the full run with students.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from guard_server.testing import DEMO_KEY, TRUSTED_KEY, GuardProcess, write_test_config
from load_tests.attacks import soft_label_story as sls
from load_tests.attacks.common import Target
from load_tests.attacks.soft_label import Answer, collect_prompts
from load_tests.lab import story, student
from load_tests.lab.train_storyteller import STORYTELLER_DIR

STORIES = 60


@pytest.fixture(scope="module")
def answers(storyteller_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The same 60 story prompts asked with ``logprobs: 20`` on the trusted and default tiers."""
    directory = tmp_path_factory.mktemp("story-soft-label")
    config = write_test_config(directory, [storyteller_url])
    with GuardProcess(config, directory / "guard.log") as process:
        prompts = [story.prompt(t) for t in story.topics(STORIES, sls.TRAIN_SEED)]
        yield {
            label: collect_prompts(
                Target(process.url, key, label), prompts, 20, temperature=1.0, max_tokens=96
            )
            for label, key in (("trusted", TRUSTED_KEY), ("default", DEMO_KEY))
        }


def test_default_tier_passes_part_of_the_distribution_and_the_what_if_tier_none(
    answers: dict[str, list[Answer]],
) -> None:
    tokenizer = student.load_tokenizer(STORYTELLER_DIR)

    def kl(got: list[Answer]) -> float:
        value, positions = sls.word_start_divergence(got, tokenizer)
        assert positions > 1000
        return value

    trusted, default = answers["trusted"], answers["default"]
    assert max(len(t) for a in default for t in a.top) <= 6  # top-5 plus the sampled token
    nothing = kl([Answer(a.text, a.tokens, [{} for _ in a.tokens]) for a in trusted])
    what_if = kl(sls.harden_offline(trusted, sls.WHAT_IF, sls.WHAT_IF_TOP))
    # the trusted tier hands over the teacher's distribution (full run: 0.09 vs 1.75 nats)
    assert kl(trusted) < 0.2
    # the default tier's hardened top-5 still carries much of it (full run: 0.94)
    assert kl(trusted) < kl(default) < nothing - 0.5
    # top-1 with noise of scale 3 carries nothing a uniform guess does not (full run: 1.81)
    assert what_if > nothing
