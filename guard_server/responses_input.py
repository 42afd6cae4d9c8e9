"""The Responses API's model input: which ``input`` items the guard serves, and what the
model sees of a request, written as the chat request vLLM renders it into.

vLLM 0.32 turns ``instructions`` and ``input`` into chat messages before its chat template
renders them (vllm/entrypoints/openai/responses/utils.py, ``construct_input_messages``): the
instructions as a system message, each function call merged into the assistant message
before it, a function call's output as a tool message, and so on. :func:`chat_view` does
the same, so the canonical input (``guard_server.canonical``) of a Responses request is the
one of the chat request the model reads: the same conversation has the same identity, noise
and counts through either endpoint. (vLLM 0.32 tokenizes a Responses prompt with special
tokens, which chat does not: a template that writes its own BOS is read with two. That one
difference is left out of the identity on purpose, or every prompt would have a second,
independent noise draw for the asking.)

Items that point at state the model server keeps (``item_reference``) or that only
OpenAI's hosted tools produce are refused: the guard would not see what they add.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from guard_server.canonical import PART_KEYS, TEXT_OF_PART
from guard_server.errors import bad_request
from guard_server.openai_fields import LOGPROBS_INCLUDE

INCLUDE_VALUES = frozenset({
    "code_interpreter_call.outputs", "computer_call_output.output.image_url",
    "file_search_call.results", "message.input_image.image_url", LOGPROBS_INCLUDE,
    "reasoning.encrypted_content",
})  # fmt: skip
"""The ``include`` values vLLM 0.32 accepts (``ResponsesRequest.include``)."""

_MESSAGE_ROLES = frozenset({"user", "assistant", "system", "developer"})
ITEM_KEYS: dict[str, frozenset[str]] = {
    # ``id``, ``status`` and ``phase`` are what a response's output items carry when a client
    # sends them back as input; the model never sees them (nor text parts' annotations).
    "message": frozenset({"type", "role", "content", "id", "status", "phase"}),
    "function_call": frozenset({"type", "call_id", "name", "arguments", "id", "status"}),
    "function_call_output": frozenset({"type", "call_id", "output", "id", "status"}),
    "reasoning": frozenset({"type", "id", "summary", "content", "encrypted_content", "status"}),
}
OUTPUT_PART_EXTRAS = frozenset({"annotations", "logprobs"})
_PARTIAL = ("in_progress", "incomplete")

# Request fields the chat view renames or leaves out (the rest mean the same in both APIs).
_RESPONSES_ONLY = frozenset({
    "input", "instructions", "max_output_tokens", "include", "text", "reasoning",
    "truncation", "top_logprobs", "max_tool_calls",
})  # fmt: skip


def _item_type(item: dict[str, Any]) -> str:
    return item.get("type", "message")


def check_input(body: dict[str, Any]) -> None:
    """400 for any ``input`` item or ``include`` value the guard does not serve."""
    include = body.get("include")
    if include is not None:
        for index, value in enumerate(include):
            if not isinstance(value, str) or value not in INCLUDE_VALUES:
                raise bad_request(
                    f"include[{index}] is not a value the model server knows: {value!r}.",
                    param=f"include[{index}]",
                    code="invalid_value",
                )
    text_format = (body.get("text") or {}).get("format")
    if text_format is not None and not isinstance(text_format, dict):
        raise bad_request("`text.format` must be an object.", param="text.format")
    items = body["input"]
    if isinstance(items, str):
        return
    if not items:
        raise bad_request("`input` must not be empty.", param="input")
    for index, item in enumerate(items):
        _check_item(f"input[{index}]", item)


def _check_item(where: str, item: Any) -> None:
    if not isinstance(item, dict):
        raise bad_request(f"{where} must be an object.", param=where)
    kind = _item_type(item)
    if kind == "item_reference":
        raise bad_request(
            f"{where} refers to an item stored by the model server; the guard keeps no "
            "response store (the model would read it unseen): send the item itself.",
            param=where,
            code="parameter_not_allowed",
        )
    keys = ITEM_KEYS.get(kind) if isinstance(kind, str) else None
    if keys is None:
        raise bad_request(
            f"{where} has the input item type `{kind}`, which this endpoint does not serve "
            "(served: message, function_call, function_call_output, reasoning).",
            param=f"{where}.type",
            code="invalid_value",
        )
    _refuse_unseen_keys(where, item, keys)
    if kind == "message":
        _check_message(where, item)
    elif kind == "function_call":
        for key in ("call_id", "name", "arguments"):
            _require_string(where, item, key)
    elif kind == "function_call_output":
        for key in ("call_id", "output"):
            _require_string(where, item, key)
    else:
        _check_reasoning(where, item)


def _require_string(where: str, item: dict[str, Any], key: str) -> None:
    if not isinstance(item.get(key), str):
        raise bad_request(f"{where}.{key} must be a string.", param=f"{where}.{key}")


def _check_message(where: str, item: dict[str, Any]) -> None:
    role = item.get("role")
    if not isinstance(role, str) or role not in _MESSAGE_ROLES:
        raise bad_request(
            f"{where}.role must be one of user, assistant, system, developer.",
            param=f"{where}.role",
        )
    content = item.get("content")
    if isinstance(content, str):
        return
    if not isinstance(content, list) or not content:
        raise bad_request(
            f"{where}.content must be a string or a non-empty array of content parts.",
            param=f"{where}.content",
        )
    if item["role"] == "assistant" and len(content) > 1:
        raise bad_request(
            f"{where}.content has {len(content)} parts; the model reads only the first part "
            "of an assistant message. Send one part.",
            param=f"{where}.content",
        )
    for index, part in enumerate(content):
        _check_part(f"{where}.content[{index}]", part)


def _check_part(where: str, part: Any) -> None:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise bad_request(f"{where} must be an object with a string `type`.", param=where)
    kind = part["type"]
    if kind not in PART_KEYS:
        raise bad_request(
            f"{where} has the unknown content part type `{kind}`.",
            param=f"{where}.type",
            code="invalid_value",
        )
    used = PART_KEYS[kind] | (OUTPUT_PART_EXTRAS if kind == "output_text" else frozenset())
    _refuse_unseen_keys(where, part, used)
    text_key = TEXT_OF_PART.get(kind)
    if text_key is not None and not isinstance(part.get(text_key), str):
        raise bad_request(f"{where}.{text_key} must be a string.", param=f"{where}.{text_key}")


def _check_reasoning(where: str, item: dict[str, Any]) -> None:
    if item.get("encrypted_content") is not None:
        raise bad_request(
            f"{where}.encrypted_content is not supported: send the reasoning as `content`.",
            param=f"{where}.encrypted_content",
        )
    for key in ("summary", "content"):
        parts = item.get(key)
        if parts is None:
            continue
        if not isinstance(parts, list) or not all(
            isinstance(p, dict) and isinstance(p.get("text"), str) for p in parts
        ):
            raise bad_request(
                f"{where}.{key} must be an array of objects with a string `text`.",
                param=f"{where}.{key}",
            )


def content_part_types(body: dict[str, Any]) -> list[str]:
    """The content-part types of the input, as the tier's ``content_parts`` names them: the
    Responses API's text parts (``input_text``, ``output_text``) are plain ``text``."""
    items = body["input"]
    if isinstance(items, str):
        return []
    kinds = []
    for item in items:
        content = item.get("content") if _item_type(item) == "message" else None
        if isinstance(content, list):
            for part in content:
                kind = part["type"]
                kinds.append("text" if kind in ("input_text", "output_text") else kind)
    return kinds


