"""The embeddings channel: the request vLLM gets and the vectors the client gets back.

vLLM is always asked for floats; the tier's vector hardening (``embeddings:`` in the tier
policy) works on them, and the guard encodes base64 itself when the client asked for it. Each
input's noise is keyed by the server secret, the client and the input's canonical identity.
From the ``perturb`` action on, the tier's ``flagged_noise`` applies when it is larger.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from guard_server.defences.embeddings import VectorHardening, encode_base64, harden_vector
from guard_server.defences.keys import client_key, identity_key
from guard_server.pipeline.context import RequestContext

NOISE_PURPOSE = "embedding-noise"
_FLAGGED = frozenset({"perturb", "decoy"})


class MalformedEmbeddings(ValueError):
    """The upstream's answer is not a list of embeddings for the inputs sent."""


def embedding_request(ctx: RequestContext, served_model: str) -> bytes:
    """The body vLLM gets: the client's, for the served model name, asking for floats."""
    return orjson.dumps({**ctx.body, "model": served_model, "encoding_format": "float"})


def vector_hardening(ctx: RequestContext) -> VectorHardening:
    """What the plan does to this request's vectors: the tier's policy, with its
    ``flagged_noise`` from the ``perturb`` action on."""
    assert ctx.client is not None and ctx.plan is not None
    policy = ctx.client.tier.embeddings
    noise = policy.noise
    if ctx.plan.action in _FLAGGED:
        noise = max(noise, policy.flagged_noise)
    return VectorHardening(noise=noise, quantize_bits=policy.quantize_bits)


def harden_embeddings(ctx: RequestContext, payload: dict[str, Any]) -> None:
    """Harden and encode each returned vector in place (``payload["data"]``)."""
    assert ctx.client is not None and ctx.canonical is not None
    data = payload.get("data")
    identities = ctx.canonical.identities
    if not isinstance(data, list) or len(data) != len(identities):
        raise MalformedEmbeddings("the answer does not hold one embedding per input")
    hardening = vector_hardening(ctx)
    base64_out = ctx.body.get("encoding_format") == "base64"
    client = None
    if hardening.active:
        client = client_key(ctx.settings.secret, NOISE_PURPOSE, ctx.client.id)
    for item in data:
        index = item.get("index") if isinstance(item, dict) else None
        values = item.get("embedding") if isinstance(item, dict) else None
        if type(index) is not int or not 0 <= index < len(identities):
            raise MalformedEmbeddings("an embedding has no valid index")
        if not isinstance(values, list):
            raise MalformedEmbeddings("an embedding is not a list of numbers")
        if client is None and not base64_out:
            continue  # returned exactly as vLLM computed it
        try:
            vector = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise MalformedEmbeddings("an embedding is not a list of numbers") from None
        if vector.ndim != 1:
            raise MalformedEmbeddings("an embedding is not a list of numbers")
        if client is not None:
            key = identity_key(client, identities[index])
            vector = harden_vector(vector, hardening, key).astype(np.float32)
        item["embedding"] = encode_base64(vector) if base64_out else vector.tolist()
