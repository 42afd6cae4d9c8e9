"""Validate: parse the JSON body and type-check every field; unknown fields are rejected."""

from __future__ import annotations

from typing import Any

import orjson

from guard_server.canonical import check_messages
from guard_server.errors import bad_request
from guard_server.openai_fields import (
    ENCODING_FORMATS,
    FIELDS,
    MINIMUMS,
    NOT_SERVED,
    REQUIRED,
    Endpoint,
    JsonType,
)
from guard_server.pipeline.context import RequestContext
from guard_server.responses_input import check_input

INTEGER_RANGE = (-(2**63), 2**64 - 1)
"""The integers the JSON parser (orjson) reads as integers; it reads a larger one as a float."""


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


def _token_ids(values: list[Any]) -> list[int] | None:
    """``values`` as token ids (an integral number such as ``5.0`` is ``5``), else None."""
    if all(_is_int(v) for v in values):
        return values
    if all(_is_int(v) or (type(v) is float and v.is_integer() and _exact(v)) for v in values):
        return [int(v) for v in values]
    return None


def _checked_prompt(prompt: str | list[Any], name: str = "prompt") -> str | list[Any]:
    """``prompt`` (or embeddings' ``input``: ``name``) with its token ids as integers; 400
    unless it has one of vLLM's shapes."""
    if isinstance(prompt, str):
        return prompt
    if not prompt:
        raise bad_request(f"`{name}` must not be empty.", param=name)
    if all(isinstance(p, str) for p in prompt):
        return prompt
    ids = _token_ids(prompt)
    if ids is not None:
        return ids
    if all(isinstance(p, list) and p for p in prompt):
        batch = [_token_ids(p) for p in prompt]
        if all(ids is not None for ids in batch):
            return batch
    raise bad_request(
        f"`{name}` must be a string, a list of strings, a list of token ids or a list of "
        "token-id lists.",
        param=name,
    )


def _check_stop(stop: str | list[Any]) -> None:
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise bad_request("`stop` must be a string or a list of strings.", param="stop")


def _check_encoding_format(value: str | None) -> None:
    if value is not None and value not in ENCODING_FORMATS:
        raise bad_request(
            f"Invalid value for `encoding_format`: {value!r}; use "
            + " or ".join(f"'{name}'" for name in ENCODING_FORMATS)
            + ".",
            param="encoding_format",
            code="invalid_value",
        )


async def validate_request(ctx: RequestContext) -> None:
    """Reject unknown fields, wrong JSON types and impossible values, naming the field."""
    body = ctx.body
    endpoint = ctx.endpoint
    for name, value in body.items():
        spec = FIELDS.get(name)
        if spec is None or endpoint not in spec.types:
            refusal = NOT_SERVED.get((endpoint, name))
            if refusal is not None:
                raise bad_request(refusal, param=name, code="parameter_not_allowed")
            raise bad_request(
                f"Unrecognized request argument supplied: {name}",
                param=name,
                code="unknown_parameter",
            )
        if value is None:
            continue
        expected = spec.types[endpoint]
        if expected is JsonType.INTEGER and type(value) is float and value.is_integer():
            value = body[name] = _integral(name, value)
        if not _CHECKS[expected](value):
            raise bad_request(
                f"Invalid type for `{name}`: expected {expected.value}, "
                f"got {_json_type_name(value)}.",
                param=name,
                code="invalid_type",
            )
        minimum = MINIMUMS.get(name)
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
    elif endpoint is Endpoint.EMBEDDINGS:
        body["input"] = _checked_prompt(body["input"], "input")
        _check_encoding_format(body.get("encoding_format"))
    elif endpoint is Endpoint.RESPONSES:
        check_input(body)
    else:
        body["prompt"] = _checked_prompt(body["prompt"])
    if body.get("stop") is not None:
        _check_stop(body["stop"])
    ctx.model = body["model"]
    ctx.stream = bool(body.get("stream"))


def _exact(value: float) -> bool:
    """An integral float that is exactly the integer the client wrote: one within ±2**53.
    (Past that, orjson may have read an integer too large for 64 bits into a float.)"""
    return -(2**53) <= value <= 2**53


def _integral(name: str, value: float) -> int:
    """An integer field sent as an integral number (``5.0``, ``1e3``) is that integer, as
    JSON Schema and vLLM read it; 400 for one outside INTEGER_RANGE (read as a float)."""
    if not _exact(value):
        raise bad_request(
            f"Invalid value for `{name}`: integers must lie between {INTEGER_RANGE[0]} and "
            f"{INTEGER_RANGE[1]} (written with a fraction or an exponent, within ±2**53).",
            param=name,
            code="invalid_value",
        )
    return int(value)


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
