"""Request correlation: each request's id (``x-request-id``) and W3C trace context.

The id is the client's own ``x-request-id`` when it is a plain token (at most 128
characters), else a new ``req_<32 hex>``. Every response carries it back (the openai SDK
shows it as ``_request_id``), errors included; the logs and the audit log record it; vLLM
gets it as ``X-Request-Id``, where it names vLLM's own request in its logs and traces and
the answer (``chatcmpl-<id>``). vLLM adds a random suffix to it internally, so requests
that reuse an id do not disturb each other there.

A valid ``traceparent`` (and its ``tracestate``) is passed on to vLLM unchanged when the
guard does not trace itself, so vLLM's spans join the caller's trace; with OpenTelemetry on
(``guard_server.otel``) the guard's own spans sit in between instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, replace

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from multidict import CIMultiDictProxy

REQUEST_ID_HEADER = "x-request-id"
_CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=@-]{0,127}")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_NO_TRACE = "0" * 32
_NO_SPAN = "0" * 16
_MAX_TRACESTATE = 512  # the W3C limit vendors must propagate


@dataclass(frozen=True, slots=True)
class Correlation:
    """How one request is named in responses, logs, the audit log and towards vLLM."""

    request_id: str
    trace_id: str | None = None
    traceparent: str | None = None  # forwarded as received (only when the guard does not trace)
    tracestate: str | None = None

    def upstream_headers(self) -> dict[str, str]:
        """The headers that carry this request's identity to vLLM."""
        headers = {"X-Request-Id": self.request_id}
        if self.traceparent is not None:
            headers["traceparent"] = self.traceparent
            if self.tracestate is not None:
                headers["tracestate"] = self.tracestate
        return headers


CURRENT: ContextVar[Correlation | None] = ContextVar("guard_correlation", default=None)
"""The correlation of the request being served (read by the log filter)."""


def new_request_id() -> str:
    """A fresh request id in OpenAI's shape."""
    return "req_" + os.urandom(16).hex()


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a valid W3C ``traceparent`` header, else None."""
    if not traceparent:
        return None
    match = _TRACEPARENT.fullmatch(traceparent.strip())
    if match is None:
        return None
    version, trace_id, parent_id, _flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _NO_TRACE:
        return None
    return None if parent_id == _NO_SPAN else trace_id


def correlate(headers: CIMultiDictProxy[str], forward_trace: bool = True) -> Correlation:
    """The correlation of a request with these headers. ``forward_trace=False`` when the
    guard traces itself (its spans then carry the trace on)."""
    offered = headers.get(REQUEST_ID_HEADER, "").strip()
    request_id = offered if _CLIENT_ID.fullmatch(offered) else new_request_id()
    traceparent = headers.get("traceparent")
    trace_id = trace_id_of(traceparent)
    if traceparent is None or trace_id is None or not forward_trace:
        return Correlation(request_id, trace_id)
    tracestate = headers.get("tracestate")
    if tracestate is not None and len(tracestate) > _MAX_TRACESTATE:
        tracestate = None
    return Correlation(request_id, trace_id, traceparent.strip(), tracestate)


def correlation_middleware(
    current_trace_id: Callable[[], str | None] | None = None,
) -> Middleware:
    """The middleware that names every request and returns its id on every response.

    ``current_trace_id`` reads the trace id of the guard's own span when it traces itself.
    """

    @web.middleware
    async def correlated(request: web.Request, handler: Handler) -> web.StreamResponse:
        ids = correlate(request.headers, forward_trace=current_trace_id is None)
        if current_trace_id is not None:
            ids = replace(ids, trace_id=current_trace_id() or ids.trace_id)
        token = CURRENT.set(ids)
        try:
            response = await handler(request)
        finally:
            CURRENT.reset(token)
        if not response.prepared:  # a stream sets it itself, before its headers go out
            response.headers.setdefault(REQUEST_ID_HEADER, ids.request_id)
        return response

    return correlated
