"""Health diagnosis: is a model's trouble the infrastructure's or the model's own?

:class:`HealthMonitor` is pure logic. It is fed worker telemetry (heartbeats and
request summaries, :mod:`pipeline.telemetry`), optionally worker readiness from the
control topic, requests answered before any worker (the router's rejections, read
from the DLQ) and lane backlog samples, every one with the timestamp it carries;
:meth:`HealthMonitor.assess` is given the time to judge at. So tests control time.

Two classes of cause, told apart because they call for different people:

- INFRASTRUCTURE: a worker stopped sending heartbeats (missing), no live worker
  serves the model (down), a lane's backlog keeps ageing, a growing share of
  answers is expired or rejected for overload, a version that prefers CUDA runs
  on another execution provider, the broker cannot be reached.
- MODEL DEGRADATION: the outputs drifted from the version's reference (class
  histogram PSI for classifiers, norm and centroid-cosine for embedders; see
  :mod:`pipeline.drift`), or the share of INVALID_INPUT answers rose.

Each (model, version) gets a :class:`ModelHealth`: ``down`` when nothing serves it,
else ``degraded-infra`` when any infrastructure cause holds, else ``degraded-model``
when a model cause holds, else ``healthy``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from pipeline.drift import (
    COSINE_DROP_THRESHOLD,
    MIN_WINDOW_ROWS,
    NORM_SHIFT_THRESHOLD,
    DriftError,
    DriftResult,
    DriftThresholds,
    OutputSummary,
    Reference,
    ReferenceBuilder,
    compare,
    merge_summaries,
)
from pipeline.metrics import Metrics
from pipeline.settings import Settings
from pipeline.telemetry import Heartbeat, RequestSummary, to_drift_summary

State = Literal["healthy", "degraded-model", "degraded-infra", "down"]
STATES: tuple[State, ...] = ("healthy", "degraded-model", "degraded-infra", "down")

INFRA = "infrastructure"
MODEL = "model degradation"

# A window with fewer answers than this is too small to judge rates on.
MIN_WINDOW_REQUESTS = 20
# Shares of a window's answers beyond which they count as a problem.
EXPIRED_RATIO_THRESHOLD = 0.05
REJECTED_RATIO_THRESHOLD = 0.05
INVALID_INPUT_RATIO_THRESHOLD = 0.05
# A lane whose oldest waiting record is older than this, and not getting younger.
LANE_LAG_THRESHOLD_MS = 10_000.0
INVALID_INPUT = "INVALID_INPUT"
# A worker silent for this long is forgotten (its versions stay expected, so a version
# that nothing else serves is still down).
FORGET_WORKER_MS = 3_600_000.0
# Execution providers that satisfy a preference for CUDA.
_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@dataclass(frozen=True)
class HealthThresholds:
    """Where each cause starts to count; see the module constants for the defaults."""

    heartbeat_timeout_ms: float = 5_000.0
    window_ms: float = 60_000.0
    reference_rows: int = 500
    psi: float = 0.2
    norm_shift: float = NORM_SHIFT_THRESHOLD
    cosine_drop: float = COSINE_DROP_THRESHOLD
    min_window_rows: int = MIN_WINDOW_ROWS
    min_window_requests: int = MIN_WINDOW_REQUESTS
    expired_ratio: float = EXPIRED_RATIO_THRESHOLD
    rejected_ratio: float = REJECTED_RATIO_THRESHOLD
    invalid_input_ratio: float = INVALID_INPUT_RATIO_THRESHOLD
    lane_lag_ms: float = LANE_LAG_THRESHOLD_MS
    forget_worker_ms: float = FORGET_WORKER_MS

    @classmethod
    def from_settings(
        cls, settings: Settings, *, window_s: float | None = None
    ) -> HealthThresholds:
        """Thresholds from the ``health_*`` and ``drift_*`` settings."""
        return cls(
            heartbeat_timeout_ms=float(settings.health_heartbeat_timeout_ms),
            window_ms=1000.0 * (window_s if window_s is not None else settings.health_window_s),
            reference_rows=settings.drift_reference_rows,
            psi=settings.drift_psi_threshold,
        )

    @property
    def drift(self) -> DriftThresholds:
        """The drift part, for :func:`pipeline.drift.compare`."""
        return DriftThresholds(
            psi=self.psi, norm_shift=self.norm_shift, cosine_drop=self.cosine_drop,
            min_window_rows=self.min_window_rows,
        )


@dataclass(frozen=True)
class ModelHealth:
    """The verdict on one model version, with the reasons in words."""

    state: State
    reasons: list[str]
    infra: bool
    model: bool
    drift: DriftResult | None = None
    live_workers: tuple[str, ...] = ()
    reference: str = ""  # where the drift reference came from, or how far it has got

    @property
    def reason(self) -> str:
        """All reasons on one line ("ok" when there are none)."""
        return "; ".join(self.reasons) or "ok"


@dataclass
class _Worker:
    pool: str
    last_start_ms: float
    last_end_ms: float
    # (model, version) -> execution provider, per the latest heartbeat
    served: dict[tuple[str, str], str] = field(default_factory=dict)
    stopping_ms: float | None = None

    @property
    def stopped(self) -> bool:
        return self.stopping_ms is not None and self.stopping_ms >= self.last_start_ms


@dataclass
class _Answers:
    """Answers of one model (all versions) over an interval."""

    at_ms: float
    total: int
    expired: int
    rejected: int
    invalid: int


@dataclass
class _Lane:
    at_ms: float
    backlog: int
    oldest_age_ms: float | None


@dataclass
class _Outputs:
    builder: ReferenceBuilder
    reference: Reference | None = None
    pending: list[tuple[float, OutputSummary]] = field(default_factory=list)


class HealthMonitor:
    """Per model version health from telemetry, with time passed in by the caller."""

    def __init__(
        self,
        thresholds: HealthThresholds | None = None,
        *,
        references: Mapping[tuple[str, str], Reference] | None = None,
        preferred_providers: Mapping[tuple[str, str], str] | None = None,
    ) -> None:
        self.t = thresholds or HealthThresholds()
        self._fixed_refs = dict(references or {})
        self._preferred = dict(preferred_providers or {})
        self._workers: dict[str, _Worker] = {}
        self._versions: set[tuple[str, str]] = set()
        self._outputs: dict[tuple[str, str], _Outputs] = {}
        self._answers: dict[str, list[_Answers]] = {}
        self._lanes: dict[tuple[str, str], list[_Lane]] = {}
        self._broker_errors: list[tuple[float, str]] = []

    # -- feeding -------------------------------------------------------------------

    def expect(self, model: str, version: str) -> None:
        """Declare a version that should be served even if no telemetry mentions it."""
        self._versions.add((model, version))

    def observe(self, record: RequestSummary | Heartbeat) -> None:
        """Take one telemetry record into account."""
        if isinstance(record, Heartbeat):
            self._heartbeat(record)
        else:
            self._summary(record)

    def _heartbeat(self, hb: Heartbeat) -> None:
        w = self._workers.get(hb.worker)
        if w is None:
            w = self._workers[hb.worker] = _Worker(hb.pool, hb.start_ms, hb.end_ms)
        elif hb.end_ms < w.last_end_ms:
            # An older heartbeat read late: its outputs still count, its roster does not.
            self._outputs_of(hb)
            return
        w.pool, w.last_start_ms, w.last_end_ms = hb.pool, hb.start_ms, hb.end_ms
        w.served = {(s.model, s.version): s.execution_provider for s in hb.served}
        self._versions.update(w.served)
        self._outputs_of(hb)

    def _outputs_of(self, hb: Heartbeat) -> None:
        for s in hb.served:
            if s.outputs is None:
                continue
            self._output_state(s.model, s.version).pending.append(
                (float(hb.end_ms), to_drift_summary(s.outputs))
            )

    def _output_state(self, model: str, version: str) -> _Outputs:
        key = (model, version)
        state = self._outputs.get(key)
        if state is None:
            state = self._outputs[key] = _Outputs(
                ReferenceBuilder(model, version, min_rows=self.t.reference_rows),
                self._fixed_refs.get(key),
            )
        return state

    def _summary(self, rs: RequestSummary) -> None:
        if rs.version:
            self._versions.add((rs.model, rs.version))
        self._answers.setdefault(rs.model, []).append(_Answers(
            at_ms=float(rs.end_ms),
            total=rs.count,
            expired=rs.statuses.get("expired", 0),
            rejected=rs.statuses.get("rejected", 0),
            invalid=rs.errors.get(INVALID_INPUT, 0),
        ))

    def observe_readiness(self, worker: str, state: str, at_ms: float) -> None:
        """A worker's readiness record from the control topic (``ready`` or ``stopping``)."""
        w = self._workers.get(worker)
        if w is None:
            return  # never seen serving: nothing to say about it
        if state == "stopping":
            w.stopping_ms = max(w.stopping_ms or 0.0, at_ms)

    def observe_rejection(self, model: str, code: str, at_ms: float) -> None:
        """A request answered before reaching any worker (a router rejection in the DLQ)."""
        self._answers.setdefault(model, []).append(_Answers(
            at_ms=at_ms, total=1, expired=int(code == "DEADLINE_EXCEEDED"),
            rejected=int(code == "OVERLOADED"), invalid=int(code == INVALID_INPUT),
        ))

    def observe_lane(
        self, model: str, priority: str, at_ms: float, backlog: int,
        oldest_age_ms: float | None,
    ) -> None:
        """A sample of a lane: records not yet answered and the age of the oldest of them."""
        self._lanes.setdefault((model, priority), []).append(
            _Lane(at_ms, backlog, oldest_age_ms)
        )

    def observe_broker_error(self, detail: str, at_ms: float) -> None:
        """The broker could not be reached or refused a request at ``at_ms``."""
        self._broker_errors.append((at_ms, detail))

    def known_versions(self) -> list[tuple[str, str]]:
        """Every (model, version) seen in telemetry or expected, sorted."""
        return sorted(self._versions)

    def pools(self) -> dict[str, set[str]]:
        """Each pool of the workers seen, with the models its workers serve."""
        out: dict[str, set[str]] = {}
        for w in self._workers.values():
            out.setdefault(w.pool, set()).update(m for m, _ in w.served)
        return out

    # -- judging -------------------------------------------------------------------

    def references(self) -> list[Reference]:
        """Every reference in force (from a file, or complete from first rows)."""
        return [o.reference for o in self._outputs.values() if o.reference is not None]

    def assess(self, now_ms: float) -> dict[tuple[str, str], ModelHealth]:
        """The health of every known model version at ``now_ms``, sorted by model, version."""
        start = now_ms - self.t.window_ms
        self._prune(start, now_ms)
        broker = [d for at, d in self._broker_errors if at > start]
        out: dict[tuple[str, str], ModelHealth] = {}
        for model, version in sorted(self._versions):
            infra: list[str] = [f"broker error: {broker[-1]}"] if broker else []
            modelr: list[str] = []
            live, down = self._workers_check(model, version, now_ms, infra)
            self._provider_check(model, version, live, infra)
            self._answers_check(model, start, infra, modelr)
            self._lane_check(model, start, infra)
            drift, ref_note = self._drift_check(model, version, start, modelr)
            if down:
                state: State = "down"
            elif infra:
                state = "degraded-infra"
            elif modelr:
                state = "degraded-model"
            else:
                state = "healthy"
            out[(model, version)] = ModelHealth(
                state=state,
                reasons=[f"{INFRA}: {r}" for r in infra] + [f"{MODEL}: {r}" for r in modelr],
                infra=bool(infra) or down,
                model=bool(modelr),
                drift=drift,
                live_workers=tuple(live),
                reference=ref_note,
            )
        return out

    def _workers_check(
        self, model: str, version: str, now_ms: float, infra: list[str]
    ) -> tuple[list[str], bool]:
        key = (model, version)
        serving = {wid: w for wid, w in self._workers.items() if key in w.served}
        live = sorted(
            wid for wid, w in serving.items()
            if not w.stopped and now_ms - w.last_end_ms <= self.t.heartbeat_timeout_ms
        )
        for wid, w in sorted(serving.items()):
            if w.stopped or wid in live:
                continue
            silent_ms = now_ms - w.last_end_ms
            if live and silent_ms > self.t.heartbeat_timeout_ms + self.t.window_ms:
                continue  # lost a while ago and the version is served: no longer news
            infra.append(
                f"worker {wid} (pool {w.pool}) missing (no heartbeat for "
                f"{_secs(now_ms - w.last_end_ms)})"
            )
        if live:
            return live, False
        stopped = sorted(wid for wid, w in serving.items() if w.stopped)
        if stopped:
            infra.append(f"no live worker serves {model}:{version} ({', '.join(stopped)} stopped)")
        elif not serving:
            infra.append(f"no worker has announced {model}:{version} (no heartbeat seen)")
        else:
            infra.append(f"no live worker serves {model}:{version}")
        return live, True

    def _provider_check(self, model: str, version: str, live: Iterable[str],
                        infra: list[str]) -> None:
        if self._preferred.get((model, version)) != "cuda":
            return
        for wid in live:
            provider = self._workers[wid].served.get((model, version), "")
            if provider not in _GPU_PROVIDERS:
                infra.append(
                    f"execution provider fallback: {model}:{version} prefers cuda, "
                    f"worker {wid} runs it on {provider or 'an unknown provider'}"
                )

    def _answers_check(self, model: str, start: float, infra: list[str],
                       modelr: list[str]) -> None:
        recent = [a for a in self._answers.get(model, ()) if a.at_ms > start]
        earlier = [a for a in self._answers.get(model, ()) if a.at_ms <= start]
        total = sum(a.total for a in recent)
        if total < self.t.min_window_requests:
            return
        window = f"of {total} answers over the last {_secs(self.t.window_ms)}"
        expired = sum(a.expired for a in recent) / total
        if expired > self.t.expired_ratio:
            infra.append(f"expired {expired:.0%} {window} (threshold {self.t.expired_ratio:.0%})")
        rejected = sum(a.rejected for a in recent) / total
        if rejected > self.t.rejected_ratio:
            infra.append(
                f"rejected as overloaded {rejected:.0%} {window} "
                f"(threshold {self.t.rejected_ratio:.0%})"
            )
        invalid = sum(a.invalid for a in recent) / total
        before_total = sum(a.total for a in earlier)
        before = sum(a.invalid for a in earlier) / before_total if before_total else 0.0
        if invalid > self.t.invalid_input_ratio and invalid > before:
            modelr.append(
                f"INVALID_INPUT rate {invalid:.0%} {window} (before: {before:.0%}, "
                f"threshold {self.t.invalid_input_ratio:.0%})"
            )

    def _lane_check(self, model: str, start: float, infra: list[str]) -> None:
        for (m, priority), samples in sorted(self._lanes.items()):
            if m != model:
                continue
            recent = sorted((s for s in samples if s.at_ms > start), key=lambda s: s.at_ms)
            if not recent:
                continue
            first, last = recent[0], recent[-1]
            age = last.oldest_age_ms
            if age is None or age <= self.t.lane_lag_ms:
                continue
            if len(recent) > 1 and first.oldest_age_ms is not None and (
                age < first.oldest_age_ms and last.backlog < first.backlog
            ):
                continue  # old, but draining
            trend = (
                f", backlog {first.backlog} -> {last.backlog} records"
                if len(recent) > 1 else f", {last.backlog} records waiting"
            )
            infra.append(
                f"lane {model}/{priority} lag {_secs(age)} and growing{trend} "
                f"(threshold {_secs(self.t.lane_lag_ms)})"
            )

    def _drift_check(self, model: str, version: str, start: float,
                     modelr: list[str]) -> tuple[DriftResult | None, str]:
        state = self._outputs.get((model, version))
        if state is None:
            return None, "no outputs seen"
        if state.reference is None:
            # The earliest rows make the reference; what follows them is compared with it.
            state.pending.sort(key=lambda p: p[0])
            used = 0
            for at, summary in state.pending:
                used += 1
                if state.builder.add(summary, at) is not None:
                    break
            del state.pending[:used]
            state.reference = state.builder.reference
            if state.reference is None:
                return None, (
                    f"collecting reference: {state.builder.rows} of {state.builder.min_rows} rows"
                )
        ref = state.reference
        window = [s for at, s in state.pending if at > start and at > ref.captured_ms]
        if not window:
            return None, ref.source
        try:
            merged = merge_summaries(window)
            assert merged is not None
            result = compare(ref.summary, merged, self.t.drift)
        except DriftError as exc:
            modelr.append(f"outputs cannot be compared with the reference: {exc}")
            return None, ref.source
        if result.drifted:
            modelr.append(result.detail)
        return result, ref.source

    def _prune(self, start: float, now_ms: float) -> None:
        """Forget what no later window can need (references are kept)."""
        self._workers = {
            wid: w for wid, w in self._workers.items()
            if now_ms - w.last_end_ms <= self.t.forget_worker_ms
        }
        for state in self._outputs.values():
            if state.reference is not None:
                state.pending = [p for p in state.pending if p[0] > start]
        for model, answers in self._answers.items():
            old = [a for a in answers if a.at_ms <= start]
            if len(old) > 1:
                # The earlier period survives as one aggregate (for "rising" comparisons).
                agg = _Answers(
                    at_ms=max(a.at_ms for a in old), total=sum(a.total for a in old),
                    expired=sum(a.expired for a in old), rejected=sum(a.rejected for a in old),
                    invalid=sum(a.invalid for a in old),
                )
                self._answers[model] = [agg, *(a for a in answers if a.at_ms > start)]
        for key, samples in self._lanes.items():
            self._lanes[key] = [s for s in samples if s.at_ms > start]
        self._broker_errors = [(at, d) for at, d in self._broker_errors if at > start]


def export_gauges(metrics: Metrics, healths: Mapping[tuple[str, str], ModelHealth]) -> None:
    """Set the health and drift gauges of ``metrics`` from an assessment."""
    for (model, version), h in healths.items():
        for state in STATES:
            metrics.model_health.labels(model, version, state).set(1 if state == h.state else 0)
        d = h.drift
        if d is None:
            continue
        if d.psi is not None:
            metrics.drift_psi.labels(model, version).set(d.psi)
        if d.norm_shift is not None:
            metrics.drift_norm_shift.labels(model, version).set(d.norm_shift)
        if d.cosine is not None and d.reference_cosine is not None:
            metrics.drift_cosine_drop.labels(model, version).set(d.reference_cosine - d.cosine)


def _secs(ms: float) -> str:
    s = ms / 1000
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
