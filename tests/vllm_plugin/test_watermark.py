"""The KGW detector: calibrated under the null, strong on watermarked text, de-duplicated."""

from __future__ import annotations

import math

import numpy as np
import pytest

from guard_server.defences.hashing import is_green
from guard_server.defences.watermark import WatermarkScore, normal_sf, score, z_score

VOCAB = 1000
RNG = np.random.default_rng(7)


def _watermarked(key: int, n: int, gamma: float = 0.25, delta: float = 2.0) -> list[int]:
    """Sample n tokens from a uniform model with the KGW bonus delta on green tokens."""
    vocab = np.arange(VOCAB, dtype=np.int64)
    tokens = [int(RNG.integers(VOCAB))]
    for _ in range(n):
        logits = delta * is_green(key, tokens[-1], vocab, gamma)
        probs = np.exp(logits) / np.exp(logits).sum()
        tokens.append(int(RNG.choice(VOCAB, p=probs)))
    return tokens


def test_z_and_p_follow_the_kgw_formula() -> None:
    assert z_score(50, 100, 0.25) == pytest.approx((50 - 25) / math.sqrt(100 * 0.25 * 0.75))
    assert normal_sf(0.0) == 0.5
    assert normal_sf(4.0) == pytest.approx(3.167e-5, rel=1e-3)
    result = score([5, 6, 7, 8, 9, 10], key=3, gamma=0.25)
    assert result.scored == 5
    assert result.z == pytest.approx(z_score(result.green, 5, 0.25))
    assert result.p_value == pytest.approx(normal_sf(result.z))


def test_watermarked_text_scores_high_only_for_its_key() -> None:
    tokens = _watermarked(key=1234, n=300)
    right = score(tokens, key=1234, vocab_size=VOCAB)
    assert right.z > 8 and right.p_value < 1e-12
    for other in (1, 2, 3, 4, 5):
        assert abs(score(tokens, key=other, vocab_size=VOCAB).z) < 3


def test_null_scores_are_calibrated() -> None:
    tokens = RNG.integers(0, VOCAB, size=400).tolist()
    zs = np.array([score(tokens, key=key).z for key in range(300)])
    assert abs(zs.mean()) < 0.2
    assert 0.8 < zs.std() < 1.2
    assert (np.abs(zs) > 2).mean() < 0.1


def test_repeated_tuples_are_scored_once() -> None:
    tokens = _watermarked(key=99, n=100)
    once = score(tokens, key=99)
    repeated = score([tokens] * 10, key=99)
    assert repeated == once
    assert score(tokens * 10, key=99).scored <= once.scored + 1  # the seam adds one tuple


def test_a_list_of_sequences_is_scored_as_one_sample() -> None:
    a, b = _watermarked(key=5, n=80), _watermarked(key=5, n=80)
    both = score([a, b], key=5)
    assert both.scored <= score(a, key=5).scored + score(b, key=5).scored
    assert both.z > score(a, key=5).z
    assert score(np.array([a[:50], b[:50]]), key=5) == score([a[:50], b[:50]], key=5)


def test_wider_context_uses_all_context_tokens() -> None:
    tokens = RNG.integers(0, VOCAB, size=200).tolist()
    result = score(tokens, key=11, context=2)
    assert result.scored == len(set(zip(tokens, tokens[1:], tokens[2:], strict=False)))
    assert result != score(tokens, key=11, context=1)


def test_edge_cases() -> None:
    assert score([], key=1) == WatermarkScore(z=0.0, p_value=0.5, scored=0, green=0)
    assert score([7], key=1).scored == 0
    with pytest.raises(ValueError):
        score([1, VOCAB], key=1, vocab_size=VOCAB)
    with pytest.raises(ValueError):
        score([1, -2], key=1)
    with pytest.raises(ValueError):
        score([1, 2], key=1, context=0)
    with pytest.raises(ValueError):
        score([1, 2], key=1, gamma=1.0)
