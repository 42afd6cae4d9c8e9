"""The model endpoints (chat, completions, embeddings): run the pipeline around one upstream
call, streaming or not."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from guard_server.appkeys import UPSTREAMS
from guard_server.config.reload import SettingsHolder
from guard_server.correlation import CURRENT, REQUEST_ID_HEADER, correlate
from guard_server.errors import GuardError, bad_request, upstream_error
from guard_server.metrics import GuardMetrics
from guard_server.openai_fields import Endpoint
from guard_server.pipeline.admit import Admitter
from guard_server.pipeline.audit import AuditLog
from guard_server.pipeline.auth import authenticate
from guard_server.pipeline.canonicalize import canonicalize
from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.embedding_channel import MalformedEmbeddings, embedding_request
from guard_server.pipeline.plan import Planner
from guard_server.pipeline.policy import apply_tier_policy
from guard_server.pipeline.record import record
from guard_server.pipeline.responses_output import is_terminal
from guard_server.pipeline.rewrite import rewrite_for_upstream
from guard_server.pipeline.score import RiskScorer
from guard_server.pipeline.transform import (
    carries_token,
    transform_chunk,
    transform_embeddings,
    transform_response,
)
from guard_server.pipeline.upstream_errors import client_error
from guard_server.pipeline.validate import parse_json_object, validate_request
from guard_server.upstream.pool import ModelUpstream

log = logging.getLogger(__name__)

Stage = Callable[[RequestContext], Awaitable[None]]


_PATHS = {
    Endpoint.CHAT: "/v1/chat/completions",
    Endpoint.COMPLETIONS: "/v1/completions",
    Endpoint.EMBEDDINGS: "/v1/embeddings",
    Endpoint.RESPONSES: "/v1/responses",
}
_SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
_DONE = b"data: [DONE]\n\n"


class GenerationHandler:
    """Serves one model endpoint through the pipeline."""

    def __init__(
        self,
        endpoint: Endpoint,
        holder: SettingsHolder,
        metrics: GuardMetrics,
        admitter: Admitter,
        scorer: RiskScorer,
        planner: Planner,
        audit: AuditLog,
    ) -> None:
        self.audit = audit
        self.endpoint = endpoint
        self.admitter = admitter
        # The stages after authentication, body parsing and validation, in order: what the
        # request may ask for is settled before it is scored, what the model will see of it
        # is taken once (every key and count derives from that), and one plan is made before
        # anything acts.
        self.stages: tuple[Stage, ...] = (
            apply_tier_policy,
            canonicalize,
            scorer,
            planner,
            admitter,
        )
        self.path = _PATHS[endpoint]
        self.holder = holder
        self.metrics = metrics

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        ctx = RequestContext(
            endpoint=self.endpoint,
            settings=self.holder.current,
            headers=request.headers,
            started=time.perf_counter(),
            correlation=CURRENT.get() or correlate(request.headers),
        )
        self.metrics.in_flight.inc()
        try:
            response = await self._serve(request, ctx)
        except GuardError as exc:
            ctx.status = exc.status
            raise
        except asyncio.CancelledError:
            ctx.status = 499
            raise
        except BaseException:
            ctx.status = 500
            raise
        else:
            ctx.status = ctx.status or response.status
            return response
        finally:
            self.metrics.in_flight.dec()
            self.admitter.settle(ctx)
            record(ctx, self.metrics)
            self.audit.write(ctx)

    async def _serve(self, request: web.Request, ctx: RequestContext) -> web.StreamResponse:
        await authenticate(ctx)
        raw = await _read_body(request, ctx)
        if self.audit.enabled:
            ctx.body_hash = hashlib.blake2b(raw, digest_size=16).hexdigest()
        ctx.body = parse_json_object(raw)
        await validate_request(ctx)
        ctx.max_model_len = request.app[UPSTREAMS].max_model_len(ctx.model)
        for stage in self.stages:
            await stage(ctx)
        assert ctx.plan is not None
        if self.endpoint is Endpoint.EMBEDDINGS:
            # no decoy model, no sampling: the vectors are hardened on the way back
            upstream = request.app[UPSTREAMS].get(ctx.model)
            payload = embedding_request(ctx, upstream.served_model)
        else:
            upstream = request.app[UPSTREAMS].get(ctx.plan.upstream_model or ctx.model)
            payload = rewrite_for_upstream(
                ctx, upstream.served_model, upstream.settings.guard_plugin
            )
        assert ctx.correlation is not None
        headers = {
            **ctx.response_headers,
            **self._policy_headers(ctx),
            REQUEST_ID_HEADER: ctx.correlation.request_id,
        }
        if ctx.stream:
            return await self._relay_stream(request, ctx, upstream, payload, headers)
        return await self._relay_whole(ctx, upstream, payload, headers)

    def _policy_headers(self, ctx: RequestContext) -> dict[str, str]:
        if not (ctx.policy_actions and ctx.settings.config.server.policy_header):
            return {}
        notes = [f"{action}={field}" for action, field in ctx.policy_actions]
        return {"x-guard-policy": "; ".join([f"tier={ctx.tier_name}", *notes])}

    async def _relay_whole(
        self, ctx: RequestContext, upstream: ModelUpstream, payload: bytes, headers: dict[str, str]
    ) -> web.Response:
        started = time.perf_counter()
        response = await upstream.post(self.path, payload, _upstream_headers(ctx))
        try:
            if response.status != 200:
                raise await _mapped_error(response, ctx, self.metrics)
            data = await response.read()
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise _broken_read(exc, self.metrics) from None
        finally:
            response.release()
            ctx.upstream_seconds += time.perf_counter() - started
        body = _json_object(data)
        if body is None:
            raise _malformed(data, self.metrics)
        if self.endpoint is Endpoint.EMBEDDINGS:
            try:
                transform_embeddings(ctx, body)
            except MalformedEmbeddings:
                raise _malformed(data, self.metrics) from None
        else:
            transform_response(ctx, body)
        return web.Response(
            body=orjson.dumps(body), content_type="application/json", headers=headers
        )

    async def _relay_stream(
        self,
        request: web.Request,
        ctx: RequestContext,
        upstream: ModelUpstream,
        payload: bytes,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        started = time.perf_counter()
        response = await upstream.post(self.path, payload, _upstream_headers(ctx))
        ctx.upstream_seconds += time.perf_counter() - started
        try:
            if response.status != 200:
                raise await _mapped_error(response, ctx, self.metrics)
            out = web.StreamResponse(headers={**_SSE_HEADERS, **headers})
            try:
                await out.prepare(request)
                ctx.status = 200
                writer = ClientWriter(request, out, ctx.settings.config.server.write_timeout_s)
                if ctx.endpoint is Endpoint.RESPONSES:
                    await self._pump_events(ctx, response, writer)
                else:
                    await self._pump(ctx, response, writer)
                await writer.finish()
            except ConnectionResetError:
                ctx.status = 499  # the client went away; closing `response` cancels upstream
            except SlowClient:
                # A client that stops reading would hold this upstream connection and its
                # concurrency slot for as long as it likes: cut it off. Closing `response`
                # cancels the upstream request; settlement releases the slot.
                ctx.status = 499
                self.metrics.client_write_timeouts.inc()
                writer.abort()
            return out
        finally:
            response.close()

    async def _pump(
        self, ctx: RequestContext, response: aiohttp.ClientResponse, out: ClientWriter
    ) -> None:
        """Relay SSE events one by one as they arrive; never buffer the answer."""
        content = response.content
        while True:
            line = await self._next_line(ctx, content)
            if isinstance(line, GuardError):
                await out.write(_error_event(line) + _DONE)
                return
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                await out.write(_DONE)
                return
            chunk = _json_object(data)
            if chunk is None:
                await out.write(_error_event(_malformed(data, self.metrics)) + _DONE)
                return
            if "error" in chunk:
                await out.write(_error_event(_stream_error(ctx, chunk, self.metrics)))
                continue
            if not transform_chunk(ctx, chunk):
                continue
            if ctx.first_token_at is None and carries_token(chunk):
                ctx.first_token_at = time.perf_counter()
            await out.write(b"data: " + orjson.dumps(chunk) + b"\n\n")

    async def _next_line(
        self, ctx: RequestContext, content: aiohttp.StreamReader
    ) -> bytes | GuardError:
        """The next line of an upstream stream, or the error that ends it (the wait counted
        as upstream time)."""
        waited = time.perf_counter()
        try:
            line = await content.readline()
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            return _broken_read(exc, self.metrics)
        finally:
            ctx.upstream_seconds += time.perf_counter() - waited
        if not line:
            self.metrics.upstream_errors.labels("stream").inc()
            return upstream_error(502, "The upstream stream ended early.", "upstream_stream")
        return line

    async def _pump_events(
        self, ctx: RequestContext, response: aiohttp.ClientResponse, out: ClientWriter
    ) -> None:
        """Relay a Responses API stream: typed events (``event:`` and ``data:`` lines), one by
        one, ending after ``response.completed`` (or ``incomplete``, ``failed``); an error is
        an ``error`` event in the guard's words, and ends the stream."""
        content = response.content
        sequence = 0
        while True:
            line = await self._next_line(ctx, content)
            if isinstance(line, GuardError):
                await out.write(_typed_error(line, sequence))
                return
            if not line.startswith(b"data:"):
                continue  # the ``event:`` line: written again from the event's own type
            event = _json_object(line[5:].strip())
            if event is not None and (
                event.get("type") == "error"
                or (event.get("type") is None and event.get("error") is not None)
            ):
                error = _stream_error(ctx, {"error": event.get("error", event)}, self.metrics)
                await out.write(_typed_error(error, sequence))
                return
            if event is None or not isinstance(event.get("type"), str):
                await out.write(_typed_error(_malformed(line[5:], self.metrics), sequence))
                return
            number = event.get("sequence_number")
            sequence = (number if type(number) is int else sequence) + 1
            transform_chunk(ctx, event)
            if ctx.first_token_at is None and carries_token(event):
                ctx.first_token_at = time.perf_counter()
            kind = event["type"].encode()
            await out.write(b"event: " + kind + b"\ndata: " + orjson.dumps(event) + b"\n\n")
            if is_terminal(event):
                return


