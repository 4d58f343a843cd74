"""pipeline.codec: OIP v2 tensors <-> numpy arrays, strict on purpose; no broker needed."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
import pytest

from pipeline import codec
from pipeline.errors import InvalidInput
from schemas import Tensor

NUMERIC = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
INTS = ["UINT8", "INT8", "INT16", "INT32", "INT64"]
FLOATS = ["FP16", "FP32", "FP64"]
SHAPES = [(1,), (), (5,), (2, 3), (2, 1, 4), (0,), (0, 3), (3, 0)]


def _sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    """Deterministic values that use the type's extremes where the array is big enough."""
    n = math.prod(shape)
    dtype = np.dtype(NUMERIC[datatype])
    if datatype == "BOOL":
        flat = np.array([i % 3 == 0 for i in range(n)], dtype=dtype)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = [info.min, info.max, 0, 1, info.max - 1] + [(i * 37) % 100 for i in range(n)]
        flat = np.array(values[:n], dtype=dtype)
    else:
        values = [-1.5, 0.0, 0.25, 1024.0, -65504.0, 65504.0] + [i / 8 for i in range(n)]
        flat = np.array(values[:n], dtype=dtype)
    return flat.reshape(shape)


def _assert_same(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any]) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def _decode_tensor(tensor: dict[str, Any]) -> np.ndarray[Any, Any]:
    return codec.decode(
        tensor["name"], tensor["datatype"], tensor["shape"], tensor["data"],
        tensor.get("parameters"),
    )


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("datatype", list(NUMERIC))
def test_numeric_round_trip(datatype: str, shape: tuple[int, ...]) -> None:
    array = _sample(datatype, shape)
    tensor = codec.encode_list("x", array)
    assert tensor["name"] == "x"
    assert tensor["datatype"] == datatype
    assert tensor["shape"] == list(shape)
    assert isinstance(tensor["data"], list)
    assert len(tensor["data"]) == math.prod(shape)
    _assert_same(_decode_tensor(tensor), array)


@pytest.mark.parametrize("datatype", list(NUMERIC))
def test_encode_gives_flat_numpy_data_of_the_right_length(datatype: str) -> None:
    array = _sample(datatype, (2, 3))
    tensor = codec.encode("t", array)
    assert isinstance(tensor["data"], np.ndarray)
    assert tensor["data"].shape == (6,)
    np.testing.assert_array_equal(tensor["data"], array.reshape(-1))


def test_encode_of_non_contiguous_array_keeps_row_major_order() -> None:
    array = np.arange(6, dtype=np.int32).reshape(2, 3).T  # Fortran-ordered view
    tensor = codec.encode_list("t", array)
    assert tensor["shape"] == [3, 2]
    assert tensor["data"] == [0, 3, 1, 4, 2, 5]
    _assert_same(_decode_tensor(tensor), array)


@pytest.mark.parametrize("shape", [(1,), (), (3,), (2, 2), (0,), (2, 0)], ids=str)
def test_bytes_round_trip_utf8(shape: tuple[int, ...]) -> None:
    words = [b"hello", "caf\u00e9".encode(), b"", "\u65e5\u672c".encode()]
    n = math.prod(shape)
    array = np.empty(n, dtype=object)
    array[:] = [words[i % len(words)] for i in range(n)]
    array = array.reshape(shape)
    tensor = codec.encode_list("text", array)
    assert tensor["datatype"] == "BYTES"
    got = _decode_tensor(tensor)
    assert got.dtype == np.object_
    assert got.shape == shape
    assert got.reshape(-1).tolist() == array.reshape(-1).tolist()


def test_bytes_from_str_array_decode_to_utf8_bytes() -> None:
    array = np.array(["a", "caf\u00e9"])
    tensor = codec.encode_list("s", array)
    assert tensor["datatype"] == "BYTES"
    assert tensor["data"] == ["a", "caf\u00e9"]
    assert _decode_tensor(tensor).tolist() == [b"a", "caf\u00e9".encode()]


