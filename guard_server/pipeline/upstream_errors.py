"""Upstream errors in the guard's own words.

vLLM's error messages name the model's facts: its vocabulary size, context length, logprob
limit, served model name, command-line flags and pydantic's internals. None of that reaches
the client. Each known kind of rejection gets the guard's wording, with ``param`` kept when it
names a field the client sent; anything unrecognised gets a generic message. The original
text is logged for operators (DEBUG), never sent.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from guard_server.errors import GuardError, model_not_found
from guard_server.openai_fields import FIELDS, Endpoint

log = logging.getLogger(__name__)

_ORIGINAL_LOGGED = 500  # characters of the upstream's message kept in the operator log


@dataclass(frozen=True, slots=True)
class UpstreamRejection:
    """What the upstream said, parsed: its status, message and ``param``."""

    status: int
    message: str
    param: str | None


def parse_rejection(status: int, raw: bytes) -> UpstreamRejection:
    """Read vLLM's ``{"error": {...}}`` (or older flat) error body, whatever its shape."""
    message, param = "", None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            message = str(error.get("message") or "")
            param = error.get("param") if isinstance(error.get("param"), str) else None
        elif isinstance(error, str):
            message = error
    elif not raw.lstrip().startswith((b"{", b"[")):
        message = raw[:_ORIGINAL_LOGGED].decode(errors="replace")
    return UpstreamRejection(status, message, param)


def _field_of(endpoint: Endpoint, param: str | None, sent: dict[str, Any]) -> str | None:
    """vLLM's ``param`` as a field the client knows, or None (never an internal name)."""
    if not param:
        return None
    path = param.removeprefix("body.")
    head, _, rest = path.partition(".")
    if head == "input_tokens":
        return endpoint.prompt_field
    if head == "logprobs" and endpoint.conversational:
        return "top_logprobs"
    if head == "max_tokens" and "max_completion_tokens" in sent and "max_tokens" not in sent:
        return "max_completion_tokens"
    if head not in FIELDS:
        return None
    parts = [head]
    for part in filter(None, rest.split(".")):
        if part.isdigit():
            parts[-1] += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", part):
            parts.append(part)
        else:
            break
    return ".".join(parts)


def _named(field: str | None, fallback: str) -> str:
    return f"`{field}`" if field else fallback


@dataclass(frozen=True, slots=True)
class _Rule:
    """One kind of vLLM rejection: how to recognise it and what the client is told."""

    pattern: re.Pattern[str]
    wording: Callable[[str | None, Endpoint], str]
    code: str
    param: Callable[[str | None, Endpoint], str | None] = lambda field, endpoint: field


def _prompt_field(endpoint: Endpoint) -> str:
    return endpoint.prompt_field


def _context_wording(field: str | None, endpoint: Endpoint) -> str:
    if field in _OUTPUT_LIMITS:
        return f"`{field}` is larger than this model can generate; request fewer completion tokens."
    if field == "truncate_prompt_tokens":
        return "`truncate_prompt_tokens` is larger than this model's context window."
    return (
        "The prompt and the requested completion do not fit in this model's context window; "
        "shorten the prompt or request fewer completion tokens."
    )


_OUTPUT_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def _context_param(field: str | None, endpoint: Endpoint) -> str | None:
    if field in _OUTPUT_LIMITS or field == "truncate_prompt_tokens":
        return field
    return _prompt_field(endpoint)


def _logprobs_field(field: str | None, endpoint: Endpoint) -> str:
    if field == "prompt_logprobs":
        return field
    return "top_logprobs" if endpoint.conversational else "logprobs"


