"""The OpenAPI document of the guard's public API, generated from the field table.

Request schemas come from :mod:`guard_server.openai_fields` (each field's JSON type per
endpoint, its minimum, which fields are required) and the exposure groups tiers allow fields
by; the shapes of ``messages``, ``prompt``, ``input`` and ``stop`` are the ones
:mod:`guard_server.pipeline.validate` checks. Nothing here is written by hand per field, so
the document cannot drift from what the validator accepts; the fuzz tests
(``tests/fuzz``) check the rest (responses, errors) against a running guard.
``guard-server openapi`` prints it; the guard serves it at ``GET /openapi.json``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import orjson

from guard_server import __version__
from guard_server.canonical import (
    ANY_ROLE_KEYS,
    FUNCTION_KEYS,
    NULLABLE_KEYS,
    PART_KEYS,
    ROLE_KEYS,
    STRING_KEYS,
    TEXT_OF_PART,
    TOOL_CALL_KEYS,
)
from guard_server.openai_fields import (
    ENCODING_FORMATS,
    FIELDS,
    GROUPS,
    GUARD_ONLY,
    MINIMUMS,
    REQUIRED,
    Endpoint,
    FieldSpec,
    JsonType,
)
from guard_server.pipeline.validate import INTEGER_RANGE
from guard_server.responses_input import INCLUDE_VALUES, ITEM_KEYS, OUTPUT_PART_EXTRAS

OPENAPI_VERSION = "3.1.0"

_JSON_TYPES: dict[JsonType, list[str]] = {
    JsonType.STRING: ["string"],
    JsonType.INTEGER: ["integer"],
    JsonType.NUMBER: ["number"],
    JsonType.BOOLEAN: ["boolean"],
    JsonType.OBJECT: ["object"],
    JsonType.ARRAY: ["array"],
    JsonType.STRING_OR_ARRAY: ["string", "array"],
    JsonType.STRING_OR_OBJECT: ["string", "object"],
    JsonType.INTEGER_OR_BOOLEAN: ["integer", "boolean"],
}

_GROUP_NOTES = {
    "openai": "the OpenAI API",
    "openai_platform": "OpenAI platform fields vLLM does not implement (strip or refuse)",
    "openai_unserved": "OpenAI features this endpoint does not serve (refuse or strip)",
    "vllm_sampling": "vLLM's sampling extras",
    "vllm_advanced": "vLLM's extras that reveal model internals or steer the engine",
}

# What validate.py checks beyond the JSON type (_check_messages, with canonical.py's key
# tables for messages and content parts; _checked_prompt; _check_stop).
_INTEGER = {"type": "integer", "minimum": INTEGER_RANGE[0], "maximum": INTEGER_RANGE[1]}
_TOKEN_IDS = {"type": "array", "minItems": 1, "items": _INTEGER}


def _content_part() -> dict[str, Any]:
    """A string, or an object of a known type with only the keys vLLM reads of it."""
    return {"anyOf": [{"type": "string"}, *_part_objects(output_extras=False)]}


def _part_objects(output_extras: bool) -> list[dict[str, Any]]:
    """One schema per content-part type, with only the keys vLLM reads of it (and, with
    ``output_extras``, the keys an ``output_text`` echoed back as input may keep)."""
    parts = []
    for kind, keys in sorted(PART_KEYS.items()):
        text_key = TEXT_OF_PART.get(kind)
        used = keys | (OUTPUT_PART_EXTRAS if output_extras and kind == "output_text" else set())
        properties: dict[str, Any] = {key: {} for key in sorted(used)}
        properties["type"] = {"const": kind}
        if text_key is not None:
            properties[text_key] = {"type": "string"}
        parts.append(
            {
                "type": "object",
                "required": ["type", *([text_key] if text_key else [])],
                "properties": properties,
                "additionalProperties": False,
            }
        )
    return parts


def _message_key(key: str) -> dict[str, Any]:
    nullable = key in NULLABLE_KEYS
    if key == "content":
        return {"anyOf": [{"type": "string"}, {"type": "array", "items": _content_part()},
                          {"type": "null"}]}  # fmt: skip
    if key in STRING_KEYS:
        return {"type": ["string", "null"] if nullable else "string"}
    if key == "tool_calls":
        function = {
            "type": "object",
            "properties": {name: {} for name in sorted(FUNCTION_KEYS)},
            "additionalProperties": False,
        }
        call = {
            "type": "object",
            "required": ["function"],
            "properties": {**{name: {} for name in sorted(TOOL_CALL_KEYS)}, "function": function},
            "additionalProperties": False,
        }
        return {"type": ["array", "null"], "items": call}
    if key == "tools":
        return {"type": ["array", "null"]}
    return {}


def _message(role: dict[str, Any], keys: frozenset[str]) -> dict[str, Any]:
    properties = {key: _message_key(key) for key in sorted(keys)}
    properties["role"] = role
    return {
        "type": "object",
        "required": ["role"],
        "properties": properties,
        "additionalProperties": False,
    }


def _messages() -> dict[str, Any]:
    """A non-empty list of messages: a string ``role`` and only the keys vLLM passes on for it."""
    per_role = [_message({"const": role}, ANY_ROLE_KEYS | keys) for role, keys in ROLE_KEYS.items()]
    other = {"type": "string", "not": {"enum": sorted(ROLE_KEYS)}}
    return {
        "type": "array",
        "minItems": 1,
        "items": {"anyOf": [*per_role, _message(other, ANY_ROLE_KEYS)]},
    }


_PROMPT = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "minItems": 1, "items": {"type": "string"}},
        _TOKEN_IDS,
        {"type": "array", "minItems": 1, "items": _TOKEN_IDS},
    ]
}


def _input_part() -> dict[str, Any]:
    """A Responses API content part: an object of a known type (no plain strings)."""
    return {"anyOf": _part_objects(output_extras=True)}


def _item(kind: str, required: list[str], shapes: dict[str, Any]) -> dict[str, Any]:
    properties: dict[str, Any] = {key: {} for key in sorted(ITEM_KEYS[kind])}
    properties["type"] = {"const": kind}
    properties.update(shapes)
    return {
        "type": "object",
        "required": required,
        "properties": properties,
        "additionalProperties": False,
    }


def _input() -> dict[str, Any]:
    """``input``: a string, or a non-empty list of the items responses_input.py serves."""
    part = _input_part()
    one_or_more = {"type": "array", "minItems": 1, "items": part}
    texts = {
        "anyOf": [
            {"type": "null"},
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["text"],
                    "properties": {"text": {"type": "string"}},
                },
            },
        ]
    }
    string = {"type": "string"}
    items = [
        _item("message", ["role", "content"], {
            "role": {"enum": ["user", "system", "developer"]},
            "content": {"anyOf": [string, one_or_more]},
        }),
        _item("message", ["role", "content"], {
            "role": {"const": "assistant"},
            "content": {"anyOf": [string, {**one_or_more, "maxItems": 1}]},
        }),
        _item("function_call", ["type", "call_id", "name", "arguments"],
              {"call_id": string, "name": string, "arguments": string}),
        _item("function_call_output", ["type", "call_id", "output"],
              {"call_id": string, "output": string}),
        _item("reasoning", ["type"],
              {"summary": texts, "content": texts, "encrypted_content": {"type": "null"}}),
    ]  # fmt: skip
    return {"anyOf": [string, {"type": "array", "minItems": 1, "items": {"anyOf": items}}]}


_SHAPES: dict[str, dict[str, Any]] = {
    "include": {"type": ["array", "null"], "items": {"enum": sorted(INCLUDE_VALUES)}},
    "text": {
        "type": ["object", "null"],
        "properties": {"format": {"type": ["object", "null"]}},
    },
    "messages": _messages(),
    "prompt": _PROMPT,
    "input": _PROMPT,
    "encoding_format": {"anyOf": [{"enum": list(ENCODING_FORMATS)}, {"type": "null"}]},
    "stop": {
        "anyOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}},
            {"type": "null"},
        ]
    },
}

PATHS = {
    Endpoint.CHAT: "/v1/chat/completions",
    Endpoint.COMPLETIONS: "/v1/completions",
    Endpoint.EMBEDDINGS: "/v1/embeddings",
    Endpoint.RESPONSES: "/v1/responses",
}
"""Each endpoint's path."""
REQUEST_SCHEMAS = {
    Endpoint.CHAT: "ChatCompletionRequest",
    Endpoint.COMPLETIONS: "CompletionRequest",
    Endpoint.EMBEDDINGS: "EmbeddingRequest",
    Endpoint.RESPONSES: "ResponseCreateRequest",
}
"""The name of each endpoint's request body schema (``components.schemas``)."""
_STREAM_NOTES = {
    Endpoint.CHAT: "chunks, then `data: [DONE]`; a failure mid-stream is an error event",
    Endpoint.COMPLETIONS: "chunks, then `data: [DONE]`; a failure mid-stream is an error event",
    Endpoint.RESPONSES: "typed events (`event:` and `data:` lines) from `response.created` to "
    "`response.completed` (or `response.incomplete`); a failure mid-stream is an `error` event",
}
_RESPONSE_SCHEMAS = {
    Endpoint.CHAT: "ChatCompletion",
    Endpoint.COMPLETIONS: "Completion",
    Endpoint.EMBEDDINGS: "EmbeddingList",
    Endpoint.RESPONSES: "Response",
}

