"""aiohttp's runner, answering a request it cannot parse as HTTP in the guard's words.

aiohttp answers such a request (a header line over its 8 KiB limit, a malformed request
line) before any middleware runs: a ``text/plain`` body that quotes the offending bytes, and
an ERROR log line with the same bytes in its traceback. An oversized ``Authorization`` header
would put part of a key in both. Here the answer is an OpenAI error, and the log names only
the kind of error.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from guard_server.errors import GuardError

log = logging.getLogger(__name__)


class _GuardRequestHandler(RequestHandler):
    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The answer to a request aiohttp could not parse (or a handler's escaped error)."""
        log.warning(
            "refused a request from %s that is not valid HTTP: %s",
            request.remote,
            type(exc).__name__ if exc is not None else status,
        )
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent: cannot send an error")
        if isinstance(exc, LineTooLong):
            status = 431
            error = GuardError(431, "A request line or header is too large.")
        elif status < 500:
            error = GuardError(status, "The request is not valid HTTP.")
        else:
            error = GuardError(status, "The guard hit an internal error.", type="internal_error")
        response = web.Response(
            body=error.to_json(), status=status, content_type="application/json"
        )
        response.force_close()
        return response


class _GuardServer(Server):
    def __call__(self) -> RequestHandler:
        return _GuardRequestHandler(self, loop=self._loop, **self._kwargs)


class GuardAppRunner(web.AppRunner):
    """:class:`aiohttp.web.AppRunner` whose connections answer unparsable requests with an
    OpenAI error (431 for an oversized header line, else 400) and log no request bytes."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _GuardServer  # same state; only the connection handler differs
        return server