_RULES: tuple[_Rule, ...] = (
    # First: pydantic's dumps quote the schema, whose words the later patterns would match.
    _Rule(
        re.compile(r"validation error", re.I),
        lambda field, endpoint: f"{_named(field, 'A field')} has an invalid value or type.",
        "invalid_value",
    ),
    _Rule(
        re.compile(r"out[- ]of[- ]vocab", re.I),
        lambda field, endpoint: (
            f"{_named(field, 'The input' if endpoint is Endpoint.EMBEDDINGS else 'The prompt')}"
            " contains a token id this model does not have."
        ),
        "invalid_token_id",
        lambda field, endpoint: (
            field or (None if endpoint.conversational else _prompt_field(endpoint))
        ),
    ),
    _Rule(
        re.compile(r"context length|max_model_len|model_max_length|maximum model length", re.I),
        _context_wording,
        "context_length_exceeded",
        _context_param,
    ),
    _Rule(
        re.compile(r"logprobs of -?\d+, which is greater than max", re.I),
        lambda field, endpoint: (
            f"`{_logprobs_field(field, endpoint)}` asks for more logprobs than this model "
            "returns; ask for fewer."
        ),
        "value_out_of_range",
        lambda field, endpoint: _logprobs_field(field, endpoint),
    ),
    _Rule(
        re.compile(r"matryoshka|dimensions", re.I),
        lambda field, endpoint: (
            "This model returns vectors of one size only: leave `dimensions` unset."
        ),
        "invalid_value",
        lambda field, endpoint: "dimensions",
    ),
    _Rule(
        re.compile(r"n must be 1 when using greedy sampling", re.I),
        lambda field, endpoint: "`n` must be 1 when `temperature` is 0.",
        "invalid_value",
        lambda field, endpoint: "n",
    ),
    _Rule(
        re.compile(r"min_tokens must be less than or equal to max_tokens", re.I),
        lambda field, endpoint: "`min_tokens` must not be larger than `max_tokens`.",
        "invalid_value",
        lambda field, endpoint: "min_tokens",
    ),
    _Rule(
        re.compile(r"stream options can only be defined when", re.I),
        lambda field, endpoint: "`stream_options` is only allowed with `stream: true`.",
        "invalid_value",
        lambda field, endpoint: "stream_options",
    ),
    _Rule(
        re.compile(r"when using `top_logprobs`, `logprobs` must be set", re.I),
        lambda field, endpoint: "`top_logprobs` needs `logprobs: true`.",
        "invalid_value",
        lambda field, endpoint: "top_logprobs",
    ),
    _Rule(
        re.compile(r"tool[ _]choice|tool-call-parser|tool call", re.I),
        lambda field, endpoint: "This model does not support this `tool_choice` or these tools.",
        "invalid_value",
        lambda field, endpoint: field or "tool_choice",
    ),
    _Rule(
        re.compile(r"multimodal|image|audio|video", re.I),
        lambda field, endpoint: "This model accepts text input only.",
        "invalid_value",
        lambda field, endpoint: endpoint.prompt_field if endpoint.conversational else field,
    ),
    _Rule(
        re.compile(r"structured output|grammar|regex|json.?schema|choice", re.I),
        lambda field, endpoint: (
            f"{_named(field, 'The output constraint')} is not a constraint this model can "
            "follow: check its regex, grammar, choices or JSON schema."
        ),
        "invalid_value",
        lambda field, endpoint: field or "structured_outputs",
    ),
)


def client_error(
    endpoint: Endpoint, model: str, sent: dict[str, Any], raw: bytes, status: int
) -> GuardError:
    """The client's error for an upstream 4xx, in the guard's words.

    Operators get the kind at INFO and vLLM's own text at DEBUG (it may quote the client's
    input, so it stays out of the default log).
    """
    rejection = parse_rejection(status, raw)
    error = _worded(endpoint, model, sent, rejection)
    log.info(
        "upstream rejected a request: HTTP %d, upstream param %s, answered %s (param %s)",
        status,
        rejection.param,
        error.code,
        error.param,
    )
    log.debug("upstream's rejection text: %s", rejection.message[:_ORIGINAL_LOGGED])
    return error


def _worded(
    endpoint: Endpoint, model: str, sent: dict[str, Any], rejection: UpstreamRejection
) -> GuardError:
    status = 400 if rejection.status == 422 else rejection.status
    if status == 404:
        if endpoint is Endpoint.EMBEDDINGS:
            # vLLM serves /v1/embeddings only for a pooling model (`--convert embed`)
            return GuardError(
                400,
                f"The model `{model}` does not serve embeddings.",
                param="model",
                code="model_not_supported",
            )
        return model_not_found(model)
    field = _field_of(endpoint, rejection.param, sent)
    for rule in _RULES:
        if rule.pattern.search(rejection.message):
            return GuardError(
                status, rule.wording(field, endpoint), param=rule.param(field, endpoint),
                code=rule.code,
            )  # fmt: skip
    message = (
        f"The model server does not accept this value of `{field}`."
        if field
        else "The model server could not process this request as sent."
    )
    return GuardError(status, message, param=field, code="upstream_rejected")