# Every status the guard answers a generation request with besides 200, and why.
_GENERATION_ERRORS = {
    "400": "The request is malformed, uses a field or value the tier does not allow, or the "
    "model server rejected it (in the guard's words).",
    "401": "No API key, or an unknown one.",
    "403": "The API key is suspended (extraction risk).",
    "404": "The model does not exist or the tier may not use it.",
    "408": "The request body did not arrive in time.",
    "413": "The request body is too large.",
    "429": "A rate limit of the client is reached.",
    "502": "The model server failed or its connection broke.",
    "503": "No model server is available, or rate limiting is unavailable (fail-closed).",
    "504": "The model server did not answer in time.",
}


_ENDPOINT_SHAPES: dict[tuple[Endpoint, str], dict[str, Any]] = {
    (Endpoint.RESPONSES, "input"): _input(),
}
"""Shapes of a field that means something else on one endpoint (``input``)."""


def _field_schema(spec: FieldSpec, endpoint: Endpoint, required: bool) -> dict[str, Any]:
    shape = _ENDPOINT_SHAPES.get((endpoint, spec.name)) or _SHAPES.get(spec.name)
    schema: dict[str, Any] = dict(shape or {})
    if not schema:
        types = list(_JSON_TYPES[spec.types[endpoint]])
        if not required:
            types.append("null")
        schema["type"] = types if len(types) > 1 else types[0]
        if "integer" in types:
            schema["minimum"], schema["maximum"] = INTEGER_RANGE
        if spec.name in MINIMUMS:
            schema["minimum"] = MINIMUMS[spec.name]
    schema["x-guard-group"] = spec.group
    if spec.unpassable is not None:
        schema["x-guard-never-passed"] = spec.unpassable
    return schema