def chat_view(body: dict[str, Any]) -> dict[str, Any]:
    """The validated Responses request as the chat request the model reads (see the module
    docstring): its messages, and its fields under their chat names."""
    view = {name: value for name, value in body.items() if name not in _RESPONSES_ONLY}
    view["messages"] = messages_of(body)
    if body.get("max_output_tokens") is not None:
        view["max_tokens"] = body["max_output_tokens"]
    text_format = (body.get("text") or {}).get("format")
    if isinstance(text_format, dict) and text_format.get("type", "text") != "text":
        view["response_format"] = text_format
    effort = (body.get("reasoning") or {}).get("effort")
    if effort is not None:
        view["reasoning_effort"] = effort
    if body.get("truncation") == "auto":
        view["truncate_prompt_tokens"] = -1
    if LOGPROBS_INCLUDE in (body.get("include") or ()):
        view["logprobs"] = True
        view["top_logprobs"] = body.get("top_logprobs") or 0
    if _continues_final(body["input"]):
        view["add_generation_prompt"] = False
        view["continue_final_message"] = True
    return view


def _continues_final(items: str | list[dict[str, Any]]) -> bool:
    """vLLM continues a last assistant message or reasoning item that is still partial."""
    if isinstance(items, str):
        return False
    last = items[-1]
    kind = _item_type(last)
    partial = last.get("status") in _PARTIAL
    if kind == "reasoning":
        return partial
    return kind == "message" and last.get("role") == "assistant" and partial


def messages_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    """``instructions`` and ``input`` as the chat messages vLLM renders."""
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body["input"]
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
        return messages
    for item in items:
        message = _message_of(item, messages[-1] if messages else None)
        if message is not None:
            messages.append(message)
    return messages


def _message_of(item: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any] | None:
    """One item as a new message, or None when vLLM merges it into ``previous``."""
    assistant = previous if previous is not None and previous["role"] == "assistant" else None
    kind = _item_type(item)
    if kind == "function_call":
        call = {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        if assistant is not None:
            assistant.setdefault("tool_calls", []).append(call)
            return None
        return {"role": "assistant", "tool_calls": [call]}
    if kind == "function_call_output":
        return {"role": "tool", "content": item["output"], "tool_call_id": item["call_id"]}
    if kind == "reasoning":
        parts = item.get("content") or item.get("summary") or []
        text = parts[0]["text"] if parts else ""
        if assistant is not None and "reasoning" not in assistant:
            assistant["reasoning"] = text
            return None
        return {"role": "assistant", "reasoning": text}
    content = item["content"]
    if item["role"] == "assistant" and isinstance(content, list):
        part = content[0]
        text = part.get(TEXT_OF_PART.get(part["type"], "text"), "")
        if assistant is not None and "content" not in assistant:
            assistant["content"] = text
            return None
        return {"role": "assistant", "content": text}
    if isinstance(content, list):
        content = [{k: v for k, v in p.items() if k in PART_KEYS[p["type"]]} for p in content]
    return {"role": item["role"], "content": content}


def _refuse_unseen_keys(where: str, obj: dict[str, Any], used: Collection[str]) -> None:
    """400 naming the keys of ``obj`` the model never sees (they would key nothing)."""
    extra = sorted(str(key) for key in obj if key not in used)
    if extra:
        shown = ", ".join(f"`{key}`" for key in extra)
        raise bad_request(
            f"{where} has key(s) the model never sees: {shown}. Remove them.",
            param=where,
            code="unknown_parameter",
        )
