"""GPU check, run by ``bench/gpu_check.sh``: does CUDA really run, and how fast.

1. CUDA execution provider: ``onnxruntime`` lists it, a ``minilm`` session created
   with it reports it first in ``get_providers()``, and ORT's profile of a run shows
   the graph's nodes executed by ``CUDAExecutionProvider`` (most of the node time),
   not a silent fallback to the CPU;
2. ``minilm`` (tokenizing included, the pipeline's ``ModelSession``) at several batch
   sizes on CUDA and on the CPU: rows/s and the CUDA/CPU ratio per size;
3. the pipeline with a CUDA worker (``INFERLINE_EXECUTION_PROVIDER=cuda``): a burst
   of minilm requests through an embedded broker, a router and a worker, its
   throughput against CUDA's raw best, and the provider every response names.

Exits 0 when every check passed, 1 when one failed, 2 when there is no usable GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

if TYPE_CHECKING:
    # Imported where used: the check says why it cannot run before any of inferline loads.
    from pipeline.broker import EmbeddedBroker
    from pipeline.settings import Settings

CUDA = "CUDAExecutionProvider"
SIZES = (1, 8, 32, 128, 512)


def fail(code: int, msg: str) -> None:
    """Print why and exit."""
    print(f"gpu_check: FAIL: {msg}", flush=True)
    sys.exit(code)


def check_provider(model_path: Path, feeds: dict[str, Any]) -> dict[str, Any]:
    """A raw ORT session on CUDA: its providers and where the profiled nodes ran."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    if CUDA not in ort.get_available_providers():
        fail(2, f"onnxruntime {ort.__version__} has no {CUDA} "
                f"(available: {ort.get_available_providers()})")
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort-profile")
    sess = ort.InferenceSession(str(model_path), opts, providers=[CUDA, "CPUExecutionProvider"])
    providers = sess.get_providers()
    if providers[0] != CUDA:
        fail(2, f"the session fell back to {providers} (CUDA libraries missing?)")
    for _ in range(5):
        sess.run(None, feeds)
    time_by, nodes_by = node_time_by_provider(json.loads(Path(sess.end_profiling()).read_text()))
    total = sum(time_by.values())
    share = time_by[CUDA] / total if total else 0.0
    out = {"providers": providers, "node_time_us": dict(time_by), "nodes": dict(nodes_by),
           "cuda_time_share": share}
    print(f"gpu_check: session providers {providers}; profiled kernels: "
          + ", ".join(f"{p} {nodes_by[p]} nodes {time_by[p]} us" for p in time_by), flush=True)
    if not nodes_by[CUDA] or share < 0.5:
        fail(1, f"only {share:.0%} of the node time ran on {CUDA}: a silent CPU fallback")
    return out


def node_time_by_provider(events: list[dict[str, Any]]) -> tuple[Counter[str], Counter[str]]:
    """Kernel time (µs) and kernels run, per execution provider, from an ORT profile."""
    time_by: Counter[str] = Counter()
    nodes_by: Counter[str] = Counter()
    for ev in events:
        if ev.get("cat") != "Node" or not str(ev.get("name", "")).endswith("_kernel_time"):
            continue
        provider = ev.get("args", {}).get("provider", "?")
        time_by[provider] += int(ev.get("dur", 0))
        nodes_by[provider] += 1
    return time_by, nodes_by


def rows_per_s(session: Any, batch: dict[str, Any], n: int, min_s: float) -> float:
    """Rows per second of ``session.run`` on one batch of ``n`` rows."""
    session.run(batch)
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_s or runs < 3:
        session.run(batch)
        runs += 1
    return runs * n / elapsed