def test_bytes_round_trip_non_utf8() -> None:
    # Bytes that are not UTF-8 must come back as the same bytes: encode has to say how
    # it wrote them (parameters content_type=base64) or decode cannot know.
    array = np.empty(2, dtype=object)
    array[:] = [b"\xff\xfe\x00", b"\x80"]
    got = codec.to_numpy(codec.encode_list("blob", array))
    assert got.tolist() == [b"\xff\xfe\x00", b"\x80"]


def test_bytes_base64_content_type_decodes() -> None:
    got = codec.decode("b", "BYTES", [2], ["/+4A", "aGk="], {"content_type": "base64"})
    assert got.tolist() == [b"\xff\xee\x00", b"hi"]
    # Without the parameter the same strings are taken as UTF-8 text.
    assert codec.decode("b", "BYTES", [1], ["aGk="]).tolist() == [b"aGk="]


def test_nested_and_flat_data_decode_alike() -> None:
    nested = [[[1, 2], [3, 4], [5, 6]], [[7, 8], [9, 10], [11, 12]]]
    flat = list(range(1, 13))
    a = codec.decode("n", "INT32", [2, 3, 2], nested)
    b = codec.decode("n", "INT32", [2, 3, 2], flat)
    _assert_same(a, b)
    assert a[1, 2, 0] == 11
    assert codec.decode("s", "BYTES", [2, 1], [["x"], ["y"]]).tolist() == [[b"x"], [b"y"]]


def test_scalar_shape_and_shape_one() -> None:
    scalar = codec.decode("s", "FP64", [], [2.5])
    assert scalar.shape == ()
    assert float(scalar) == 2.5
    one = codec.decode("s", "FP64", [1], [2.5])
    assert one.shape == (1,)
    assert one.tolist() == [2.5]


def test_integers_are_accepted_in_float_tensors() -> None:
    got = codec.decode("f", "FP32", [3], [1, -2, 3])
    _assert_same(got, np.array([1, -2, 3], dtype=np.float32))


@pytest.mark.parametrize("datatype", ["BOOL", *INTS, *FLOATS, "BYTES"])
def test_empty_tensor_of_every_datatype(datatype: str) -> None:
    got = codec.decode("e", datatype, [0, 4], [])
    assert got.shape == (0, 4)
    want = np.dtype(NUMERIC.get(datatype, np.object_))
    assert got.dtype == want


@pytest.mark.parametrize("shape", [(3,), (2, 2), (1,), (0, 5)], ids=str)
@pytest.mark.parametrize("datatype", [*NUMERIC, "BYTES"])
def test_orjson_wire_round_trip(datatype: str, shape: tuple[int, ...]) -> None:
    if datatype == "BYTES":
        array = np.empty(math.prod(shape), dtype=object)
        array[:] = [f"w{i}\u00e9".encode() for i in range(array.size)]
        array = array.reshape(shape)
    else:
        array = _sample(datatype, shape)
    wire = orjson.dumps(codec.encode("out", array), option=orjson.OPT_SERIALIZE_NUMPY)
    tensor = Tensor.model_validate_json(wire)
    assert tensor.datatype == datatype
    assert tensor.shape == list(shape)
    got = codec.to_numpy(tensor.model_dump())
    assert got.shape == array.shape
    assert got.dtype == array.dtype
    assert got.reshape(-1).tolist() == array.reshape(-1).tolist()


def test_datatype_of_every_numpy_dtype() -> None:
    for name, dtype in NUMERIC.items():
        assert codec.datatype_of(np.zeros(1, dtype=dtype)) == name
    assert codec.datatype_of(np.array(["a"])) == "BYTES"
    assert codec.datatype_of(np.array([b"a"])) == "BYTES"
    assert codec.datatype_of(np.array([b"a"], dtype=object)) == "BYTES"


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64, np.complex64])
def test_encode_rejects_dtypes_without_an_oip_datatype(dtype: Any) -> None:
    with pytest.raises(InvalidInput, match=str(np.dtype(dtype))) as info:
        codec.encode("x", np.zeros(2, dtype=dtype))
    assert "supported:" in str(info.value)
    assert "float32" in str(info.value)


