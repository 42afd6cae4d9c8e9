"""Build the aiohttp application: routes, the error middleware and resource lifecycles."""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import time
from collections.abc import AsyncIterator, Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from guard_server import admin
from guard_server.appkeys import AUDIT, DRAINING, METRICS, REVIEW, SETTINGS, STATE, UPSTREAMS
from guard_server.config.loader import Settings
from guard_server.config.reload import SettingsHolder
from guard_server.config.schema import StateSettings, Timeouts, UpstreamSettings
from guard_server.correlation import correlation_middleware
from guard_server.errors import GuardError, model_not_found, unauthorized
from guard_server.generation import GenerationHandler
from guard_server.metrics import EventLoopTasksCollector, GuardMetrics
from guard_server.openai_fields import Endpoint
from guard_server.openapi import openapi_json
from guard_server.otel import Tracing
from guard_server.pipeline.admit import Admitter
from guard_server.pipeline.audit import AuditLog
from guard_server.pipeline.auth import authenticate, hash_key
from guard_server.pipeline.context import RequestContext
from guard_server.pipeline.plan import Planner
from guard_server.pipeline.score import RiskScorer
from guard_server.state.base import StateStore
from guard_server.state.memory import MemoryStore
from guard_server.state.redis import RedisStore
from guard_server.state.review import MemoryReview, ReviewState
from guard_server.state.review_redis import RedisReview
from guard_server.top_clients import TopClientsCollector
from guard_server.upstream.pool import UpstreamPool

log = logging.getLogger(__name__)

_HTTP_ERROR_TYPES = {404: "not_found_error", 405: "invalid_request_error"}