def request_schema(endpoint: Endpoint) -> dict[str, Any]:
    """The JSON schema of one endpoint's request body: every field a client may send."""
    required = REQUIRED[endpoint]
    properties = {
        spec.name: _field_schema(spec, endpoint, spec.name in required)
        for spec in FIELDS.values()
        if endpoint in spec.types and spec.group != GUARD_ONLY
    }
    groups = "; ".join(f"`@{group}`: {_GROUP_NOTES[group]}" for group in GROUPS)
    return {
        "type": "object",
        "description": "Unknown fields are rejected (400). A tier passes fields to vLLM "
        "(`allow_fields`) or accepts and strips them (`strip_fields`, named in `x-guard-policy`) "
        f"by group (`x-guard-group`) or by name ({groups}); any other field is 400.",
        "required": list(required),
        "properties": properties,
        "additionalProperties": False,
    }


_NULLABLE_STRING = {"type": ["string", "null"]}
# One server-sent event (OpenAPI 3.1: the schema of an event stream describes each event).
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "A chunk, an error object (`code`: the HTTP status), or `[DONE]`.",
        },
        "event": {"type": "string"},
    },
}
_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
    },
}


def _completion_object(kind: str, choice: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": kind},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice},
            "usage": {"anyOf": [{"$ref": "#/components/schemas/Usage"}, {"type": "null"}]},
        },
    }


def _choice(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["index", "finish_reason", *required],
        "properties": {
            "index": {"type": "integer"},
            "finish_reason": _NULLABLE_STRING,
            "logprobs": {"type": ["object", "null"]},
            **properties,
        },
    }


