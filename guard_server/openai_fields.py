"""The request fields the guard knows, their JSON types, endpoints and exposure groups.

vLLM silently ignores unknown fields; the guard rejects them. Every field a client may send
is listed here. Tiers pass fields to vLLM by group (``@openai``, ``@vllm_sampling``,
``@vllm_advanced``) or by name, and may accept and strip others (``@openai_platform``,
``@openai_unserved``); ``vllm_xargs`` is in no group: only the guard sets it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class JsonType(Enum):
    """The JSON shapes a field may take."""

    STRING = "string"
    INTEGER = "integer"
    NUMBER = "number"
    BOOLEAN = "boolean"
    OBJECT = "object"
    ARRAY = "array"
    STRING_OR_ARRAY = "string or array"
    STRING_OR_OBJECT = "string or object"
    INTEGER_OR_BOOLEAN = "integer or boolean"


class Endpoint(Enum):
    """The endpoints that take a model input: the generation endpoints and embeddings."""

    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"

    @property
    def prompt_field(self) -> str:
        """The field that holds the model input."""
        return _PROMPT_FIELDS[self]

    @property
    def conversational(self) -> bool:
        """Whether the input is a conversation rendered by the chat template (chat, responses)."""
        return self is Endpoint.CHAT or self is Endpoint.RESPONSES


_PROMPT_FIELDS = {
    Endpoint.CHAT: "messages",
    Endpoint.COMPLETIONS: "prompt",
    Endpoint.EMBEDDINGS: "input",
    Endpoint.RESPONSES: "input",
}

BOTH = frozenset({Endpoint.CHAT, Endpoint.COMPLETIONS})
"""The generation endpoints."""
CHAT = frozenset({Endpoint.CHAT})
COMPLETIONS = frozenset({Endpoint.COMPLETIONS})
EMBEDDINGS = frozenset({Endpoint.EMBEDDINGS})
EVERY = BOTH | EMBEDDINGS
RESPONSES = frozenset({Endpoint.RESPONSES})
ALL = BOTH | RESPONSES
"""The generation endpoints, the Responses API's included."""
CHAT_AND_RESPONSES = CHAT | RESPONSES

