"""Runtime settings: one object, built once at startup from ``INFERLINE_*`` variables."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_worker_id() -> str:
    return socket.gethostname()


# The embedded broker shares its machine with the models. With a runtime thread per
# core, the requests it serves (a fleet makes a hundred-odd fetches a second, idle or
# not) wake threads on every core, preempting the inference threads there. On 2
# cores, one thread: a minilm bulk job 904-957 texts/s against 843-889 (runs taken
# in turn), the worker's CPU per text 3-7% lower and the broker's lower too.
EMBEDDED_BROKER_THREADS = 1


class Settings(BaseSettings):
    """All knobs of an inferline process.

    Nothing else in the code base reads the environment: build one ``Settings``
    at startup (``Settings()`` reads ``INFERLINE_*``) and pass it down.
    """

    model_config = SettingsConfigDict(env_prefix="INFERLINE_", extra="ignore")

    bootstrap_servers: str | None = Field(
        default=None,
        description="Kafka bootstrap servers; unset means start the embedded broker.",
    )
    embedded_broker_threads: int = Field(
        default=EMBEDDED_BROKER_THREADS, ge=0, le=1024,
        description="Runtime threads of the embedded broker; 0 starts one per core.",
    )
    topic_prefix: str = Field(default="inferline", pattern=r"^[A-Za-z0-9._-]{1,100}$")
    partitions: int = Field(default=4, ge=1, le=1024, description="Partitions per topic created.")
    registry: Path | None = Field(
        default=None,
        description="Model registry TOML; unset means <model_dir>/registry.toml.",
    )
    model_dir: Path = Field(
        default=Path.home() / ".cache" / "inferline" / "models",
        description="Where `inferline models build` writes models and their registry.",
    )
    state_dir: Path = Field(
        default=Path.home() / ".cache" / "inferline" / "state",
        description="Scratch space of the Faust apps (they keep no tables, but need a folder).",
    )
    metrics_port: int = Field(default=0, ge=0, le=65535, description="0 disables the endpoint.")
    metrics_host: str = "127.0.0.1"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    worker_id: str = Field(default_factory=_default_worker_id)

    # Kafka client tuning. Short session/rebalance timeouts keep group joins fast
    # against the embedded broker; production clusters may raise them.
    session_timeout_ms: int = 10_000
    rebalance_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 1_000
    commit_interval_ms: int = Field(
        default=500, ge=10, description="How often consumers commit handled offsets."
    )
    shutdown_grace_ms: int = Field(
        default=20_000, ge=0, description="How long a stopping agent may finish its batch."
    )
    # The embedded broker holds an empty fetch for this whole wait and notices
    # records arriving meanwhile only every so often, so it bounds each hop's latency.
    fetch_max_wait_ms: int = Field(default=10, ge=1, le=10_000)
    # While every executor of every model a worker serves is computing, a record
    # fetched sooner could not start sooner: the worker's fetch may wait until the
    # first of them is expected to finish, up to this long. 0 keeps fetch_max_wait_ms.
    busy_fetch_max_wait_ms: int = Field(default=200, ge=0, le=10_000)
    # The router's fetches, a worker's with an executor free and a client's with
    # nothing waiting wait this long once no record has come (nothing submitted, for
    # a client) for idle_after_ms (the first record after a quiet spell pays up to
    # the difference, once); at or below fetch_max_wait_ms, fetch_max_wait_ms holds.
    idle_fetch_max_wait_ms: int = Field(default=30, ge=1, le=10_000)
    idle_after_ms: int = Field(default=2_000, ge=0, le=600_000)
    # An InferenceClient's reply fetch may wait this share of the age of its youngest
    # unanswered request (between fetch_max_wait_ms and idle_fetch_max_wait_ms): a
    # burst's answers still due are late already, and polling for them a hundred
    # times a second costs the client and the broker CPU the workers could use.
    # 0 keeps fetch_max_wait_ms.
    reply_wait_share: float = Field(default=0.02, ge=0.0, le=1.0)
    linger_ms: int = 2
    # aiokafka keeps one batch per partition in flight and blocks send() while it
    # is full; 16 KiB (its default) caps a partition at a few dozen requests per
    # broker round trip.
    producer_batch_bytes: int = Field(default=262_144, ge=16_384)
    max_request_bytes: int = Field(default=1_048_576, ge=1024)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: Path | None = None

    # Consumption: how many records an agent handles per step and how long it
    # waits to fill one. These bound per-message overhead, not batch size.
    take_max: int = Field(default=1024, ge=1)
    take_within_ms: float = Field(default=2.0, gt=0)
    worker_concurrency: int = Field(default=2, ge=1, le=64)
    scheduling: Literal["priority", "fifo"] = Field(
        default="priority",
        description="Worker scheduling: priority lanes with pausing and admission control, "
        "or one first-in-first-out queue per model (the baseline).",
    )
    batch_share_when_busy: float = Field(
        default=0.1, gt=0, le=1,
        description="While interactive lanes have traffic, the share of a worker's time "
        "that bulk (batch-lane) batches may take; the rest is left idle for the interactive "
        "path (router, broker, intake) on the same machine. 1, with an interval of 0, "
        "disables the throttle.",
    )
    batch_interval_when_busy_ms: float = Field(
        default=250.0, ge=0, le=60_000,
        description="While interactive lanes have traffic, the least time between two bulk "
        "batches of a model: bounds the bulk job's load on the broker and its client, "
        "which the worker's CPU share does not count. 0 leaves only the share.",
    )

    uvloop: bool = Field(default=True, description="Run serve processes on uvloop if installed.")

    execution_provider: Literal["auto", "cuda", "cpu"] = Field(
        default="auto", description="Overrides each model's preferred provider unless 'auto'."
    )
    intra_op_threads: int = Field(default=0, ge=0, description="0 lets ONNX Runtime decide.")
    model_instances: int = Field(
        default=0, ge=0, le=64,
        description="Batches per model version a worker computes at once; 0: the registry's.",
    )

    # Observability: worker telemetry, windowed stats, cost of idle capacity, tracing.
    telemetry_interval_ms: int = Field(
        default=1000, ge=0, description="How often workers publish telemetry; 0 disables it."
    )
    pool: str = Field(
        default="default", pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="Worker pool this process belongs to (idle cost is accounted per pool).",
    )
    pool_hourly_usd: float | None = Field(
        default=None, ge=0,
        description="Hourly price of one worker of the pool; unset: the highest hourly_usd "
        "of the model versions it serves.",
    )
    stats_window_s: float = Field(
        default=10.0, gt=0, description="Tumbling window of the stats agent, in seconds."
    )
    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces); "
        "unset disables tracing.",
    )

    # Fleet: readiness on the control topic, warm-up gating, canary rollouts.
    cold_policy: Literal["hold", "stable"] = Field(
        default="hold",
        description="Router, for a version no warm worker serves: 'hold' forwards to the lane "
        "anyway (it waits in Kafka), 'stable' routes to the stable version instead.",
    )
    control_heartbeat_ms: int = Field(
        default=2000, ge=10, description="How often workers republish their readiness."
    )
    control_expiry_ms: int = Field(
        default=10_000, ge=10,
        description="A worker whose readiness is older than this counts as gone.",
    )
    controller_interval_ms: int = Field(
        default=1000, ge=10, description="How often the canary controller judges rollouts."
    )
    rollout_sample_percent: float = Field(
        default=10.0, ge=0, le=100,
        description="Share of each arm's traffic whose responses are copied to "
        "<prefix>.rollout for the controller during a rollout.",
    )
    rollout_window: int | None = Field(
        default=None, ge=1,
        description="Samples per arm and step for every model; unset: each model's registry "
        "rollout.window.",
    )
    rollout_step_min_ms: int = Field(
        default=30_000, ge=0, description="Least time a canary stays at a step before promotion."
    )

    # Health diagnosis (`inferline status`, drift gauges): see pipeline/health.py.
    health_heartbeat_timeout_ms: int = Field(
        default=5000, ge=1, description="A worker silent for longer than this is missing."
    )
    health_window_s: float = Field(
        default=60.0, gt=0, description="Recent window that rates and drift are judged on."
    )
    drift_psi_threshold: float = Field(
        default=0.2, gt=0, description="Class histogram PSI above which outputs have drifted."
    )
    drift_reference_rows: int = Field(
        default=500, ge=1, description="Rows of a version's first outputs that make its "
        "drift reference.",
    )
    drift_reference_file: Path | None = Field(
        default=None, description="JSON references (inferline status --save-reference); "
        "unset: each version's first drift_reference_rows rows.",
    )

    @property
    def registry_path(self) -> Path:
        """The registry file in force."""
        return self.registry if self.registry is not None else self.model_dir / "registry.toml"

    def topic(self, name: str) -> str:
        """Full name of one of the fixed topics (``requests``, ``responses``, ``dlq``, ...)."""
        return f"{self.topic_prefix}.{name}"

    def group_id(self, role: str) -> str:
        """Consumer group of a role; the topic prefix keeps pipelines on one cluster apart."""
        return f"{self.topic_prefix}-{role}"

    def worker_group_id(self) -> str:
        """Consumer group of this process's worker pool; the default pool keeps ``-worker``."""
        return self.group_id("worker" if self.pool == "default" else f"worker-{self.pool}")

    def lane_topic(self, model: str, priority: str) -> str:
        """The lane topic for one model and priority."""
        return f"{self.topic_prefix}.lane.{model}.{priority}"

    @property
    def idle_wait_is_longer(self) -> bool:
        """Whether ``idle_fetch_max_wait_ms`` lengthens ``fetch_max_wait_ms`` at all."""
        return self.idle_fetch_max_wait_ms > self.fetch_max_wait_ms

    def fetch_wait_ms(self, at_least_ms: int = 0) -> int:
        """The fetch wait of a consumer that needs no answer sooner than ``at_least_ms``.

        Readers of rare records (the control topic, health, a batch job's answers)
        wait longer than the interactive path: each idle fetch costs the broker CPU
        the traffic beside it could use. None waits less than ``fetch_max_wait_ms``.
        """
        return max(self.fetch_max_wait_ms, at_least_ms)

    def to_env(self) -> dict[str, str]:
        """These settings as ``INFERLINE_*`` variables, for child processes."""
        env: dict[str, str] = {}
        for name, value in self.model_dump(exclude_none=True).items():
            env[f"INFERLINE_{name.upper()}"] = str(value)
        return env

    def kafka_security(self) -> dict[str, object]:
        """Security keyword arguments shared by every aiokafka client."""
        kwargs: dict[str, object] = {"security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password
        if self.security_protocol in ("SSL", "SASL_SSL"):
            import ssl

            kwargs["ssl_context"] = ssl.create_default_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None
            )
        return kwargs
