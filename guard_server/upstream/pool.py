"""One pooled HTTP client per model, spreading requests over its healthy vLLM endpoints."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import aiohttp

from guard_server.config.schema import UpstreamSettings
from guard_server.errors import GuardError, upstream_error
from guard_server.metrics import GuardMetrics

log = logging.getLogger(__name__)

_JSON_HEADERS = {"Content-Type": "application/json"}
_HEALTH_TIMEOUT = aiohttp.ClientTimeout(total=3)


@dataclass(slots=True)
class Endpoint:
    """One upstream base URL and what the guard last saw of its health."""

    url: str
    healthy: bool = True
    failed_probes: int = 0
    max_model_len: int | None = None  # the context length vLLM reports in /v1/models
    models_checked: bool = False  # /v1/models answered (it may not report a context length)


_KEEPALIVE_S = 4.0
"""How long an idle upstream connection is kept for reuse: below uvicorn's (vLLM's server)
5-second keep-alive, so the pool rarely sends a request on a connection the upstream is
closing. Rarely, not never: the guard counts idleness from when it has read a response, which
on a busy guard is seconds after uvicorn sent it; :meth:`ModelUpstream.post` then retries once
on a new connection."""


class ModelUpstream:
    """The endpoints behind one public model name, sharing one connection pool.

    ``api_key`` is sent to every endpoint as ``Authorization: Bearer`` (vLLM's
    ``--api-key``); ``trace_configs`` instrument the request pool (not the health probes).
    """

    def __init__(
        self,
        name: str,
        settings: UpstreamSettings,
        metrics: GuardMetrics,
        api_key: str | None = None,
        trace_configs: Sequence[aiohttp.TraceConfig] = (),
    ) -> None:
        self.name = name
        self.served_model = settings.served_model or name
        self.settings = settings
        self.endpoints = [Endpoint(url) for url in settings.urls]
        self._metrics = metrics
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._trace_configs = list(trace_configs)
        self._turn = itertools.count()
        self._session: aiohttp.ClientSession | None = None
        self._fresh_session: aiohttp.ClientSession | None = None  # one connection per request
        self._probe_session: aiohttp.ClientSession | None = None
        self._health_task: asyncio.Task[None] | None = None
        for endpoint in self.endpoints:
            self._set_health(endpoint, True)

    def _open_session(self, connector: aiohttp.TCPConnector) -> aiohttp.ClientSession:
        timeouts = self.settings.timeouts
        return aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=timeouts.total, sock_connect=timeouts.connect, sock_read=timeouts.read
            ),
            headers=self._auth,
            read_bufsize=1 << 20,
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
            trace_configs=self._trace_configs or None,
        )

    async def start(self) -> None:
        """Open the connection pools, probe every endpoint once, then keep probing."""
        self._session = self._open_session(
            aiohttp.TCPConnector(
                limit=self.settings.max_connections,
                ttl_dns_cache=300,
                keepalive_timeout=_KEEPALIVE_S,
            )
        )
        self._fresh_session = self._open_session(aiohttp.TCPConnector(force_close=True))
        # Probes have connections of their own: they never wait behind busy requests.
        self._probe_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=len(self.endpoints), keepalive_timeout=_KEEPALIVE_S
            ),
            headers=self._auth,
            skip_auto_headers=("User-Agent",),
        )
        # The first probe before serving: requests then know each model's context length.
        await self._probe_all()
        self._health_task = asyncio.create_task(self._check_health_forever())

    async def close(self) -> None:
        """Stop health checks and close the pools."""
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        for session in (self._session, self._fresh_session, self._probe_session):
            if session is not None:
                await session.close()

    @property
    def ready(self) -> bool:
        """Whether at least one endpoint is healthy."""
        return any(endpoint.healthy for endpoint in self.endpoints)

    @property
    def max_model_len(self) -> int | None:
        """The smallest context length the endpoints reported, or None if none did."""
        known = [e.max_model_len for e in self.endpoints if e.max_model_len is not None]
        return min(known) if known else None

    def _candidates(self) -> list[Endpoint]:
        """Healthy endpoints in round-robin order; all of them when none is healthy.

        The fallback ("panic routing", as Envoy calls it) keeps a model served when every
        probe failed because the servers were busy rather than gone: a dead server still
        fails fast on connect.
        """
        start = next(self._turn) % len(self.endpoints)
        rotated = self.endpoints[start:] + self.endpoints[:start]
        return [endpoint for endpoint in rotated if endpoint.healthy] or rotated

    async def post(
        self, path: str, payload: bytes, headers: Mapping[str, str] | None = None
    ) -> aiohttp.ClientResponse:
        """POST to a healthy endpoint, moving on to the next one if a connection fails.

        Returns the response with its status and headers read; the caller reads the body
        and must release it. Raises an OpenAI-shaped 503/504 when no endpoint answers.
        """
        assert self._session is not None and self._fresh_session is not None
        all_headers = {**_JSON_HEADERS, **headers} if headers else _JSON_HEADERS
        for endpoint in self._candidates():
            url = endpoint.url + path
            try:
                try:
                    return await self._session.post(url, data=payload, headers=all_headers)
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                    # Closed before any answer: most likely a kept-alive connection the
                    # upstream was closing as it was reused. Once more, on a new connection.
                    log.info("upstream %s closed a connection (%s): retrying once", url, exc)
                    return await self._fresh_session.post(url, data=payload, headers=all_headers)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                self._metrics.upstream_errors.labels("connect").inc()
                log.warning("upstream %s unreachable: %s", endpoint.url, exc)
                self._set_health(endpoint, False)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                self._metrics.upstream_errors.labels("connect").inc()
                raise upstream_error(
                    502,
                    f"The upstream closed the connection: {type(exc).__name__}.",
                    "upstream_disconnected",
                ) from None
            except TimeoutError:
                self._metrics.upstream_errors.labels("timeout").inc()
                raise upstream_error(
                    504, "The upstream did not answer in time.", "upstream_timeout"
                ) from None
        self._metrics.upstream_errors.labels("unavailable").inc()
        raise upstream_error(
            503,
            f"No upstream for model `{self.name}` accepted the connection.",
            "upstream_unavailable",
        )

    async def _check_health_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            await self._probe_all()

    async def _probe_all(self) -> None:
        await asyncio.gather(*(self._probe(endpoint) for endpoint in self.endpoints))

    async def _probe(self, endpoint: Endpoint) -> None:
        assert self._probe_session is not None
        try:
            async with self._probe_session.get(
                endpoint.url + "/health", timeout=_HEALTH_TIMEOUT
            ) as response:
                healthy = response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            healthy = False
        if healthy and not (endpoint.models_checked and endpoint.healthy):
            await self._read_models(endpoint)  # once, and again when it comes back (restarted)
        # One failed probe is not an outage (a saturated vLLM answers /health late):
        # only `unhealthy_after` failures in a row take the endpoint out.
        endpoint.failed_probes = 0 if healthy else endpoint.failed_probes + 1
        if not healthy and endpoint.failed_probes < self.settings.unhealthy_after:
            return
        if healthy != endpoint.healthy:
            log.warning("upstream %s is now %s", endpoint.url, "healthy" if healthy else "down")
        self._set_health(endpoint, healthy)

    async def _read_models(self, endpoint: Endpoint) -> None:
        """Learn the served model's context length from vLLM's ``/v1/models``."""
        assert self._probe_session is not None
        try:
            async with self._probe_session.get(
                endpoint.url + "/v1/models", timeout=_HEALTH_TIMEOUT
            ) as response:
                if response.status in (401, 403):
                    endpoint.models_checked = True  # say it once: requests fail the same way
                    log.error(
                        "upstream %s refused the guard's API key (HTTP %d); check "
                        "upstreams.%s.api_key",
                        endpoint.url,
                        response.status,
                        self.name,
                    )
                if response.status != 200:
                    return
                listing = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return
        endpoint.models_checked = True
        models = listing.get("data") if isinstance(listing, dict) else None
        for model in models if isinstance(models, list) else []:
            if isinstance(model, dict) and model.get("id") == self.served_model:
                length = model.get("max_model_len")
                if isinstance(length, int) and length > 0:
                    endpoint.max_model_len = length

    def _set_health(self, endpoint: Endpoint, healthy: bool) -> None:
        endpoint.healthy = healthy
        self._metrics.upstream_healthy.labels(self.name, endpoint.url).set(1 if healthy else 0)


class UpstreamPool:
    """All models' upstreams; ``api_keys`` holds the key to send per model name."""

    def __init__(
        self,
        upstreams: Mapping[str, UpstreamSettings],
        metrics: GuardMetrics,
        api_keys: Mapping[str, str] | None = None,
        trace_configs: Sequence[aiohttp.TraceConfig] = (),
    ) -> None:
        keys = api_keys or {}
        self.models = {
            name: ModelUpstream(name, settings, metrics, keys.get(name), trace_configs)
            for name, settings in upstreams.items()
        }

    async def start(self) -> None:
        """Open every model's pool."""
        for upstream in self.models.values():
            await upstream.start()

    async def close(self) -> None:
        """Close every model's pool."""
        for upstream in self.models.values():
            await upstream.close()

    def get(self, model: str) -> ModelUpstream:
        """The upstream for a public model name; 503 if the config names none."""
        upstream = self.models.get(model)
        if upstream is None:
            raise GuardError(
                503,
                f"No upstream is configured for model `{model}`.",
                type="upstream_error",
                code="upstream_unavailable",
            )
        return upstream

    @property
    def ready(self) -> bool:
        """Whether every model has a healthy endpoint."""
        return all(upstream.ready for upstream in self.models.values())

    def max_model_len(self, model: str) -> int | None:
        """The context length of a public model's upstream, if its servers reported one."""
        upstream = self.models.get(model)
        return upstream.max_model_len if upstream is not None else None
