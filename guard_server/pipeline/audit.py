"""Audit: one JSON line per decision, in a rotating file. Prompt text only if enabled.

Each line has an ``event``: ``request`` for a request's decision, ``pin`` and ``reset`` for
an operator's change made through the admin API.
"""

from __future__ import annotations

import logging
import logging.handlers
import time
from typing import Any

import orjson

from guard_server.config.schema import AuditSettings
from guard_server.openai_fields import Endpoint
from guard_server.pipeline.context import RequestContext


class AuditLog:
    """Writes decisions to ``audit.path`` (rotating by size); does nothing without a path."""

    def __init__(self, settings: AuditSettings) -> None:
        self.settings = settings
        self._logger: logging.Logger | None = None
        if settings.path:
            handler = logging.handlers.RotatingFileHandler(
                settings.path, maxBytes=settings.max_bytes, backupCount=settings.backups
            )
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger = logging.getLogger(f"guard_server.audit.{id(self)}")
            logger.propagate = False
            logger.setLevel(logging.INFO)
            logger.addHandler(handler)
            self._logger = logger

    @property
    def enabled(self) -> bool:
        """Whether decisions are written anywhere."""
        return self._logger is not None

    def write(self, ctx: RequestContext) -> None:
        """Record the decision taken for one authenticated request."""
        if self._logger is None or ctx.client is None:
            return
        plan = ctx.plan
        if self.settings.only_flagged and (plan is None or plan.assessed == "pass"):
            return
        assessment = ctx.assessment
        canonical = ctx.canonical
        record = {
            "event": "request",
            "ts": round(time.time(), 3),
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
        if self.settings.include_prompts and ctx.body:
            key = "messages" if ctx.endpoint is Endpoint.CHAT else "prompt"
            record["prompt"] = ctx.body.get(key)
        self._logger.info(orjson.dumps(record).decode())

    def event(self, event: str, fields: dict[str, Any]) -> None:
        """Record an operator's change (``pin``, ``reset``): who, what, when. Written
        whatever ``only_flagged`` says."""
        if self._logger is not None:
            record = {"event": event, "ts": round(time.time(), 3), **fields}
            self._logger.info(orjson.dumps(record).decode())

    def close(self) -> None:
        """Flush and close the file."""
        if self._logger is not None:
            for handler in list(self._logger.handlers):
                handler.close()
                self._logger.removeHandler(handler)
