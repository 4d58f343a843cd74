"""Prometheus metrics of routers and workers.

Names follow Prometheus conventions (base units, ``_total`` for counters,
``_seconds`` for durations). Labelled children are cached because looking a
child up by labels costs more than the increment itself on the hot path.

Every series carries a ``pool`` label: a process serves one pool, so the pool
is bound once, when :class:`Metrics` is built, and added to each sample when the
registry is collected (at scrape time) rather than passed on every increment.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from functools import lru_cache
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# The series names a family of each type exposes, as suffixes of the family name.
# ``_created`` timestamps are left out: nothing should be built on them.
_SUFFIXES: Mapping[str, tuple[str, ...]] = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "gauge": ("",),
    "summary": ("", "_count", "_sum"),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "unknown": ("",),
}


class ConstantLabels(Collector):
    """Exposes the families of another registry with constant labels added to each sample."""

    def __init__(self, source: CollectorRegistry, labels: Mapping[str, str]) -> None:
        self.source = source
        self.labels = dict(labels)

    def collect(self) -> Iterator[Metric]:
        """The source's families, each sample with the constant labels merged in."""
        for family in self.source.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            out.samples = [
                s._replace(labels={**s.labels, **self.labels}) for s in family.samples
            ]
            yield out


class Metrics:
    """All inferline series of one process, with its ``pool`` label bound.

    ``registry`` is what ``/metrics`` serves (a fresh one per instance unless
    given); the series themselves live on a private registry that it exposes
    through :class:`ConstantLabels`.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, pool: str = "default") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.pool = pool
        self._own = CollectorRegistry()
        r = self._own
        self.requests = Counter(
            "inferline_requests_total",
            "Requests answered, by outcome (ok, error, expired, rejected).",
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
        self.queue = Histogram(
            "inferline_queue_duration_seconds",
            "Time from the request record's timestamp until a worker took it from its lane.",
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
        self.worker_ready = Gauge(
            "inferline_worker_ready",
            "1 while this worker has its models warmed up and consumes its lanes.",
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

        # Fleet: warm-up gating and canary rollouts (router and controller).
        self.routed_version = Counter(
            "inferline_routed_version_total",
            "Requests the router sent to a version, by arm (stable, candidate, shadow, "
            "explicit).",
            ["model", "version", "arm"],
            registry=r,
        )
        self.routed_cold = Counter(
            "inferline_routed_cold_total",
            "Requests for a version no warm worker served: held in its lane, or rerouted "
            "to the stable version (INFERLINE_COLD_POLICY).",
            ["model", "version", "action"],
            registry=r,
        )
        self.warm_workers = Gauge(
            "inferline_warm_workers",
            "Live workers with the version warm, as the router sees the control topic.",
            ["model", "version"],
            registry=r,
        )
        self.rollout_decisions = Counter(
            "inferline_rollout_decisions_total",
            "Canary decisions taken by the controller.",
            ["model", "action"],
            registry=r,
        )

        # Health diagnosis (pipeline/health.py; alerts in deploy/prometheus/alerts.yml).
        self.errors = Counter(
            "inferline_errors_total",
            "Answers that are not ok (error, expired, rejected), by error code.",
            ["model", "version", "code"],
            registry=r,
        )
        self.provider_fallback = Gauge(
            "inferline_execution_provider_fallback",
            "1 when a version that prefers CUDA runs on another execution provider here.",
            ["model", "version"],
            registry=r,
        )
        self.drift_psi = Gauge(
            "inferline_output_drift_psi",
            "Class histogram PSI of a classifier's recent outputs against its reference.",
            ["model", "version"],
            registry=r,
        )
        self.drift_norm_shift = Gauge(
            "inferline_output_drift_norm_shift",
            "Relative change of an embedder's mean output norm against its reference.",
            ["model", "version"],
            registry=r,
        )
        self.drift_cosine_drop = Gauge(
            "inferline_output_drift_cosine_drop",
            "Fall of an embedder's mean cosine to its reference centroid.",
            ["model", "version"],
            registry=r,
        )
        self.model_health = Gauge(
            "inferline_model_health",
            "1 for the state health diagnosis gives a model version (healthy, "
            "degraded-model, degraded-infra, down), 0 for the others.",
            ["model", "version", "state"],
            registry=r,
        )
        # CPU and memory of the process (Linux /proc), pool-labelled like the rest.
        ProcessCollector(registry=r)
        self.registry.register(ConstantLabels(r, {"pool": pool}))

    @lru_cache(maxsize=4096)  # noqa: B019 - one Metrics per process; the cache lives as long
    def request_child(self, model: str, version: str, priority: str, status: str) -> Any:
        """Cached counter child for one label set."""
        return self.requests.labels(model, version, priority, status)

    @lru_cache(maxsize=4096)  # noqa: B019
    def latency_child(self, model: str, version: str, priority: str) -> Any:
        """Cached end-to-end latency histogram child."""
        return self.latency.labels(model, version, priority)

    @lru_cache(maxsize=4096)  # noqa: B019
    def queue_child(self, model: str, version: str, priority: str) -> Any:
        """Cached queue latency histogram child."""
        return self.queue.labels(model, version, priority)

    @lru_cache(maxsize=4096)  # noqa: B019
    def cost_child(self, model: str, version: str) -> Any:
        """Cached cost counter child."""
        return self.cost.labels(model, version)

    @lru_cache(maxsize=4096)  # noqa: B019
    def routed_child(self, model: str, priority: str) -> Any:
        """Cached routed counter child."""
        return self.routed.labels(model, priority)

    def series_names(self) -> frozenset[str]:
        """Every series name these metrics can expose (``_total``, ``_bucket``... included).

        Derived from the declared families, so a label set that has not been used
        yet still counts: dashboards and alert rules are checked against this.
        """
        return frozenset(_series_names(self._own.collect()))

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose ``/metrics`` on ``host:port`` (no-op when port is 0)."""
        if port:
            start_http_server(port, addr=host, registry=self.registry)


def _series_names(families: Iterable[Metric]) -> Iterator[str]:
    for family in families:
        for suffix in _SUFFIXES.get(family.type, ("",)):
            yield family.name + suffix
