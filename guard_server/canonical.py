"""The canonical model input: what vLLM will actually see of a validated request.

Every key, hash and count the guard derives from a request comes from here, never from the
request's bytes: the logprob noise key, the plugin's sampling-noise seed, the re-keyed seed,
the detector's prompt identities and fingerprint. Two requests that differ only in bytes vLLM
ignores (key order, spacing, an extra key, a default spelled out) map to the same input.

Two levels, because a chat template decides what of a message it renders:

- a prompt's **identity** holds what every template renders and what vLLM applies itself: the
  model, each message's role and content (text parts joined as vLLM joins them for a string
  template, other parts as they are), and the prompt-shaping options (``add_generation_prompt``,
  ``continue_final_message``, ``add_special_tokens``, ``truncate_prompt_tokens``,
  ``chat_template``, ``prompt_embeds``). Noise keys and the detector use it. What a template may
  or may not render (a message's ``name``, tool calls, reasoning, ``tools``, ``documents``,
  ``chat_template_kwargs``) is left out, so a template that drops it cannot be used to draw
  fresh noise for one prompt; requests that differ only there share their noise.
- the **digest** holds everything vLLM uses to sample: the identities, those template inputs,
  and every sampling field (``SAMPLING_FIELDS``). The re-keyed seed uses it, so a fixed seed
  under any change gives unrelated randomness.

Fields that do not change what is sampled (``OUTPUT_FIELDS``: streaming, logprob counts,
``user``, ...) are in neither. Keys vLLM would drop from a message are refused by
:func:`check_messages` (400 naming them), so no request carries them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from guard_server.errors import GuardError, bad_request
from guard_server.openai_fields import LOGPROBS_INCLUDE, Endpoint

# --------------------------------------------------------------------------- request fields

PROMPT_FIELDS = frozenset({
    "model", "messages", "prompt", "input", "add_generation_prompt", "continue_final_message",
    "add_special_tokens", "truncate_prompt_tokens", "chat_template", "prompt_embeds",
    "mm_processor_kwargs", "instructions", "truncation",
})  # fmt: skip
"""Fields that shape the prompt the model reads, whatever the chat template. (A Responses
request's own fields are read through the chat request it becomes:
``guard_server.responses_input.chat_view``.)"""
TEMPLATE_FIELDS = frozenset({
    "tools", "documents", "chat_template_kwargs", "reasoning_effort", "reasoning",
})  # fmt: skip
"""Fields a chat template may render or ignore."""
SAMPLING_FIELDS = frozenset({
    "max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "stop", "seed",
    "presence_penalty", "frequency_penalty", "response_format", "tool_choice",
    "parallel_tool_calls", "logit_bias", "top_k", "min_p", "repetition_penalty",
    "length_penalty", "min_tokens", "stop_token_ids", "ignore_eos", "bad_words",
    "structured_outputs", "allowed_token_ids", "use_beam_search", "thinking_token_budget",
    "max_output_tokens", "text", "max_tool_calls",
})  # fmt: skip
"""Fields that change what is sampled (the distribution, or where sampling stops)."""
OUTPUT_FIELDS = frozenset({
    "stream", "stream_options", "user", "logprobs", "top_logprobs", "prompt_logprobs",
    "logprob_token_ids", "echo", "return_tokens_as_token_ids", "return_token_ids",
    "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
    "include_reasoning", "kv_transfer_params", "priority", "request_id", "cache_salt",
    "vllm_xargs", "encoding_format", "dimensions", "include",
})  # fmt: skip
"""Fields that change only what is returned or how: never part of an identity."""

# vLLM's defaults for the prompt-shaping flags: spelling a default out changes nothing.
_PROMPT_DEFAULTS: dict[Endpoint, dict[str, Any]] = {
    Endpoint.CHAT: {
        "add_generation_prompt": True,
        "continue_final_message": False,
        "add_special_tokens": False,
    },
    Endpoint.COMPLETIONS: {"add_special_tokens": True},
    Endpoint.EMBEDDINGS: {"add_special_tokens": True},
}

# --------------------------------------------------------------------------- chat messages

# The keys vLLM 0.32 passes from a chat message to the template
# (vllm/renderers/chat_utils.py, _parse_chat_message_content): role, content, name and task
# of any message; an assistant's tool_calls and reasoning (reasoning_content is its older
# name, renamed by the request validator); a tool message's tool_call_id; a developer
# message's tools. Any other key, or one of these on another role, is dropped unseen.
ANY_ROLE_KEYS = frozenset({"role", "content", "name", "task"})
ROLE_KEYS: dict[str, frozenset[str]] = {
    "assistant": frozenset({"tool_calls", "reasoning", "reasoning_content"}),
    "tool": frozenset({"tool_call_id"}),
    "developer": frozenset({"tools"}),
}
_KEYS_OF_ROLE = {role: ANY_ROLE_KEYS | keys for role, keys in ROLE_KEYS.items()}
STRING_KEYS = frozenset({"name", "task", "reasoning", "reasoning_content", "tool_call_id"})
NULLABLE_KEYS = frozenset({"content", "task", "reasoning", "reasoning_content", "tool_call_id"})
NULLABLE_KEYS |= frozenset({"tool_calls", "tools"})  # vLLM's types take null for these
TOOL_CALL_KEYS = frozenset({"id", "type", "function"})
FUNCTION_KEYS = frozenset({"name", "arguments"})

# Content parts, by type: the keys vLLM reads (its content-part TypedDicts), and the one that
# holds the text of a text-like part.
PART_KEYS: dict[str, frozenset[str]] = {
    "text": frozenset({"type", "text"}),
    "input_text": frozenset({"type", "text"}),
    "output_text": frozenset({"type", "text"}),
    "refusal": frozenset({"type", "refusal"}),
    "thinking": frozenset({"type", "thinking", "closed"}),
    "tool_reference": frozenset({"type", "name"}),
    "image_url": frozenset({"type", "image_url", "uuid"}),
    "input_image": frozenset({"type", "image_url", "detail", "file_id"}),
    "image_embeds": frozenset({"type", "image_embeds", "uuid"}),
    "audio_url": frozenset({"type", "audio_url", "uuid"}),
    "input_audio": frozenset({"type", "input_audio", "uuid"}),
    "audio_embeds": frozenset({"type", "audio_embeds", "uuid"}),
    "video_url": frozenset({"type", "video_url", "uuid"}),
    "video_embeds": frozenset({"type", "video_embeds", "uuid"}),
    "prompt_embeds": frozenset({"type", "data"}),
}
TEXT_OF_PART = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}


def _unused(keys: Any, used: frozenset[str]) -> list[str]:
    return sorted(str(key) for key in keys if key not in used)


def _ignored_keys_error(where: str, keys: list[str]) -> GuardError:
    shown = ", ".join(f"`{key}`" for key in keys)
    return bad_request(
        f"{where} has key(s) the model never sees: {shown}. Remove them.",
        param=where,
        code="unknown_parameter",
    )


def part_type(part: Any) -> str:
    """The type of one content part (a plain string is a ``text`` part)."""
    return "text" if isinstance(part, str) else part["type"]


def _check_part(where: str, part: Any) -> None:
    if isinstance(part, str):
        return
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise bad_request(f"{where} must be a string or an object with a string `type`.", where)
    kind = part["type"]
    if kind not in PART_KEYS:
        raise bad_request(
            f"{where} has the unknown content part type `{kind}`.",
            param=f"{where}.type",
            code="invalid_value",
        )
    unused = _unused(part, PART_KEYS[kind])
    if unused:
        raise _ignored_keys_error(where, unused)
    text_key = TEXT_OF_PART.get(kind)
    if text_key is not None and not isinstance(part.get(text_key), str):
        raise bad_request(f"{where}.{text_key} must be a string.", param=f"{where}.{text_key}")


def _check_tool_calls(where: str, calls: Any) -> None:
    if not isinstance(calls, list):
        raise bad_request(f"{where} must be an array.", param=where)
    for index, call in enumerate(calls):
        at = f"{where}[{index}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise bad_request(f"{at} must be an object with a `function` object.", param=at)
        unused = _unused(call, TOOL_CALL_KEYS)
        if unused:
            raise _ignored_keys_error(at, unused)
        unused = _unused(call["function"], FUNCTION_KEYS)
        if unused:
            raise _ignored_keys_error(f"{at}.function", unused)


def check_messages(messages: list[Any]) -> None:
    """400 for any message key or content part vLLM would drop or cannot read.

    ``messages`` is a non-empty list of objects with a string ``role``.
    """
    for index, message in enumerate(messages):
        content = message.get("content")
        if len(message) <= 2 and isinstance(content, str) and "content" in message:
            continue  # role and a string content: the usual case
        where = f"messages[{index}]"
        used = _KEYS_OF_ROLE.get(message["role"], ANY_ROLE_KEYS)
        if not message.keys() <= used:
            raise _ignored_keys_error(where, _unused(message, used))
        for key in STRING_KEYS & message.keys():
            value = message[key]
            if not isinstance(value, str) and (value is not None or key not in NULLABLE_KEYS):
                raise bad_request(f"{where}.{key} must be a string.", param=f"{where}.{key}")
        if isinstance(content, list):
            for part_index, part in enumerate(content):
                _check_part(f"{where}.content[{part_index}]", part)
        elif content is not None and not isinstance(content, str):
            raise bad_request(
                f"{where}.content must be a string or an array of content parts.",
                param=f"{where}.content",
            )
        if message.get("tool_calls") is not None:
            _check_tool_calls(f"{where}.tool_calls", message["tool_calls"])
        if message.get("tools") is not None and not isinstance(message["tools"], list):
            raise bad_request(f"{where}.tools must be an array.", param=f"{where}.tools")


def first_disallowed_part(messages: list[dict[str, Any]], allowed: frozenset[str]) -> str | None:
    """The first content-part type in ``messages`` that is not in ``allowed``, if any."""
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                kind = part_type(part)
                if kind not in allowed:
                    return kind
    return None


# --------------------------------------------------------------------------- the input


@dataclass(slots=True)  # built per request, and a frozen __init__ costs 4x: treat as read-only
class CanonicalInput:
    """What vLLM will see of one request, reduced to what the guard keys and counts on."""

    endpoint: Endpoint
    identities: tuple[bytes, ...]
    """One per prompt (chat: the conversation; completions: each prompt of a batch): a
    16-byte digest of what every chat template renders of it (see the module docstring)."""
    digest: bytes
    """A 16-byte digest of everything vLLM uses to sample the answer."""
    turns: tuple[tuple[str, str], ...]
    """Chat: each message's role and rendered text; completions: empty."""
    prompt_texts: tuple[str, ...]
    """Completions: each prompt's text (token ids as JSON); chat: empty."""
    sampling: dict[str, Any]
    """The sampling fields the request sets (``SAMPLING_FIELDS``, None left out)."""
    n: int
    logprobs: int | None
    """How many top logprobs per position the request asks for (0: the sampled token's
    only, -1: all); None: none. Not part of any identity."""

    @property
    def prompts(self) -> int:
        """How many prompts the request asks about."""
        return len(self.identities)

    @property
    def batch_identity(self) -> bytes:
        """One digest of every prompt's identity, in order (equal to it for one prompt)."""
        if len(self.identities) == 1:
            return self.identities[0]
        return _digest(b"".join(self.identities))


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _rendered_content(content: Any) -> str | list[Any]:
    """A message's content as a string template renders it: text parts joined by newlines;
    with other parts, the list of texts and the other parts (keys sorted when dumped)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    items: list[Any] = []
    texts: list[str] = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
            continue
        text_key = TEXT_OF_PART.get(part["type"])
        if text_key is not None:
            texts.append(part[text_key])
        else:
            items.append(part)
    if not items:
        return "\n".join(texts)
    return ["\n".join(texts), *items]


def _template_inputs(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The keys of each message besides role and content that vLLM hands the template
    (None when there are none)."""
    if all(len(message) <= 2 for message in messages):  # role and content only: the usual case
        return None
    inputs = []
    for message in messages:
        extra = {k: v for k, v in message.items() if k not in ("role", "content")}
        extra = {k: v for k, v in extra.items() if v is not None}
        reasoning = extra.pop("reasoning_content", None)
        if reasoning is not None:
            extra.setdefault("reasoning", reasoning)
        inputs.append(extra)
    return inputs if any(inputs) else None