def _upstream_headers(ctx: RequestContext) -> dict[str, str]:
    assert ctx.correlation is not None
    return ctx.correlation.upstream_headers()


class SlowClient(Exception):
    """The client did not read a streamed write within ``server.write_timeout_s``."""


class ClientWriter:
    """Writes a stream to the client, giving up on one that stops reading.

    A write waits only while the client's socket buffer is over its high-water mark; only
    then is a timer armed (arming one per chunk would cost more than the rest of the relay).
    """

    def __init__(self, request: web.Request, out: web.StreamResponse, timeout_s: float) -> None:
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("the client went away")
        self._transport = transport
        self._protocol = request.protocol
        self._high = transport.get_write_buffer_limits()[1]
        self._out = out
        self._timeout_s = timeout_s

    def write(self, data: bytes) -> Awaitable[None]:
        """Send ``data``; the awaitable raises :class:`SlowClient` when the client does not
        take it in time. (Not a coroutine itself: the common case adds no frame.)"""
        if (
            not self._protocol.writing_paused
            and self._transport.get_write_buffer_size() + len(data) <= self._high
        ):
            return self._out.write(data)  # cannot wait: the buffer stays under its mark
        return self._bounded(self._out.write(data))

    async def _bounded(self, write: Awaitable[None]) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await write
        except TimeoutError:
            raise SlowClient from None

    async def finish(self) -> None:
        """End the stream (this flushes: bounded like a write)."""
        await self._bounded(self._out.write_eof())

    def abort(self) -> None:
        """Drop the client's connection without flushing what it never read."""
        self._transport.abort()


