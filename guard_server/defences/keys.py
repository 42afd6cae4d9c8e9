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
