"""What one request says about its sender: prompt identity, template, client fingerprint."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

from guard_server.openai_fields import Endpoint

_NUMBER = re.compile(r"\d+")
_TEMPLATE_HEAD = 16  # characters of the last turn's template in the fingerprint
# Request fields that describe *how* a client's software asks, not *what* it asks.
_STYLE_FIELDS = frozenset((
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "stop",
    "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "seed", "logit_bias",
))  # fmt: skip


@dataclass(slots=True)  # not frozen: built per request, and frozen __init__ costs 4x
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
    return " ".join(_NUMBER.sub("#", text).split()).lower()


def _template_head(text: str) -> str:
    """``template_of(text)[:16]``, normalizing only as much of a long text as it needs."""
    head = template_of(text[: 2 * _TEMPLATE_HEAD])
    if len(head) <= _TEMPLATE_HEAD and len(text) > 2 * _TEMPLATE_HEAD:
        head = template_of(text)  # digits or spaces collapsed it: normalize it all
    return head[:_TEMPLATE_HEAD]


@lru_cache(maxsize=4096)
def _scaffold_line(role: object, content: str) -> str:
    """One earlier turn, normalized (system prompts and few-shot turns repeat: cached)."""
    return f"{role}:{template_of(content)}"


def _texts(endpoint: Endpoint, body: dict[str, Any]) -> tuple[str, str]:
    """(the scaffolding around the last user turn, the last user turn)."""
    if endpoint is Endpoint.CHAT:
        messages = body["messages"]
        last = str(messages[-1].get("content") or "")
        scaffold = "\n".join(
            _scaffold_line(m.get("role"), str(m.get("content") or "")) for m in messages[:-1]
        )
        return scaffold, last
    prompt = body["prompt"]
    return "", prompt if isinstance(prompt, str) else orjson.dumps(prompt).decode()


def extract_features(
    endpoint: Endpoint, body: dict[str, Any], wants_logprobs: bool, max_top: int
) -> RequestFeatures:
    """Features of a validated request body (before the guard rewrites it)."""
    scaffold, last = _texts(endpoint, body)
    style = {k: v for k, v in body.items() if k in _STYLE_FIELDS and v is not None}
    if "logit_bias" in style:
        style["logit_bias"] = len(style["logit_bias"])
    signature = orjson.dumps(
        [endpoint.value, scaffold, _template_head(last), style], option=orjson.OPT_SORT_KEYS
    )
    count = body.get("top_logprobs") if endpoint is Endpoint.CHAT else body.get("logprobs")
    return RequestFeatures(
        prompt_hash=_digest(orjson.dumps([scaffold, last])),
        fingerprint=_digest(signature),
        wants_logprobs=wants_logprobs,
        max_top=wants_logprobs and isinstance(count, int) and (count == -1 or count >= max_top),
        logit_bias=bool(body.get("logit_bias")),
    )
