"""Prometheus metrics of the guard. Every label is bounded by configuration."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
)
_OVERHEAD_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
)


def multiprocess_dir() -> str | None:
    """The folder shared by worker processes, when the guard runs several."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


class GuardMetrics:
    """All of the guard's metrics, registered on one registry.

    With several worker processes (``PROMETHEUS_MULTIPROC_DIR`` set before prometheus-client
    is imported), every worker writes its values to that folder and ``/metrics`` on any
    worker shows the sum over all of them; gauges say how they combine.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._collectors: list[Collector] = []
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.requests = Counter(
            "guard_requests",
            "Requests answered by the guard, by tier, endpoint and HTTP status.",
            ["tier", "endpoint", "status"],
            registry=r,
        )
        self.client_requests = Counter(
            "guard_client_requests",
            "Requests by client id (only when metrics.client_label is on).",
            ["client"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "guard_request_duration_seconds",
            "Total request latency seen by the client, in seconds.",
            ["tier", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "guard_upstream_duration_seconds",
            "Time spent waiting on the upstream model server, in seconds.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead_seconds = Histogram(
            "guard_overhead_seconds",
            "The guard's own time per request (total minus upstream), in seconds.",
            ["endpoint"],
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.ttft_seconds = Histogram(
            "guard_time_to_first_token_seconds",
            "Streaming: time from request arrival to the first content chunk sent, in seconds.",
            ["tier", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "guard_prompt_tokens", "Prompt tokens reported by the upstream.", ["tier"], registry=r
        )
        self.completion_tokens = Counter(
            "guard_completion_tokens",
            "Completion tokens reported by the upstream.",
            ["tier"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "guard_upstream_errors",
            "Upstream failures by kind (connect, timeout, status, stream, unavailable, malformed).",
            ["kind"],
            registry=r,
        )
        self.upstream_healthy = Gauge(
            "guard_upstream_healthy",
            "1 if the upstream endpoint passed its last health check.",
            ["model", "endpoint"],
            registry=r,
            multiprocess_mode="min",
        )
        self.config_reloads = Counter(
            "guard_config_reloads",
            "Config reloads by result (success or failure).",
            ["result"],
            registry=r,
        )
        self.policy_actions = Counter(
            "guard_policy_actions",
            "Request rewrites by the tier policy (clamp, strip), by tier and field.",
            ["tier", "action", "field"],
            registry=r,
        )
        self.rate_limited = Counter(
            "guard_rate_limited",
            "Requests refused with 429, by tier and the limit hit.",
            ["tier", "limit"],
            registry=r,
        )
        self.state_up = Gauge(
            "guard_state_backend_up",
            "1 if the state backend (Redis) answered the last call, else 0.",
            registry=r,
            multiprocess_mode="min",
        )
        self.state_errors = Counter(
            "guard_state_errors", "Calls to the state backend that failed.", registry=r
        )
        self.admissions_corrected = Counter(
            "guard_admissions_corrected",
            "Admissions taken with the request's observation under limits its plan did not "
            "keep (its action crossed pass or block), given back and taken again in a second "
            "round trip (Redis backend).",
            registry=r,
        )
        self.actions = Counter(
            "guard_actions",
            "Actions the plan stage chose, by tier, action (pass, tighten, perturb, decoy, "
            "block) and detection mode (in shadow mode: the action the score called for, "
            "while the request was served as pass).",
            ["tier", "action", "mode"],
            registry=r,
        )
        self.risk_score = Histogram(
            "guard_risk_score",
            "Extraction-risk score (0..1) of the client at each request, by tier.",
            ["tier"],
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
            registry=r,
        )
        self.flagged_clients = Gauge(
            "guard_flagged_clients",
            "Clients whose current action is above pass, by action and detection mode (in "
            "shadow mode: the action they would get).",
            ["action", "mode"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.campaigns = Counter(
            "guard_campaigns_detected",
            "Multi-key extraction campaigns detected (clusters of keys flagged together).",
            registry=r,
        )
        self.client_write_timeouts = Counter(
            "guard_client_write_timeouts",
            "Streams cut off because the client stopped reading for server.write_timeout_s "
            "(their upstream requests cancelled).",
            registry=r,
        )
        self.decoys = Counter(
            "guard_decoys_served", "Decoy answers served, by decoy source.", ["source"], registry=r
        )
        self.in_flight = Gauge(
            "guard_requests_in_flight",
            "Requests being served right now.",
            registry=r,
            multiprocess_mode="livesum",
        )

        self.worker_up = Gauge(
            "guard_worker_up",
            "1 for each live worker process (with several workers: one series per pid).",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.worker_up.set(1)

    def child(self, metric: MetricWrapperBase, *values: str) -> Any:
        """``metric.labels(*values)``, cached.

        ``labels()`` validates and locks on every call, a visible share of the hot path; the
        label values used with this are bounded (tier, endpoint, status, action, field), so
        the cache is too. Not for client ids.
        """
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def add_collector(self, collector: Collector) -> None:
        """Export metrics computed at scrape time (from state every worker shares)."""
        self._collectors.append(collector)
        self.registry.register(collector)

    def exposition_registry(self) -> CollectorRegistry:
        """What ``/metrics`` shows: this process's registry, or all workers' combined (the
        counters and gauges from every worker's files, the scrape-time collectors from the
        worker that answers)."""
        if multiprocess_dir() is None:
            return self.registry
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined)
        for collector in self._collectors:
            combined.register(collector)
        return combined


class EventLoopTasksCollector(Collector):
    """``guard_event_loop_tasks``: the asyncio tasks alive on this process's event loop at
    scrape time (in-flight requests, settlements, health probes...): flat under steady load,
    growing when tasks leak. Scraped from the loop's own thread, as ``/metrics`` is; nothing
    when no loop runs."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The one sample."""
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:
            return
        yield GaugeMetricFamily(
            "guard_event_loop_tasks",
            "asyncio tasks alive on the event loop of the process that answers",
            value=tasks,
        )