# --- rejections ------------------------------------------------------------------------------


def _reject(datatype: str, shape: list[int], data: list[Any], **kw: Any) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        codec.decode("pixels", datatype, shape, data, **kw)
    err = info.value
    assert err.name == "pixels"
    assert err.code == "INVALID_INPUT"
    assert "'pixels'" in str(err)
    return err


@pytest.mark.parametrize(
    ("datatype", "shape", "data"),
    [
        ("FP32", [2, 2], [1.0, 2.0, 3.0]),
        ("INT64", [3], [1, 2, 3, 4]),
        ("BYTES", [2], ["a"]),
        ("BOOL", [1], []),
        ("INT32", [0], [1]),
        ("FP64", [], [1.0, 2.0]),
    ],
)
def test_shape_and_data_length_mismatch(datatype: str, shape: list[int], data: list[Any]) -> None:
    err = _reject(datatype, shape, data)
    msg = str(err)
    assert str(shape) in msg
    assert f"({math.prod(shape)} elements)" in msg
    assert f"has {len(data)} elements" in msg


@pytest.mark.parametrize("datatype", [*INTS, *FLOATS, "BOOL"])
@pytest.mark.parametrize("data", [["1", "2"], [1, "2"], ["a", 2.5]], ids=["all", "one", "mixed"])
def test_strings_in_numeric_tensor(datatype: str, data: list[Any]) -> None:
    err = _reject(datatype, [2], data)
    assert datatype in str(err) or "not numeric" in str(err)


@pytest.mark.parametrize("datatype", [*INTS, *FLOATS])
def test_none_in_numeric_tensor(datatype: str) -> None:
    _reject(datatype, [2], [1, None])


@pytest.mark.parametrize("datatype", INTS)
@pytest.mark.parametrize("data", [[1.5], [1, 2.5], [1.0], [float("nan")]])
def test_floats_in_integer_tensor(datatype: str, data: list[Any]) -> None:
    err = _reject(datatype, [len(data)], data)
    assert datatype in str(err)
    assert "non-integer" in str(err)


@pytest.mark.parametrize(
    ("datatype", "bad", "lo", "hi"),
    [
        ("UINT8", 256, 0, 255),
        ("UINT8", -1, 0, 255),
        ("INT8", 128, -128, 127),
        ("INT8", -129, -128, 127),
        ("INT16", 32768, -32768, 32767),
        ("INT16", -32769, -32768, 32767),
        ("INT32", 2**31, -(2**31), 2**31 - 1),
        ("INT32", -(2**31) - 1, -(2**31), 2**31 - 1),
        ("INT64", 2**63, -(2**63), 2**63 - 1),
    ],
)
def test_out_of_range_integers(datatype: str, bad: int, lo: int, hi: int) -> None:
    err = _reject(datatype, [3], [0, bad, 1])
    msg = str(err)
    assert f"value {bad} " in msg
    assert datatype in msg
    assert f"[{lo}, {hi}]" in msg


@pytest.mark.parametrize("datatype", INTS)
def test_integers_at_the_limits_are_accepted(datatype: str) -> None:
    info = np.iinfo(NUMERIC[datatype])
    got = codec.decode("x", datatype, [2], [int(info.min), int(info.max)])
    assert got.tolist() == [info.min, info.max]


@pytest.mark.parametrize("bad", [-(2**63) - 1, 2**64, 10**30])
@pytest.mark.parametrize("datatype", INTS)
def test_integers_beyond_int64_are_rejected(datatype: str, bad: int) -> None:
    _reject(datatype, [2], [1, bad])


@pytest.mark.parametrize("datatype", [*INTS, *FLOATS])
def test_booleans_in_numeric_tensor(datatype: str) -> None:
    err = _reject(datatype, [2], [True, False])
    assert "booleans" in str(err)
    assert datatype in str(err)


