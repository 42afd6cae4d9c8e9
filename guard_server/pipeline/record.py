"""Record: metrics for one finished request (labels are bounded: tier, endpoint, status)."""

from __future__ import annotations

import time

from guard_server.metrics import GuardMetrics
from guard_server.pipeline.context import RequestContext


def record(ctx: RequestContext, metrics: GuardMetrics) -> None:
    """Count the request, its latency split, its tokens and its time to first token."""
    total = time.perf_counter() - ctx.started
    tier = ctx.tier_name
    endpoint = ctx.endpoint.value
    metrics.requests.labels(tier, endpoint, str(ctx.status)).inc()
    if ctx.client is not None:
        metrics.actions.labels(tier, ctx.action).inc()
    for action, field in ctx.policy_actions:
        metrics.policy_actions.labels(tier, action, field).inc()
    if ctx.client is not None and ctx.settings.config.metrics.client_label:
        metrics.client_requests.labels(ctx.client.id).inc()
    metrics.request_seconds.labels(tier, endpoint).observe(total)
    if ctx.upstream_seconds:
        metrics.upstream_seconds.labels(endpoint).observe(ctx.upstream_seconds)
        metrics.overhead_seconds.labels(endpoint).observe(max(0.0, total - ctx.upstream_seconds))
    if ctx.first_token_at is not None:
        metrics.ttft_seconds.labels(tier, endpoint).observe(ctx.first_token_at - ctx.started)
    if ctx.prompt_tokens:
        metrics.prompt_tokens.labels(tier).inc(ctx.prompt_tokens)
    if ctx.completion_tokens:
        metrics.completion_tokens.labels(tier).inc(ctx.completion_tokens)