def _schemas() -> dict[str, Any]:
    message = {
        "type": "object",
        "required": ["role"],
        "properties": {"role": {"type": "string"}, "content": _NULLABLE_STRING},
    }
    return {
        **{REQUEST_SCHEMAS[e]: request_schema(e) for e in Endpoint},
        "Response": {
            "type": "object",
            "required": ["id", "object", "model", "output", "status"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "response"},
                "created_at": {"type": "number"},
                "model": {"type": "string"},
                "status": {"type": "string"},
                "output": {"type": "array", "items": {"type": "object"}},
                "usage": {"type": ["object", "null"]},
            },
        },
        "ChatCompletion": _completion_object(
            "chat.completion", _choice(["message"], {"message": message})
        ),
        "Completion": _completion_object(
            "text_completion", _choice(["text"], {"text": {"type": "string"}})
        ),
        "Usage": _USAGE,
        "EmbeddingList": {
            "type": "object",
            "required": ["object", "data", "model", "usage"],
            "properties": {
                "object": {"const": "list"},
                "model": {"type": "string"},
                "data": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["index", "object", "embedding"],
                        "properties": {
                            "index": {"type": "integer"},
                            "object": {"const": "embedding"},
                            "embedding": {
                                "description": "Floats, or with `encoding_format: base64` "
                                "their little-endian float32 bytes in base64; the tier's "
                                "`embeddings` policy may add keyed noise and quantize.",
                                "anyOf": [
                                    {"type": "array", "items": {"type": "number"}},
                                    {"type": "string"},
                                ],
                            },
                        },
                    },
                },
                "usage": {
                    "type": "object",
                    "required": ["prompt_tokens", "total_tokens"],
                    "properties": {
                        "prompt_tokens": {"type": "integer"},
                        "total_tokens": {"type": "integer"},
                    },
                },
            },
        },
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"const": "list"},
                "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
            },
        },
        "Model": {
            "type": "object",
            "required": ["id", "object", "created", "owned_by"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "model"},
                "created": {"type": "integer"},
                "owned_by": {"type": "string"},
            },
        },
        "Error": {
            "type": "object",
            "description": "Every error, in OpenAI's shape and the guard's own words.",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "param", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": _NULLABLE_STRING,
                        "code": _NULLABLE_STRING,
                    },
                    "additionalProperties": False,
                }
            },
            "additionalProperties": False,
        },
    }


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _generation_operation(endpoint: Endpoint) -> dict[str, Any]:
    name = REQUEST_SCHEMAS[endpoint]
    return {
        "operationId": "create" + _RESPONSE_SCHEMAS[endpoint],
        "summary": f"OpenAI-compatible {endpoint.value} generation, through the guard",
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
        },
        "responses": {
            "200": {
                "description": "The answer: a JSON object, or with `stream` server-sent events "
                f"({_STREAM_NOTES[endpoint]}).",
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{_RESPONSE_SCHEMAS[endpoint]}"}
                    },
                    "text/event-stream": {"schema": _SSE_EVENT},
                },
            },
            **{status: _error_response(why) for status, why in _GENERATION_ERRORS.items()},
        },
    }


def _embeddings_operation() -> dict[str, Any]:
    name = REQUEST_SCHEMAS[Endpoint.EMBEDDINGS]
    return {
        "operationId": "createEmbedding",
        "summary": "OpenAI-compatible embeddings, through the guard (each input counts as one "
        "request in the rate limits)",
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
        },
        "responses": {
            "200": {
                "description": "One embedding per input, in input order.",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/EmbeddingList"}}
                },
            },
            **{status: _error_response(why) for status, why in _GENERATION_ERRORS.items()},
        },
    }


@cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``/v1/chat/completions``, ``/v1/completions``,
    ``/v1/embeddings``, ``/v1/responses``, ``/v1/models`` and ``/v1/models/{model}``."""
    generation = (Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.RESPONSES)
    paths: dict[str, Any] = {PATHS[e]: {"post": _generation_operation(e)} for e in generation}
    paths[PATHS[Endpoint.EMBEDDINGS]] = {"post": _embeddings_operation()}
    paths["/v1/models"] = {
        "get": {
            "operationId": "listModels",
            "summary": "The models the caller's tier may use",
            "responses": {
                "200": {
                    "description": "The models.",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ModelList"}}
                    },
                },
                "401": _error_response(_GENERATION_ERRORS["401"]),
            },
        }
    }
    paths["/v1/models/{model}"] = {
        "get": {
            "operationId": "retrieveModel",
            "summary": "One model the caller's tier may use",
            "parameters": [
                {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": {
                    "description": "The model.",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Model"}}
                    },
                },
                "401": _error_response(_GENERATION_ERRORS["401"]),
                "404": _error_response(
                    "No such model, or the caller's tier may not use it (the two look alike)."
                ),
            },
        }
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "guard-server",
            "version": __version__,
            "description": "The public API of guard-server: an OpenAI-compatible endpoint in "
            "front of vLLM. Generated from the guard's field table (`guard-server openapi`).",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearerAuth": []}],
    }


@cache
def openapi_json() -> bytes:
    """:func:`openapi_document`, serialized (indented, keys in order)."""
    return orjson.dumps(openapi_document(), option=orjson.OPT_INDENT_2) + b"\n"
