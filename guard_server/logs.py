"""The guard's logs: plain text or JSON lines on stderr, each line naming its request.

A line written while a request is served carries that request's id (and trace id, when it
has one): ``[req_...]`` in text, ``request_id`` and ``trace_id`` fields in JSON
(python-json-logger). The optional access log writes one line per HTTP request.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from guard_server.correlation import CURRENT, REQUEST_ID_HEADER

LogFormat = Literal["text", "json"]
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"
ACCESS_LOGGER = "guard_server.access"


class _RequestFields(logging.Filter):
    """Adds the current request's ``request_id`` and ``trace_id`` to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        correlation = CURRENT.get()
        if correlation is not None and not hasattr(record, "request_id"):
            record.request_id = correlation.request_id
            if correlation.trace_id is not None:
                record.trace_id = correlation.trace_id
        return True


class _TextFormatter(logging.Formatter):
    """The plain format, with `` [<request id>]`` after the logger name when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.request_tag = f" [{request_id}]" if request_id else ""
        return super().format(record)


def _json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(
        "{levelname}{name}{message}",
        style="{",
        timestamp="time",  # ISO 8601, UTC
        rename_fields={"levelname": "level", "name": "logger"},
    )


def configure_logging(level: str, log_format: LogFormat) -> None:
    """Send every logger's records to stderr in ``log_format``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestFields())
    handler.setFormatter(
        _json_formatter() if log_format == "json" else _TextFormatter(_TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


class AccessLogger(AbstractAccessLogger):
    """One line per HTTP request: method, path, status, bytes, duration and request id."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %d %d %.1fms',
            request.remote,
            request.method,
            request.path,
            response.status,
            response.body_length,
            time * 1000,
            extra={
                "request_id": response.headers.get(REQUEST_ID_HEADER),
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "duration_ms": round(time * 1000, 3),
                "remote": request.remote,
            },
        )
