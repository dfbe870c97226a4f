"""OpenTelemetry traces (docs/design.md#traces): a span per request with children for admit, classify, lookup,
upstream and commit.

On only when an OTLP endpoint is configured (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``…_TRACES_ENDPOINT``): then the
SDK exports over OTLP/HTTP, configured by the standard ``OTEL_*`` variables. Otherwise the API's no-op tracer,
whose spans record nothing, and the SDK is never imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING

from opentelemetry import propagate, trace
from opentelemetry.context import Context

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

NAME = "promptcache.proxy"
SERVICE = "promptcache-proxy"
"""``service.name`` unless ``OTEL_SERVICE_NAME`` or ``OTEL_RESOURCE_ATTRIBUTES`` names one."""
ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
CONTEXT_HEADERS = ("traceparent", "tracestate")
"""W3C trace context: passed to the upstream as the client sent it while tracing is off."""


def provider_from_env(environ: Mapping[str, str] = os.environ) -> TracerProvider | None:
    """An SDK provider exporting over OTLP/HTTP in batches, or None when no endpoint is set."""
    if not any(environ.get(name) for name in ENDPOINTS):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: SERVICE}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class Tracing:
    """The proxy's tracer, and how trace context crosses the proxy: from the client's headers, to the upstream's."""

    def __init__(self, provider: TracerProvider | None) -> None:
        self.provider = provider
        self.on = provider is not None
        self.tracer = (provider if provider is not None else trace.NoOpTracerProvider()).get_tracer(NAME)

    def incoming(self, headers: Mapping[str, str]) -> Context | None:
        """The client's trace context (its ``traceparent``), so the request's span joins the client's trace."""
        return propagate.extract(headers) if self.on and "traceparent" in headers else None

    def outgoing(self, client: Mapping[str, str], headers: MutableMapping[str, str]) -> None:
        """Trace context for the upstream: the current span's when tracing, else the client's own headers."""
        if self.on:
            propagate.inject(headers)
            return
        for name in CONTEXT_HEADERS:
            if name in client:
                headers[name] = client[name]

    def shutdown(self) -> None:
        """Export what is buffered; called once, as the proxy stops."""
        if self.provider is not None:
            self.provider.shutdown()
