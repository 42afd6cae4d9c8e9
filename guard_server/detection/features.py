"""What one request says about its sender: prompt identity, template, client fingerprint."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import orjson

from guard_server.openai_fields import Endpoint

_NUMBER = re.compile(r"\d+")
_SPACE = re.compile(r"\s+")
# Request fields that describe *how* a client's software asks, not *what* it asks.
_STYLE_FIELDS = (
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "stop",
    "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "seed", "logit_bias",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    """The features of one request that detection keeps (no prompt text)."""

    prompt_hash: str
    fingerprint: str
    wants_logprobs: bool
    max_top: bool
    logit_bias: bool


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def template_of(text: str) -> str:
    """A prompt with its numbers and spacing normalized: requests from one script share it."""
    return _SPACE.sub(" ", _NUMBER.sub("#", text)).strip().lower()


def _texts(endpoint: Endpoint, body: dict[str, Any]) -> tuple[str, str]:
    """(the scaffolding around the last user turn, the last user turn)."""
    if endpoint is Endpoint.CHAT:
        messages = body["messages"]
        last = str(messages[-1].get("content") or "")
        scaffold = "\n".join(
            f"{m.get('role')}:{template_of(str(m.get('content') or ''))}" for m in messages[:-1]
        )
        return scaffold, last
    prompt = body["prompt"]
    return "", prompt if isinstance(prompt, str) else orjson.dumps(prompt).decode()


def extract_features(
    endpoint: Endpoint, body: dict[str, Any], wants_logprobs: bool, max_top: int
) -> RequestFeatures:
    """Features of a validated request body (before the guard rewrites it)."""
    scaffold, last = _texts(endpoint, body)
    style = {name: body[name] for name in _STYLE_FIELDS if body.get(name) is not None}
    if "logit_bias" in style:
        style["logit_bias"] = len(style["logit_bias"])
    signature = orjson.dumps(
        [endpoint.value, scaffold, template_of(last)[:16], style], option=orjson.OPT_SORT_KEYS
    )
    count = body.get("top_logprobs") if endpoint is Endpoint.CHAT else body.get("logprobs")
    return RequestFeatures(
        prompt_hash=_digest(orjson.dumps([scaffold, last])),
        fingerprint=_digest(signature),
        wants_logprobs=wants_logprobs,
        max_top=wants_logprobs and isinstance(count, int) and (count == -1 or count >= max_top),
        logit_bias=bool(body.get("logit_bias")),
    )
