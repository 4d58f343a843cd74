"""A naive Faust inference agent: the baseline the pipeline is compared against.

The straightforward way to serve a model from Kafka with Faust: one ``@app.agent``
over the requests topic, and per message parse the JSON, run ONNX Runtime once
(batch of one) and send the response to the request's ``reply_to``. No batching,
no batch consumer, no off-loop inference.

With ``NAIVE_ROLE`` the same file also gives the pipeline's topology, naively: a
``router`` process (per message: validate with the project's pydantic
``InferenceRequest``, forward the raw bytes to a lane topic) and a ``worker``
process (the per-message model agent above, on the lane topic instead of the
requests topic): three broker hops, like the pipeline.

Run by ``bench/baselines.py`` (for ``bench/throughput.py``) as
``python bench/naive_agent.py worker --without-web -l warn`` with:

- ``NAIVE_BROKER``: bootstrap servers (``host:port``)
- ``NAIVE_INPUT_TOPIC``: topic of the InferenceRequests (raw JSON bytes)
- ``NAIVE_MODEL_PATH``: the ONNX file (the digits model)
- ``NAIVE_APP_ID``: Faust app id, also its consumer group
- ``NAIVE_STATE_DIR``: Faust's data directory (optional; a temp folder otherwise)
- ``NAIVE_PARTITIONS``: partitions of topics Faust declares (default 4)
- ``NAIVE_HOURLY_USD``: cost per hour for ``cost_usd`` (default 0.1, the registry's)
- ``NAIVE_ROLE``: ``single`` (default: parse, run, reply on the input topic),
  ``router`` (validate the input topic's requests, forward them to the lane topic) or
  ``worker`` (parse, run, reply on the lane topic); give each its own ``NAIVE_APP_ID``
- ``NAIVE_LANE_TOPIC``: the lane topic of ``router`` and ``worker``
  (default ``naive.lane.digits.normal``)
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from typing import Any

import faust
import numpy as np
import onnxruntime as ort
import orjson

BROKER = os.environ.get("NAIVE_BROKER", "127.0.0.1:9092")
INPUT_TOPIC = os.environ.get("NAIVE_INPUT_TOPIC", "naive.requests")
MODEL_PATH = os.environ.get("NAIVE_MODEL_PATH", "model.onnx")
APP_ID = os.environ.get("NAIVE_APP_ID", "naive-agent")
STATE_DIR = os.environ.get("NAIVE_STATE_DIR") or tempfile.mkdtemp(prefix="naive-agent-")
PARTITIONS = int(os.environ.get("NAIVE_PARTITIONS", "4"))
HOURLY_USD = float(os.environ.get("NAIVE_HOURLY_USD", "0.1"))
ROLE = os.environ.get("NAIVE_ROLE", "single")
LANE_TOPIC = os.environ.get("NAIVE_LANE_TOPIC", "naive.lane.digits.normal")
if ROLE not in ("single", "router", "worker"):
    raise SystemExit(f"NAIVE_ROLE must be single, router or worker, not {ROLE!r}")

DATATYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}
OUT_DATATYPES = {
    np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64",
    np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32",
}

app = faust.App(
    APP_ID,
    broker=f"kafka://{BROKER}",
    key_serializer="raw",
    value_serializer="raw",
    web_enabled=False,
    datadir=STATE_DIR,
    topic_partitions=PARTITIONS,
    consumer_auto_offset_reset="earliest",
    # The embedded broker rebalances slowly with Faust's defaults.
    broker_session_timeout=3.0,
    broker_rebalance_timeout=3.0,
    broker_heartbeat_interval=0.3,
)
requests_topic = app.topic(INPUT_TOPIC, key_serializer="raw", value_serializer="raw")
lane_topic = app.topic(LANE_TOPIC, key_serializer="raw", value_serializer="raw")

PROVIDER: str | None = None
INPUT_NAMES: list[str] = []
OUTPUT_NAMES: list[str] = []
if ROLE != "router":
    # One intra-op thread: a single 64-feature row gains nothing from more, and idle
    # pool threads would only compete with the broker and the client for the cores.
    _opts = ort.SessionOptions()
    _opts.intra_op_num_threads = 1
    session = ort.InferenceSession(MODEL_PATH, _opts, providers=["CPUExecutionProvider"])
    PROVIDER = session.get_providers()[0]
    INPUT_NAMES = [i.name for i in session.get_inputs()]
    OUTPUT_NAMES = [o.name for o in session.get_outputs()]
WORKER = f"{APP_ID}@{os.getpid()}"

_reply_topics: dict[str, Any] = {}


def _reply_topic(name: str) -> Any:
    topic = _reply_topics.get(name)
    if topic is None:
        topic = _reply_topics[name] = app.topic(name, key_serializer="raw", value_serializer="raw")
    return topic


def _error(req: dict[str, Any], code: str, message: str) -> dict[str, Any]:
    return {
        "id": str(req.get("id", "")), "model": str(req.get("model", "")),
        "version": req.get("version"), "status": "error", "outputs": [],
        "error": {"code": code, "message": message}, "timing": None, "batch_size": 0,
        "cost_usd": 0.0, "worker": WORKER, "execution_provider": PROVIDER,
    }


def infer(req: dict[str, Any], record_ts_ms: float, received_ms: float) -> dict[str, Any]:
    """The response to one parsed request: one ONNX Runtime run of its inputs."""
    feeds: dict[str, np.ndarray[Any, Any]] = {}
    for tensor in req.get("inputs", []):
        dtype = DATATYPES.get(tensor.get("datatype"))
        if dtype is None or tensor.get("name") not in INPUT_NAMES:
            return _error(req, "INVALID_INPUT", f"unsupported input {tensor.get('name')!r}")
        feeds[tensor["name"]] = np.asarray(tensor["data"], dtype=dtype).reshape(tensor["shape"])
    start = time.perf_counter()
    results = session.run(OUTPUT_NAMES, feeds)
    compute_s = time.perf_counter() - start
    outputs = [
        {"name": name, "shape": list(arr.shape),
         "datatype": OUT_DATATYPES.get(arr.dtype, "FP32"), "data": arr.ravel().tolist()}
        for name, arr in zip(OUTPUT_NAMES, results, strict=True)
    ]
    now_ms = time.time() * 1000
    return {
        "id": req["id"], "model": req.get("model", ""), "version": req.get("version") or "1",
        "status": "ok", "outputs": outputs, "error": None,
        "timing": {
            "queue_ms": max(received_ms - record_ts_ms, 0.0), "batch_wait_ms": 0.0,
            "compute_ms": compute_s * 1000, "total_ms": now_ms - record_ts_ms,
        },
        "batch_size": 1, "cost_usd": HOURLY_USD / 3600 * compute_s, "worker": WORKER,
        "execution_provider": PROVIDER,
    }


async def serve(stream: Any) -> None:
    """Per message: parse, run the model once, send the response to reply_to."""
    async for event in stream.events():
        received_ms = time.time() * 1000
        try:
            req = orjson.loads(event.value)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(req, dict) or not req.get("id") or not req.get("reply_to"):
            continue
        # Faust's message timestamps are in seconds.
        record_ts_ms = float(event.message.timestamp) * 1000
        try:
            resp = infer(req, record_ts_ms, received_ms)
        except Exception as exc:
            resp = _error(req, "INTERNAL", repr(exc))
        await _reply_topic(req["reply_to"]).send(
            key=str(req["id"]).encode(), value=orjson.dumps(resp)
        )


async def route(stream: Any) -> None:
    """Per message: validate the request, forward its raw bytes to the lane topic."""
    # The repo root is importable: the bench puts it on the children's PYTHONPATH.
    from schemas import InferenceRequest

    async for event in stream.events():
        value = event.value
        try:
            InferenceRequest.model_validate_json(value)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            try:
                req = orjson.loads(value)
            except orjson.JSONDecodeError:
                continue
            if isinstance(req, dict) and isinstance(req.get("reply_to"), str):
                resp = _error(req, "INVALID_REQUEST", str(exc))
                await _reply_topic(req["reply_to"]).send(
                    key=str(req.get("id", "")).encode(), value=orjson.dumps(resp)
                )
            continue
        await lane_topic.send(key=event.key, value=value)


# Agents are registered by role: the single agent and the worker are the same code.
if ROLE == "router":
    app.agent(requests_topic)(route)
else:
    app.agent(lane_topic if ROLE == "worker" else requests_topic)(serve)


if __name__ == "__main__":
    # The collector settings `inferline serve` uses, so that they are not the difference.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    app.main()