async def pipeline_burst(base: Settings, n: int, logs: Path,
                         broker: EmbeddedBroker | None = None) -> dict[str, Any]:
    """A minilm burst through a pipeline whose worker runs on ``base``'s provider.

    The router and the worker run as processes on ``broker``, or on an embedded
    broker of their own when it is None; their logs go to ``logs``, a folder. The
    check runs it with CUDA; the tests, on a machine without a GPU, with the CPU.
    """
    from bench.burst import run_burst
    from bench.suite import fleet, minilm_requests
    from pipeline.broker import EmbeddedBroker
    from pipeline.client import InferenceClient

    async with contextlib.AsyncExitStack() as stack:
        if broker is None:
            broker = await stack.enter_async_context(
                EmbeddedBroker(log_path=logs / "broker.log"))
        bootstrap = broker.bootstrap_servers
        s, _ = await stack.enter_async_context(
            fleet(base, bootstrap, ["minilm"], logs, broker.pid))
        client = await stack.enter_async_context(
            InferenceClient(s, bootstrap_servers=bootstrap, max_in_flight=n * 2))
        await run_burst(client, minilm_requests(min(n, 500), "warm"))
        burst = await run_burst(client, minilm_requests(n, "gpu"))
    return {"throughput_rps": burst.throughput_rps, "ok_share": burst.ok_share,
            "mean_batch_size": burst.mean_batch_size, "p50_ms": burst.p50_ms,
            "p99_ms": burst.p99_ms, "execution_providers": burst.execution_providers}


def main() -> int:
    """Run the three checks; print a summary and the JSON figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=os.environ.get("INFERLINE_MODEL_DIR"),
                   help="model store (default: a temp folder, built there)")
    p.add_argument("--seconds", type=float, default=1.0, help="per batch size and provider")
    p.add_argument("--requests", type=int, default=5000, help="pipeline burst size")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "gpu_check.json"))
    args = p.parse_args()

    from pipeline.modelstore import ensure_models
    from pipeline.registry import Registry
    from pipeline.session import ModelSession
    from pipeline.settings import Settings
    from pipeline.text import TextEncoder, sample_texts

    model_dir = Path(args.model_dir) if args.model_dir else Path(tempfile.mkdtemp()) / "models"
    ensure_models(model_dir)
    spec = Registry.load(model_dir / "registry.toml").resolve("minilm")
    res: dict[str, Any] = {}

    assert spec.tokenizer is not None
    encoder = TextEncoder.load(spec.tokenizer, max_seq_len=spec.max_seq_len,
                               sha256=spec.tokenizer_sha256)
    res["provider_check"] = check_provider(spec.path, dict(encoder.encode(sample_texts(32))))
    with ModelSession(spec, provider="cpu") as cpu_session:
        with ModelSession(spec, provider="cuda") as cuda_session:
            if cuda_session.execution_provider != CUDA:
                fail(2, f"the pipeline's ModelSession runs minilm on "
                        f"{cuda_session.execution_provider}: {cuda_session.fallback_reason}")
            table = {}
            for n in SIZES:
                batch = {"text": sample_texts(n)}
                gpu = rows_per_s(cuda_session, batch, n, args.seconds)
                cpu = rows_per_s(cpu_session, batch, n, args.seconds)
                table[str(n)] = {"cuda_rows_per_s": gpu, "cpu_rows_per_s": cpu,
                                 "cuda/cpu": gpu / cpu}
                print(f"gpu_check: minilm batch {n:>4}: CUDA {gpu:>10,.0f} rows/s, "
                      f"CPU {cpu:>8,.0f} rows/s, ratio CUDA/CPU {gpu / cpu:7.2f}", flush=True)
    res["minilm_by_batch"] = table
    best = max(v["cuda_rows_per_s"] for v in table.values())

    base = Settings(model_dir=model_dir, registry=None, bootstrap_servers=None,
                    execution_provider="cuda", state_dir=Path(tempfile.mkdtemp()))
    logs = ROOT / "bench" / "out" / "logs-gpu"
    logs.mkdir(parents=True, exist_ok=True)
    pipe = asyncio.run(pipeline_burst(base, args.requests, logs))
    res["pipeline_cuda"] = pipe
    ratio = pipe["throughput_rps"] / best
    print(f"gpu_check: pipeline with a CUDA worker: {pipe['throughput_rps']:,.0f} texts/s "
          f"(ok {pipe['ok_share']:.1%}, mean batch {pipe['mean_batch_size']:.1f}, providers "
          f"{pipe['execution_providers']}); ratio pipeline/raw CUDA best = {ratio:.3f}",
          flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    if pipe["execution_providers"] != [CUDA] or pipe["ok_share"] < 1.0:
        fail(1, f"pipeline responses name {pipe['execution_providers']}, "
                f"ok {pipe['ok_share']:.1%}")
    print(f"gpu_check: PASS; figures in {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
