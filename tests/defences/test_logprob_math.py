"""The logprob hardening math alone: keyed noise, order, normalization, quantization."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from guard_server.canonical import canonical_input
from guard_server.defences.keys import client_key, identity_key, rekeyed_seed
from guard_server.defences.logprobs import FLOOR, NEAR_ONE, LogprobHardening, keyed_normal
from guard_server.openai_fields import Endpoint

SECRET = b"s" * 32


def _random_position(rng: random.Random, k: int = 6) -> tuple[list[str], list[float]]:
    logits = [rng.gauss(0, 3) for _ in range(k)]
    top = max(logits)
    lse = top + math.log(sum(math.exp(x - top) for x in logits)) + rng.uniform(0, 2)
    return [f"t{i}" for i in range(k)], [x - lse for x in logits]


def test_keyed_normal_is_deterministic_and_standard() -> None:
    key = identity_key(client_key(SECRET, "logprob-noise", "alice"), b"prompt")
    draws = [keyed_normal(key, position, "tok") for position in range(20_000)]
    assert draws[:50] == [keyed_normal(key, position, "tok") for position in range(50)]
    assert abs(statistics.fmean(draws)) < 0.03
    assert abs(statistics.pstdev(draws) - 1) < 0.03


def test_keys_differ_by_client_purpose_and_prompt() -> None:
    keys = {
        client_key(SECRET, "logprob-noise", "alice"),
        client_key(SECRET, "logprob-noise", "bob"),
        client_key(SECRET, "seed", "alice"),
        client_key(b"t" * 32, "logprob-noise", "alice"),
    }
    assert len(keys) == 4
    base = client_key(SECRET, "logprob-noise", "alice")
    assert identity_key(base, b"x") == identity_key(base, b"x")
    assert identity_key(base, b"x") != identity_key(base, b"y")


@pytest.mark.parametrize("seed", range(20))
def test_hardened_values_are_a_valid_ordered_subdistribution(seed: int) -> None:
    rng = random.Random(seed)
    tokens, values = _random_position(rng)
    policy = LogprobHardening(noise_scale=2.0, quantize="grid", grid_step=0.5)
    out = policy.apply(b"k" * 32, seed, tokens, values)
    assert all(math.isfinite(v) and v <= 0 for v in out)
    assert sum(math.exp(v) for v in out) <= 1 + 1e-9
    assert all(abs(v / 0.5 - round(v / 0.5)) < 1e-9 for v in out)
    by_original = sorted(range(len(values)), key=lambda i: -values[i])
    assert [out[i] for i in by_original] == sorted(out, reverse=True)


def test_noise_moves_values_and_order_can_be_released() -> None:
    tokens, values = [f"t{i}" for i in range(8)], [-0.1 * i - 1 for i in range(8)]
    free = LogprobHardening(noise_scale=3.0, preserve_order=False, normalize=False)
    out = free.apply(b"k" * 32, 0, tokens, values)
    assert out != values
    assert sorted(out, reverse=True) != out  # with big noise the order changes


CONFIDENT = LogprobHardening(noise_scale=1.0, quantize="grid", grid_step=0.5, exact_above=0.9)


@pytest.mark.parametrize("seed", range(20))
def test_a_confident_sampled_token_keeps_its_exact_value(seed: int) -> None:
    rng = random.Random(seed)
    p_sampled = rng.uniform(0.9, 0.9999)
    rest = [rng.random() for _ in range(5)]
    values = [math.log(p_sampled)] + [math.log((1 - p_sampled) * r / 1.5) for r in rest]
    tokens = [f"t{i}" for i in range(len(values))]
    sampled = rng.randrange(len(values))  # the sampled token may come anywhere in the list
    values.insert(sampled, values.pop(0))
    out = CONFIDENT.apply(b"k" * 32, seed, tokens, values, sampled)
    assert out[sampled] == values[sampled]
    others = [v for i, v in enumerate(out) if i != sampled]
    assert all(abs(v / 0.5 - round(v / 0.5)) < 1e-9 for v in others)  # hardened
    assert all(v < out[sampled] for v in others)
    assert sum(math.exp(v) for v in out) <= 1 + 1e-9
    by_original = sorted(range(len(values)), key=lambda i: -values[i])
    assert [out[i] for i in by_original] == sorted(out, reverse=True)


def test_an_unsure_sampled_token_is_hardened_like_the_rest() -> None:
    tokens, values = ["a", "b", "c"], [math.log(0.85), math.log(0.1), math.log(0.05)]
    unsure = CONFIDENT.apply(b"k" * 32, 3, tokens, values, 0)
    plain = LogprobHardening(noise_scale=1.0, quantize="grid", grid_step=0.5)
    assert unsure == plain.apply(b"k" * 32, 3, tokens, values)
    assert unsure[0] != values[0]


def test_a_certain_sampled_token_leaves_float32_room_to_the_others() -> None:
    """vLLM reports 0.0 when the other tokens hold under 2^-24 of the mass."""
    out = CONFIDENT.apply(b"k" * 32, 0, ["a", "b", "c"], [-17.0, 0.0, -19.0], 1)
    assert out[1] == NEAR_ONE and -1e-7 < out[1] < 0
    assert all(-30 < v <= math.log(2.0**-24) for v in (out[0], out[2]))
    assert sum(math.exp(v) for v in out) <= 1 + 1e-12


def test_rank_mode_returns_minus_rank_and_floor_is_kept() -> None:
    policy = LogprobHardening(quantize="rank")
    out = policy.apply(b"k" * 32, 0, ["a", "b", "c", "d"], [-2.0, -0.5, FLOOR, -1.0])
    assert out == [-2.0, 0.0, FLOOR, -1.0]


def test_rekeyed_seed_reproduces_only_the_same_request() -> None:
    def digest(**fields: object) -> bytes:
        body = {"model": "m", "prompt": "p", "temperature": 1.0, "seed": 7, **fields}
        return canonical_input(Endpoint.COMPLETIONS, body).digest

    same = rekeyed_seed(SECRET, "alice", digest())
    assert same == rekeyed_seed(SECRET, "alice", digest(stream=True, user="x"))
    assert same != rekeyed_seed(SECRET, "alice", digest(temperature=0.9))
    assert same != rekeyed_seed(SECRET, "alice", digest(seed=8))
    assert same != rekeyed_seed(SECRET, "bob", digest())
    assert 0 <= same < 2**63