OPENAI = "openai"
OPENAI_PLATFORM = "openai_platform"
OPENAI_UNSERVED = "openai_unserved"
VLLM_SAMPLING = "vllm_sampling"
VLLM_ADVANCED = "vllm_advanced"
GUARD_ONLY = "guard_only"
GROUPS = (OPENAI, OPENAI_PLATFORM, OPENAI_UNSERVED, VLLM_SAMPLING, VLLM_ADVANCED)


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One request field: its type per endpoint, where it is valid and its exposure group.

    ``unpassable`` says why the field never reaches vLLM (None: a tier may pass it): a tier
    either strips it or refuses it, and the refusal names the reason.
    """

    name: str
    types: dict[Endpoint, JsonType]
    group: str
    unpassable: str | None = None

    @property
    def endpoints(self) -> frozenset[Endpoint]:
        """The endpoints that accept this field."""
        return frozenset(self.types)


def _spec(name: str, json_type: JsonType, endpoints: frozenset[Endpoint], group: str) -> FieldSpec:
    return FieldSpec(name, dict.fromkeys(endpoints, json_type), group)


def _unpassable(
    name: str, json_type: JsonType, endpoints: frozenset[Endpoint], group: str, why: str
) -> FieldSpec:
    return FieldSpec(name, dict.fromkeys(endpoints, json_type), group, why)


_NOT_IN_VLLM = "vLLM does not implement it"
_UNSEEN_STATE = (
    "earlier turns kept by the model server would reach the model without the guard seeing "
    "them (its keys, limits and detection take this request's input alone); send the whole "
    "conversation in `input`"
)


_S, _I, _N, _B = JsonType.STRING, JsonType.INTEGER, JsonType.NUMBER, JsonType.BOOLEAN
_O, _A = JsonType.OBJECT, JsonType.ARRAY
_S_OR_O = JsonType.STRING_OR_OBJECT

_FIELDS: list[FieldSpec] = [
    # The OpenAI API itself.
    _spec("model", _S, EVERY | RESPONSES, OPENAI),
    _spec("messages", _A, CHAT, OPENAI),
    _spec("prompt", JsonType.STRING_OR_ARRAY, COMPLETIONS, OPENAI),
    _spec("max_tokens", _I, BOTH, OPENAI),
    _spec("max_completion_tokens", _I, CHAT, OPENAI),
    _spec("n", _I, BOTH, OPENAI),
    _spec("temperature", _N, ALL, OPENAI),
    _spec("top_p", _N, ALL, OPENAI),
    _spec("stop", JsonType.STRING_OR_ARRAY, ALL, OPENAI),
    _spec("stream", _B, ALL, OPENAI),
    _spec("stream_options", _O, BOTH, OPENAI),
    _spec("seed", _I, ALL, OPENAI),
    _spec("presence_penalty", _N, ALL, OPENAI),
    _spec("frequency_penalty", _N, ALL, OPENAI),
    _spec("user", _S, EVERY | RESPONSES, OPENAI),
    _spec("response_format", _O, BOTH, OPENAI),
    _spec("tools", _A, CHAT_AND_RESPONSES, OPENAI),
    _spec("tool_choice", JsonType.STRING_OR_OBJECT, CHAT_AND_RESPONSES, OPENAI),
    _spec("parallel_tool_calls", _B, CHAT_AND_RESPONSES, OPENAI),
    _spec("reasoning_effort", _S, CHAT, OPENAI),
    # The Responses API's own (vllm/entrypoints/openai/responses/protocol.py, ResponsesRequest).
    _spec("instructions", _S, RESPONSES, OPENAI),
    _spec("max_output_tokens", _I, RESPONSES, OPENAI),
    _spec("include", _A, RESPONSES, OPENAI),
    _spec("text", _O, RESPONSES, OPENAI),
    _spec("reasoning", _O, RESPONSES, OPENAI),
    _spec("truncation", _S, RESPONSES, OPENAI),
    _spec("max_tool_calls", _I, RESPONSES, OPENAI),
    _spec("top_logprobs", _I, CHAT_AND_RESPONSES, OPENAI),
    _spec("logit_bias", _O, ALL, OPENAI),
    FieldSpec("logprobs", {Endpoint.CHAT: _B, Endpoint.COMPLETIONS: _I}, OPENAI),
    # Embeddings: the guard asks vLLM for floats and encodes base64 itself (the tier's
    # vector defence works on the floats).
    _spec("input", JsonType.STRING_OR_ARRAY, EMBEDDINGS | RESPONSES, OPENAI),
    _spec("encoding_format", _S, EMBEDDINGS, OPENAI),
    _spec("dimensions", _I, EMBEDDINGS, OPENAI),
    # OpenAI platform features with no effect on what a self-hosted model samples (end-user
    # ids, caching, billing, storage, latency hints): vLLM 0.32 does not implement them.
    # ``safety_identifier`` (like ``user``) is read first: the audit log's end user.
    _unpassable("safety_identifier", _S, ALL, OPENAI_PLATFORM, _NOT_IN_VLLM),
    _unpassable("prompt_cache_key", _S, ALL, OPENAI_PLATFORM, _NOT_IN_VLLM),
    _unpassable("service_tier", _S, ALL, OPENAI_PLATFORM, _NOT_IN_VLLM),
    _unpassable("metadata", _O, ALL, OPENAI_PLATFORM, _NOT_IN_VLLM),
    _unpassable("store", _B, ALL, OPENAI_PLATFORM, _NOT_IN_VLLM),
    _unpassable("verbosity", _S, CHAT, OPENAI_PLATFORM, _NOT_IN_VLLM),
    _unpassable("prediction", _O, CHAT, OPENAI_PLATFORM, _NOT_IN_VLLM),
    _unpassable("modalities", _A, CHAT, OPENAI_PLATFORM, _NOT_IN_VLLM),
    # OpenAI features this endpoint does not serve; dropping them would change the answer.
    _unpassable("audio", _O, CHAT, OPENAI_UNSERVED, "audio output is not served, only text"),
    _unpassable("web_search_options", _O, CHAT, OPENAI_UNSERVED, "the model cannot search the web"),
    _unpassable(
        "functions", _A, CHAT, OPENAI_UNSERVED, "it is the deprecated form of `tools`: send that"
    ),
    _unpassable(
        "function_call",
        JsonType.STRING_OR_OBJECT,
        CHAT,
        OPENAI_UNSERVED,
        "it is the deprecated form of `tool_choice`: send that",
    ),
    # State kept by the model server between requests: the guard would not see what it adds to
    # the model input (README, "The Responses API").
    _unpassable("previous_response_id", _S, RESPONSES, OPENAI_UNSERVED, _UNSEEN_STATE),
    _unpassable("conversation", _S_OR_O, RESPONSES, OPENAI_UNSERVED, _UNSEEN_STATE),
    _unpassable(
        "background",
        _B,
        RESPONSES,
        OPENAI_UNSERVED,
        "background responses live in the model server's response store, which the guard keeps "
        "off (no response is stored, so none can be polled)",
    ),
    _unpassable(
        "best_of",
        _I,
        COMPLETIONS,
        OPENAI_UNSERVED,
        "vLLM does not implement it; ask for `n` answers and choose among them",
    ),
    _unpassable(
        "suffix",
        _S,
        COMPLETIONS,
        OPENAI_UNSERVED,
        "fill-in-the-middle is not served (the guard's canonical input has no suffix)",
    ),
    # vLLM sampling extras that reveal nothing beyond the sampled text.
    _spec("top_k", _I, ALL, VLLM_SAMPLING),
    _spec("min_p", _N, ALL, VLLM_SAMPLING),
    _spec("repetition_penalty", _N, ALL, VLLM_SAMPLING),
    _spec("length_penalty", _N, BOTH, VLLM_SAMPLING),
    _spec("min_tokens", _I, BOTH, VLLM_SAMPLING),
    _spec("stop_token_ids", _A, ALL, VLLM_SAMPLING),
    _spec("include_stop_str_in_output", _B, ALL, VLLM_SAMPLING),
    _spec("ignore_eos", _B, ALL, VLLM_SAMPLING),
    _spec("skip_special_tokens", _B, ALL, VLLM_SAMPLING),
    _spec("spaces_between_special_tokens", _B, BOTH, VLLM_SAMPLING),
    _spec("truncate_prompt_tokens", _I, BOTH, VLLM_SAMPLING),
    _spec("bad_words", _A, BOTH, VLLM_SAMPLING),
    _spec("structured_outputs", _O, ALL, VLLM_SAMPLING),
    _spec("add_generation_prompt", _B, CHAT, VLLM_SAMPLING),
    _spec("continue_final_message", _B, CHAT, VLLM_SAMPLING),
    _spec("include_reasoning", _B, CHAT_AND_RESPONSES, VLLM_SAMPLING),
    _spec("thinking_token_budget", _I, BOTH, VLLM_SAMPLING),
    # vLLM extras that leak model internals, steer the engine or cost unbounded work.
    _spec("prompt_logprobs", _I, BOTH, VLLM_ADVANCED),
    _spec("logprob_token_ids", _A, BOTH, VLLM_ADVANCED),
    _spec("allowed_token_ids", _A, BOTH, VLLM_ADVANCED),
    _spec("echo", _B, BOTH, VLLM_ADVANCED),
    _spec("return_tokens_as_token_ids", _B, BOTH, VLLM_ADVANCED),
    _spec("return_token_ids", _B, BOTH, VLLM_ADVANCED),
    _spec("use_beam_search", _B, BOTH, VLLM_ADVANCED),
    _spec("prompt_embeds", JsonType.STRING_OR_ARRAY, COMPLETIONS, VLLM_ADVANCED),
    _spec("kv_transfer_params", _O, ALL, VLLM_ADVANCED),
    _spec("add_special_tokens", _B, EVERY, VLLM_ADVANCED),
    _spec("chat_template", _S, CHAT, VLLM_ADVANCED),
    _spec("chat_template_kwargs", _O, CHAT_AND_RESPONSES, VLLM_ADVANCED),
    _spec("mm_processor_kwargs", _O, CHAT_AND_RESPONSES, VLLM_ADVANCED),
    _spec("documents", _A, CHAT, VLLM_ADVANCED),
    _spec("priority", _I, EVERY | RESPONSES, VLLM_ADVANCED),
    _spec("request_id", _S, ALL, VLLM_ADVANCED),
    _spec("cache_salt", _S, ALL, VLLM_ADVANCED),
    # Parameters for the guard's own vLLM plugin: set by the guard, never by a client.
    _spec("vllm_xargs", _O, ALL, GUARD_ONLY),
]

FIELDS: dict[str, FieldSpec] = {spec.name: spec for spec in _FIELDS}

LOGPROBS_INCLUDE = "message.output_text.logprobs"
"""The Responses API's ``include`` value that asks for the output text's logprobs."""

NOT_SERVED: dict[tuple[Endpoint, str], str] = {
    (Endpoint.RESPONSES, "prompt"): (
        "`prompt` (a stored prompt template) is an OpenAI platform feature vLLM does not "
        "implement; send the text in `instructions` and `input`."
    ),
}
"""Fields of the OpenAI API that an endpoint refuses whatever the tier, with the reason
(a name another endpoint uses for something else, so not in :data:`FIELDS` for this one)."""

REQUIRED: dict[Endpoint, tuple[str, ...]] = {
    Endpoint.CHAT: ("model", "messages"),
    Endpoint.COMPLETIONS: ("model", "prompt"),
    Endpoint.EMBEDDINGS: ("model", "input"),
    Endpoint.RESPONSES: ("model", "input"),
}

ENCODING_FORMATS = ("float", "base64")
"""The ``encoding_format`` values of ``/v1/embeddings`` (base64: little-endian float32)."""

# The smallest value a numeric field may take (-1 for logprob counts: vLLM's "all").
MINIMUMS: dict[str, int] = {
    "max_tokens": 1,
    "max_completion_tokens": 1,
    "max_output_tokens": 1,
    "max_tool_calls": 0,
    "n": 1,
    "temperature": 0,
    "top_logprobs": -1,
    "prompt_logprobs": -1,
    "min_tokens": 0,
    "thinking_token_budget": -1,
    "dimensions": 1,
}

# Numeric fields a tier may bound. ``max_tokens`` also bounds ``max_completion_tokens`` and
# ``max_output_tokens`` (the Responses API's name for it);
# ``logprobs``/``top_logprobs`` are capped by the tier's ``logprobs.max_top`` instead.
BOUNDABLE: frozenset[str] = frozenset(
    {
        "max_tokens",
        "n",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "min_tokens",
        "prompt_logprobs",
    }
)


# The chat content-part types vLLM 0.32 parses (vllm/renderers/chat_utils.py, MM_PARSER_MAP;
# a plain string in a content list is a ``text`` part). Tiers allow them by name.
CONTENT_PART_TYPES: frozenset[str] = frozenset(
    {
        "text",
        "input_text",
        "output_text",
        "refusal",
        "thinking",
        "tool_reference",
        "image_url",
        "input_image",
        "image_embeds",
        "audio_url",
        "input_audio",
        "audio_embeds",
        "video_url",
        "video_embeds",
        "prompt_embeds",
    }
)


def expand_field_selectors(selectors: list[str]) -> frozenset[str]:
    """Turn ``["@openai", "echo"]`` into the set of field names; raise ValueError on a bad name."""
    names: set[str] = set()
    for selector in selectors:
        if selector.startswith("@"):
            group = selector[1:]
            if group not in GROUPS:
                raise ValueError(
                    f"unknown field group {selector!r}; groups are "
                    + ", ".join("@" + g for g in GROUPS)
                )
            names.update(s.name for s in _FIELDS if s.group == group)
        elif selector in FIELDS:
            if FIELDS[selector].group == GUARD_ONLY:
                raise ValueError(f"{selector!r} is set by the guard only and cannot be allowed")
            names.add(selector)
        else:
            raise ValueError(f"unknown request field {selector!r}")
    return frozenset(names)
