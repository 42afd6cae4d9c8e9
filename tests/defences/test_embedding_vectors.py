"""The vector hardening of /v1/embeddings: keyed noise, quantization, renormalization."""

from __future__ import annotations

import base64
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard_server.defences.embeddings import (
    VectorHardening,
    decode_base64,
    encode_base64,
    harden_vector,
    keyed_normals,
    quantize,
)


def _unit(seed: int, size: int = 128) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(size)
    return vector / np.linalg.norm(vector)


def test_the_noise_is_a_function_of_the_key_alone() -> None:
    assert np.array_equal(keyed_normals(b"k", 128), keyed_normals(b"k", 128))
    assert not np.allclose(keyed_normals(b"k", 128), keyed_normals(b"j", 128))


@given(st.integers(1, 300), st.integers(1, 300))
def test_fewer_dimensions_meet_the_same_noise(short: int, long: int) -> None:
    short, long = min(short, long), max(short, long)
    assert np.array_equal(keyed_normals(b"key", short), keyed_normals(b"key", long)[:short])


def test_the_noise_is_standard_normal() -> None:
    draws = np.concatenate([keyed_normals(i.to_bytes(4, "little"), 1000) for i in range(50)])
    assert abs(draws.mean()) < 0.02
    assert abs(draws.std() - 1.0) < 0.02


@pytest.mark.parametrize("noise", [0.05, 0.3])
def test_noise_is_a_fraction_of_the_norm_and_unit_vectors_stay_unit(noise: float) -> None:
    errors = []
    for seed in range(200):
        vector = _unit(seed)
        served = harden_vector(vector, VectorHardening(noise=noise), seed.to_bytes(4, "little"))
        assert np.linalg.norm(served) == pytest.approx(1.0)
        errors.append(np.linalg.norm(served - vector))
    # renormalized, a noise of relative length s moves a unit vector by about s
    assert np.mean(errors) == pytest.approx(noise, rel=0.15)


def test_a_vector_that_was_not_normalized_is_not_normalized() -> None:
    vector = 3.0 * _unit(1)
    served = harden_vector(vector, VectorHardening(noise=0.05), b"k")
    assert np.linalg.norm(served) == pytest.approx(3.0, rel=0.02)
    assert np.linalg.norm(served) != pytest.approx(3.0, rel=1e-6)


@settings(max_examples=50)
@given(st.integers(1, 12), st.integers(0, 10_000))
def test_quantization_keeps_at_most_two_to_the_bits_levels(bits: int, seed: int) -> None:
    vector = _unit(seed, 512)
    rounded = quantize(vector, bits)
    assert len(np.unique(np.round(rounded, 12))) <= 2**bits
    step = 2 * np.max(np.abs(vector)) / (2**bits - 1)
    assert np.max(np.abs(rounded - vector)) <= step / 2 + 1e-12


def test_nothing_active_returns_the_vector() -> None:
    vector = _unit(2)
    assert not VectorHardening().active
    assert np.array_equal(harden_vector(vector, VectorHardening(), b"k"), vector)


def test_base64_is_little_endian_float32() -> None:
    vector = _unit(3).astype(np.float32)
    text = encode_base64(vector)
    assert np.array_equal(decode_base64(text), vector)
    assert base64.b64decode(text)[:4] == struct.pack("<f", vector[0])
