"""pipeline.validation: request records -> validated requests -> decoded arrays."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from pipeline.errors import InvalidInput, InvalidRequest, UnknownModel
from pipeline.registry import ModelEntry, ModelVersion, Registry, TensorSpec
from pipeline.validation import (
    Decoded,
    deadline_left_ms,
    decode_inputs,
    decode_request,
    parse_request,
    recover_reply,
)
from schemas import InferenceRequest

LIMIT = 4096
DEFAULT_TOPIC = "inferline.responses"


def _body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "req-1",
        "model": "digits",
        "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3]}],
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def _raw(**overrides: Any) -> bytes:
    return orjson.dumps(_body(**overrides))


def _spec(
    inputs: list[tuple[str, str, tuple[int, ...]]] | None = None,
    *,
    name: str = "digits",
    version: str = "1",
    max_batch_size: int = 8,
) -> ModelVersion:
    inputs = inputs or [("input", "FP32", (-1, 4))]
    return ModelVersion(
        name=name,
        version=version,
        path=Path("/models/m.onnx"),
        inputs=tuple(TensorSpec.model_validate({"name": n, "datatype": d, "shape": s})
                     for n, d, s in inputs),
        outputs=(TensorSpec(name="out", datatype="FP32", shape=(-1,)),),
        max_batch_size=max_batch_size,
    )


def _request(inputs: list[dict[str, Any]], **kw: Any) -> InferenceRequest:
    return InferenceRequest.model_validate({"id": "r", "model": "digits", "inputs": inputs, **kw})


def _t(name: str, shape: list[int], datatype: str = "FP32", data: Any = None) -> dict[str, Any]:
    if data is None:
        data = [0] * math.prod(shape)
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


# --- parse_request ---------------------------------------------------------------------------


def test_parse_valid_request() -> None:
    req = parse_request(
        _raw(version="2", priority="high", timeout_ms=500, reply_to="my.replies"),
        max_request_bytes=LIMIT,
    )
    assert req.id == "req-1"
    assert req.model == "digits"
    assert req.version == "2"
    assert req.priority == "high"
    assert req.timeout_ms == 500
    assert req.reply_to == "my.replies"
    assert req.inputs[0].shape == [1, 4]


def test_parse_defaults() -> None:
    req = parse_request(_raw(), max_request_bytes=LIMIT)
    assert req.priority == "normal"
    assert req.version is None
    assert req.timeout_ms is None
    assert req.reply_to is None


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b'{"id": "a",'])
def test_parse_invalid_json(raw: bytes) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_request(raw, max_request_bytes=LIMIT)
    assert info.value.code == "INVALID_REQUEST"
    assert str(info.value).startswith("record is not valid JSON")


@pytest.mark.parametrize("raw", [b"[]", b"42", b'"req"', b"null"])
def test_parse_json_that_is_not_an_object(raw: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parse_request(raw, max_request_bytes=LIMIT)


def test_parse_missing_id() -> None:
    body = _body()
    del body["id"]
    with pytest.raises(InvalidRequest) as info:
        parse_request(orjson.dumps(body), max_request_bytes=LIMIT)
    assert "field 'id'" in str(info.value)
    assert "required" in str(info.value).lower()


def test_parse_id_over_256_chars() -> None:
    parse_request(_raw(id="x" * 256), max_request_bytes=LIMIT)
    with pytest.raises(InvalidRequest) as info:
        parse_request(_raw(id="x" * 257), max_request_bytes=LIMIT)
    msg = str(info.value)
    assert "field 'id'" in msg
    assert "256" in msg
    # The offending value is shown, but cut short.
    assert "..." in msg
    assert "x" * 257 not in msg


def test_parse_over_max_request_bytes() -> None:
    raw = _raw(parameters={"pad": "p" * 5000})
    with pytest.raises(InvalidRequest) as info:
        parse_request(raw, max_request_bytes=LIMIT)
    assert str(info.value) == (
        f"request is {len(raw)} bytes, over the max_request_bytes limit of {LIMIT}"
    )
    # Exactly at the limit is fine.
    assert parse_request(raw, max_request_bytes=len(raw)).id == "req-1"


def test_parse_wrong_priority() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_request(_raw(priority="urgent"), max_request_bytes=LIMIT)
    msg = str(info.value)
    assert "field 'priority'" in msg
    assert "'urgent'" in msg


def test_parse_extra_field() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_request(_raw(colour="blue"), max_request_bytes=LIMIT)
    assert "field 'colour'" in str(info.value)
    assert "'blue'" in str(info.value)


def test_parse_counts_further_errors() -> None:
    with pytest.raises(InvalidRequest, match=r"\(and 1 more\)"):
        parse_request(_raw(priority="urgent", timeout_ms=-5), max_request_bytes=LIMIT)


def test_parse_names_nested_location() -> None:
    bad = [{"name": "input", "shape": [1], "datatype": "FLOAT", "data": [1]}]
    with pytest.raises(InvalidRequest, match=r"field 'inputs\.0\.datatype'"):
        parse_request(_raw(inputs=bad), max_request_bytes=LIMIT)


# --- recover_reply ---------------------------------------------------------------------------


def test_recover_id_and_reply_to() -> None:
    raw = orjson.dumps({"id": "abc", "reply_to": "team.replies-2_x", "model": 5})
    assert recover_reply(raw, DEFAULT_TOPIC) == ("abc", "team.replies-2_x")


def test_recover_default_topic_when_reply_to_missing() -> None:
    assert recover_reply(orjson.dumps({"id": "abc"}), DEFAULT_TOPIC) == ("abc", DEFAULT_TOPIC)


@pytest.mark.parametrize("reply_to", ["bad topic", "a/b", "", "x" * 250, 7, None, ["t"], "t\u00e9"])
def test_recover_invalid_reply_to_falls_back(reply_to: Any) -> None:
    raw = orjson.dumps({"id": "abc", "reply_to": reply_to})
    assert recover_reply(raw, DEFAULT_TOPIC) == ("abc", DEFAULT_TOPIC)


def test_recover_reply_to_at_249_chars_is_kept() -> None:
    raw = orjson.dumps({"id": "abc", "reply_to": "t" * 249})
    assert recover_reply(raw, DEFAULT_TOPIC) == ("abc", "t" * 249)


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[1, 2]", b'"abc"', b"null", b"\xff", b"{}"],
)
def test_recover_no_id(raw: bytes) -> None:
    assert recover_reply(raw, DEFAULT_TOPIC) == (None, DEFAULT_TOPIC)


@pytest.mark.parametrize("rid", ["", "x" * 257, 12, None, {"a": 1}])
def test_recover_unusable_id_keeps_reply_to(rid: Any) -> None:
    raw = orjson.dumps({"id": rid, "reply_to": "r.t"})
    assert recover_reply(raw, DEFAULT_TOPIC) == (None, "r.t")


def test_recover_id_of_exactly_256_chars() -> None:
    assert recover_reply(orjson.dumps({"id": "y" * 256}), DEFAULT_TOPIC)[0] == "y" * 256


# --- decode_inputs ---------------------------------------------------------------------------


def test_decode_inputs_ok() -> None:
    spec = _spec([("a", "FP32", (-1, 2)), ("b", "INT64", (-1,))])
    req = _request(
        [_t("b", [3], "INT64", [7, 8, 9]), _t("a", [3, 2], data=[[1, 2], [3, 4], [5, 6]])]
    )
    arrays, rows = decode_inputs(req, spec)
    assert rows == 3
    assert set(arrays) == {"a", "b"}
    assert arrays["a"].dtype == np.float32
    np.testing.assert_array_equal(arrays["a"], [[1, 2], [3, 4], [5, 6]])
    np.testing.assert_array_equal(arrays["b"], np.array([7, 8, 9], dtype=np.int64))


def test_decode_inputs_missing_input() -> None:
    spec = _spec([("a", "FP32", (-1, 2)), ("b", "INT64", (-1,))])
    with pytest.raises(InvalidInput) as info:
        decode_inputs(_request([_t("a", [1, 2])]), spec)
    assert info.value.name == "b"
    assert str(info.value) == "model digits:1 needs input(s) ['b']; got ['a']"


def test_decode_inputs_extra_input() -> None:
    spec = _spec()
    with pytest.raises(InvalidInput) as info:
        decode_inputs(_request([_t("input", [1, 4]), _t("mask", [1, 4])]), spec)
    assert info.value.name == "mask"
    assert "has no input(s) ['mask']" in str(info.value)
    assert "takes ['input']" in str(info.value)


def test_decode_inputs_duplicate_input() -> None:
    with pytest.raises(InvalidInput, match="more than once"):
        decode_inputs(_request([_t("input", [1, 4]), _t("input", [1, 4])]), _spec())


def test_decode_inputs_wrong_datatype() -> None:
    with pytest.raises(InvalidInput) as info:
        decode_inputs(_request([_t("input", [1, 4], "FP64")]), _spec())
    assert info.value.name == "input"
    assert "must be FP32, got FP64" in str(info.value)


@pytest.mark.parametrize("shape", [[1, 5], [4], [1, 4, 1], []], ids=str)
def test_decode_inputs_wrong_shape(shape: list[int]) -> None:
    data = [0] * math.prod(shape)
    with pytest.raises(InvalidInput) as info:
        decode_inputs(_request([_t("input", shape, data=data)]), _spec())
    assert info.value.name == "input"
    assert f"must have shape [-1, 4] (-1 = any), got {shape}" in str(info.value)


def test_decode_inputs_rows_over_max_batch_size() -> None:
    spec = _spec(max_batch_size=8)
    decode_inputs(_request([_t("input", [8, 4])]), spec)
    with pytest.raises(InvalidInput) as info:
        decode_inputs(_request([_t("input", [9, 4])]), spec)
    assert str(info.value) == "request has 9 rows, over model digits:1's max_batch_size of 8"


def test_decode_inputs_zero_rows() -> None:
    with pytest.raises(InvalidInput, match=r"no rows \(batch dimension 0\)"):
        decode_inputs(_request([_t("input", [0, 4], data=[])]), _spec())


def test_decode_inputs_mismatched_rows() -> None:
    spec = _spec([("a", "FP32", (-1, 2)), ("b", "INT64", (-1,))])
    req = _request([_t("a", [2, 2]), _t("b", [3], "INT64")])
    with pytest.raises(InvalidInput) as info:
        decode_inputs(req, spec)
    assert info.value.name == "b"
    assert str(info.value) == "input 'b' has 3 rows but other inputs have 2"


def test_decode_inputs_passes_codec_errors_through() -> None:
    req = _request([_t("input", [1, 4], data=[1, 2, "x", 4])])
    with pytest.raises(InvalidInput) as info:
        decode_inputs(req, _spec())
    assert info.value.name == "input"


def test_decode_inputs_bytes_with_base64_parameters() -> None:
    spec = _spec([("text", "BYTES", (-1,))])
    tensor = _t("text", [2], "BYTES", ["aGk=", "/w=="])
    tensor["parameters"] = {"content_type": "base64"}
    arrays, rows = decode_inputs(_request([tensor]), spec)
    assert rows == 2
    assert arrays["text"].tolist() == [b"hi", b"\xff"]


# --- decode_request --------------------------------------------------------------------------


@pytest.fixture
def registry() -> Registry:
    v1 = _spec(version="1")
    v2 = _spec([("input", "FP32", (-1, 2))], version="2", max_batch_size=2)
    return Registry({"digits": ModelEntry(name="digits", default_version="2", versions=(v1, v2))})


def test_decode_request_uses_default_version(registry: Registry) -> None:
    req = _request([_t("input", [2, 2], data=[1, 2, 3, 4])])
    decoded = decode_request(req, registry)
    assert isinstance(decoded, Decoded)
    assert decoded.spec.key == "digits:2"
    assert decoded.request is req
    assert decoded.rows == 2
    np.testing.assert_array_equal(decoded.inputs["input"], [[1, 2], [3, 4]])


def test_decode_request_explicit_version(registry: Registry) -> None:
    decoded = decode_request(_request([_t("input", [1, 4])], version="1"), registry)
    assert decoded.spec.key == "digits:1"
    assert decoded.inputs["input"].shape == (1, 4)


def test_decode_request_checks_against_the_resolved_version(registry: Registry) -> None:
    # A [1, 4] input fits version 1 but not the default version 2.
    with pytest.raises(InvalidInput, match="digits:2"):
        decode_request(_request([_t("input", [1, 4])]), registry)


def test_decode_request_unknown_model_and_version(registry: Registry) -> None:
    with pytest.raises(UnknownModel, match="known: digits"):
        decode_request(_request([_t("input", [1, 4])], model="nope"), registry)
    with pytest.raises(UnknownModel, match="known: digits:1, digits:2"):
        decode_request(_request([_t("input", [1, 4])], version="3"), registry)


# --- deadline_left_ms ------------------------------------------------------------------------


def test_deadline_left() -> None:
    assert deadline_left_ms(500, 1_000.0, 1_200.0) == 300.0
    assert deadline_left_ms(500, 1_000.0, 1_500.0) == 0.0
    assert deadline_left_ms(500, 1_000.0, 1_750.5) == -250.5
    assert deadline_left_ms(1, 1_700_000_000_000.0, 1_700_000_000_000.0) == 1.0


def test_no_deadline_is_infinite() -> None:
    assert deadline_left_ms(None, 0.0, 1e15) == math.inf


def test_a_non_flag_binary_data_output_is_an_invalid_request_naming_it() -> None:
    raw = orjson.dumps({"id": "r", "model": "digits", "parameters": {"binary_data_output": "yes"},
                        "inputs": [{"name": "input", "shape": [1], "datatype": "FP32",
                                    "data": [1.0]}]})
    with pytest.raises(InvalidRequest, match=r"field 'parameters'.*binary_data_output must be "
                                             r"true or false, got 'yes'"):
        parse_request(raw, max_request_bytes=10_000)