_SHAPING_FIELDS = PROMPT_FIELDS - {"model", "messages", "prompt", "input", "instructions"}
_ENDPOINT_NAMES = {endpoint: endpoint.value for endpoint in Endpoint}  # Enum.value is slow


def canonical_input(endpoint: Endpoint, body: dict[str, Any]) -> CanonicalInput:
    """Map a validated request body to its canonical model input."""
    defaults = _PROMPT_DEFAULTS[endpoint]
    shaping: dict[str, Any] = {}
    template: dict[str, Any] = {}
    sampling: dict[str, Any] = {}
    for name, value in body.items():
        if value is None:
            continue
        if name in SAMPLING_FIELDS:
            sampling[name] = value
        elif name in _SHAPING_FIELDS:
            if defaults.get(name) != value:  # a default spelled out changes nothing
                shaping[name] = value
        elif name in TEMPLATE_FIELDS:
            template[name] = value
    head = [_ENDPOINT_NAMES[endpoint], body["model"], shaping]
    n = body.get("n") or 1
    if endpoint is Endpoint.CHAT:
        messages = body["messages"]
        turns = tuple((m["role"], _rendered_content(m.get("content"))) for m in messages)
        identities: tuple[bytes, ...] = (_digest(_dumps([*head, turns])),)
        inputs = _template_inputs(messages)
        if inputs is not None:
            template["messages"] = inputs
        texts = tuple(
            (role, content if isinstance(content, str) else _as_text(content))
            for role, content in turns
        )
        prompt_texts: tuple[str, ...] = ()
    else:
        prompts = prompt_list(body["input" if endpoint is Endpoint.EMBEDDINGS else "prompt"])
        identities = tuple(_digest(_dumps([*head, prompt])) for prompt in prompts)
        texts = ()
        prompt_texts = tuple(p if isinstance(p, str) else orjson.dumps(p).decode() for p in prompts)
    digest = _digest(b"".join(identities) + _dumps([template, sampling]))
    logprobs = logprob_count(endpoint, body)
    return CanonicalInput(endpoint, identities, digest, texts, prompt_texts, sampling, n, logprobs)


