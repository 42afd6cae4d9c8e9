"""Optional OpenTelemetry tracing: a server span for each ``/v1`` request and a client span
for its upstream call, exported over OTLP/HTTP.

Needs the ``otel`` extra (``pip install 'guard-server[otel]'``): the OpenTelemetry SDK, its
OTLP/HTTP exporter and the aiohttp server and client instrumentations, used the way they are
documented: the server instrumentor adds its middleware to the applications this process
creates, and the upstream sessions get the client's trace config. The server span continues
the caller's ``traceparent``; the client span's context goes to vLLM in its ``traceparent``,
so a vLLM started with ``--otlp-traces-endpoint`` adds its own spans to the same trace.
Only ``/v1/`` requests are traced (not probes, ``/metrics`` or the upstream health checks),
unless ``OTEL_PYTHON_AIOHTTP_SERVER_EXCLUDED_URLS`` says otherwise.
"""

from __future__ import annotations

import importlib.util
import os

import aiohttp

from guard_server.config.schema import TracingSettings

EXTRA_HINT = "pip install 'guard-server[otel]'"
_REQUIRED = (
    "opentelemetry.sdk.trace",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.instrumentation.aiohttp_server",
    "opentelemetry.instrumentation.aiohttp_client",
)
_EXCLUDED_URLS_ENV = ("OTEL_PYTHON_AIOHTTP_SERVER_EXCLUDED_URLS", "OTEL_PYTHON_EXCLUDED_URLS")
_UNTRACED_PATHS = "^(?!/v1/)"  # a regex the instrumentation searches each path with


def missing_packages() -> list[str]:
    """The modules of the ``otel`` extra that are not installed."""
    missing = []
    for module in _REQUIRED:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(module)
    return missing


def otlp_traces_endpoint(settings: TracingSettings) -> str:
    """Where spans go: the config's URL, else the OpenTelemetry environment variables'."""
    if settings.otlp_endpoint:
        return settings.otlp_endpoint
    traces = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if traces:
        return traces
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318")
    return base.rstrip("/") + "/v1/traces"


class Tracing:
    """One process's tracer provider and the two instrumentations that use it.

    Create it before the aiohttp application: the server instrumentation applies to the
    applications created afterwards.
    """

    def __init__(self, settings: TracingSettings) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.provider = TracerProvider(
            resource=Resource.create({SERVICE_NAME: settings.service_name})
        )
        exporter = OTLPSpanExporter(endpoint=otlp_traces_endpoint(settings))
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        if not any(os.environ.get(name) for name in _EXCLUDED_URLS_ENV):
            os.environ[_EXCLUDED_URLS_ENV[0]] = _UNTRACED_PATHS
        self._server = AioHttpServerInstrumentor()
        self._server.instrument(tracer_provider=self.provider)

    def client_trace_config(self) -> aiohttp.TraceConfig:
        """The client-span trace config for the upstream sessions (it sends ``traceparent``)."""
        from opentelemetry.instrumentation.aiohttp_client import create_trace_config

        return create_trace_config(tracer_provider=self.provider)

    @staticmethod
    def current_trace_id() -> str | None:
        """The trace id of the span being served, as 32 hex digits."""
        from opentelemetry import trace

        context = trace.get_current_span().get_span_context()
        return format(context.trace_id, "032x") if context.is_valid else None

    def shutdown(self) -> None:
        """Export what is still buffered, then stop."""
        self._server.uninstrument()
        self.provider.shutdown()
