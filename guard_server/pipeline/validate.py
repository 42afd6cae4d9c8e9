"""Validate: parse the JSON body and type-check every field; unknown fields are rejected."""

from __future__ import annotations

from typing import Any

import orjson

from guard_server.canonical import check_messages
from guard_server.errors import bad_request
from guard_server.openai_fields import FIELDS, REQUIRED, Endpoint, JsonType
from guard_server.pipeline.context import RequestContext


def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


_CHECKS = {
    JsonType.STRING: lambda v: isinstance(v, str),
    JsonType.INTEGER: _is_int,
    JsonType.NUMBER: _is_number,
    JsonType.BOOLEAN: lambda v: isinstance(v, bool),
    JsonType.OBJECT: lambda v: isinstance(v, dict),
    JsonType.ARRAY: lambda v: isinstance(v, list),
    JsonType.STRING_OR_ARRAY: lambda v: isinstance(v, str | list),
    JsonType.STRING_OR_OBJECT: lambda v: isinstance(v, str | dict),
}

_MINIMUMS = {
    "max_tokens": 1,
    "max_completion_tokens": 1,
    "n": 1,
    "temperature": 0,
    "top_logprobs": -1,
    "prompt_logprobs": -1,
    "min_tokens": 0,
}


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode the body; 400 unless it is a JSON object."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def _check_messages(messages: list[Any]) -> None:
    if not messages:
        raise bad_request("`messages` must not be empty.", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(
                f"messages[{index}] must be an object with a string `role`.",
                param=f"messages[{index}]",
            )
    check_messages(messages)


def _check_prompt(prompt: str | list[Any]) -> None:
    if isinstance(prompt, str):
        return
    if not prompt:
        raise bad_request("`prompt` must not be empty.", param="prompt")
    if all(isinstance(p, str) for p in prompt) or all(_is_int(p) for p in prompt):
        return
    if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
        return
    raise bad_request(
        "`prompt` must be a string, a list of strings, a list of token ids or a list of "
        "token-id lists.",
        param="prompt",
    )


def _check_stop(stop: str | list[Any]) -> None:
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise bad_request("`stop` must be a string or a list of strings.", param="stop")


async def validate_request(ctx: RequestContext) -> None:
    """Reject unknown fields, wrong JSON types and impossible values, naming the field."""
    body = ctx.body
    endpoint = ctx.endpoint
    for name, value in body.items():
        spec = FIELDS.get(name)
        if spec is None or endpoint not in spec.types:
            raise bad_request(
                f"Unrecognized request argument supplied: {name}",
                param=name,
                code="unknown_parameter",
            )
        if value is None:
            continue
        expected = spec.types[endpoint]
        if not _CHECKS[expected](value):
            raise bad_request(
                f"Invalid type for `{name}`: expected {expected.value}, "
                f"got {_json_type_name(value)}.",
                param=name,
                code="invalid_type",
            )
        minimum = _MINIMUMS.get(name)
        if minimum is not None and value < minimum:
            raise bad_request(
                f"Invalid value for `{name}`: {value} is below the minimum of {minimum}.",
                param=name,
                code="invalid_value",
            )
    for name in REQUIRED[endpoint]:
        if body.get(name) is None:
            raise bad_request(f"Missing required parameter: `{name}`.", param=name)
    if endpoint is Endpoint.CHAT:
        _check_messages(body["messages"])
    else:
        _check_prompt(body["prompt"])
    if body.get("stop") is not None:
        _check_stop(body["stop"])
    ctx.model = body["model"]
    ctx.stream = bool(body.get("stream"))


def _json_type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
