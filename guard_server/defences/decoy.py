"""The misinformation decoy: answers that look real but carry a consistent, wrong rule.

Every digit in generated text (and in logprob token strings) goes through a permutation
without fixed points, keyed by the server secret and the client. The real model still runs,
so format, usage and timing are genuine; the numbers are wrong, always in the same way for
one client, which is the worst kind of training data: a student learns a false rule.
"""

from __future__ import annotations

import hashlib
import random

_DIGITS = "0123456789"


def digit_map(secret: bytes, client_id: str) -> dict[int, str]:
    """A ``str.translate`` table: a keyed derangement of the ten digits."""
    seed = hashlib.blake2b(client_id.encode(), key=secret[:64], digest_size=16).digest()
    rng = random.Random(seed)
    shifted = list(_DIGITS)
    while any(a == b for a, b in zip(shifted, _DIGITS, strict=True)):
        rng.shuffle(shifted)
    return str.maketrans(_DIGITS, "".join(shifted))
