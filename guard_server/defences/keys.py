"""Per-client keys derived from the server secret, so clients cannot predict or cancel them."""

from __future__ import annotations

import hashlib
import hmac

import orjson


def client_key(secret: bytes, purpose: str, client_id: str) -> bytes:
    """HMAC-SHA256(secret, purpose ‖ client): one independent 32-byte key per use and client."""
    message = purpose.encode() + b"\0" + client_id.encode()
    return hmac.new(secret, message, hashlib.sha256).digest()


def request_key(key: bytes, material: object) -> bytes:
    """A key for one request's content (for example its prompt), derived from a client key."""
    data = orjson.dumps(material, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(data, key=key, digest_size=32).digest()


def rekeyed_seed(secret: bytes, client_id: str, body: dict[str, object], seed: int) -> int:
    """The seed vLLM gets in place of a client's own.

    Keyed by the client and by everything else in the request, so repeating a request
    reproduces its answer, while changing any parameter (temperature, bias, prompt) under
    the same seed gives unrelated randomness: a fixed seed no longer lets a client resample
    one distribution under controlled changes.
    """
    rest = {name: value for name, value in body.items() if name != "seed"}
    digest = request_key(client_key(secret, "seed", client_id), [rest, seed])
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _int31(digest: bytes) -> int:
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def watermark_key(secret: bytes, client_id: str) -> int:
    """The client's 31-bit watermark key; ``guard-server trace`` recomputes it to attribute text."""
    return _int31(client_key(secret, "watermark", client_id))


def sampling_noise_seed(secret: bytes, client_id: str, body: dict[str, object]) -> int:
    """The 31-bit seed of the plugin's logit noise for one request.

    Keyed by client and request content: the same request meets the same noise again, so
    resampling it cannot average the noise away, and clients cannot predict it.
    """
    material = {name: value for name, value in body.items() if name not in ("stream", "seed")}
    return _int31(request_key(client_key(secret, "sampling-noise", client_id), material))
