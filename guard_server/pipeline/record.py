"""Record: metrics for one finished request (labels are bounded: tier, endpoint, status,
action, mode)."""

from __future__ import annotations

import time

from guard_server.metrics import GuardMetrics
from guard_server.pipeline.context import RequestContext


def record(ctx: RequestContext, metrics: GuardMetrics) -> None:
    """Count the request, its latency split, its tokens and its time to first token."""
    total = time.perf_counter() - ctx.started
    tier = ctx.tier_name
    endpoint = ctx.endpoint.value
    child = metrics.child
    child(metrics.requests, tier, endpoint, str(ctx.status)).inc()
    plan = ctx.plan
    if plan is not None:
        # In shadow mode the action counted is the one the score called for; a pinned
        # request counts the pin's action under mode `pinned`.
        child(metrics.actions, tier, *plan.counted).inc()
        if plan.decoy is not None and ctx.status == 200:
            child(metrics.decoys, plan.decoy.source).inc()
    for action, field in ctx.policy_actions:
        child(metrics.policy_actions, tier, action, field).inc()
    if ctx.client is not None and ctx.settings.config.metrics.client_label:
        metrics.client_requests.labels(ctx.client.id).inc()
    child(metrics.request_seconds, tier, endpoint).observe(total)
    if ctx.upstream_seconds:
        child(metrics.upstream_seconds, endpoint).observe(ctx.upstream_seconds)
        child(metrics.overhead_seconds, endpoint).observe(max(0.0, total - ctx.upstream_seconds))
    if ctx.first_token_at is not None:
        child(metrics.ttft_seconds, tier, endpoint).observe(ctx.first_token_at - ctx.started)
    if ctx.prompt_tokens:
        child(metrics.prompt_tokens, tier).inc(ctx.prompt_tokens)
    if ctx.completion_tokens:
        child(metrics.completion_tokens, tier).inc(ctx.completion_tokens)
