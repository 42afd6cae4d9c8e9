"""Run the guard: one process, or a supervisor and N workers sharing the port (SO_REUSEPORT).

The supervisor owns what must exist once (the bundled teacher's vLLM); each worker runs its
own event loop and app. Shared state then has to live in Redis, and ``/metrics`` on any
worker aggregates all workers (prometheus-client multiprocess mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import signal
import socket
import time
import urllib.request

from aiohttp import web

from guard_server.app import build_app, build_metrics_app
from guard_server.appkeys import DRAINING
from guard_server.config.loader import ConfigError, Settings
from guard_server.config.reload import SettingsHolder
from guard_server.config.schema import UpstreamSettings
from guard_server.http_server import GuardAppRunner
from guard_server.logs import ACCESS_LOGGER, AccessLogger
from guard_server.metrics import GuardMetrics, multiprocess_dir
from guard_server.otel import otlp_traces_endpoint
from guard_server.upstream.bundled_teacher import start_bundled_teacher, teacher_upstream

log = logging.getLogger("guard_server")

_GC_YOUNG_THRESHOLD = 20_000
"""Allocations between young-generation collections (CPython's default is 700)."""


def serve(settings: Settings, host: str, port: int, on_ready) -> None:  # type: ignore[no-untyped-def]
    """Serve until SIGINT/SIGTERM; ``on_ready(base_url)`` is called once requests are served."""
    config = settings.config
    workers = config.server.workers
    if workers > 1 and config.state.backend != "redis":
        raise ConfigError(
            "server.workers > 1 needs state.backend: redis, so that limits and risk scores "
            "hold across the worker processes"
        )
    if settings.secret_is_ephemeral and workers > 1:
        raise ConfigError("server.workers > 1 needs a configured secret shared by the workers")
    if settings.secret_is_ephemeral:
        log.warning("no server secret configured: using a random one for this process only")
    upstreams = dict(config.upstreams)
    api_keys = dict(settings.upstream_api_keys)
    teacher = None
    if not upstreams:
        # A random key, held only by the guard (and vLLM): the managed vLLM listens on
        # loopback, and any local process could otherwise call it directly.
        key = secrets.token_urlsafe(32)
        tracing = config.tracing
        teacher = start_bundled_teacher(
            config.bundled_teacher, key, otlp_traces_endpoint(tracing) if tracing.otel else None
        )
        name = config.bundled_teacher.public_name
        upstreams = {name: teacher_upstream(config.bundled_teacher, teacher)}
        api_keys[name] = key
    metrics_at = _metrics_address(settings, host)
    try:
        if workers == 1:
            metrics_sock = None if metrics_at is None else _listen(*metrics_at)
            asyncio.run(
                _run_worker(
                    settings, upstreams, api_keys, _listen(host, port), metrics_sock, on_ready
                )
            )
        else:
            _supervise(settings, upstreams, api_keys, (host, port), metrics_at, workers, on_ready)
    finally:
        if teacher is not None:
            teacher.stop()


def _metrics_address(settings: Settings, api_host: str) -> tuple[str, int] | None:
    """Where the ``/metrics`` listener binds, or None when it shares the API port."""
    metrics = settings.config.metrics
    if metrics.port is None:
        return None
    return metrics.host or api_host, metrics.port


def _listen(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def _run_worker(
    settings: Settings,
    upstreams: dict[str, UpstreamSettings],
    api_keys: dict[str, str],
    sock: socket.socket,
    metrics_sock: socket.socket | None,
    on_ready,  # type: ignore[no-untyped-def]
    worker: int | None = None,
) -> None:
    """One worker's event loop and app; ``worker`` is its index when there are several."""
    metrics = GuardMetrics()
    holder = SettingsHolder(
        settings,
        on_reload=lambda ok: metrics.config_reloads.labels("success" if ok else "failure").inc(),
    )
    app = build_app(holder, metrics, upstreams, worker=worker, api_keys=api_keys)
    access_log = settings.config.logging.access_log
    runner = GuardAppRunner(
        app,
        handler_cancellation=True,
        access_log=logging.getLogger(ACCESS_LOGGER) if access_log else None,
        access_log_class=AccessLogger,
        shutdown_timeout=settings.config.server.drain_timeout_s,
    )
    # Handlers first: a SIGTERM that arrives as soon as the port answers must drain, not kill.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await runner.setup()
    metrics_runner = None
    if metrics_sock is not None:
        metrics_runner = web.AppRunner(build_metrics_app(holder, metrics), access_log=None)
        await metrics_runner.setup()
        await web.SockSite(metrics_runner, metrics_sock).start()
        bound = metrics_sock.getsockname()
        log.info("metrics on http://%s:%d/metrics", bound[0], bound[1])
    _tune_gc()
    await web.SockSite(runner, sock).start()
    if on_ready is not None:
        bound = sock.getsockname()
        on_ready(f"http://{bound[0]}:{bound[1]}/v1")
    try:
        await stop.wait()
    finally:
        # Drain: readiness turns false, the listener closes (new connections are refused),
        # in-flight requests and streams get up to drain_timeout_s to finish.
        app[DRAINING].set()
        log.info("draining (up to %.0f s), then exiting", settings.config.server.drain_timeout_s)
        await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()


def _tune_gc() -> None:
    """Keep the cyclic garbage collector off the request path.

    A request allocates hundreds of short-lived objects, and at CPython's default threshold
    (700) the young generation is collected every few requests; what startup built (config,
    app, metrics) would also be walked by every full collection. Freeze the latter and
    collect the young generation less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, 20, 20)


def _reserve(host: str, port: int) -> socket.socket:
    """Hold ``port`` for the workers (and learn it when it is 0) without accepting on it."""
    reserve = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserve.bind((host, port))
    return reserve


def _supervise(
    settings: Settings,
    upstreams: dict[str, UpstreamSettings],
    api_keys: dict[str, str],
    api_at: tuple[str, int],
    metrics_at: tuple[str, int] | None,
    workers: int,
    on_ready,  # type: ignore[no-untyped-def]
) -> None:
    """Fork the workers, restart one that dies, pass SIGHUP on, stop them all on SIGTERM."""
    from prometheus_client import multiprocess

    host = api_at[0]
    reserved = [_reserve(*api_at)]
    port = reserved[0].getsockname()[1]
    if metrics_at is not None:
        reserved.append(_reserve(*metrics_at))
        metrics_at = (metrics_at[0], reserved[1].getsockname()[1])

    def spawn(index: int) -> int:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                sock = _listen(host, port, reuse_port=True)
                metrics_sock = None if metrics_at is None else _listen(*metrics_at, reuse_port=True)
                asyncio.run(
                    _run_worker(
                        settings, upstreams, api_keys, sock, metrics_sock, None, worker=index
                    )
                )
            except BaseException:
                log.exception("worker crashed")
                code = 1
            os._exit(code)
        return pid

    # pid -> worker index; a restarted worker takes over its predecessor's index (and so
    # its audit file: still one writer per file).
    children = {spawn(index): index for index in range(workers)}
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    _wait_healthy(host, port)
    on_ready(f"http://{host}:{port}/v1")
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            continue
        index = children.pop(pid)
        if multiprocess_dir():
            multiprocess.mark_process_dead(pid)
        if not stopping:
            log.error("worker %d exited (status %d); starting another", pid, status)
            time.sleep(1)
            children[spawn(index)] = index
    for reserve in reserved:
        reserve.close()


def _wait_healthy(host: str, port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("the workers did not start")
