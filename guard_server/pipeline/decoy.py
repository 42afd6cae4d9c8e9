"""The decoy, both halves: what a decoyed request becomes on the way up (another model, hotter
sampling, or the misinformation decoy's digit-permuted world) and what its answer becomes on
the way back.

The plan decides whether a request is decoyed (:func:`plan_decoy`); this module is the only
one that knows what each decoy source does. The misinformation decoy answers as the real
model would in a world whose digits are permuted (see ``guard_server.defences.decoy``): every
text the model reads is mapped one way, every text it writes the other way, so no field of the
answer disagrees with another or with the client's own text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from guard_server.config.loader import Client
from guard_server.defences.decoy import DigitMap, digit_map
from guard_server.openai_fields import Endpoint
from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.responses_output import pieces, response_object

_HOT_TEMPERATURE = 2.0
"""The ``perturbed`` decoy's sampling temperature when the upstream runs no guard plugin."""

_WRITTEN_TEXT = ("content", "reasoning", "reasoning_content")
"""The text fields of a chat message or delta that the model wrote."""

_ECHOED = ("instructions", "tools", "text", "temperature")
"""Request fields a Response object echoes that a decoy's request half may rewrite."""

_SCHEMA_MEMBERS = frozenset(("properties", "patternProperties", "$defs", "definitions"))
"""JSON-schema keywords whose keys are names (the model writes them as JSON keys)."""
_SCHEMA_LITERAL = frozenset(("type", "format", "pattern", "$schema", "$id"))
"""JSON-schema keywords whose values are syntax, not text: left as they are."""


@dataclass(frozen=True, slots=True)
class DecoyPlan:
    """How one request is decoyed."""

    source: str  # misinformation, model or perturbed
    model: str | None = None  # source `model`: the upstream model that answers instead
    sigma: float = 0.0  # source `perturbed`: the plugin's sampling-noise strength
    maps: tuple[DigitMap, ...] = ()  # source `misinformation`: one digit map per prompt


def plan_decoy(secret: bytes, client: Client, identities: tuple[bytes, ...]) -> DecoyPlan:
    """The decoy the client's tier configures, for a request whose prompts have the canonical
    ``identities``: each prompt gets its own digit map, the same alone or in a batch."""
    decoy = client.tier.detection.decoy
    if decoy.source == "model":
        return DecoyPlan("model", model=decoy.model)
    if decoy.source == "perturbed":
        return DecoyPlan("perturbed", sigma=decoy.perturbed_sigma)
    maps = tuple(digit_map(secret, client.id, identity) for identity in identities)
    return DecoyPlan("misinformation", maps=maps)


