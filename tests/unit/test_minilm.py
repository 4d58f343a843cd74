"""The minilm model: the hand-built ONNX graphs against an independent reference.

``tests/data/minilm_reference.json`` holds embeddings of varied texts computed by
``bench/minilm_reference.py`` with transformers' BertModel in float64 and the
pure-Python WordPiece tokenizer, from the same weights. Here the texts go the way
requests go: a JSON request, the codec's BYTES decoding, the session's tokenizer
and ONNX Runtime.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from pipeline import codec, minilm
from pipeline.batcher import DynamicBatcher
from pipeline.errors import InvalidInput, ModelLoadError, RegistryError
from pipeline.modelstore import (
    build_minilm,
    ensure_models,
    render_registry,
    sha256_file,
)
from pipeline.registry import Registry
from pipeline.session import ModelSession, representative_input
from pipeline.text import WARMUP_TEXTS, TextEncoder, as_texts, check_utf8
from pipeline.validation import decode_inputs, parse_request

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "minilm_reference.json"
# The reference is float64; the fp32 graph differs only by float32 rounding.
MIN_FP32_COSINE = 0.9999
# Dynamic int8 (activations quantized per batch): measured min ~0.978, mean ~0.994.
MIN_INT8_COSINE_EACH = 0.97
MIN_INT8_COSINE_MEAN = 0.99


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    ref: dict[str, Any] = json.loads(REFERENCE.read_text(encoding="utf-8"))
    return ref


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("minilm-store")
    build_minilm(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def registry(store: Path) -> Registry:
    return Registry.load(store / "registry.toml")


@pytest.fixture(scope="module")
def sessions(registry: Registry) -> Any:
    opened = {v: ModelSession(registry.resolve("minilm", v), provider="cpu") for v in ("1", "2")}
    for s in opened.values():
        s.load()
    yield opened
    for s in opened.values():
        s.close()


def _request(texts: list[str], **params: Any) -> bytes:
    tensor: dict[str, Any] = {
        "name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts
    }
    if params:
        tensor["parameters"] = params
    return orjson.dumps({"id": "r1", "model": "minilm", "inputs": [tensor]})


def _embed(session: ModelSession, texts: list[str]) -> np.ndarray[Any, Any]:
    """Embeddings of ``texts`` the way the worker gets them: JSON -> codec -> session."""
    req = parse_request(_request(texts), max_request_bytes=1 << 20)
    inputs, rows = decode_inputs(req, session.spec)
    assert rows == len(texts)
    assert inputs["text"].dtype == object
    out = session.run(inputs)["embedding"]
    assert out.shape == (len(texts), minilm.EMBEDDING_DIM) and out.dtype == np.float32
    return out


def _cosines(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_reference_was_computed_from_the_packaged_weights(reference: dict[str, Any]) -> None:
    assert reference["weights_sha256"] == minilm.WEIGHTS_SHA256
    assert "BertModel" in reference["implementation"]
    assert len(reference["sentences"]) >= 20
    assert len(reference["embeddings"]) == len(reference["sentences"])


def test_tokenizer_json_agrees_with_the_independent_wordpiece(
    registry: Registry, reference: dict[str, Any]
) -> None:
    spec = registry.resolve("minilm")
    assert spec.tokenizer is not None
    enc = TextEncoder.load(spec.tokenizer, max_seq_len=spec.max_seq_len)
    for text, ids in zip(reference["sentences"], reference["token_ids"], strict=True):
        assert enc.token_ids(text) == ids, text
    # One text is longer than max_seq_len and is cut there, [SEP] included.
    assert max(len(ids) for ids in reference["token_ids"]) == spec.max_seq_len == 256


def test_fp32_embeddings_match_the_reference(
    sessions: dict[str, ModelSession], reference: dict[str, Any]
) -> None:
    got = _embed(sessions["1"], reference["sentences"])
    cos = _cosines(got, np.asarray(reference["embeddings"]))
    assert cos.min() >= MIN_FP32_COSINE, dict(zip(reference["sentences"], cos, strict=True))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # Shuffled, long and short texts interleave and run in sub-batches by length: each
    # embedding still comes back in its request row.
    perm = np.random.default_rng(3).permutation(len(reference["sentences"]))
    shuffled = _embed(sessions["1"], [reference["sentences"][i] for i in perm])
    assert _cosines(shuffled, np.asarray(reference["embeddings"])[perm]).min() >= MIN_FP32_COSINE


def test_int8_embeddings_agree_with_the_reference_and_with_fp32(
    sessions: dict[str, ModelSession], reference: dict[str, Any]
) -> None:
    ref = np.asarray(reference["embeddings"])
    fp32 = _embed(sessions["1"], reference["sentences"])
    int8 = _embed(sessions["2"], reference["sentences"])
    to_ref, to_fp32 = _cosines(int8, ref), _cosines(int8, fp32)
    for cos in (to_ref, to_fp32):
        assert cos.min() >= MIN_INT8_COSINE_EACH, cos
        assert cos.mean() >= MIN_INT8_COSINE_MEAN, cos
    # And the two versions are really different graphs.
    assert to_fp32.max() < 0.99999


@pytest.mark.parametrize("version", ["1", "2"])
def test_paraphrases_score_above_unrelated_pairs(
    version: str, sessions: dict[str, ModelSession], reference: dict[str, Any]
) -> None:
    pairs = [tuple(p) for p in reference["paraphrases"]]
    group = {i: g for g, pair in enumerate(pairs) for i in pair}
    emb = _embed(sessions[version], reference["sentences"])
    sim = emb @ emb.T
    paraphrase = [sim[a, b] for a, b in pairs]
    unrelated = [sim[a, b] for a in group for b in group if group[a] != group[b]]
    assert min(paraphrase) > max(unrelated) + 0.3, (paraphrase, max(unrelated))


def test_padding_does_not_change_an_embedding(
    sessions: dict[str, ModelSession], reference: dict[str, Any]
) -> None:
    # A short text alone (no padding) and beside the longest one (padded to 256 tokens).
    short, long_text = reference["sentences"][0], reference["sentences"][-1]
    alone = _embed(sessions["1"], [short])
    padded = _embed(sessions["1"], [short, long_text])[:1]
    assert _cosines(alone, padded)[0] >= 0.99999


def test_response_encoding_round_trips(sessions: dict[str, ModelSession]) -> None:
    out = _embed(sessions["1"], ["héllo wörld", "東京"])
    tensor = codec.encode("embedding", out)
    assert tensor["datatype"] == "FP32" and tensor["shape"] == [2, 384]
    back = codec.to_numpy(json.loads(json.dumps(codec.encode_list("embedding", out))))
    np.testing.assert_array_equal(back, out)


async def test_batcher_concatenates_text_requests_and_splits_embeddings(
    sessions: dict[str, ModelSession], reference: dict[str, Any]
) -> None:
    session = sessions["1"]
    texts = reference["sentences"][:9]
    members = [texts[0:1], texts[1:4], texts[4:9]]
    ref = np.asarray(reference["embeddings"][:9])

    batcher = DynamicBatcher(
        session.run_async, max_batch_size=32, max_wait_ms=1000, name="minilm:1"
    )
    await batcher.start()
    try:
        futures = []
        for m in members:
            req = parse_request(_request(m), max_request_bytes=1 << 20)
            inputs, rows = decode_inputs(req, session.spec)
            futures.append(batcher.submit(inputs, rows))
        batcher.flush()
        results = list(await asyncio.gather(*futures))
    finally:
        await batcher.stop()
    assert [r.batch_rows for r in results] == [9, 9, 9]
    got = np.concatenate([r.outputs["embedding"] for r in results])
    assert [len(r.outputs["embedding"]) for r in results] == [1, 3, 5]
    assert _cosines(got, ref).min() >= MIN_FP32_COSINE


def test_text_that_is_not_utf8_is_invalid_input(registry: Registry) -> None:
    raw = _request(
        [base64.b64encode(b"ok").decode(), base64.b64encode(b"\xff\xfe bad").decode()],
        content_type="base64",
    )
    req = parse_request(raw, max_request_bytes=1 << 20)
    with pytest.raises(InvalidInput, match=r"element 1 is not valid UTF-8"):
        decode_inputs(req, registry.resolve("minilm"))
    # Valid UTF-8 sent as base64 is fine.
    ok = parse_request(
        _request([base64.b64encode("ça va".encode()).decode()], content_type="base64"),
        max_request_bytes=1 << 20,
    )
    inputs, _ = decode_inputs(ok, registry.resolve("minilm"))
    assert as_texts(inputs["text"]) == ["ça va"]


def test_check_utf8_refuses_non_text_elements() -> None:
    with pytest.raises(InvalidInput, match="expected UTF-8 text"):
        check_utf8("text", np.array([b"a", 3], dtype=object))


def test_warmup_inputs_are_real_sentences_of_varied_length(registry: Registry) -> None:
    spec = registry.resolve("minilm")
    texts = as_texts(representative_input(spec.inputs[0], 12))
    assert texts == list(WARMUP_TEXTS)
    assert len({len(t.split()) for t in texts}) >= 6
    shifted = as_texts(representative_input(spec.inputs[0], 3, offset=1))
    assert shifted == list(WARMUP_TEXTS[1:4])


def test_warmup_runs_every_batch_bucket(registry: Registry) -> None:
    spec = registry.resolve("minilm", "2")
    assert spec.batch_buckets == (1, 2, 4, 8, 16, 32, 64, 128)
    seen: list[int] = []
    with ModelSession(spec, provider="cpu") as session:
        run = session.run

        def counting(inputs: Any) -> Any:
            seen.append(len(inputs["text"]))
            return run(inputs)

        session.run = counting  # type: ignore[method-assign]
        session.warmup()
        assert session.warm
    assert seen == [1, 2, 4, 8, 16, 32, 64, 128]


def test_registry_records_precision_and_tokenizer(registry: Registry, store: Path) -> None:
    v1, v2 = registry.resolve("minilm", "1"), registry.resolve("minilm", "2")
    assert registry.entries["minilm"].default_version == "1"
    assert (v1.precision, v2.precision) == ("fp32", "int8")
    assert v1.preprocess == v2.preprocess == "tokenize"
    assert v1.tokenizer == store / "minilm" / "tokenizer.json"
    assert v1.tokenizer_sha256 == sha256_file(v1.tokenizer)
    assert v1.sha256 == sha256_file(v1.path) and v2.sha256 == sha256_file(v2.path)
    assert v2.path.stat().st_size < v1.path.stat().st_size / 2
    # Rendering keeps the text-model fields, tokenizer path relative to the registry.
    text = render_registry(registry.entries.values(), store)
    assert 'tokenizer = "minilm/tokenizer.json"' in text
    assert Registry.from_dict(tomllib.loads(text), base=store).resolve("minilm", "2") == v2


def test_a_changed_tokenizer_file_is_refused(registry: Registry, tmp_path: Path) -> None:
    spec = registry.resolve("minilm")
    assert spec.tokenizer is not None
    altered = tmp_path / "tokenizer.json"
    altered.write_bytes(spec.tokenizer.read_bytes().replace(b'"[UNK]"', b'"[UNKNOWN]"', 1))
    session = ModelSession(spec.model_copy(update={"tokenizer": altered}), provider="cpu")
    with pytest.raises(ModelLoadError, match=r"tokenizer file .* has sha256"):
        session.load()
    session.close()


def test_tokenize_without_a_tokenizer_is_refused(registry: Registry) -> None:
    spec = registry.resolve("minilm")
    raw = {"models": {"m": {"default_version": "1", "versions": [{
        "version": "1", "path": "m.onnx", "preprocess": "tokenize",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}],
    }]}}}
    with pytest.raises(RegistryError, match="no tokenizer"):
        Registry.from_dict(raw, base=spec.path.parent)


def test_the_build_refuses_other_weights(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(minilm.source_dir(), source, ignore=shutil.ignore_patterns("*.safetensors"))
    (source / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}      ")
    store = tmp_path / "store"
    with pytest.raises(ModelLoadError, match=r"have sha256 .* expected"):
        build_minilm(store, source=source)
    assert not (store / "registry.toml").exists()


def test_ensure_models_builds_minilm_once(store: Path) -> None:
    before = (store / "registry.toml").read_bytes()
    assert ensure_models(store, models=["minilm"]) == []
    assert (store / "registry.toml").read_bytes() == before
