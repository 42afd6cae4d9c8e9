"""Per-client keys derived from the server secret, so clients cannot predict or cancel them.

Request-level keys take a digest of the request's canonical model input
(``guard_server.canonical``), never its bytes: bytes the model ignores change no key.
"""

from __future__ import annotations

import hashlib
import hmac
from functools import lru_cache


@lru_cache(maxsize=4096)
def client_key(secret: bytes, purpose: str, client_id: str) -> bytes:
    """HMAC-SHA256(secret, purpose ‖ client): one independent 32-byte key per use and client.
    Cached: a client's requests each need a few (noise, decoy digits, seeds, watermark)."""
    message = purpose.encode() + b"\0" + client_id.encode()
    return hmac.new(secret, message, hashlib.sha256).digest()


def identity_key(key: bytes, identity: bytes) -> bytes:
    """A key for one prompt (its canonical identity), derived from a client key."""
    return hashlib.blake2b(identity, key=key, digest_size=32).digest()


def rekeyed_seed(secret: bytes, client_id: str, digest: bytes) -> int:
    """The seed vLLM gets in place of a client's own.

    ``digest`` is the canonical input's digest, which covers the prompt, the template inputs
    and every sampling field, the client's seed among them. So repeating a request reproduces
    its answer, while changing anything that changes sampling (temperature, bias, prompt)
    under the same seed gives unrelated randomness: a fixed seed no longer lets a client
    resample one distribution under controlled changes.
    """
    key = identity_key(client_key(secret, "seed", client_id), digest)
    return int.from_bytes(key[:8], "little") & ((1 << 63) - 1)


def _int31(digest: bytes) -> int:
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def watermark_key(secret: bytes, client_id: str) -> int:
    """The client's 31-bit watermark key; ``guard-server trace`` recomputes it to attribute text."""
    return _int31(client_key(secret, "watermark", client_id))


def sampling_noise_seed(secret: bytes, client_id: str, identity: bytes) -> int:
    """The 31-bit seed of the plugin's logit noise for one request.

    Keyed by client and by the identity of the request's prompt(s) only: the same prompt
    meets the same noise again whatever else the request changes (temperature, ``n``,
    ``max_tokens``, ...), so resampling it cannot average the noise away, and clients
    cannot predict it.
    """
    return _int31(identity_key(client_key(secret, "sampling-noise", client_id), identity))
