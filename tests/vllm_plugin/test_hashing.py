"""The shared hash: numpy, torch and Python ints agree bit for bit; green lists are fair."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from guard_server.defences import hashing
from guard_server.defences.hashing import (
    MASK32,
    cell_hash,
    green_threshold,
    is_green,
    is_green_hashed,
    mix32,
    noise_row_key,
    premix,
    row_key,
    token_hash,
    uniform_from_hash,
    unit_from_bits,
)

RNG = np.random.default_rng(20261128)


def _values(n: int) -> np.ndarray:
    extremes = np.array([0, 1, 2, MASK32 - 1, MASK32, 1 << 31, (1 << 31) - 1], dtype=np.int64)
    return np.concatenate([extremes, RNG.integers(0, 1 << 32, size=n, dtype=np.int64)])


def test_mix32_is_identical_in_numpy_torch_and_python() -> None:
    x = _values(200_000)
    from_numpy = mix32(x)
    from_torch = mix32(torch.from_numpy(x)).numpy()
    assert from_numpy.dtype == np.int64
    np.testing.assert_array_equal(from_numpy, from_torch)
    assert [mix32(int(v)) for v in x[:2000]] == from_numpy[:2000].tolist()
    assert from_numpy.min() >= 0 and from_numpy.max() <= MASK32


def test_mix32_does_not_modify_its_input() -> None:
    x = _values(100)
    t = torch.from_numpy(x.copy())
    reference = x.copy()
    mix32(x)
    mix32(t)
    np.testing.assert_array_equal(x, reference)
    np.testing.assert_array_equal(t.numpy(), reference)


def test_mix32_is_a_bijection_on_distinct_inputs() -> None:
    x = np.unique(_values(500_000))
    assert np.unique(mix32(x)).size == x.size


def test_row_key_agrees_across_backends_and_masks_parts() -> None:
    keys = RNG.integers(0, 1 << 31, size=5000, dtype=np.int64)
    parts = RNG.integers(-5, 1 << 40, size=5000, dtype=np.int64)
    from_numpy = row_key(keys, parts, 7)
    from_torch = row_key(torch.from_numpy(keys), torch.from_numpy(parts), 7).numpy()
    np.testing.assert_array_equal(from_numpy, from_torch)
    expected = [row_key(int(k), int(p), 7) for k, p in zip(keys[:500], parts[:500], strict=True)]
    assert from_numpy[:500].tolist() == expected
    assert row_key(1, -1) == row_key(1, MASK32)
    assert row_key(1, 2) != row_key(2, 1)
    assert row_key(5, 9) != noise_row_key(5, 9)


def test_premix_commutes_with_xor_and_noise_keys_extend_a_per_request_base() -> None:
    a, b = _values(10_000), _values(10_000)[::-1]
    np.testing.assert_array_equal(premix(a ^ b), premix(a) ^ premix(b))
    steps = np.arange(10_000, dtype=np.int64)
    base = row_key(42, hashing.NOISE_DOMAIN)
    np.testing.assert_array_equal(noise_row_key(42, steps), hashing.extend_key(base, steps))
    unsigned = hashing.extend_key(np.uint32(base), steps.astype(np.uint32))
    assert unsigned.dtype == np.uint32  # the plugin rekeys in uint32: the same values
    np.testing.assert_array_equal(unsigned, noise_row_key(42, steps))


def test_the_plugins_int32_cell_hashes_equal_the_reference() -> None:
    from guard_server.vllm_plugin import transform

    keys = _values(300)
    vocab = np.arange(5000, dtype=np.int64)
    expected = cell_hash(keys[:, None], token_hash(vocab)[None, :])
    premixed = torch.from_numpy(premix(keys).astype(np.uint32).view(np.int32))
    hashes = transform.cell_hashes(premixed, transform.vocab_hashes(5000, "cpu"))
    assert hashes.dtype == torch.int32
    np.testing.assert_array_equal(hashes.numpy().view(np.uint32), expected)


def test_green_list_is_identical_in_numpy_and_torch_over_a_batch() -> None:
    vocab = np.arange(50_000, dtype=np.int64)
    keys = row_key(123456, RNG.integers(0, 50_000, size=16, dtype=np.int64))
    threshold = green_threshold(0.25)
    from_numpy = is_green_hashed(keys[:, None], token_hash(vocab)[None, :], threshold)
    tk = torch.from_numpy(keys)[:, None]
    tv = token_hash(torch.from_numpy(vocab))[None, :]
    from_torch = is_green_hashed(tk, tv, torch.full((16, 1), threshold)).numpy()
    np.testing.assert_array_equal(from_numpy, from_torch)


def test_green_fraction_is_gamma() -> None:
    vocab = np.arange(152_064, dtype=np.int64)
    for gamma in (0.1, 0.25, 0.5):
        fractions = [is_green(99, prev, vocab, gamma).mean() for prev in range(20)]
        assert abs(float(np.mean(fractions)) - gamma) < 0.003
        assert max(abs(f - gamma) for f in fractions) < 0.01


def test_is_green_matches_the_scalar_rule() -> None:
    for prev, token in [(0, 0), (17, 4), (151_000, 3), (5, 151_999)]:
        h = mix32(mix32(token) ^ row_key(42, prev))
        assert bool(is_green(42, prev, token, 0.25)) == (h < 0.25 * 2**32)


def test_uniform_is_inside_the_unit_interval_with_mean_one_half() -> None:
    h = cell_hash(noise_row_key(7, 3), token_hash(np.arange(1_000_000, dtype=np.int64)))
    u = uniform_from_hash(h)
    assert u.dtype == np.float64 and u.min() > 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.002
    assert uniform_from_hash(0) == 0.5 / 2**32 and uniform_from_hash(MASK32) < 1.0


def test_float32_uniform_from_23_bits_is_exact_and_inside_the_unit_interval() -> None:
    h = torch.tensor([0, MASK32, 1 << 31], dtype=torch.int64)
    u = unit_from_bits((h >> 9).to(torch.float32), 23)
    assert u.dtype == torch.float32
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    np.testing.assert_array_equal(u.numpy(), uniform_from_hash(h.numpy(), bits=23))


def test_hashing_and_watermark_never_import_torch() -> None:
    code = (
        "import sys, guard_server.defences.hashing, guard_server.defences.watermark; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert hashing.__doc__
