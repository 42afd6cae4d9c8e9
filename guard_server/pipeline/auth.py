"""Authenticate: ``Authorization: Bearer <key>`` → client and tier, by the key's sha256."""

from __future__ import annotations

import hashlib

from guard_server.errors import unauthorized
from guard_server.pipeline.context import RequestContext


def hash_key(key: str) -> str:
    """The form a key is stored in: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


async def authenticate(ctx: RequestContext) -> None:
    """Resolve the bearer key to a client; 401 when it is missing, malformed or unknown.

    The key is hashed before anything else and only its SHA-256 digest is looked up, so the
    time a lookup takes depends on the digest, never on how much of a stored key a guess
    matches: timing reveals nothing usable about any key. The key is never logged.
    """
    header = ctx.headers.get("Authorization")
    if not header:
        raise unauthorized("Missing API key: send `Authorization: Bearer <key>`.")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key or not key.isascii():
        raise unauthorized("Malformed Authorization header: expected `Bearer <key>`.")
    digest = hashlib.sha256(key.encode()).digest()
    client = ctx.settings.clients_by_key_hash.get(digest)
    if client is None:
        raise unauthorized("Incorrect API key provided.")
    ctx.client = client
