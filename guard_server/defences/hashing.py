"""One counter-based 32-bit hash, bit-identical on Python ints, numpy int64 and torch int64.

Every function here uses only the operators ``^ >> * & + <`` and in-place forms of them, so the
same code runs on a Python ``int``, a numpy ``int64`` array or a torch ``int64`` tensor. The
guard (numpy) and the vLLM plugin (torch) therefore share one definition of the keyed noise
and of the watermark's green list, and cannot drift apart. This module never imports torch.

The mixer is the two-round "lowbias32" form found by Chris Wellons' hash-prospector, with the
multipliers ``0x21f0aaad`` and ``0x735a2d97`` (shifts 16, 15, 15). Both multipliers are below
2**31 and every value is masked to 32 bits before it is multiplied, so no product reaches
2**63: nothing overflows int64, and a right shift never sees a negative number (torch's ``>>``
on int64 is arithmetic). The vLLM plugin runs the same mixer on int32 tensors
(``vllm_plugin.transform``: wrapping products, masked shifts), which its tests hold bit for bit
to this module.
"""

from __future__ import annotations

from typing import TypeVar

MASK32 = 0xFFFF_FFFF
TWO_32 = 1 << 32
MULTIPLIERS = (0x21F0_AAAD, 0x735A_2D97)  # the mixer's two rounds: multiply, then xor-shift
SHIFTS = (16, 15, 15)  # the xor-shift before the first round and after each round
_KEY_SALT = 0x9E37_79B9  # keeps key 0 away from the mixer's fixed point at 0
NOISE_DOMAIN = 0x6E6F_6973  # "nois": keeps noise row keys apart from green-list row keys
NOISE_WINDOW_BITS = 16  # a noise row reads its values from one of 2**16 windows of the table

H = TypeVar("H")  # int, numpy.ndarray (int64, or uint32) or torch.Tensor (int64)


def premix(x: H) -> H:
    """The mixer's first step, ``x ^ (x >> 16)``. It commutes with xor:
    ``premix(a ^ b) == premix(a) ^ premix(b)``, so a cell hash can premix its two halves apart.
    """
    return x ^ (x >> SHIFTS[0])  # a fresh value: callers may change it in place


def mix32(x: H) -> H:
    """The 32-bit mixer: a bijection on [0, 2**32). ``x`` must already lie in that range."""
    x = premix(x)
    for multiplier, shift in zip(MULTIPLIERS, SHIFTS[1:], strict=True):
        x *= multiplier
        x &= MASK32
        x ^= x >> shift
    return x


def extend_key(h: H, part: H) -> H:
    """One more part (reduced mod 2**32) folded into a row key: ``row_key``'s step."""
    return mix32(h ^ (part & MASK32))


def row_key(key: H, *parts: H) -> H:
    """Fold ``key`` and ``parts`` (each reduced mod 2**32) into one 32-bit per-row value."""
    h = mix32((key & MASK32) ^ _KEY_SALT)
    for part in parts:
        h = extend_key(h, part)
    return h


def token_hash(token_ids: H) -> H:
    """The per-token half of every hash; precompute it once for ``arange(vocab_size)``."""
    return mix32(token_ids & MASK32)


def cell_hash(row_keys: H, token_hashes: H) -> H:
    """The hash of one (row, token) cell; broadcasts ``[R, 1]`` against ``[1, V]``."""
    return mix32(token_hashes ^ row_keys)


def green_threshold(gamma: float) -> int:
    """The cell-hash bound below which a token is green: a fraction ``gamma`` of all hashes."""
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must be in (0, 1), got {gamma!r}")
    return int(gamma * TWO_32)


def is_green_hashed(row_keys: H, token_hashes: H, threshold: H | int) -> H:
    """Green-list membership from precomputed row keys and token hashes (the vectorized form)."""
    return cell_hash(row_keys, token_hashes) < threshold


def is_green(key: int, prev_token: H, token_ids: H, gamma: float) -> H:
    """KGW green list, context width 1: ``mix(mix(token) ^ row_key(key, prev)) < gamma * 2**32``."""
    return is_green_hashed(row_key(key, prev_token), token_hash(token_ids), green_threshold(gamma))


def noise_row_key(seed: H, step: H) -> H:
    """The row key of a request's keyed noise at decoding step ``step``.

    It is ``extend_key(row_key(seed, NOISE_DOMAIN), step)``: a decoder keeps the first part per
    request and mixes only the step in at each token.
    """
    return row_key(seed, NOISE_DOMAIN, step)


def noise_window(key: H) -> H:
    """Where a noise row's values start in the noise table: the top bits of its row key.

    The noise of token ``v`` in that row is the table's entry ``noise_window(key) + v``.
    """
    return key >> (32 - NOISE_WINDOW_BITS)


def noise_table_hash(index: H) -> H:
    """The hash behind entry ``index`` of the noise table, a fixed public sequence: what is
    keyed (by the server secret, through the request's seed) is which window a row reads."""
    return mix32((index & MASK32) ^ NOISE_DOMAIN)


def uniform_from_hash(h: H, bits: int = 32) -> H:
    """``(top bits of h + 0.5) / 2**bits``: a float strictly inside (0, 1).

    With the default 32 bits it needs float64 (numpy, Python). In float32, ``x + 0.5`` is exact
    only for ``x`` below 2**23, so torch code uses 23 bits: ``unit_from_bits`` on
    ``(h >> 9).to(torch.float32)``, which equals ``uniform_from_hash(h, bits=23)``.
    """
    return unit_from_bits(h >> (32 - bits), bits)


def unit_from_bits(x: H, bits: int) -> H:
    """``(x + 0.5) / 2**bits`` for ``x`` in [0, 2**bits); keeps the float dtype ``x`` has."""
    return (x + 0.5) * (1.0 / (1 << bits))
