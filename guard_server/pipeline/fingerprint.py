"""The ``system_fingerprint`` responses carry.

vLLM stamps its own version and commit (``vllm-0.32.0-830a35d4``): a fact about the serving
stack the client has no use for and an attacker can match to known bugs. By default
(``auto``) the guard sends its own value instead, ``fp_`` and ten hex digits of
HMAC(secret, model name) like OpenAI's: stable for a model as long as the secret is, the
same on every replica, the same for a decoyed answer, and unrelated to the upstream's
version (a keyed hash cannot be matched against a list of vLLM versions). ``pass`` sends
vLLM's value; any other string is sent as it is.
"""

from __future__ import annotations

import hashlib
import hmac
from functools import lru_cache

from guard_server.config.loader import Settings

AUTO = "auto"
PASS = "pass"


@lru_cache(maxsize=256)
def _keyed(secret: bytes, model: str) -> str:
    digest = hmac.new(secret, b"system-fingerprint\0" + model.encode(), hashlib.sha256)
    return "fp_" + digest.hexdigest()[:10]


def system_fingerprint(settings: Settings, model: str, upstream_value: object) -> object:
    """What the client sees for public model ``model`` when vLLM said ``upstream_value``."""
    upstream = settings.config.upstreams.get(model)
    mode = (upstream and upstream.system_fingerprint) or settings.config.server.system_fingerprint
    if mode == PASS:
        return upstream_value
    if mode == AUTO:
        return _keyed(settings.secret, model)
    return mode
