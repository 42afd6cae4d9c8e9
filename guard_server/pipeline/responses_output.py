"""Where a Responses API answer holds what the model wrote: the text, function calls and
reasoning of its output items, and the logprobs of its output text, in a whole response and
in each of the typed events of a stream (vllm/entrypoints/openai/responses/streaming_events.py).

The defences' response halves walk these :class:`Piece` s; they never need to know the
event types themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_WRITTEN = ("text", "delta", "arguments", "refusal")
"""The keys of an output part, item or event that hold text the model wrote."""
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
"""The events after which a Responses stream ends (it has no ``[DONE]``)."""


@dataclass(slots=True)
class Piece:
    """One place in an answer that holds model-written text."""

    holder: dict[str, Any]
    keys: tuple[str, ...]
    """The keys of ``holder`` that hold written text (those present are strings)."""
    logprobs: list[dict[str, Any]] | None
    """The output text's logprobs here, chat-shaped (token, logprob, bytes, top_logprobs)."""
    slot: tuple[int, int] | None = None
    """For a streamed delta: its (output_index, content_index), whose positions run on from
    the deltas before it; None where the list starts at the text's first token."""


def response_object(payload: dict[str, Any]) -> dict[str, Any] | None:
    """The Response object in a whole answer or a ``response.*`` lifecycle event."""
    if payload.get("object") == "response":
        return payload
    response = payload.get("response")
    return response if isinstance(response, dict) else None


def is_terminal(event: dict[str, Any]) -> bool:
    """Whether a streamed event is the last one of its stream."""
    return event.get("type") in _TERMINAL


def pieces(payload: dict[str, Any]) -> Iterator[Piece]:
    """Every piece of model-written text in a whole response or one streamed event."""
    response = response_object(payload)
    if response is not None:
        for item in response.get("output") or ():
            yield from _item_pieces(item)
        return
    if isinstance(payload.get("item"), dict):
        yield from _item_pieces(payload["item"])
        return
    if isinstance(payload.get("part"), dict):
        yield _part_piece(payload["part"])
        return
    kind = payload.get("type") or ""
    if not kind.endswith((".delta", ".done")):
        return
    keys = _WRITTEN + (("name",) if kind.startswith("response.function_call") else ())
    slot = None
    if kind == "response.output_text.delta":
        slot = (payload.get("output_index", 0), payload.get("content_index", 0))
    yield Piece(payload, keys, _logprobs(payload), slot)


def _item_pieces(item: dict[str, Any]) -> Iterator[Piece]:
    kind = item.get("type")
    if kind == "function_call":
        yield Piece(item, ("name", "arguments"), None)
    for key in ("content", "summary"):
        for part in item.get(key) or ():
            if isinstance(part, dict):
                yield _part_piece(part)


def _part_piece(part: dict[str, Any]) -> Piece:
    return Piece(part, _WRITTEN, _logprobs(part))


def _logprobs(holder: dict[str, Any]) -> list[dict[str, Any]] | None:
    value = holder.get("logprobs")
    return value if isinstance(value, list) and value else None


def take_usage(payload: dict[str, Any]) -> tuple[int, int] | None:
    """(input tokens, output tokens) from a whole response or its last event, if it has them."""
    response = response_object(payload)
    usage = response.get("usage") if response is not None else None
    if not isinstance(usage, dict):
        return None
    return int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)


def carries_text(event: dict[str, Any]) -> bool:
    """Whether a streamed event holds generated text (for time-to-first-token)."""
    return event.get("type", "").endswith(".delta") and bool(event.get("delta"))
