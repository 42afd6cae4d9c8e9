"""The storyteller's task: the secret chain, its stories and how generations are scored."""

from __future__ import annotations

import math
import random

from load_tests.lab import story


def test_chain_is_fixed_and_each_word_has_its_successors() -> None:
    chain = story.chain()
    assert chain is story.chain()
    assert set(chain.successors) == set(story.WORDS)
    for word in story.WORDS:
        assert len(set(chain.successors[word])) == story.SUCCESSORS
        assert math.isclose(sum(chain.probs[word]), 1.0)
    assert story.chain(seed=1).successors != chain.successors


def test_chain_stories_are_fully_valid_and_their_nll_is_near_the_entropy() -> None:
    rng = random.Random(3)
    topics = story.topics(200, seed=3)
    texts = [story.sample_story(t, rng) for t in topics]
    assert all(t.startswith(" ") and t.endswith(".") for t in texts)
    result = story.fidelity(topics, texts)
    assert result.transitions == 200 * story.STORY_WORDS
    assert result.valid == 1.0
    assert abs(result.nll - story.entropy()) < 0.1


def test_fidelity_counts_invalid_transitions_and_a_missing_topic() -> None:
    chain = story.chain()
    topic = story.WORDS[0]
    follower = chain.successors[topic][0]
    stranger = next(w for w in story.WORDS if w not in chain.successors[follower])
    # the text does not repeat the topic: the first transition is topic -> follower
    result = story.fidelity([topic], [f" {follower} {stranger}."])
    assert result.transitions == 2
    assert result.valid == 0.5
    assert math.isclose(result.nll, -math.log(chain.probs[topic][0]))
    assert story.fidelity([topic], [""]).transitions == 0
