"""The misinformation decoy's digit maps: answers that look real but whose numbers are wrong.

A decoyed request is answered by a *conjugated* model: the real model in a world whose ten
digits are permuted. The digits of what the model reads (the prompt, stop strings, ...) go
through the inverse permutation on the way up, and the digits of everything it writes (text,
reasoning, tool-call arguments, the stop string that ended it, logprob tokens) through the
permutation on the way back. Format, usage and timing are genuine, the client's own text
comes back unchanged wherever the model repeats it, and every field agrees with every other:
nothing inside one answer shows the remapping.

The permutation is a derangement (no digit maps to itself) keyed by the server secret, the
client and the prompt: the same question always gets the same wrong answer (repeating it
reveals nothing), while one answer the client can check reveals nothing about the map of any
other prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from guard_server.defences.keys import client_key, identity_key

_DIGITS = "0123456789"
_ASCII = {code: code for code in range(128)}
"""Every ASCII character to itself: ``str.translate`` looks each character up, and one
missing from the table costs it a raised and caught ``LookupError``."""


@dataclass(frozen=True, slots=True)
class DigitMap:
    """A derangement of the ten digits, as ``str.translate`` tables both ways."""

    forward: dict[int, int]  # what the model wrote -> what the client reads
    inverse: dict[int, int]  # what the client wrote -> what the model reads
    forward_bytes: bytes  # ``forward`` as a ``bytes.translate`` table

    def show(self, text: str) -> str:
        """Text the model wrote, as the client sees it."""
        return text.translate(self.forward)

    def hide(self, text: str) -> str:
        """Text the client wrote, as the model reads it."""
        return text.translate(self.inverse)

    def show_bytes(self, data: list[int]) -> list[int]:
        """UTF-8 bytes the model wrote (a token's), as the client sees them."""
        try:
            return list(bytes(data).translate(self.forward_bytes))
        except (TypeError, ValueError):  # not a list of bytes: map what is a digit's code
            forward = self.forward  # str.maketrans keys and values are code points
            return [forward.get(byte, byte) for byte in data]


def digit_map(secret: bytes, client_id: str, identity: bytes) -> DigitMap:
    """The keyed derangement for ``client_id`` asking the prompt of canonical ``identity``."""
    seed = identity_key(client_key(secret, "decoy-digits", client_id), identity)
    rng = random.Random(seed)
    shifted = list(_DIGITS)
    while any(a == b for a, b in zip(shifted, _DIGITS, strict=True)):
        rng.shuffle(shifted)
    image = "".join(shifted)
    forward, inverse = _ASCII.copy(), _ASCII.copy()
    forward.update(str.maketrans(_DIGITS, image))
    inverse.update(str.maketrans(image, _DIGITS))
    return DigitMap(forward, inverse, bytes.maketrans(_DIGITS.encode(), image.encode()))