@pytest.mark.parametrize("datatype", [*INTS, *FLOATS])
def test_a_boolean_mixed_with_numbers_is_rejected(datatype: str) -> None:
    # numpy would silently turn True into 1: strict decoding must refuse it.
    _reject(datatype, [3], [1, True, 0])


@pytest.mark.parametrize("data", [[1, 0], [0.0, 1.0], [True, 1]])
def test_numbers_in_bool_tensor(data: list[Any]) -> None:
    err = _reject("BOOL", [2], data)
    assert "BOOL" in str(err)


def test_bool_tensor_accepts_true_false() -> None:
    assert codec.decode("b", "BOOL", [3], [True, False, True]).tolist() == [True, False, True]


@pytest.mark.parametrize("datatype", FLOATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_nan_and_infinity_in_float_tensor(datatype: str, bad: float) -> None:
    err = _reject(datatype, [3], [1.0, bad, 2.0])
    assert "NaN or infinity" in str(err)


@pytest.mark.parametrize(
    ("datatype", "big"), [("FP16", 70000.0), ("FP16", 100000), ("FP32", 1e39)]
)
def test_finite_values_that_overflow_the_float_type_are_rejected(
    datatype: str, big: float
) -> None:
    # 70000 does not fit FP16 (max 65504): a silent cast would hand the model +inf,
    # the very value the NaN/infinity check keeps out.
    _reject(datatype, [2], [1.0, big])


@pytest.mark.parametrize(
    ("shape", "data"),
    [
        ([2, 2], [[1, 2], [3]]),
        ([3], [1, [2, 3]]),
        ([2, 2], [[1, 2, 3], [4]]),
        ([2, 2], [[1, 2], 3, 4]),
    ],
    ids=["short-row", "scalar-then-list", "ragged-same-count", "list-then-scalars"],
)
def test_ragged_nested_data(shape: list[int], data: list[Any]) -> None:
    _reject("INT32", shape, data)


@pytest.mark.parametrize("item", [1, 1.5, None, True, ["a"], {"a": 1}])
def test_non_string_in_bytes(item: Any) -> None:
    err = _reject("BYTES", [2], ["ok", item])
    assert f"element 1 is {type(item).__name__}" in str(err)
    assert "expected a string" in str(err)


@pytest.mark.parametrize("bad", ["not base64!", "abc", "a===", "\u00e9"])
def test_invalid_base64(bad: str) -> None:
    err = _reject("BYTES", [2], ["aGk=", bad], parameters={"content_type": "base64"})
    assert "element 1" in str(err)
    assert "base64" in str(err)


@pytest.mark.parametrize("datatype", ["FLOAT32", "fp32", "STRING", "", "UINT16"])
def test_unknown_datatype(datatype: str) -> None:
    err = _reject(datatype, [1], [1])
    assert repr(datatype) in str(err)
    assert "FP32" in str(err) and "BYTES" in str(err)


def test_to_numpy_rejects_like_decode() -> None:
    with pytest.raises(InvalidInput, match="'out'"):
        codec.to_numpy({"name": "out", "datatype": "UINT8", "shape": [1], "data": [-1]})


# --------------------------------------------------------------------------- base64 buffers


@pytest.mark.parametrize("datatype", sorted(NUMERIC))
@pytest.mark.parametrize("shape", [(1,), (), (2, 3), (0, 4)])
def test_binary_encoding_round_trips_every_numeric_datatype(
    datatype: str, shape: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(7)
    array = (rng.standard_normal(shape) * 50).astype(NUMERIC[datatype])
    tensor = codec.encode("out", array, binary=True)
    assert tensor["parameters"] == {"content_type": "base64"}
    assert len(tensor["data"]) == 1 and isinstance(tensor["data"][0], str)
    # Through the wire and the schema, as a client reads it.
    wire = Tensor.model_validate_json(orjson.dumps(tensor, option=orjson.OPT_SERIALIZE_NUMPY))
    back = codec.decode(wire.name, wire.datatype, wire.shape, wire.data, wire.parameters)
    assert back.dtype == array.dtype and back.shape == array.shape
    assert back.tobytes() == array.tobytes()
    assert back.flags.writeable  # like a decoded JSON tensor: ONNX Runtime may take it


def test_binary_buffer_is_row_major_little_endian() -> None:
    tensor = codec.encode("out", np.array([[1.5], [-2.0]], dtype=np.float32), binary=True)
    assert tensor["data"] == ["AADAPwAAAMA="]  # bytes 00 00 c0 3f, 00 00 00 c0
    assert tensor["shape"] == [2, 1] and codec.to_numpy(tensor).tolist() == [[1.5], [-2.0]]
    column = np.asfortranarray(np.array([[1, 2], [3, 4]], dtype=np.int16))
    assert codec.to_numpy(codec.encode("c", column, binary=True)).tolist() == [[1, 2], [3, 4]]


def test_binary_float_embedding_is_about_half_the_bytes_of_json() -> None:
    emb = np.random.default_rng(0).standard_normal((16, 384)).astype(np.float32)
    as_json = orjson.dumps(codec.encode("e", emb), option=orjson.OPT_SERIALIZE_NUMPY)
    as_b64 = orjson.dumps(codec.encode("e", emb, binary=True), option=orjson.OPT_SERIALIZE_NUMPY)
    assert len(as_b64) < 0.6 * len(as_json)
    assert codec.to_numpy(orjson.loads(as_b64)).tobytes() == emb.tobytes()


def test_bytes_tensors_keep_their_encoding_when_binary_is_asked() -> None:
    texts = np.array(["a", "b"], dtype=object)
    assert codec.encode("t", texts, binary=True) == codec.encode("t", texts)


B64 = {"content_type": "base64"}


@pytest.mark.parametrize(
    ("datatype", "shape", "data", "match"),
    [
        ("FP32", [2], ["AACAPw==", "AACAPw=="], r"list of one base64 string .*got 2 element"),
        ("FP32", [1], [1.0], r"list of one base64 string"),
        ("FP32", [1], "AACAPw==", r"list of one base64 string .*got str"),
        ("FP32", [1], ["not base64!"], "not valid base64"),
        ("FP32", [2], ["AACAPw=="], r"shape \[2\] is FP32: it takes 8 bytes, .* decodes to 4"),
        ("INT64", [1], ["AACAPw=="], r"INT64: it takes 8 bytes, .* decodes to 4"),
        ("BOOL", [2], ["AAI="], "BOOL but its base64 data holds a byte other than 0 and 1"),
        ("FP32", [1], ["AADAfw=="], "holds NaN or infinity"),
        ("FP64", [1], ["AAAAAAAA8H8="], "holds NaN or infinity"),
    ],
    ids=["two-strings", "a-number", "a-bare-string", "bad-base64", "short", "int64-short",
         "bool-2", "fp32-nan", "fp64-inf"],
)
def test_binary_inputs_are_checked_and_named(
    datatype: str, shape: list[int], data: Any, match: str
) -> None:
    with pytest.raises(InvalidInput, match=match) as info:
        codec.decode("pixels", datatype, shape, data, B64)
    assert info.value.name == "pixels" and "'pixels'" in str(info.value)


def test_binary_outputs_may_hold_nan_where_inputs_may_not() -> None:
    tensor = codec.encode("out", np.array([np.nan, 1.0], dtype=np.float32), binary=True)
    with pytest.raises(InvalidInput, match="NaN"):
        codec.decode("out", "FP32", [2], tensor["data"], tensor["parameters"])
    got = codec.to_numpy(tensor)
    assert np.isnan(got[0]) and got[1] == 1.0


def test_to_numpy_reads_a_response_tensor_model_as_its_dict() -> None:
    emb = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
    for binary in (False, True):
        raw = orjson.dumps(codec.encode("e", emb, binary=binary), option=orjson.OPT_SERIALIZE_NUMPY)
        model = Tensor.model_validate_json(raw)
        assert codec.to_numpy(model).tobytes() == codec.to_numpy(orjson.loads(raw)).tobytes()
        assert codec.to_numpy(model).tobytes() == emb.tobytes()