def logprob_count(endpoint: Endpoint, body: dict[str, Any]) -> int | None:
    """How many top logprobs a request asks for: chat ``top_logprobs`` when ``logprobs`` is
    true (0 if unset), completions ``logprobs``, responses ``top_logprobs`` when ``include``
    names the output text's logprobs (0 if unset); None when it asks for none."""
    if endpoint is Endpoint.RESPONSES:
        include = body.get("include") or ()
        return (body.get("top_logprobs") or 0) if LOGPROBS_INCLUDE in include else None
    if endpoint is Endpoint.CHAT:
        return (body.get("top_logprobs") or 0) if body.get("logprobs") is True else None
    return body.get("logprobs")


def _as_text(content: str | list[Any]) -> str:
    return content if isinstance(content, str) else orjson.dumps(content).decode()


def prompt_list(prompt: str | list[Any]) -> list[str | list[int]]:
    """The prompts of a completions request: one string or token list, or a batch of them."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def prompt_count(endpoint: Endpoint, body: dict[str, Any]) -> int:
    """How many prompts a validated request batches (chat, responses: always one;
    embeddings: each input)."""
    if endpoint.conversational:
        return 1
    return len(prompt_list(body["input" if endpoint is Endpoint.EMBEDDINGS else "prompt"]))
