"""OpenTelemetry spans of a request's way through the pipeline, exported over OTLP/HTTP.

Only when ``otlp_endpoint`` is set: :meth:`Tracing.from_settings` returns None
otherwise, and this module imports nothing of OpenTelemetry until a
:class:`Tracing` starts, so a pipeline without tracing pays one ``is None`` test
per answer. The SDK and exporter come with the ``otel`` extra.

Spans hang off the request's W3C ``traceparent`` header (requests without one are
not traced; its sampled flag is honoured). Their times come from what the
pipeline already measures, so they are recorded after the fact:

- ``route`` (router): from the request record's timestamp to its forwarding;
- ``queue`` (worker): from the request record's timestamp until the worker took
  it, the response's ``timing.queue_ms`` (routing included);
- ``batch`` (worker): from then until the answer, batch wait and run;
- ``compute`` (worker, child of ``batch``): the ONNX Runtime run.

The exporter batches spans and sends them from its own thread, never from the
event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from pipeline.settings import Settings

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_NS_PER_MS = 1_000_000


def _carrier(headers: Sequence[tuple[str, bytes]] | None) -> dict[str, str] | None:
    """The trace context headers as text, or None when there is no traceparent."""
    carrier: dict[str, str] = {}
    for k, v in headers or ():
        if k in (TRACEPARENT, TRACESTATE):
            carrier[k] = v.decode("latin-1")
    return carrier if TRACEPARENT in carrier else None


class Tracing:
    """A tracer provider with an OTLP/HTTP exporter, and the pipeline's span shapes."""

    def __init__(
        self, endpoint: str, *, service: str, instance: str, exporter: Any = None
    ) -> None:
        self.endpoint = endpoint
        self.service = service
        self.instance = instance
        self._exporter = exporter
        self._provider: Any = None
        self._tracer: Any = None
        self._propagator: Any = None
        self._set_in_context: Any = None

    @classmethod
    def from_settings(cls, settings: Settings, service: str) -> Tracing | None:
        """A tracer for ``service`` (router, worker) when an OTLP endpoint is set, else None."""
        if not settings.otlp_endpoint:
            return None
        return cls(settings.otlp_endpoint, service=f"inferline-{service}",
                   instance=settings.worker_id)

    @property
    def started(self) -> bool:
        """Whether spans are being recorded."""
        return self._tracer is not None

    async def start(self) -> None:
        """Build the provider and its exporter (idempotent)."""
        if self._provider is not None:
            return
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        exporter = self._exporter
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=self.endpoint)
        provider = TracerProvider(resource=Resource.create(
            {"service.name": self.service, "service.instance.id": self.instance}
        ))
        provider.add_span_processor(BatchSpanProcessor(exporter))
        self._provider = provider
        # The provider is this object's own, not the process-wide one: tests and
        # embedding applications keep their own global provider.
        self._tracer = provider.get_tracer("inferline")
        self._propagator = TraceContextTextMapPropagator()
        self._set_in_context = trace.set_span_in_context

    async def stop(self) -> None:
        """Export what is pending and shut the exporter down (idempotent)."""
        provider, self._provider, self._tracer = self._provider, None, None
        if provider is not None:
            # Flushing posts to the collector: a blocking call, so off the event loop.
            await asyncio.to_thread(provider.shutdown)

    def _parent(self, headers: Sequence[tuple[str, bytes]] | None) -> Any:
        carrier = _carrier(headers)
        if carrier is None or self._tracer is None:
            return None
        return self._propagator.extract(carrier)

    def route_span(
        self,
        headers: Sequence[tuple[str, bytes]] | None,
        start_ms: float,
        end_ms: float,
        *,
        request_id: str,
        model: str,
        priority: str,
    ) -> None:
        """Record the router's span of one request."""
        parent = self._parent(headers)
        if parent is None:
            return
        span = self._tracer.start_span(
            "route", context=parent, start_time=int(start_ms * _NS_PER_MS),
            attributes={"inferline.request_id": request_id, "inferline.model": model,
                        "inferline.priority": priority},
        )
        span.end(end_time=int(max(end_ms, start_ms) * _NS_PER_MS))

    def worker_spans(
        self,
        headers: Sequence[tuple[str, bytes]] | None,
        *,
        ts_ms: float,
        received_ms: float,
        compute_start_ms: float,
        compute_ms: float,
        end_ms: float,
        request_id: str,
        model: str,
        version: str,
        priority: str,
        batch_rows: int,
    ) -> None:
        """Record the queue, batch and compute spans of one answered request."""
        parent = self._parent(headers)
        if parent is None:
            return
        attrs = {"inferline.request_id": request_id, "inferline.model": model,
                 "inferline.version": version, "inferline.priority": priority}
        received_ms = max(received_ms, ts_ms)
        end_ms = max(end_ms, received_ms)
        queue = self._tracer.start_span(
            "queue", context=parent, start_time=int(ts_ms * _NS_PER_MS), attributes=attrs
        )
        queue.end(end_time=int(received_ms * _NS_PER_MS))
        batch = self._tracer.start_span(
            "batch", context=parent, start_time=int(received_ms * _NS_PER_MS),
            attributes={**attrs, "inferline.batch_rows": batch_rows},
        )
        start = min(max(compute_start_ms, received_ms), end_ms)
        compute = self._tracer.start_span(
            "compute", context=self._set_in_context(batch),
            start_time=int(start * _NS_PER_MS), attributes=attrs,
        )
        compute.end(end_time=int(min(start + compute_ms, end_ms) * _NS_PER_MS))
        batch.end(end_time=int(end_ms * _NS_PER_MS))
