"""Transform the upstream's answer on its way back: the public model name and system
fingerprint, usage accounting and every defence's response half. Works on whole responses
and on streamed chunks alike."""

from __future__ import annotations

from typing import Any

from guard_server.openai_fields import Endpoint
from guard_server.pipeline import responses_output
from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.defences import DEFENCES
from guard_server.pipeline.embedding_channel import harden_embeddings
from guard_server.pipeline.fingerprint import system_fingerprint
from guard_server.pipeline.logprob_channel import harden_prompt_logprobs


def _take_usage(ctx: RequestContext, payload: dict[str, Any]) -> None:
    usage = payload.get("usage")
    if isinstance(usage, dict):
        ctx.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        ctx.completion_tokens = int(usage.get("completion_tokens") or 0)


def _stamp(ctx: RequestContext, payload: dict[str, Any]) -> None:
    """The public model name, and the configured ``system_fingerprint`` where vLLM set one."""
    payload["model"] = ctx.model
    if "system_fingerprint" in payload:
        payload["system_fingerprint"] = system_fingerprint(
            ctx.settings, ctx.model, payload["system_fingerprint"]
        )


def _defend(ctx: RequestContext, payload: dict[str, Any], streaming: bool) -> None:
    if payload.get("choices") or payload.get("prompt_logprobs"):
        for defence in DEFENCES:
            defence.response(ctx, payload, streaming)


def _transform_responses(ctx: RequestContext, payload: dict[str, Any], streaming: bool) -> None:
    """A Responses API answer, whole or one streamed event: every defence sees every one
    (the text and logprobs sit in output items, parts and events of many types)."""
    response = responses_output.response_object(payload)
    if response is not None:
        response["model"] = ctx.model
        usage = responses_output.take_usage(response)
        if usage is not None:
            ctx.prompt_tokens, ctx.completion_tokens = usage
    for defence in DEFENCES:
        defence.response(ctx, payload, streaming)


def transform_response(ctx: RequestContext, body: dict[str, Any]) -> None:
    """Rewrite a whole (non-streaming) response in place."""
    if ctx.endpoint is Endpoint.RESPONSES:
        _transform_responses(ctx, body, streaming=False)
        return
    _stamp(ctx, body)
    _take_usage(ctx, body)
    if body.get("prompt_logprobs"):  # chat's, for the whole response (vLLM refuses it on streams)
        harden_prompt_logprobs(ctx, 0, body["prompt_logprobs"])
    _defend(ctx, body, streaming=False)


def transform_embeddings(ctx: RequestContext, body: dict[str, Any]) -> None:
    """Rewrite an embeddings response in place: the public model name, usage accounting
    and the tier's vector hardening (raises MalformedEmbeddings on a malformed answer)."""
    body["model"] = ctx.model
    _take_usage(ctx, body)
    harden_embeddings(ctx, body)


def transform_chunk(ctx: RequestContext, chunk: dict[str, Any]) -> bool:
    """Rewrite one streamed chunk in place; return False to drop it."""
    if ctx.endpoint is Endpoint.RESPONSES:
        _transform_responses(ctx, chunk, streaming=True)
        return True
    if "usage" in chunk and not chunk.get("choices"):
        _take_usage(ctx, chunk)
        if not ctx.client_wants_usage:
            return False
    _stamp(ctx, chunk)
    _defend(ctx, chunk, streaming=True)
    return True


def carries_token(chunk: dict[str, Any]) -> bool:
    """Whether a chunk holds generated text (for time-to-first-token)."""
    if "type" in chunk:  # a Responses API event
        return responses_output.carries_text(chunk)
    for choice in chunk.get("choices") or ():
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False
