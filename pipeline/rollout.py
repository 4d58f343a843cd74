"""Canary rollouts: the traffic split, shadow mirroring and the windowed verdict.

Everything here is plain Python without I/O, shared by the router (which version
a request goes to), the controller (is the candidate as good as the stable
version?) and the command line.

- A request id hashes to three independent buckets in ``0..9999``: one picks
  the arm (candidate when below ``canary_percent * 100``), one whether a stable
  request is mirrored to the candidate (shadow), one whether its response is
  copied to the controller. The same id always lands in the same buckets, in
  every process, so a retried request keeps its arm, and raising the canary
  percentage only moves requests from stable to candidate, never back.
- The controller keeps a sliding window per arm (status and latency of copied
  responses) and the output agreement of shadow pairs (the stable and the
  candidate response to one request, joined by id), and judges a step with
  :func:`judge`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from pipeline.registry import ModelEntry, RolloutPolicy

# The router sets these on lane records; senders' own copies are removed first.
COPY_TO_HEADER = "inferline-copy-to"
SHADOW_HEADER = "inferline-shadow"
BUCKETS = 10_000

Arm = Literal["stable", "candidate", "explicit"]
Metric = Literal["label", "cosine"]
ColdPolicy = Literal["hold", "stable"]


def buckets(request_id: str) -> tuple[int, int, int]:
    """The canary, shadow and sample buckets (each ``0..9999``) of a request id."""
    d = hashlib.blake2b(request_id.encode("utf-8", "surrogatepass"), digest_size=12).digest()
    return (
        int.from_bytes(d[0:4], "big") % BUCKETS,
        int.from_bytes(d[4:8], "big") % BUCKETS,
        int.from_bytes(d[8:12], "big") % BUCKETS,
    )


def basis_points(percent: float) -> int:
    """A percentage as a count of buckets out of :data:`BUCKETS`."""
    return round(min(max(percent, 0.0), 100.0) * BUCKETS / 100)


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request goes: the version, and what else the router does with it."""

    version: str
    arm: Arm
    copy: bool = False
    """Mark it so the worker copies its response to the rollout topic."""
    shadow: str | None = None
    """Candidate version a copy of it is mirrored to, answered on the rollout topic."""
    cold: bool = False
    """No warm worker serves ``version``: forwarded anyway, it waits in its lane."""
    rerouted_from: str | None = None
    """Policy ``stable``: the cold version this request would have gone to."""


class ModelPlan:
    """Routing of one model's requests, built from its deployment and the warm versions."""

    __slots__ = (
        "_stable_route", "canary_bp", "candidate", "model", "policy", "sample_bp",
        "shadow_bp", "stable", "warm",
    )

    def __init__(
        self,
        model: str,
        stable: str,
        *,
        candidate: str | None = None,
        canary_percent: float = 0.0,
        shadow_percent: float = 0.0,
        sample_percent: float = 0.0,
        warm: Collection[str] = (),
        policy: ColdPolicy = "hold",
    ) -> None:
        self.model = model
        self.stable = stable
        self.candidate = candidate if candidate != stable else None
        self.canary_bp = basis_points(canary_percent) if self.candidate else 0
        self.shadow_bp = basis_points(shadow_percent) if self.candidate else 0
        self.sample_bp = basis_points(sample_percent) if self.candidate else 0
        self.warm = frozenset(warm)
        self.policy = policy
        self._stable_route = Route(stable, "stable", cold=stable not in self.warm)

    @property
    def active(self) -> bool:
        """Whether a candidate takes traffic, mirrored traffic or samples."""
        return self.candidate is not None and (self.canary_bp or self.shadow_bp) > 0

    def route(self, request_id: str) -> Route:
        """The route of a request that names no version."""
        if not self.active:
            return self._stable_route
        assert self.candidate is not None
        canary, shadow, sample = buckets(request_id)
        arm: Arm = "candidate" if canary < self.canary_bp else "stable"
        version = self.candidate if arm == "candidate" else self.stable
        rerouted: str | None = None
        cold = False
        if version not in self.warm:
            if self.policy == "stable" and version != self.stable and self.stable in self.warm:
                rerouted, version, arm = version, self.stable, "stable"
            else:
                cold = True
        mirror = (
            self.candidate
            if arm == "stable" and shadow < self.shadow_bp and self.candidate in self.warm
            else None
        )
        return Route(
            version, arm,
            copy=mirror is not None or sample < self.sample_bp,
            shadow=mirror, cold=cold, rerouted_from=rerouted,
        )

    def explicit(self, version: str) -> Route:
        """The route of a request that names its version: honoured as it is."""
        return Route(version, "explicit", cold=version not in self.warm)


