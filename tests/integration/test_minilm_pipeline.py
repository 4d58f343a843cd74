"""minilm end to end: text requests through the router and worker processes of the session.

The embeddings that come back are compared with ``tests/data/minilm_reference.json``,
computed by an independent implementation (transformers' BertModel in float64) from
the same weights.
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.client import InferenceClient
from pipeline.registry import Registry
from tests.integration.conftest import Pipeline

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "minilm_reference.json"


def _reference() -> dict[str, Any]:
    ref: dict[str, Any] = json.loads(REFERENCE.read_text(encoding="utf-8"))
    return ref


def _text_request(texts: list[str], rid: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": rid,
        "model": "minilm",
        "inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}],
        **extra,
    }


def _embedding(resp: Any) -> np.ndarray[Any, Any]:
    assert resp.status == "ok", resp
    (out,) = resp.outputs
    assert out.name == "embedding" and out.datatype == "FP32"
    return np.asarray(out.data, dtype=np.float64).reshape(out.shape)


def _cos(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


async def test_minilm_text_requests_match_the_reference(
    pipeline: Pipeline, client: InferenceClient
) -> None:
    ref = _reference()
    texts, expected = ref["sentences"], np.asarray(ref["embeddings"])
    registry = Registry.load(pipeline.settings.registry_path)
    assert registry.entries["minilm"].default_version == "1"
    tag = uuid.uuid4().hex[:8]
    # One request per text (so the worker batches them together, padded to the longest),
    # to the default version and, explicitly, to the int8 version 2.
    requests = [_text_request([t], f"ml-{tag}-{i}") for i, t in enumerate(texts)]
    requests += [
        _text_request([t], f"ml2-{tag}-{i}", version="2") for i, t in enumerate(texts)
    ]
    responses = await client.infer_many(requests, wait_timeout_ms=60_000)
    v1, v2 = responses[: len(texts)], responses[len(texts):]
    assert {(r.model, r.version) for r in v1} == {("minilm", "1")}
    assert {(r.model, r.version) for r in v2} == {("minilm", "2")}
    got1 = np.concatenate([_embedding(r) for r in v1])
    got2 = np.concatenate([_embedding(r) for r in v2])
    assert got1.shape == got2.shape == (len(texts), 384)
    assert _cos(got1, expected).min() >= 0.9999
    cos2 = _cos(got2, expected)
    assert cos2.min() >= 0.97 and cos2.mean() >= 0.99, cos2
    assert all(r.cost_usd > 0 and r.batch_size >= 1 for r in responses)
    # The worker batched the burst: some responses came from batches of several rows.
    assert max(r.batch_size for r in responses) > 1


async def test_minilm_multi_row_request(pipeline: Pipeline, client: InferenceClient) -> None:
    ref = _reference()
    idx = [0, 11, 12, 13, 20]  # ASCII, accents, CJK, emoji, a long paragraph
    resp = await client.infer(
        "minilm", [_text_request([ref["sentences"][i] for i in idx], "unused")["inputs"][0]],
        wait_timeout_ms=60_000,
    )
    got = _embedding(resp)
    assert got.shape == (len(idx), 384)
    assert _cos(got, np.asarray(ref["embeddings"])[idx]).min() >= 0.9999


async def test_minilm_refuses_text_that_is_not_utf8(
    pipeline: Pipeline, client: InferenceClient
) -> None:
    rid = f"ml-bad-{uuid.uuid4().hex[:8]}"
    bad = base64.b64encode(b"\xc3\x28 broken").decode()
    request = _text_request([bad], rid)
    request["inputs"][0]["parameters"] = {"content_type": "base64"}
    (resp,) = await client.infer_many([request], wait_timeout_ms=30_000)
    assert resp.status == "error" and resp.error is not None
    assert resp.error.code == "INVALID_INPUT"
    assert "not valid UTF-8" in resp.error.message
