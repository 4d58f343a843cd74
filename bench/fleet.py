"""The model fleet: minilm's versions, warm-up, pipeline overhead, and worker pools.

``python bench/fleet.py [--quick] [--threads T] [--model-dir DIR]`` builds the
models (digits and minilm v1 fp32 / v2 int8), starts one embedded broker and
prints four figures, each a ratio against a baseline measured in the same run:

a. int8 / fp32 throughput of minilm in-process (``ModelSession.run``, tokenizing
   included, same intra-op threads, batches of 32 mixed-length texts, the runs of
   the two versions interleaved), and their agreement (mean / min cosine);
b. cold / warm first-request latency: a fresh session's first one-text request
   without warm-up against the first one after ``warmup()``;
c. end-to-end minilm throughput through the real pipeline (router and worker
   processes, embedded broker, bursts of one-text requests) over raw ONNX
   Runtime at its best batch size in-process with the same intra-op threads,
   measured with no pipeline running before and after (target >= 0.9); also the
   median ratio against raw runs interleaved with the bursts (pipeline idle),
   and the CPU per text of raw, of the worker and of all pipeline processes. It
   runs at the CPU count's threads and at ``--also-threads`` (default 1);
d. a mixed digits + minilm open-loop workload on two worker processes arranged
   as separate pools (registry ``pool``: ``digits`` and ``text``, one worker each,
   ``inferline serve --role worker --pool NAME``) against one shared pool (both
   workers serve both models in one consumer group): digits and minilm p99.

Results also go to ``bench/out/fleet.json``.
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
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import AsyncIterator, Sequence  # noqa: E402
from dataclasses import asdict  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from agents.processes import ServeProcess  # noqa: E402
from agents.serve import prepare_topics  # noqa: E402
from bench import prepare_process  # noqa: E402
from bench.burst import BenchError, CpuMeter, run_burst  # noqa: E402
from bench.loadgen import open_loop, pipeline_sender  # noqa: E402
from bench.results import ratio  # noqa: E402
from pipeline.broker import EmbeddedBroker  # noqa: E402
from pipeline.client import InferenceClient  # noqa: E402
from pipeline.modelstore import ensure_models, load_heldout, write_registry  # noqa: E402
from pipeline.registry import ModelVersion, Registry  # noqa: E402
from pipeline.session import ModelSession  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from pipeline.text import WARMUP_TEXTS, TextEncoder, sample_texts  # noqa: E402

OUT = ROOT / "bench" / "out" / "fleet.json"
REFERENCE = ROOT / "tests" / "data" / "minilm_reference.json"
RAW_BATCH_SIZES = (16, 32, 64, 128)


def step(msg: str) -> None:
    """One progress line."""
    print(f"[fleet] {msg}", flush=True)


def texts_input(n: int, offset: int) -> dict[str, Any]:
    """``n`` sample texts from ``offset`` on: mixed lengths, as the requests have."""
    return {"text": sample_texts(n, offset=offset)}


def text_request(i: int, tag: str) -> dict[str, Any]:
    """One single-text minilm request; texts cycle through the same samples."""
    text = WARMUP_TEXTS[i % len(WARMUP_TEXTS)]
    return {"id": f"{tag}-{i}", "model": "minilm",
            "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}


def digits_request(x: np.ndarray[Any, Any], i: int, tag: str) -> dict[str, Any]:
    """One single-row digits request over the held-out rows."""
    return {"id": f"{tag}-{i}", "model": "digits",
            "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                        "data": x[i % len(x)].tolist()}]}


# --------------------------------------------------------------------------- a. int8 vs fp32


def int8_vs_fp32(registry: Registry, threads: int, seconds: float) -> dict[str, Any]:
    """Texts/s of both minilm versions at batch 32, runs interleaved; their agreement."""
    sessions = {v: ModelSession(registry.resolve("minilm", v), provider="cpu",
                                intra_op_threads=threads) for v in ("1", "2")}
    try:
        for s in sessions.values():
            s.load()
            s.warmup()
        batches = [texts_input(32, 32 * k) for k in range(6)]
        elapsed = dict.fromkeys(sessions, 0.0)
        rows = dict.fromkeys(sessions, 0)
        start = time.perf_counter()
        i = 0
        # Alternating runs share whatever else the machine is doing at the time.
        while time.perf_counter() - start < 2 * seconds or i < 6:
            for v, s in sessions.items():
                t0 = time.perf_counter()
                s.run(batches[i % len(batches)])
                elapsed[v] += time.perf_counter() - t0
                rows[v] += 32
            i += 1
        rate = {v: rows[v] / elapsed[v] for v in sessions}
        reference = json.loads(REFERENCE.read_text(encoding="utf-8"))["sentences"]
        texts = np.array([t.encode() for t in [*reference, *WARMUP_TEXTS]], dtype=object)
        emb = {v: s.run({"text": texts})["embedding"] for v, s in sessions.items()}
        cos = np.sum(emb["1"] * emb["2"], axis=1) / (
            np.linalg.norm(emb["1"], axis=1) * np.linalg.norm(emb["2"], axis=1))
    finally:
        for s in sessions.values():
            s.close()
    return {"fp32_texts_per_s": rate["1"], "int8_texts_per_s": rate["2"],
            "ratio": ratio(rate["2"], rate["1"]), "texts_compared": len(texts),
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


# --------------------------------------------------------------------------- b. cold vs warm


def cold_vs_warm(spec: ModelVersion, request: dict[str, Any], threads: int,
                 repeats: int, label: str) -> dict[str, Any]:
    """First-request latency of fresh sessions, without and after warm-up (medians)."""
    cold: list[float] = []
    warm: list[float] = []
    for _ in range(repeats):
        for target, do_warm in ((cold, False), (warm, True)):
            with ModelSession(spec, provider="cpu", intra_op_threads=threads) as s:
                if do_warm:
                    s.warmup()
                t0 = time.perf_counter()
                s.run(request)
                target.append((time.perf_counter() - t0) * 1000)
    c, w = statistics.median(cold), statistics.median(warm)
    return {"model": spec.key, "request": label, "cold_ms": c, "warm_ms": w,
            "ratio": ratio(c, w), "repeats": repeats}


# --------------------------------------------------------------------------- c. raw vs pipeline


def raw_minilm(spec: ModelVersion, threads: int, seconds: float,
               sizes: Sequence[int] = RAW_BATCH_SIZES) -> dict[str, Any]:
    """Texts/s and CPU ms/text of ``ModelSession.run`` (tokenizing included) per batch size.

    Also texts/s of ONNX Runtime alone on the same batches tokenized beforehand.
    """
    per: dict[str, float] = {}
    cpu: dict[str, float] = {}
    ort_only: dict[str, float] = {}
    assert spec.tokenizer is not None
    encoder = TextEncoder.load(spec.tokenizer, max_seq_len=spec.max_seq_len)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(spec.path), opts, providers=["CPUExecutionProvider"])
    with ModelSession(spec, provider="cpu", intra_op_threads=threads) as session:
        session.warmup()
        for n in sizes:
            inputs = [texts_input(n, k * n) for k in range(12)]
            chunks = [encoder.encode_chunks(b["text"]) for b in inputs]
            runs, t0, c0 = 0, time.perf_counter(), time.process_time()
            while (elapsed := time.perf_counter() - t0) < seconds or runs < 3:
                session.run(inputs[runs % len(inputs)])
                runs += 1
            per[str(n)] = runs * n / elapsed
            cpu[str(n)] = (time.process_time() - c0) / (runs * n) * 1000
            runs, t0 = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < seconds / 2 or runs < 3:
                for _, feeds in chunks[runs % len(chunks)]:
                    sess.run(["embedding"], feeds)
                runs += 1
            ort_only[str(n)] = runs * n / elapsed
    best = max(per, key=lambda k: per[k])
    return {"texts_per_s_by_batch": per, "cpu_ms_per_text_by_batch": cpu,
            "best_batch_size": int(best), "best_texts_per_s": per[best],
            "ort_only_texts_per_s_by_batch": ort_only, "intra_op_threads": threads}


@contextlib.asynccontextmanager
async def running(
    s: Settings, bootstrap: str, workers: list[tuple[str, Settings]], logs: Path,
    probes: dict[str, dict[str, Any]],
) -> AsyncIterator[list[ServeProcess]]:
    """A router and the given worker processes, ready to answer every probed model."""
    await prepare_topics(s, bootstrap, list(probes))
    procs = [ServeProcess(s, bootstrap, "router", worker_id="fleet-router",
                          log_path=logs / "router.log")]
    procs += [ServeProcess(ws, bootstrap, "worker", worker_id=f"fleet-{name}",
                           log_path=logs / f"{name}.log") for name, ws in workers]
    try:
        for p in procs:
            await p.start()
        async with InferenceClient(s, bootstrap_servers=bootstrap) as client:
            for model, probe in probes.items():
                try:
                    await client.wait_until_served(model, probe, timeout_ms=180_000)
                except Exception as exc:
                    tails = "\n".join(f"--- {p.role}:\n{p.tail()}" for p in procs)
                    raise BenchError(f"not serving {model}: {exc}\n{tails}") from exc
        yield procs
    finally:
        for p in procs:
            await p.stop()


def _settings(base: Settings, **update: Any) -> Settings:
    return base.model_copy(update={"topic_prefix": f"fleet-{uuid.uuid4().hex[:8]}", **update})


async def pipeline_vs_raw(base: Settings, bootstrap: str, logs: Path, spec: ModelVersion,
                          threads: int, n: int, rounds: int, seconds: float,
                          broker_pid: int | None) -> dict[str, Any]:
    """minilm through a router and a minilm-only worker against raw ONNX Runtime.

    Raw is swept over batch sizes with no pipeline running, then, with the pipeline
    up (idle between bursts), ``rounds`` times: raw at the best batch size, then a
    burst of ``n`` one-text requests. Raw runs once more after the pipeline stops.
    """
    out: dict[str, Any] = {"threads": threads}
    out["raw_sweep"] = await asyncio.to_thread(raw_minilm, spec, threads, seconds)
    best = out["raw_sweep"]["best_batch_size"]
    s = _settings(base, intra_op_threads=threads)
    probe = {"minilm": {"text": sample_texts(1)}}
    bursts: list[dict[str, Any]] = []
    raw_idle: list[float] = []
    async with running(s, bootstrap, [("worker", s)], logs, probe) as procs:
        pids = {"bench_client": None, "broker": broker_pid,
                **{p.role: p.proc.pid if p.proc else None for p in procs}}
        async with InferenceClient(s, bootstrap_servers=bootstrap,
                                   max_in_flight=n * 2) as client:
            await run_burst(client, [text_request(i, "warm") for i in range(n // 4)])
            meter = CpuMeter(pids)
            meter.start()
            await asyncio.sleep(3.0)
            idle, _ = meter.stop()
            out["pipeline_idle_cores"] = {k: v / 3.0 for k, v in idle.items()}
            for r in range(rounds):
                again = await asyncio.to_thread(raw_minilm, spec, threads, seconds, (best,))
                raw_idle.append(again["best_texts_per_s"])
                burst = await run_burst(
                    client, [text_request(i, f"m{r}") for i in range(n)], CpuMeter(pids))
                bursts.append(asdict(burst))
    after = await asyncio.to_thread(raw_minilm, spec, threads, seconds, (best,))
    out["raw_after_texts_per_s"] = after["best_texts_per_s"]
    out["raw_idle_pipeline_texts_per_s"] = raw_idle
    out["bursts"] = bursts
    rates = [b["throughput_rps"] for b in bursts]
    out["pipeline_texts_per_s"] = statistics.median(rates)
    strict = (out["raw_sweep"]["best_texts_per_s"] + after["best_texts_per_s"]) / 2
    out["raw_texts_per_s"] = strict
    out["ratio_strict"] = ratio(out["pipeline_texts_per_s"], strict)
    out["ratio_interleaved"] = statistics.median(
        ratio(b, r) for b, r in zip(rates, raw_idle, strict=True))
    raw_cpu = out["raw_sweep"]["cpu_ms_per_text_by_batch"][str(best)]
    worker_cpu = statistics.median(b["cpu_us_per_request"].get("worker", 0) for b in bursts)
    all_cpu = statistics.median(sum(b["cpu_us_per_request"].values()) for b in bursts)
    out["cpu_ms_per_text"] = {"raw": raw_cpu, "worker": worker_cpu / 1000,
                              "pipeline_all_processes": all_cpu / 1000}
    return out


# --------------------------------------------------------------------------- d. pools


async def mixed_load(
    base: Settings, bootstrap: str, logs: Path, x: np.ndarray[Any, Any], *, separate: bool,
    digits_rps: float, text_rps: float, seconds: float,
) -> dict[str, Any]:
    """Digits and minilm open loop at once on two worker processes."""
    registry = Registry.load(base.registry_path)
    s = _settings(base)
    if separate:
        pools = {"digits": "digits", "minilm": "text"}
        entries = [
            e.model_copy(update={"versions": tuple(
                v.model_copy(update={"pool": pools[e.name]}) for v in e.versions)})
            for e in registry.entries.values()
        ]
        folder = Path(tempfile.mkdtemp(prefix="fleet-pools-", dir=base.state_dir))
        s = s.model_copy(update={"registry": write_registry(folder, entries)})
        workers = [(f"pool-{p}", s.model_copy(update={"pool": p})) for p in pools.values()]
    else:
        workers = [(f"shared-{i}", s.model_copy(update={"pool": "default"})) for i in (1, 2)]
    probes = {"digits": {"input": x[:1]}, "minilm": {"text": sample_texts(1)}}
    async with running(s, bootstrap, workers, logs / ("separate" if separate else "shared"),
                       probes):
        async with InferenceClient(s, bootstrap_servers=bootstrap,
                                   max_in_flight=int((digits_rps + text_rps) * seconds * 2)
                                   ) as client:
            tag = uuid.uuid4().hex[:6]
            d_send = pipeline_sender(client, lambda i: digits_request(x, i, f"d{tag}"))
            m_send = pipeline_sender(client, lambda i: text_request(i, f"m{tag}"))
            d, m = await asyncio.gather(
                open_loop(d_send, rate=digits_rps, seconds=seconds, drain_s=30),
                open_loop(m_send, rate=text_rps, seconds=seconds, drain_s=30),
            )
    return {"arrangement": "separate pools" if separate else "one shared pool",
            "workers": [name for name, _ in workers], "digits": asdict(d), "minilm": asdict(m)}


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement on one broker; returns the results."""
    q = args.quick
    threads = args.threads or (os.cpu_count() or 1)
    seconds = 0.5 if q else 1.5
    tmp = Path(tempfile.mkdtemp(prefix="inferline-fleet-"))
    try:
        model_dir = Path(args.model_dir) if args.model_dir else tmp / "models"
        logs = OUT.parent / "logs-fleet"
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir(parents=True, exist_ok=True)
        base = Settings(model_dir=model_dir, registry=None, state_dir=tmp / "state",
                        bootstrap_servers=None, intra_op_threads=threads,
                        session_timeout_ms=3000, rebalance_timeout_ms=3000,
                        heartbeat_interval_ms=300)
        started = time.perf_counter()
        built = await asyncio.to_thread(ensure_models, model_dir)
        step(f"models in {model_dir}: built {len(built)} versions in "
             f"{time.perf_counter() - started:.1f}s")
        registry = Registry.load(base.registry_path)
        res: dict[str, Any] = {"intra_op_threads": threads, "quick": q,
                               "loadavg_start": list(os.getloadavg())}

        step(f"a. minilm int8 vs fp32 in-process, batch 32, {threads} intra-op threads")
        res["a"] = await asyncio.to_thread(int8_vs_fp32, registry, threads, seconds * 3)

        step("b. cold vs warm first request")
        x, _ = load_heldout(model_dir)
        requests = [
            ("minilm", "one text", {"text": np.array([WARMUP_TEXTS[2].encode()], dtype=object)}),
            ("minilm", "32 texts", texts_input(32, 5)),
            ("digits", "one row", {"input": x[:1]}),
        ]
        res["b"] = []
        for model, label, request in requests:
            for spec_b in registry.entries[model].versions:
                res["b"].append(await asyncio.to_thread(
                    cold_vs_warm, spec_b, request, threads, 3 if q else 5, label))

        spec = registry.resolve("minilm", "1")
        async with EmbeddedBroker(log_path=logs / "broker.log") as broker:
            bootstrap = broker.bootstrap_servers
            n, rounds = (300, 2) if q else (800, 3)
            res["c"] = []
            for t in dict.fromkeys((threads, *args.also_threads)):
                step(f"c. minilm:1 raw ONNX Runtime vs pipeline, {t} intra-op threads: "
                     f"{rounds} rounds of {n} one-text requests")
                res["c"].append(await pipeline_vs_raw(
                    base, bootstrap, logs / f"c{t}", spec, t, n, rounds, seconds, broker.pid))
            capacity = res["c"][0]["pipeline_texts_per_s"]
            d_seconds = 6.0 if q else 12.0
            rates = {"digits_rps": 300.0, "text_rps": max(5.0, round(capacity * 0.3))}
            res["d_rates"] = rates
            for separate in (False, True):
                step(f"d. mixed load, {'separate pools' if separate else 'one shared pool'}: "
                     f"digits {rates['digits_rps']:.0f}/s + minilm {rates['text_rps']:.0f}/s "
                     f"for {d_seconds:.0f}s")
                res["d_separate" if separate else "d_shared"] = await mixed_load(
                    base, bootstrap, logs / "d", x, separate=separate, seconds=d_seconds,
                    **rates)
        res["loadavg_end"] = list(os.getloadavg())
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(res: dict[str, Any]) -> None:
    """The figures, each as a ratio against its baseline from the same run."""
    a = res["a"]
    print()
    print(f"a. minilm in-process, batch 32, {res['intra_op_threads']} threads: fp32 "
          f"{a['fp32_texts_per_s']:,.0f} texts/s, int8 {a['int8_texts_per_s']:,.0f} texts/s")
    print(f"   ratio int8/fp32 throughput = {a['ratio']:.2f}; agreement over "
          f"{a['texts_compared']} texts: mean cosine {a['cosine_mean']:.4f}, "
          f"min {a['cosine_min']:.4f}")
    for b in res["b"]:
        print(f"b. {b['model']} first request ({b['request']}): cold {b['cold_ms']:.1f} ms, "
              f"after warm-up "
              f"{b['warm_ms']:.1f} ms (median of {b['repeats']}): ratio cold/warm = "
              f"{b['ratio']:.1f}")
    for c in res["c"]:
        sweep = c["raw_sweep"]
        best = sweep["best_batch_size"]
        by_batch = ", ".join(f"{k}: {v:,.0f}" for k, v in sweep["texts_per_s_by_batch"].items())
        ort_only = ", ".join(
            f"{k}: {v:,.0f}" for k, v in sweep["ort_only_texts_per_s_by_batch"].items())
        print(f"c. [{c['threads']} intra-op threads] raw minilm:1 texts/s by batch: {by_batch} "
              f"(ONNX Runtime alone on pre-tokenized batches: {ort_only})")
        rates = ", ".join(f"{b['throughput_rps']:,.0f}" for b in c["bursts"])
        batches = ", ".join(f"{b['mean_batch_size']:.1f}" for b in c["bursts"])
        idle = " ".join(f"{k}={v:.2f}" for k, v in c["pipeline_idle_cores"].items())
        cpu = c["cpu_ms_per_text"]
        print(f"   pipeline bursts {rates} texts/s (mean batch {batches}); raw at batch {best}: "
              f"{c['raw_texts_per_s']:,.0f} texts/s with no pipeline running (mean of "
              f"{sweep['best_texts_per_s']:,.0f} before and {c['raw_after_texts_per_s']:,.0f} "
              "after), " + ", ".join(f"{v:,.0f}" for v in c["raw_idle_pipeline_texts_per_s"])
              + " between bursts")
        print(f"   CPU ms per text: raw {cpu['raw']:.2f}, worker process {cpu['worker']:.2f}, "
              f"all pipeline processes {cpu['pipeline_all_processes']:.2f}; idle pipeline "
              f"cores: {idle}")
        print(f"   ratio pipeline/raw_onnxruntime_best_batch = {c['ratio_strict']:.3f} "
              f"(target >= 0.9); interleaved with raw runs = {c['ratio_interleaved']:.3f}; "
              f"CPU efficiency raw/worker = {ratio(cpu['raw'], cpu['worker']):.2f}")
    sh, se = res["d_shared"], res["d_separate"]
    for row in (sh, se):
        d, m = row["digits"], row["minilm"]
        print(f"d. {row['arrangement']} ({', '.join(row['workers'])}): digits ok {d['ok']}/"
              f"{d['sent']} p50 {d['p50_ms']:.0f} p99 {d['p99_ms']:.0f} ms; minilm ok "
              f"{m['ok']}/{m['sent']} p50 {m['p50_ms']:.0f} p99 {m['p99_ms']:.0f} ms, "
              f"mean batch {m['mean_batch_size']:.1f}")
    ok_se = se["digits"]["ok"] + se["minilm"]["ok"]
    ok_sh = sh["digits"]["ok"] + sh["minilm"]["ok"]
    print(f"   ratio separate/shared digits p99 = "
          f"{ratio(se['digits']['p99_ms'], sh['digits']['p99_ms']):.2f}; minilm p99 = "
          f"{ratio(se['minilm']['p99_ms'], sh['minilm']['p99_ms']):.2f}; ok answers = "
          f"{ratio(ok_se, ok_sh):.2f}")
    print(f"load average {res['loadavg_start'][0]:.1f} at start, {res['loadavg_end'][0]:.1f} "
          "at end (other processes share this machine)", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="shorter runs (about a third)")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads, raw and pipeline alike (default: CPU count)")
    p.add_argument("--also-threads", type=int, nargs="*", default=[1],
                   help="further intra-op thread counts for (c) (default: 1)")
    p.add_argument("--model-dir", default=None, help="model store to build into or reuse")
    args = p.parse_args(argv)
    prepare_process()
    try:
        res = asyncio.run(run(args))
    except BenchError as exc:
        print(f"fleet benchmark failed: {exc}", file=sys.stderr)
        return 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2, allow_nan=True) + "\n")
    report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
