"""Audit: one JSON line per decision, to a rotating file or to stdout. Prompt text only if
enabled.

Each line has an ``event``: ``request`` for a request's decision, ``pin`` and ``reset`` for
an operator's change made through the admin API. A scored request's line carries the
``features`` detection counted (prompt hashes, fingerprint, logprob count, ``logit_bias``):
``guard-server replay`` re-scores a log from them under another policy.

Every file has one writer. With several worker processes each writes its own file
(``audit.jsonl`` becomes ``audit.w0.jsonl``, ``audit.w1.jsonl``, ...): Python's rotation is
not safe with two processes on one file. On stdout (``path: "-"``) each record is one
``write()``, which the kernel keeps whole on a pipe up to ``PIPE_BUF`` (4 KiB).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import time
from pathlib import Path
from typing import Any

import orjson

from guard_server.config.schema import AuditSettings
from guard_server.correlation import CURRENT
from guard_server.pipeline.context import RequestContext

STDOUT = "-"


def worker_audit_path(path: str, worker: int | None) -> str:
    """The file one worker writes: ``path`` itself with one worker, else ``<stem>.w<N><suffix>``."""
    if worker is None or path == STDOUT:
        return path
    file = Path(path)
    return str(file.with_name(f"{file.stem}.w{worker}{file.suffix}"))


class _FileSink:
    """A file rotated by size (``max_bytes``, ``backups`` kept), written by this process only."""

    def __init__(self, path: str, settings: AuditSettings) -> None:
        self._handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=settings.max_bytes, backupCount=settings.backups, encoding="utf-8"
        )
        self._handler.setFormatter(logging.Formatter("%(message)s"))

    def write(self, line: bytes) -> None:
        self._handler.handle(logging.makeLogRecord({"msg": line.decode()}))

    def close(self) -> None:
        self._handler.close()


class _StdoutSink:
    """JSON lines on standard output, one ``write()`` per record."""

    def write(self, line: bytes) -> None:
        data = memoryview(line + b"\n")
        while data:
            data = data[os.write(1, data) :]

    def close(self) -> None:
        pass


class AuditLog:
    """Writes decisions to ``audit.path`` (or stdout for ``-``); does nothing without a path.

    ``worker`` is this process's index when several workers serve: it names the file.
    """

    def __init__(self, settings: AuditSettings, worker: int | None = None) -> None:
        self.settings = settings
        self._sink: _FileSink | _StdoutSink | None = None
        if settings.path == STDOUT:
            self._sink = _StdoutSink()
        elif settings.path:
            self._sink = _FileSink(worker_audit_path(settings.path, worker), settings)

    @property
    def enabled(self) -> bool:
        """Whether decisions are written anywhere."""
        return self._sink is not None

    def write(self, ctx: RequestContext) -> None:
        """Record the decision taken for one authenticated request."""
        if self._sink is None or ctx.client is None:
            return
        plan = ctx.plan
        if self.settings.only_flagged and (plan is None or plan.assessed == "pass"):
            return
        assessment = ctx.assessment
        correlation = ctx.correlation
        canonical = ctx.canonical
        record = {
            "event": "request",
            "ts": round(time.time(), 3),
            "request_id": correlation.request_id if correlation else None,
            "trace_id": correlation.trace_id if correlation else None,
            "client": ctx.client.id,
            "tier": ctx.client.tier.name,
            "endpoint": ctx.endpoint.value,
            "model": ctx.model,
            "status": ctx.status,
            "prompts": canonical.prompts if canonical else None,  # the work: prompts x n
            "n": canonical.n if canonical else None,
            "action": plan.action if plan else None,
            "assessed": plan.assessed if plan else None,
            "mode": plan.mode if plan else None,
            "reason": plan.reason if plan else None,
            "pin": plan.pin if plan else None,
            "risk": assessment.score if assessment else None,
            "signals": assessment.signals() if assessment else {},
            "policy": [f"{action}={field}" for action, field in ctx.policy_actions],
            "request_hash": ctx.body_hash,
        }
        if ctx.end_user is not None:
            record["end_user"] = ctx.end_user
            mine = ctx.end_user_assessment
            if mine is not None:
                record["end_user_risk"] = mine.score
                record["end_user_assessed"] = mine.action
            newcomers = ctx.newcomers_assessment
            if newcomers is not None:
                record["newcomers_risk"] = newcomers.score
                record["newcomers_assessed"] = newcomers.action
            if plan is not None and plan.by_end_user:
                record["scope"] = plan.scope
        features = ctx.features
        if features is not None:  # what detection counted: enough to replay it (no text)
            record["features"] = {
                "at": round(ctx.scored_at, 3),
                "prompts": features.prompt_hashes,
                "fingerprint": features.fingerprint,
                "logprobs": features.logprobs,
                "logit_bias": features.logit_bias,
            }
        if self.settings.include_prompts and ctx.body:
            record["prompt"] = ctx.body.get(ctx.endpoint.prompt_field)
            if ctx.body.get("instructions") is not None:
                record["instructions"] = ctx.body["instructions"]
        self._sink.write(orjson.dumps(record))

    def event(self, event: str, fields: dict[str, Any]) -> None:
        """Record an operator's change (``pin``, ``reset``): who, what, when, and the admin
        call's request id. Written whatever ``only_flagged`` says."""
        if self._sink is not None:
            correlation = CURRENT.get()
            record = {
                "event": event,
                "ts": round(time.time(), 3),
                "request_id": correlation.request_id if correlation else None,
                **fields,
            }
            self._sink.write(orjson.dumps(record))

    def close(self) -> None:
        """Flush and close the file."""
        if self._sink is not None:
            self._sink.close()