async def _read_body(request: web.Request, ctx: RequestContext) -> bytes:
    """The whole body: up to its ``Content-Length`` (or the end of a chunked body), 413 past
    ``max_body_bytes``, 408 when it does not arrive within ``body_timeout_s``."""
    server = ctx.settings.config.server
    limit = server.max_body_bytes
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(limit)
    content = request.content
    try:
        if content.is_eof():  # all of it arrived with the headers: no wait, no timer
            body = content.read_nowait()
            if len(body) > limit:
                raise _too_large(limit)
        else:
            async with asyncio.timeout(server.body_timeout_s):
                body = await _read_until_end(content, limit)
    except TimeoutError:
        raise GuardError(
            408,
            f"The request body did not arrive within {server.body_timeout_s:g} seconds.",
            code="request_timeout",
        ) from None
    if declared is not None and len(body) < declared:
        raise bad_request(
            f"The request body ended after {len(body)} of its {declared} bytes (Content-Length)."
        )
    if not body:
        raise bad_request("The request body is empty; send a JSON object.")
    return body


async def _read_until_end(content: aiohttp.StreamReader, limit: int) -> bytes:
    """Everything until the body ends; 413 as soon as it passes ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await content.read(limit + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
    return b"".join(chunks)


def _too_large(limit: int) -> GuardError:
    return GuardError(
        413,
        f"The request body is larger than the {limit}-byte limit.",
        code="request_too_large",
    )


async def _mapped_error(
    response: aiohttp.ClientResponse, ctx: RequestContext, metrics: GuardMetrics
) -> GuardError:
    """Turn a non-200 upstream answer into the client's error: 4xx in the guard's own words
    (upstream_errors), 5xx as 502. The upstream's text is logged, never sent."""
    try:
        raw = await response.read()
    except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        return _broken_read(exc, metrics)
    status = response.status
    if status in (401, 403):
        # vLLM's --api-key refused the guard's own key: the operator's problem, not the client's
        metrics.upstream_errors.labels("auth").inc()
        log.error(
            "upstream refused the guard's API key (HTTP %d); check upstreams.*.api_key", status
        )
        return upstream_error(
            502,
            f"The model server refused the guard's credentials (HTTP {status}).",
            "upstream_auth_failed",
        )
    if 400 <= status < 500:
        return client_error(ctx.endpoint, ctx.model, ctx.body, raw, status)
    metrics.upstream_errors.labels("status").inc()
    log.warning("upstream answered HTTP %d: %s", status, raw[:500])
    return upstream_error(502, f"The upstream failed (HTTP {status}).", "upstream_error")