def next_step(steps: Sequence[float], current: float) -> float:
    """The canary percentage after ``current``: the first step above it, else 100."""
    return next((s for s in steps if s > current), 100.0)


def comparison(entry: ModelEntry) -> tuple[str, Metric]:
    """The output compared between versions and how: labels, or cosine of rows.

    ``agreement = "auto"`` compares the first integer output by label when there is
    one (classifiers), else the first output by cosine (embedders).
    """
    policy = entry.rollout
    outputs = entry.versions[0].outputs
    integer = ("BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "BYTES")
    if policy.compare_output is not None:
        chosen = next((o for o in outputs if o.name == policy.compare_output), outputs[0])
    elif policy.agreement == "cosine":
        chosen = next((o for o in outputs if o.datatype not in integer), outputs[0])
    else:
        chosen = next((o for o in outputs if o.datatype in integer), outputs[0])
    if policy.agreement != "auto":
        return chosen.name, policy.agreement
    return chosen.name, "label" if chosen.datatype in integer else "cosine"


def agreement(metric: Metric, stable: Any, candidate: Any) -> tuple[float, int]:
    """Agreement of two outputs of one request: (sum of per-row scores, rows).

    Labels score 1 per equal row; embeddings score each row's cosine similarity.
    Outputs of different shapes score 0 on every row.
    """
    a, b = np.asarray(stable), np.asarray(candidate)
    rows = int(a.shape[0]) if a.ndim else 1
    if a.shape != b.shape or rows == 0:
        return 0.0, max(rows, 1)
    if metric == "label":
        equal = np.all(a.reshape(rows, -1) == b.reshape(rows, -1), axis=1)
        return float(equal.sum()), rows
    x = a.reshape(rows, -1).astype(np.float64)
    y = b.reshape(rows, -1).astype(np.float64)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    cos = np.where(norms > 0, np.sum(x * y, axis=1) / np.where(norms > 0, norms, 1.0), 0.0)
    return float(cos.sum()), rows


class Figures(BaseModel):
    """What the controller measured over a window, for decisions and ``rollout status``."""

    model_config = ConfigDict(extra="forbid")

    stable_n: int = 0
    candidate_n: int = 0
    pairs: int = 0
    stable_error_rate: float | None = None
    candidate_error_rate: float | None = None
    stable_p99_ms: float | None = None
    candidate_p99_ms: float | None = None
    agreement: float | None = None
    agreement_metric: Metric | None = None

    @property
    def error_rate_delta(self) -> float | None:
        """Candidate error rate minus the stable one's."""
        if self.stable_error_rate is None or self.candidate_error_rate is None:
            return None
        return self.candidate_error_rate - self.stable_error_rate

    @property
    def p99_ratio(self) -> float | None:
        """Candidate p99 over the stable p99."""
        if not self.stable_p99_ms or self.candidate_p99_ms is None:
            return None
        return self.candidate_p99_ms / self.stable_p99_ms


@dataclass(frozen=True)
class Verdict:
    """The judgement of one window: ready (enough samples), passed, and why."""

    ready: bool
    passed: bool
    reasons: tuple[str, ...]
    figures: Figures

    @property
    def reason(self) -> str:
        """The reasons as one line."""
        return "; ".join(self.reasons)


def judge(
    policy: RolloutPolicy, figures: Figures, *, window: int, slo_p99_ms: float,
    needs_pairs: bool,
) -> Verdict:
    """Judge a candidate's window against the stable one's and the policy's thresholds.

    Not ready until both arms have ``window`` samples (and ``window`` shadow pairs
    when agreement is measured). A candidate fails on any of: error rate above the
    stable one's by more than ``max_error_rate_delta``; p99 above ``max_p99_ratio``
    times the stable p99 *and* above its ``slo_p99_ms``; agreement below
    ``min_agreement``.
    """
    f = figures
    waiting = []
    if f.candidate_n < window:
        waiting.append(f"candidate has {f.candidate_n}/{window} samples")
    if f.stable_n < window:
        waiting.append(f"stable has {f.stable_n}/{window} samples")
    if needs_pairs and f.pairs < window:
        waiting.append(f"{f.pairs}/{window} shadow pairs")
    if waiting:
        return Verdict(False, False, tuple(waiting), f)
    failed: list[str] = []
    passed: list[str] = []
    delta = f.error_rate_delta
    if delta is not None:
        line = (f"error rate {f.candidate_error_rate:.4f} vs stable {f.stable_error_rate:.4f} "
                f"(delta {delta:+.4f}, limit {policy.max_error_rate_delta})")
        (failed if delta > policy.max_error_rate_delta else passed).append(line)
    ratio = f.p99_ratio
    if ratio is not None and f.candidate_p99_ms is not None:
        line = (f"p99 {f.candidate_p99_ms:.1f} ms vs stable {f.stable_p99_ms:.1f} ms "
                f"(ratio {ratio:.2f}, limit {policy.max_p99_ratio}; slo {slo_p99_ms:g} ms)")
        slow = ratio > policy.max_p99_ratio and f.candidate_p99_ms > slo_p99_ms
        (failed if slow else passed).append(line)
    if f.agreement is not None:
        line = (f"{f.agreement_metric} agreement {f.agreement:.4f} over {f.pairs} shadow pairs "
                f"(min {policy.min_agreement})")
        (failed if f.agreement < policy.min_agreement else passed).append(line)
    elif needs_pairs:
        failed.append("no agreement measured")
    return Verdict(True, not failed, tuple(failed or passed), f)


@dataclass
class ArmWindow:
    """The last ``size`` responses of one arm: ok or not, and latency of the ok ones."""

    size: int
    samples: deque[tuple[bool, float | None]] = field(init=False)

    def __post_init__(self) -> None:
        self.samples = deque(maxlen=self.size)

    def add(self, ok: bool, latency_ms: float | None) -> None:
        """Record one response."""
        self.samples.append((ok, latency_ms))

    def clear(self) -> None:
        """Forget every sample (a new step starts)."""
        self.samples.clear()

    def __len__(self) -> int:
        return len(self.samples)

    def error_rate(self) -> float | None:
        """Share of responses that were not ok."""
        if not self.samples:
            return None
        return sum(1 for ok, _ in self.samples if not ok) / len(self.samples)

    def p99_ms(self) -> float | None:
        """99th percentile latency of the ok responses."""
        lat = [ms for ok, ms in self.samples if ok and ms is not None]
        return float(np.percentile(lat, 99)) if lat else None


class PairJoiner:
    """Holds one side of a shadow pair until the other side arrives (bounded memory)."""

    def __init__(self, capacity: int = 20_000) -> None:
        self.capacity = capacity
        self._waiting: OrderedDict[str, tuple[str, Any]] = OrderedDict()

    def offer(self, request_id: str, arm: str, output: Any) -> tuple[Any, Any] | None:
        """Add one side; returns (stable output, candidate output) once both are in."""
        other = self._waiting.get(request_id)
        if other is not None and other[0] != arm:
            del self._waiting[request_id]
            return (other[1], output) if arm == "candidate" else (output, other[1])
        self._waiting[request_id] = (arm, output)
        self._waiting.move_to_end(request_id)
        while len(self._waiting) > self.capacity:
            self._waiting.popitem(last=False)
        return None

    def clear(self) -> None:
        """Forget every waiting side."""
        self._waiting.clear()


class RolloutTracker:
    """The controller's windows for one rollout: both arms and the shadow agreement.

    The stable window slides over the whole rollout; the candidate window and the
    agreement restart at every step, so each step is judged on its own traffic.
    """

    def __init__(
        self, rollout_id: str, stable: str, candidate: str, *, window: int,
        output: str, metric: Metric,
    ) -> None:
        self.rollout_id = rollout_id
        self.stable = stable
        self.candidate = candidate
        self.window = window
        self.output = output
        self.metric = metric
        self.stable_arm = ArmWindow(window)
        self.candidate_arm = ArmWindow(window)
        self.scores: deque[tuple[float, int]] = deque(maxlen=window)
        self.joiner = PairJoiner()

    def new_step(self) -> None:
        """Start judging afresh: the candidate's samples and the pairs are dropped."""
        self.candidate_arm.clear()
        self.scores.clear()
        self.joiner.clear()

    def add(self, request_id: str, version: str | None, ok: bool, latency_ms: float | None,
            outputs: dict[str, Any] | None) -> None:
        """Account one copied response (stable or candidate; others are ignored)."""
        if version == self.stable:
            arm, window = "stable", self.stable_arm
        elif version == self.candidate:
            arm, window = "candidate", self.candidate_arm
        else:
            return
        window.add(ok, latency_ms)
        output = (outputs or {}).get(self.output)
        if ok and output is not None:
            pair = self.joiner.offer(request_id, arm, output)
            if pair is not None:
                self.scores.append(agreement(self.metric, *pair))

    def figures(self) -> Figures:
        """The windows' current figures."""
        rows = sum(n for _, n in self.scores)
        return Figures(
            stable_n=len(self.stable_arm),
            candidate_n=len(self.candidate_arm),
            pairs=len(self.scores),
            stable_error_rate=self.stable_arm.error_rate(),
            candidate_error_rate=self.candidate_arm.error_rate(),
            stable_p99_ms=self.stable_arm.p99_ms(),
            candidate_p99_ms=self.candidate_arm.p99_ms(),
            agreement=sum(s for s, _ in self.scores) / rows if rows else None,
            agreement_metric=self.metric if rows else None,
        )
