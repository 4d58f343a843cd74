"""Tensor codec between OIP v2 JSON tensors and numpy arrays.

Decoding is strict on purpose: a string where a number belongs, a float where an
integer belongs, a value outside an integer type's range, or data whose length
does not match the shape is an :class:`~pipeline.errors.InvalidInput`, never a
silent cast.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.errors import InvalidInput

DTYPES: dict[str, npt.DTypeLike] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
_BY_NUMPY: dict[np.dtype[Any], str] = {
    np.dtype(t): name for name, t in DTYPES.items() if name != "BYTES"
}
_INT_KINDS = "iu"


def datatype_of(array: np.ndarray[Any, Any]) -> str:
    """OIP datatype name of a numpy array; object and string arrays are BYTES."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    try:
        return _BY_NUMPY[array.dtype]
    except KeyError:
        raise InvalidInput(
            f"numpy dtype {array.dtype} has no OIP datatype "
            f"(supported: {', '.join(str(d) for d in _BY_NUMPY)})"
        ) from None


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


def _decode_bytes(name: str, data: list[Any], parameters: Mapping[str, Any] | None) -> list[bytes]:
    b64 = bool(parameters) and (parameters or {}).get("content_type") == "base64"
    out: list[bytes] = []
    for i, item in enumerate(data):
        if not isinstance(item, str):
            raise InvalidInput(
                f"input {name!r} is BYTES but element {i} is {type(item).__name__}, "
                "expected a string",
                name=name,
            )
        if b64:
            try:
                out.append(base64.b64decode(item, validate=True))
            except (binascii.Error, ValueError):
                raise InvalidInput(
                    f"input {name!r} element {i} is not valid base64", name=name
                ) from None
        else:
            out.append(item.encode("utf-8"))
    return out


def _flatten(name: str, data: list[Any]) -> list[Any]:
    if not data or not isinstance(data[0], list):
        return data
    flat: list[Any] = []
    stack: list[Any] = [data]
    # Iterative so that hostile, deeply nested data cannot blow the recursion limit.
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    return flat


def decode(
    name: str,
    datatype: str,
    shape: Sequence[int],
    data: list[Any],
    parameters: Mapping[str, Any] | None = None,
) -> np.ndarray[Any, Any]:
    """Turn one OIP tensor into a numpy array of its shape and datatype."""
    target = DTYPES.get(datatype)
    if target is None:
        raise InvalidInput(
            f"input {name!r} has datatype {datatype!r}; expected one of {', '.join(DTYPES)}",
            name=name,
        )
    flat = _flatten(name, data)
    expected = _numel(shape)
    if len(flat) != expected:
        raise InvalidInput(
            f"input {name!r} has shape {list(shape)} ({expected} elements) "
            f"but its data has {len(flat)} elements",
            name=name,
        )
    if datatype == "BYTES":
        arr = np.empty(expected, dtype=object)
        arr[:] = _decode_bytes(name, flat, parameters)
        return arr.reshape(shape)
    try:
        raw = np.asarray(flat)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"input {name!r} data is not numeric: {exc}", name=name) from None
    kind = raw.dtype.kind
    if expected and kind not in "biuf":
        raise InvalidInput(
            f"input {name!r} is {datatype} but its data holds {raw.dtype.kind!r}-kind values "
            "(strings or mixed types), expected numbers",
            name=name,
        )
    target_dtype = np.dtype(target)
    if datatype == "BOOL":
        if expected and kind != "b":
            raise InvalidInput(f"input {name!r} is BOOL but its data is not true/false", name=name)
    elif kind == "b" and expected:
        raise InvalidInput(f"input {name!r} is {datatype} but its data holds booleans", name=name)
    elif target_dtype.kind in _INT_KINDS and expected:
        if kind == "f":
            raise InvalidInput(
                f"input {name!r} is {datatype} but its data holds non-integer numbers", name=name
            )
        info = np.iinfo(target_dtype)
        lo, hi = int(raw.min()), int(raw.max())
        if lo < info.min or hi > info.max:
            raise InvalidInput(
                f"input {name!r} value {lo if lo < info.min else hi} is outside the "
                f"{datatype} range [{info.min}, {info.max}]",
                name=name,
            )
    elif target_dtype.kind == "f" and expected and kind == "f" and not np.isfinite(raw).all():
        raise InvalidInput(f"input {name!r} holds NaN or infinity", name=name)
    return raw.astype(target_dtype, copy=False).reshape(shape)


def encode(name: str, array: np.ndarray[Any, Any]) -> dict[str, Any]:
    """One numpy array as an OIP tensor dict whose ``data`` orjson serialises natively."""
    datatype = datatype_of(array)
    data: Any
    if datatype == "BYTES":
        data = [_bytes_to_str(x) for x in array.reshape(-1).tolist()]
    else:
        data = np.ascontiguousarray(array).reshape(-1)
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": data}


def encode_list(name: str, array: np.ndarray[Any, Any]) -> dict[str, Any]:
    """Like :func:`encode`, with plain Python lists (for the stdlib json module)."""
    tensor = encode(name, array)
    if isinstance(tensor["data"], np.ndarray):
        tensor["data"] = tensor["data"].tolist()
    return tensor


def _bytes_to_str(item: Any) -> str:
    if isinstance(item, bytes):
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(item).decode("ascii")
    return str(item)


def to_numpy(tensor: Mapping[str, Any]) -> np.ndarray[Any, Any]:
    """Decode a tensor given as a mapping (a response output, for instance)."""
    return decode(
        tensor["name"],
        tensor["datatype"],
        tensor["shape"],
        tensor["data"],
        tensor.get("parameters"),
    )