def _stream_error(ctx: RequestContext, chunk: dict[str, Any], metrics: GuardMetrics) -> GuardError:
    """An error event inside vLLM's stream, as the client's error (same wording rules)."""
    error = chunk.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    if isinstance(code, int) and 400 <= code < 500:
        return client_error(ctx.endpoint, ctx.model, ctx.body, orjson.dumps(chunk), code)
    metrics.upstream_errors.labels("stream").inc()
    log.warning("upstream stream error: %s", orjson.dumps(chunk)[:500])
    return upstream_error(502, "The upstream failed while generating.", "upstream_error")


def _json_object(data: bytes) -> dict[str, Any] | None:
    """``data`` as a JSON object, or None when it is not one."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _malformed(data: bytes, metrics: GuardMetrics) -> GuardError:
    """A 200 answer (or stream event) that is not a JSON object: logged, never relayed."""
    metrics.upstream_errors.labels("malformed").inc()
    log.warning("upstream answered 200 with what is not a JSON object: %r", data[:200])
    return upstream_error(502, "The upstream answered with a malformed body.", "upstream_error")


def _broken_read(exc: BaseException, metrics: GuardMetrics) -> GuardError:
    if isinstance(exc, TimeoutError):
        metrics.upstream_errors.labels("timeout").inc()
        return upstream_error(504, "The upstream did not answer in time.", "upstream_timeout")
    metrics.upstream_errors.labels("stream").inc()
    return upstream_error(
        502, f"The upstream connection broke: {type(exc).__name__}.", "upstream_disconnected"
    )


def _typed_error(error: GuardError, sequence: int) -> bytes:
    """A Responses API ``error`` event (``ResponseErrorEvent``), in the guard's words."""
    body = error.body()["error"]
    event = {
        "type": "error",
        "code": body.get("code"),
        "message": body["message"],
        "param": body.get("param"),
        "sequence_number": sequence,
    }
    return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"


def _error_event(error: GuardError) -> bytes:
    body: dict[str, Any] = error.body()
    body["error"]["code"] = error.status
    return b"data: " + orjson.dumps(body) + b"\n\n"
