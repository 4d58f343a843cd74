"""Ray Serve baseline: the same ONNX model behind ``@serve.batch``, over HTTP.

Run by ``python -m bench`` as its own process (so Ray's processes and threads stay
out of the benchmark's)::

    python bench/ray_serve_app.py --registry R --model digits --port P \
        --max-batch-size 64 --batch-wait-ms 4 --intra-op-threads 2

It starts a local Ray instance (no dashboard, no usage reporting), deploys one
replica that loads the model with the pipeline's own :class:`ModelSession` (same
ONNX Runtime options and intra-op threads as the pipeline's worker) and answers
``POST /{model}`` with the body of an InferenceRequest (OIP v2 JSON, one row),
decoded and encoded with the pipeline's codec. Requests are grouped by
``@serve.batch(max_batch_size, batch_wait_timeout_s)``, the batch runs in a thread
so the replica keeps accepting requests meanwhile. It prints ``READY <port>`` once
a request has been answered, and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from typing import Any  # noqa: E402


def build_app(registry: str, model: str, max_batch_size: int, batch_wait_ms: float,
              intra_op_threads: int, max_ongoing_requests: int) -> Any:
    """The Ray Serve application of one model."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    @serve.deployment(
        num_replicas=1,
        # Ray Serve's default (5 at a time) would cap every batch at 5 requests.
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    )
    class OnnxModel:
        def __init__(self) -> None:
            import numpy as np
            import orjson

            from pipeline.codec import decode, encode
            from pipeline.registry import Registry
            from pipeline.session import ModelSession

            self.np, self.orjson, self.decode, self.encode = np, orjson, decode, encode
            spec = Registry.load(Path(registry)).resolve(model)
            self.spec = spec
            self.session = ModelSession(spec, provider="cpu", intra_op_threads=intra_op_threads)
            self.session.load()
            self.session.warmup()
            self.input_name = spec.inputs[0].name

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_ms / 1000)
        async def infer(self, rows: list[Any]) -> list[bytes]:
            np = self.np
            batch = np.concatenate(rows, axis=0)
            outputs = await asyncio.to_thread(self.session.run, {self.input_name: batch})
            start = 0
            bodies: list[bytes] = []
            for row in rows:
                n = row.shape[0]
                bodies.append(self.orjson.dumps({
                    "model": model, "status": "ok", "batch_size": len(rows),
                    "outputs": [self.encode(name, arr[start:start + n])
                                for name, arr in outputs.items()],
                }, option=self.orjson.OPT_SERIALIZE_NUMPY))
                start += n
            return bodies

        async def __call__(self, request: Request) -> Response:
            req = self.orjson.loads(await request.body())
            t = next(t for t in req["inputs"] if t["name"] == self.input_name)
            row = self.decode(t["name"], t["datatype"], t["shape"], t["data"],
                              t.get("parameters"))
            body = await self.infer(row)
            return Response(body, media_type="application/json")

    return OnnxModel.bind()  # type: ignore[attr-defined]  # bind comes with @serve.deployment


def main() -> int:
    """Serve until signalled."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--registry", required=True)
    p.add_argument("--model", default="digits")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-batch-size", type=int, required=True)
    p.add_argument("--batch-wait-ms", type=float, required=True)
    p.add_argument("--intra-op-threads", type=int, default=0)
    p.add_argument("--max-ongoing-requests", type=int, default=1024)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    p.add_argument("--probe", required=True, help="a request body to probe readiness with")
    args = p.parse_args()

    import ray
    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 1024 * 1024, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build_app(args.registry, args.model, args.max_batch_size, args.batch_wait_ms,
                            args.intra_op_threads, args.max_ongoing_requests),
                  name=args.model, route_prefix=f"/{args.model}")
        url = f"http://127.0.0.1:{args.port}/{args.model}"
        body = Path(args.probe).read_bytes()
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        print(f"READY {args.port}", flush=True)
        stop.wait()
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
