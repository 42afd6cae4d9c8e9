"""Run the request stages on a hand-made context, as the guard does (no network)."""

from __future__ import annotations

import copy
import time
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from guard_server.config.loader import Settings, load_settings
from guard_server.metrics import GuardMetrics
from guard_server.openai_fields import Endpoint
from guard_server.pipeline.auth import authenticate
from guard_server.pipeline.canonicalize import canonicalize
from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.plan import Planner
from guard_server.pipeline.policy import apply_tier_policy
from guard_server.pipeline.validate import validate_request
from guard_server.testing import DEMO_KEY, POLICIES

SETTINGS = load_settings(POLICIES / "guard.yaml")


def context(
    body: dict[str, Any],
    key: str | None = DEMO_KEY,
    endpoint: Endpoint = Endpoint.CHAT,
    settings: Settings = SETTINGS,
) -> RequestContext:
    """A context for ``body`` (copied) as sent with ``key``."""
    headers = CIMultiDict({"Authorization": f"Bearer {key}"} if key else {})
    ctx = RequestContext(endpoint, settings, CIMultiDictProxy(headers), time.perf_counter())
    ctx.body = copy.deepcopy(body)
    return ctx


async def planned(ctx: RequestContext) -> RequestContext:
    """Authenticate, validate, apply the tier policy, canonicalize and plan."""
    await authenticate(ctx)
    return await planned_for_client(ctx)


async def planned_for_client(ctx: RequestContext) -> RequestContext:
    """The stages after authentication, for a context whose client is set."""
    await validate_request(ctx)
    await apply_tier_policy(ctx)
    await canonicalize(ctx)
    await Planner(GuardMetrics(CollectorRegistry()))(ctx)
    return ctx