class Decoy:
    """The decoy defence: acts only on requests whose plan carries a decoy."""

    def request(self, ctx: RequestContext, body: dict[str, Any], guard_plugin: bool) -> None:
        """``perturbed`` without the guard's plugin upstream samples hot; ``misinformation``
        maps every text the model will read into the permuted world."""
        assert ctx.plan is not None
        decoy = ctx.plan.decoy
        if decoy is None:
            return
        if ctx.endpoint is Endpoint.RESPONSES:  # the answer echoes them: as the client sent them
            ctx.echo = {name: body.get(name) for name in _ECHOED if name in body}
            ctx.echo.setdefault("temperature", 1.0)  # vLLM's default when the client sets none
        if decoy.source == "perturbed" and not guard_plugin:
            body["temperature"] = _HOT_TEMPERATURE
        if decoy.maps:
            _hide_request(body, decoy.maps)
            if ctx.endpoint is Endpoint.RESPONSES:
                _hide_responses_input(body, decoy.maps[0])

    def response(self, ctx: RequestContext, payload: dict[str, Any], streaming: bool) -> None:
        """``misinformation``: map every text the model wrote back out of the permuted world."""
        assert ctx.plan is not None
        decoy = ctx.plan.decoy
        if decoy is None:
            return
        if ctx.endpoint is Endpoint.RESPONSES:
            _show_responses(ctx, decoy.maps[0] if decoy.maps else None, payload)
            return
        maps = decoy.maps
        if not maps:
            return
        n = ctx.body.get("n") or 1
        for choice in payload.get("choices") or ():
            index = choice.get("index", 0)
            _show_choice(maps[min(index // n, len(maps) - 1)], choice)
        if payload.get("prompt_logprobs"):  # chat: one prompt, at the top of the response
            _show_prompt_logprobs(maps[0], payload["prompt_logprobs"])


def _hide_request(body: dict[str, Any], maps: tuple[DigitMap, ...]) -> None:
    first = maps[0]
    messages = body.get("messages")
    if isinstance(messages, list):
        body["messages"] = [_hide_message(first, message) for message in messages]
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        body["prompt"] = first.hide(prompt)
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        body["prompt"] = [m.hide(p) for m, p in zip(maps, prompt, strict=True)]
    # One stop list serves the whole request: a batch's prompts each have their own map, so
    # there digit-bearing stop strings follow the first prompt's (README, "Decoys").
    stop = body.get("stop")
    if isinstance(stop, str):
        body["stop"] = first.hide(stop)
    elif isinstance(stop, list):
        body["stop"] = [first.hide(s) if isinstance(s, str) else s for s in stop]
    if isinstance(body.get("bad_words"), list):
        body["bad_words"] = [first.hide(w) if isinstance(w, str) else w for w in body["bad_words"]]
    if isinstance(body.get("tools"), list):
        body["tools"] = _hide_schema(first, body["tools"])
    for field in ("structured_outputs", "response_format"):
        if isinstance(body.get(field), dict):
            body[field] = _hide_constraint(first, body[field])


def _hide_responses_input(body: dict[str, Any], digits: DigitMap) -> None:
    """The Responses API's own model input: instructions, input items, ``text.format``."""
    if isinstance(body.get("instructions"), str):
        body["instructions"] = digits.hide(body["instructions"])
    items = body["input"]
    if isinstance(items, str):
        body["input"] = digits.hide(items)
    else:
        body["input"] = [_hide_item(digits, item) for item in items]
    text = body.get("text")
    if isinstance(text, dict) and isinstance(text.get("format"), dict):
        text_format = dict(text["format"])
        if isinstance(text_format.get("schema"), dict):
            text_format["schema"] = _hide_schema(digits, text_format["schema"])
        body["text"] = {**text, "format": text_format}


def _hide_item(digits: DigitMap, item: dict[str, Any]) -> dict[str, Any]:
    """One input item as the model reads it in the permuted world (validated shapes)."""
    kind = item.get("type", "message")
    if kind == "message":
        return _hide_message(digits, item)
    item = dict(item)
    for field in ("name", "arguments", "output"):
        if isinstance(item.get(field), str):
            item[field] = digits.hide(item[field])
    for field in ("content", "summary"):
        if isinstance(item.get(field), list):
            item[field] = [{**part, "text": digits.hide(part["text"])} for part in item[field]]
    return item


def _show_responses(ctx: RequestContext, digits: DigitMap | None, payload: dict[str, Any]) -> None:
    """The Response object's echoes of the request as the client sent them; with a digit
    map, every text the model wrote mapped back."""
    response = response_object(payload)
    if response is not None:
        response.update(ctx.echo)
    if digits is None:
        return
    for piece in pieces(payload):
        for key in piece.keys:
            if isinstance(piece.holder.get(key), str):
                piece.holder[key] = digits.show(piece.holder[key])
        if piece.logprobs is not None:
            _show_logprobs(digits, {"content": piece.logprobs})


def _hide_message(digits: DigitMap, message: Any) -> Any:
    if not isinstance(message, dict):
        return message
    message = dict(message)
    for field in _WRITTEN_TEXT:
        value = message.get(field)
        if isinstance(value, str):
            message[field] = digits.hide(value)
        elif isinstance(value, list):  # content parts: only text parts carry text
            message[field] = [
                {**part, "text": digits.hide(part["text"])}
                if isinstance(part, dict) and isinstance(part.get("text"), str)
                else part
                for part in value
            ]
    if isinstance(message.get("tool_calls"), list):
        message["tool_calls"] = [_map_call(digits.hide, call) for call in message["tool_calls"]]
    return message


def _map_call(mapping: Any, call: Any) -> Any:
    """A tool call with its function name and arguments mapped (ids are vLLM's, not text)."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    function = dict(call["function"])
    for field in ("name", "arguments"):
        if isinstance(function.get(field), str):
            function[field] = mapping(function[field])
    return {**call, "function": function}


def _hide_constraint(digits: DigitMap, constraint: dict[str, Any]) -> dict[str, Any]:
    """Choices and JSON schemas are text the model writes under; regexes and grammars are
    syntax whose digits may be counts, so they are left as they are."""
    out = dict(constraint)
    if isinstance(out.get("choice"), list):
        out["choice"] = [digits.hide(c) if isinstance(c, str) else c for c in out["choice"]]
    for field in ("json", "json_schema"):
        if isinstance(out.get(field), dict | list):
            out[field] = _hide_schema(digits, out[field])
    return out


def _hide_schema(digits: DigitMap, node: Any) -> Any:
    """Strings of tool definitions and JSON schemas (names, descriptions, enums) as the
    model reads them; schema syntax stays."""
    if isinstance(node, str):
        return digits.hide(node)
    if isinstance(node, list):
        return [_hide_schema(digits, item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _SCHEMA_LITERAL:
            out[key] = value
        elif key in _SCHEMA_MEMBERS and isinstance(value, dict):
            out[key] = {digits.hide(k): _hide_schema(digits, v) for k, v in value.items()}
        else:
            out[key] = _hide_schema(digits, value)
    return out


def _show_choice(digits: DigitMap, choice: dict[str, Any]) -> None:
    if isinstance(choice.get("text"), str):
        choice["text"] = digits.show(choice["text"])
    if isinstance(choice.get("stop_reason"), str):
        choice["stop_reason"] = digits.show(choice["stop_reason"])
    for part in (choice.get("message"), choice.get("delta")):
        if not part:
            continue
        for field in _WRITTEN_TEXT:
            if isinstance(part.get(field), str):
                part[field] = digits.show(part[field])
        if isinstance(part.get("tool_calls"), list):
            part["tool_calls"] = [_map_call(digits.show, call) for call in part["tool_calls"]]
    logprobs = choice.get("logprobs")
    if logprobs:
        _show_logprobs(digits, logprobs)
    if choice.get("prompt_logprobs"):  # completions: per choice
        _show_prompt_logprobs(digits, choice["prompt_logprobs"])


def _show_logprobs(digits: DigitMap, logprobs: dict[str, Any]) -> None:
    if "content" in logprobs:
        for item in logprobs.get("content") or ():
            for entry in (item, *(item.get("top_logprobs") or ())):
                entry["token"] = digits.show(entry["token"])
                if entry.get("bytes") is not None:
                    entry["bytes"] = digits.show_bytes(entry["bytes"])
        return
    logprobs["tokens"] = [digits.show(token) for token in logprobs.get("tokens") or ()]
    logprobs["top_logprobs"] = [
        {digits.show(t): v for t, v in top.items()} if top else top
        for top in logprobs.get("top_logprobs") or ()
    ]


def _show_prompt_logprobs(digits: DigitMap, positions: list[Any]) -> None:
    """vLLM's prompt logprobs: per position, ``{token id: {logprob, rank, decoded_token}}``.
    The model read the permuted prompt; mapped back, the client sees its own tokens."""
    for position in positions:
        if not isinstance(position, dict):
            continue
        for entry in position.values():
            if isinstance(entry, dict) and isinstance(entry.get("decoded_token"), str):
                entry["decoded_token"] = digits.show(entry["decoded_token"])
