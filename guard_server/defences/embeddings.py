"""Hardening of returned embedding vectors: keyed noise, quantization, renormalization.

Embeddings are an extraction channel: a copy model can be trained to reproduce the vectors.
The noise for an input is a pure function of its key (server secret, client, the input's
canonical identity): the same client sending the same input again gets the same vector, so
averaging repeats gains nothing. The noise stream is drawn from SHAKE-256, so it is the same
on every replica and every numpy version, and its first ``k`` values do not depend on the
vector's length: asking for fewer ``dimensions`` meets the same noise on the coordinates kept.
"""

from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import dataclass

import numpy as np

UNIT_TOLERANCE = 1e-3
"""A vector whose norm is this close to 1 was normalized upstream; the result is too."""
_TWO_64 = float(1 << 64)


@dataclass(frozen=True, slots=True)
class VectorHardening:
    """How one tier's returned vectors are changed."""

    noise: float = 0.0
    """Keyed Gaussian noise as a fraction of the vector's norm (0: none)."""
    quantize_bits: int | None = None
    """Each coordinate rounded to one of 2**bits levels over the vector's range (None: off)."""

    @property
    def active(self) -> bool:
        """Whether vectors are changed at all."""
        return self.noise > 0 or self.quantize_bits is not None


def keyed_normals(key: bytes, size: int) -> np.ndarray:
    """``size`` standard normal draws that depend only on ``key`` (Box-Muller over SHAKE-256);
    the first ``k`` are the same for any ``size >= k``."""
    pairs = (size + 1) // 2
    words = np.frombuffer(hashlib.shake_256(key).digest(16 * pairs), dtype="<u8")
    u1 = (words[0::2].astype(np.float64) + 0.5) / _TWO_64
    u2 = words[1::2].astype(np.float64) / _TWO_64
    radius = np.sqrt(-2.0 * np.log(u1))
    normals = np.empty(2 * pairs)
    normals[0::2] = radius * np.cos(2.0 * math.pi * u2)
    normals[1::2] = radius * np.sin(2.0 * math.pi * u2)
    return normals[:size]


def quantize(vector: np.ndarray, bits: int) -> np.ndarray:
    """Round each coordinate to one of ``2**bits`` evenly spaced levels over
    ``[-max|v|, max|v|]`` (the largest coordinate keeps its magnitude)."""
    top = float(np.max(np.abs(vector))) if vector.size else 0.0
    if top == 0.0:
        return vector
    step = 2.0 * top / ((1 << bits) - 1)
    return np.round((vector + top) / step) * step - top


def harden_vector(vector: np.ndarray, hardening: VectorHardening, key: bytes) -> np.ndarray:
    """The vector a client gets: ``vector`` plus keyed noise, quantized, and renormalized
    when it came normalized (as float64; the caller returns it as float32)."""
    result = vector.astype(np.float64)
    if not hardening.active:
        return result
    norm = float(np.linalg.norm(vector))
    if hardening.noise > 0 and vector.size:
        scale = hardening.noise * norm / math.sqrt(vector.size)
        result = result + scale * keyed_normals(key, vector.size)
    if hardening.quantize_bits is not None:
        result = quantize(result, hardening.quantize_bits)
    if abs(norm - 1.0) < UNIT_TOLERANCE:
        length = float(np.linalg.norm(result))
        if length > 0:
            result = result / length
    return result


def encode_base64(vector: np.ndarray) -> str:
    """OpenAI's base64 encoding: little-endian float32 bytes (what the SDK decodes)."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def decode_base64(text: str) -> np.ndarray:
    """The vector :func:`encode_base64` encoded (for tests and the measurements)."""
    return np.frombuffer(base64.b64decode(text), dtype="<f4")
