"""Prometheus metrics of routers and workers.

Names follow Prometheus conventions (base units, ``_total`` for counters,
``_seconds`` for durations). Labelled children are cached because looking a
child up by labels costs more than the increment itself on the hot path.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """All inferline series, on one registry (a fresh one per instance in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "inferline_requests_total",
            "Requests answered, by outcome.",
            ["model", "version", "priority", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "inferline_request_duration_seconds",
            "End-to-end latency, from the request record's timestamp to the response.",
            ["model", "version", "priority"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
            "inferline_batch_size",
            "Rows per ONNX Runtime call.",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "inferline_compute_duration_seconds",
            "ONNX Runtime time per batch.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.cost = Counter(
            "inferline_cost_usd_total",
            "Compute cost charged to requests, in US dollars.",
            ["model", "version"],
            registry=r,
        )
        self.routed = Counter(
            "inferline_routed_total",
            "Requests the router forwarded to a lane.",
            ["model", "priority"],
            registry=r,
        )
        self.dlq = Counter(
            "inferline_dlq_records_total",
            "Records written to the dead-letter topic, by error code.",
            ["code", "source"],
            registry=r,
        )
        self.model_ready = Gauge(
            "inferline_model_ready",
            "1 when the model version is loaded and warmed up on this worker.",
            ["model", "version", "execution_provider"],
            registry=r,
        )

        # Scheduling (priority lanes, deadlines, admission control).
        self.lane_backlog = Gauge(
            "inferline_lane_backlog_messages",
            "Records in a lane not yet taken by this worker (end offset minus position).",
            ["model", "priority"],
            registry=r,
        )
        self.lane_lag = Gauge(
            "inferline_lane_lag_seconds",
            "Age of the oldest record of a lane waiting in this worker or in Kafka.",
            ["model", "priority"],
            registry=r,
        )
        self.lane_paused = Gauge(
            "inferline_lane_paused",
            "1 while this worker has paused consuming the lane for a higher one.",
            ["model", "priority"],
            registry=r,
        )
        self.inflight = Gauge(
            "inferline_inflight_requests",
            "Requests taken from the lanes and not yet answered, per model.",
            ["model"],
            registry=r,
        )

    @lru_cache(maxsize=4096)  # noqa: B019 - one Metrics per process; the cache lives as long
    def request_child(self, model: str, version: str, priority: str, status: str) -> Any:
        """Cached counter child for one label set."""
        return self.requests.labels(model, version, priority, status)

    @lru_cache(maxsize=4096)  # noqa: B019
    def latency_child(self, model: str, version: str, priority: str) -> Any:
        """Cached latency histogram child."""
        return self.latency.labels(model, version, priority)

    @lru_cache(maxsize=4096)  # noqa: B019
    def cost_child(self, model: str, version: str) -> Any:
        """Cached cost counter child."""
        return self.cost.labels(model, version)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose ``/metrics`` on ``host:port`` (no-op when port is 0)."""
        if port:
            start_http_server(port, addr=host, registry=self.registry)