@web.middleware
async def openai_errors(request: web.Request, handler):  # type: ignore[no-untyped-def]
    """Render every error as an OpenAI error body; never leak a stack trace."""
    try:
        return await handler(request)
    except GuardError as exc:
        return web.Response(
            body=exc.to_json(),
            status=exc.status,
            content_type="application/json",
            headers=exc.headers,
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = GuardError(
            exc.status,
            exc.reason if exc.status != 413 else "The request body is too large.",
            type=_HTTP_ERROR_TYPES.get(exc.status, "invalid_request_error"),
        )
        return web.Response(
            body=error.to_json(),
            status=exc.status,
            content_type="application/json",
            headers=_kept_headers(exc),
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        error = GuardError(500, "The guard hit an internal error.", type="internal_error")
        return web.Response(body=error.to_json(), status=500, content_type="application/json")


def _kept_headers(exc: web.HTTPException) -> dict[str, str]:
    """The headers aiohttp set on its own error that the error must keep (a 405's ``Allow``)."""
    return {name: value for name, value in exc.headers.items() if name.lower() == "allow"}


async def _offered_models(request: web.Request) -> list[dict[str, object]]:
    """The caller's models as OpenAI model objects: those its tier may use, never a decoy."""
    holder = request.app[SETTINGS]
    ctx = RequestContext(Endpoint.CHAT, holder.current, request.headers, time.perf_counter())
    await authenticate(ctx)
    assert ctx.client is not None
    created = int(holder.current.path.stat().st_mtime)
    return [
        {"id": name, "object": "model", "created": created, "owned_by": "guard-server"}
        for name in holder.current.public_models
        if ctx.client.tier.may_use(name)
    ]


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the models the caller's tier may use (never a decoy model)."""
    return web.json_response({"object": "list", "data": await _offered_models(request)})


async def retrieve_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model}``: one entry of the caller's ``/v1/models``; 404 for any
    other name (unknown, a decoy model, or one its tier may not use: all look alike)."""
    name = request.match_info["model"]
    for model in await _offered_models(request):
        if model["id"] == name:
            return web.json_response(model)
    raise model_not_found(name)


async def openapi_endpoint(request: web.Request) -> web.Response:
    """``GET /openapi.json``: the OpenAPI document of the public API (guard_server.openapi)."""
    return web.Response(body=openapi_json(), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: the process is alive."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """``GET /readyz``: not draining, and every model has a healthy upstream."""
    if request.app[DRAINING].is_set():
        return web.json_response({"status": "draining"}, status=503)
    upstreams = request.app[UPSTREAMS]
    if upstreams.ready:
        return web.json_response({"status": "ready"})
    down = [name for name, upstream in upstreams.models.items() if not upstream.ready]
    return web.json_response({"status": "not ready", "unhealthy_models": down}, status=503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text format; with ``metrics.token_hash``, only for the
    bearer of that token."""
    expected = request.app[SETTINGS].current.config.metrics.token_hash
    if expected is not None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        digest = hash_key(token.strip()) if scheme.lower() == "bearer" else ""
        if not hmac.compare_digest(digest.encode(), expected.encode()):
            raise unauthorized("/metrics needs `Authorization: Bearer <metrics token>`.")
    body = generate_latest(request.app[METRICS].exposition_registry())
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_metrics_app(holder: SettingsHolder, metrics: GuardMetrics) -> web.Application:
    """``/metrics`` alone, for the listener on ``metrics.port``."""
    app = web.Application(middlewares=[openai_errors])
    app[SETTINGS] = holder
    app[METRICS] = metrics
    app.router.add_get("/metrics", metrics_endpoint)
    return app


def build_app(
    holder: SettingsHolder,
    metrics: GuardMetrics,
    upstreams: dict[str, UpstreamSettings],
    worker: int | None = None,
    api_keys: Mapping[str, str] | None = None,
) -> web.Application:
    """The guard as an aiohttp application, in front of ``upstreams`` (model → servers).

    ``worker`` is this process's index when several workers serve; ``api_keys`` (model →
    key) default to the configured ``upstreams.<model>.api_key`` values.
    """
    settings = holder.current
    tracing = Tracing(settings.config.tracing) if settings.config.tracing.otel else None
    # with tracing, the server span's middleware comes first (Tracing adds it)
    middlewares = [
        correlation_middleware(tracing.current_trace_id if tracing else None),
        openai_errors,
    ]
    app = web.Application(
        middlewares=middlewares,
        client_max_size=settings.config.server.max_body_bytes,
    )
    app[SETTINGS] = holder
    app[METRICS] = metrics
    store = _state_store(settings.config.state, settings.redis_password)
    app[STATE] = store
    review = _review_state(store, holder)
    app[REVIEW] = review
    app[DRAINING] = asyncio.Event()
    metrics.state_up.set(1)

    async def upstreams_ctx(app: web.Application) -> AsyncIterator[None]:
        trace_configs = [tracing.client_trace_config()] if tracing else []
        keys = settings.upstream_api_keys if api_keys is None else api_keys
        pool = UpstreamPool(upstreams, metrics, keys, trace_configs)
        await pool.start()
        app[UPSTREAMS] = pool
        try:
            yield
        finally:
            await pool.close()
            if tracing is not None:
                await asyncio.to_thread(tracing.shutdown)  # exports the last spans

    async def reload_ctx(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        watcher = asyncio.create_task(holder.watch())
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(holder.reload()))
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def state_ctx(app: web.Application) -> AsyncIterator[None]:
        await review.start()
        try:
            yield
        finally:
            await admitter.drain()  # settlements still in flight, before the store closes
            await review.close()
            await store.close()

    app.cleanup_ctx.append(state_ctx)
    app.cleanup_ctx.append(upstreams_ctx)
    app.cleanup_ctx.append(reload_ctx)

    admitter = Admitter(
        store,
        metrics,
        fail_open=settings.config.state.on_failure == "open",
        slot_ttl_s=_slot_ttl(settings),
    )
    planner = Planner(metrics, review)
    scorer = RiskScorer(
        store,
        metrics,
        speculate=lambda ctx, assessment: admitter.request_for(
            ctx, planner.expected_limits(ctx.client, assessment)
        ),
    )
    review.on_reset(scorer.forget)
    review.on_reset(planner.forget)
    metrics.add_collector(TopClientsCollector(review, holder))
    metrics.add_collector(EventLoopTasksCollector())
    audit = AuditLog(settings.config.audit, worker)
    app[AUDIT] = audit
    app.on_cleanup.append(lambda _: _close_audit(audit))
    for endpoint in Endpoint:
        handler = GenerationHandler(endpoint, holder, metrics, admitter, scorer, planner, audit)
        app.router.add_post(handler.path, handler)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", retrieve_model)
    app.router.add_get("/openapi.json", openapi_endpoint)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if settings.config.metrics.port is None:  # then it needs a token (schema)
        app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/admin/clients", admin.list_clients)
    app.router.add_get("/admin/clients/{client_id}", admin.client_report)
    app.router.add_post("/admin/clients/{client_id}/reset", admin.reset_client)
    app.router.add_put("/admin/clients/{client_id}/pin", admin.pin_client)
    return app


async def _close_audit(audit: AuditLog) -> None:
    audit.close()


def _state_store(state: StateSettings, password: str | None) -> StateStore:
    if state.backend == "redis":
        return RedisStore(
            state.redis_url, prefix=state.key_prefix, timeout_s=state.timeout_s, password=password
        )
    return MemoryStore()


def _review_state(store: StateStore, holder: SettingsHolder) -> ReviewState:
    if isinstance(store, RedisStore):
        state = holder.current.config.state
        return RedisReview(
            store,
            state.redis_url,
            prefix=state.key_prefix,
            timeout_s=state.timeout_s,
            top_k=lambda: holder.current.config.metrics.top_clients,
            password=holder.current.redis_password,
        )
    assert isinstance(store, MemoryStore)
    return MemoryReview(store)


def _slot_ttl(settings: Settings) -> float:
    """How long a concurrency slot lives if never released: the longest request, plus margin."""
    totals = [upstream.timeouts.total for upstream in settings.config.upstreams.values()]
    return max(totals, default=Timeouts().total) + 30.0
