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
from schemas.messages import Tensor

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
_NUMPY: dict[str, np.dtype[Any]] = {name: np.dtype(t) for name, t in DTYPES.items()}
_INT_KINDS = "iu"
_BOOL_TYPES: frozenset[type] = frozenset({bool, np.bool_})
_INT_ONLY: frozenset[type] = frozenset({int})
_INT_OR_FLOAT: frozenset[type] = frozenset({int, float})
_FLOAT_ONLY: frozenset[type] = frozenset({float})
_FLOAT_MAX = {np.dtype(t): float(np.finfo(t).max) for t in (np.float16, np.float32, np.float64)}


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


# The tensor parameter that says its data is base64: one string per element for BYTES,
# one string holding the whole row-major little-endian buffer for a numeric tensor.
CONTENT_TYPE = "content_type"
BASE64 = "base64"


def is_base64(parameters: Mapping[str, Any] | None) -> bool:
    """Whether a tensor's ``parameters`` say its data is base64."""
    return parameters is not None and parameters.get(CONTENT_TYPE) == BASE64


def is_buffer(datatype: str, parameters: Mapping[str, Any] | None) -> bool:
    """Whether a tensor's data is one base64 buffer (numeric, ``content_type=base64``)."""
    return datatype != "BYTES" and is_base64(parameters)


def _decode_bytes(name: str, data: list[Any], parameters: Mapping[str, Any] | None) -> list[bytes]:
    b64 = is_base64(parameters)
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


def _flatten(name: str, data: Any, shape: Sequence[int]) -> list[Any]:
    """The leaves of ``data`` in row-major order, checking nested data against ``shape``.

    Flat data (a list whose first element is not a list) is returned as it is; its
    length and element types are checked by the caller. Nested data must follow the
    shape exactly: every list at depth ``d`` holds ``shape[d]`` items and the leaves sit
    at depth ``len(shape)``, so ragged data is refused even when its element count
    happens to match.
    """
    if isinstance(data, np.ndarray):
        # Not what the wire gives, but callers in Python may pass an array: take its values.
        data = data.reshape(-1).tolist()
    if not isinstance(data, list):
        raise InvalidInput(
            f"input {name!r} data must be a list, got {type(data).__name__}", name=name
        )
    if not data or not isinstance(data[0], list):
        return data
    # Level by level, so that hostile, deeply nested data cannot blow the recursion limit:
    # the walk never goes deeper than the shape, whatever the data's depth.
    level: list[Any] = [data]
    for depth, size in enumerate(shape):
        below: list[Any] = []
        for item in level:
            if not isinstance(item, list) or len(item) != size:
                found = f"{len(item)} items" if isinstance(item, list) else "a scalar"
                raise InvalidInput(
                    f"input {name!r} nested data does not match shape {list(shape)}: "
                    f"expected lists of {size} items at depth {depth}, found {found}",
                    name=name,
                )
            below.extend(item)
        level = below
    return level


def _check_int_range(name: str, datatype: str, info: np.iinfo[Any], lo: int, hi: int) -> None:
    if lo < info.min or hi > info.max:
        raise InvalidInput(
            f"input {name!r} value {lo if lo < info.min else hi} is outside the "
            f"{datatype} range [{info.min}, {info.max}]",
            name=name,
        )


def _decode_base64(
    name: str, datatype: str, shape: Sequence[int], data: Any, *, finite_only: bool
) -> np.ndarray[Any, Any]:
    """A numeric tensor whose data is one base64 string of its little-endian buffer."""
    if not (isinstance(data, list) and len(data) == 1 and isinstance(data[0], str)):
        got = f"{len(data)} element(s)" if isinstance(data, list) else type(data).__name__
        raise InvalidInput(
            f"input {name!r} is {datatype} with content_type=base64: its data must be a "
            f"list of one base64 string (the row-major little-endian buffer), got {got}",
            name=name,
        )
    try:
        raw = base64.b64decode(data[0], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"input {name!r} data is not valid base64", name=name) from None
    dtype = _NUMPY[datatype].newbyteorder("<")
    expected = _numel(shape)
    if len(raw) != expected * dtype.itemsize:
        raise InvalidInput(
            f"input {name!r} of shape {list(shape)} is {datatype}: it takes "
            f"{expected * dtype.itemsize} bytes, but its base64 data decodes to {len(raw)}",
            name=name,
        )
    if datatype == "BOOL" and raw and max(raw) > 1:
        raise InvalidInput(
            f"input {name!r} is BOOL but its base64 data holds a byte other than 0 and 1",
            name=name,
        )
    # A bytearray, so that the array owns writable memory as a decoded JSON tensor does.
    arr = np.frombuffer(bytearray(raw), dtype=dtype)
    if finite_only and dtype.kind == "f" and expected and not np.isfinite(arr).all():
        raise InvalidInput(f"input {name!r} holds NaN or infinity", name=name)
    return arr.astype(_NUMPY[datatype], copy=False).reshape(shape)


def decode(
    name: str,
    datatype: str,
    shape: Sequence[int],
    data: list[Any],
    parameters: Mapping[str, Any] | None = None,
    *,
    finite_only: bool = True,
) -> np.ndarray[Any, Any]:
    """Turn one OIP tensor into a numpy array of its shape and datatype.

    A numeric tensor whose parameters say ``content_type=base64`` carries its values
    as one base64 string of the row-major little-endian buffer (see :func:`encode`).
    ``finite_only`` refuses NaN and infinity there; JSON numbers cannot hold them.
    """
    target = DTYPES.get(datatype)
    if target is None:
        raise InvalidInput(
            f"input {name!r} has datatype {datatype!r}; expected one of {', '.join(DTYPES)}",
            name=name,
        )
    if is_buffer(datatype, parameters):
        return _decode_base64(name, datatype, shape, data, finite_only=finite_only)
    flat = _flatten(name, data, shape)
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
        return arr.reshape(shape)  # a list among the leaves is not a string: refused
    # One C-level pass over the element types (no per-element Python code): it finds the
    # lists nested below the shape's depth and the booleans numpy would silently turn
    # into 1 and 0 when they are mixed with numbers.
    types = set(map(type, flat))
    if list in types:
        raise InvalidInput(
            f"input {name!r} data does not match shape {list(shape)}: it holds lists "
            f"where {'scalar' if not shape else f'depth-{len(shape)}'} values belong",
            name=name,
        )
    target_dtype = _NUMPY[datatype]
    if target_dtype.kind == "f" and expected and (types == _FLOAT_ONLY or types == _INT_OR_FLOAT):
        fast = _floats(flat, target_dtype)
        if fast is not None:
            return fast.reshape(shape)
        # Fall through: the general path below names what is wrong.
    has_bools = bool in types or np.bool_ in types
    if datatype == "BOOL":
        if expected and not types <= _BOOL_TYPES:
            raise InvalidInput(f"input {name!r} is BOOL but its data is not true/false", name=name)
    elif has_bools:
        raise InvalidInput(f"input {name!r} is {datatype} but its data holds booleans", name=name)
    if target_dtype.kind in _INT_KINDS and types == _INT_ONLY:
        # All Python ints: check the range on the ints themselves, since numpy turns
        # ints beyond int64 into float64 or object and the value would read as a float.
        info = np.iinfo(target_dtype)
        _check_int_range(name, datatype, info, min(flat), max(flat))
    try:
        raw = np.asarray(flat)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"input {name!r} data is not numeric: {exc}", name=name) from None
    kind = raw.dtype.kind
    if kind == "O" and target_dtype.kind == "f" and types <= _INT_OR_FLOAT:
        # Python ints too big for int64 in a float tensor: convert them as floats.
        try:
            raw = np.asarray(flat, dtype=np.float64)
        except OverflowError:
            raise InvalidInput(
                f"input {name!r} holds an integer too large for {datatype}", name=name
            ) from None
        kind = "f"
    if expected and (kind not in "biuf" or raw.ndim != 1):
        raise InvalidInput(
            f"input {name!r} is {datatype} but its data holds {raw.dtype.kind!r}-kind values "
            "(strings or mixed types), expected numbers",
            name=name,
        )
    if target_dtype.kind in _INT_KINDS and expected:
        if kind == "f":
            raise InvalidInput(
                f"input {name!r} is {datatype} but its data holds non-integer numbers", name=name
            )
        if types != _INT_ONLY:  # otherwise checked above, on the Python ints
            _check_int_range(name, datatype, np.iinfo(target_dtype), int(raw.min()), int(raw.max()))
    elif target_dtype.kind == "f":
        if raw.dtype == target_dtype:
            out = raw
        else:
            # A finite value beyond the target's range becomes +-inf in the cast: that is
            # refused below, so numpy's overflow warning would only be noise.
            with np.errstate(over="ignore"):
                out = raw.astype(target_dtype)
        if expected and not np.isfinite(out).all():
            if not np.isfinite(raw).all():
                raise InvalidInput(f"input {name!r} holds NaN or infinity", name=name)
            raise InvalidInput(
                f"input {name!r} holds a value outside the {datatype} range "
                f"(max magnitude {float(np.finfo(target_dtype).max):.8g})",
                name=name,
            )
        return out.reshape(shape)
    return raw.astype(target_dtype, copy=False).reshape(shape)


def _floats(flat: list[Any], target: np.dtype[Any]) -> np.ndarray[Any, Any] | None:
    """The common case, plain numbers into a float tensor, in three numpy calls.

    Returns None when anything is off (NaN, infinity, a value beyond the target's
    range, an int too large for a double), leaving the error to the general path.
    """
    try:
        wide = np.array(flat, dtype=np.float64)
    except OverflowError:
        return None
    # max() of the magnitudes is NaN if any value is NaN, so one comparison covers
    # NaN, infinities and values the narrower type cannot hold.
    if not float(np.abs(wide).max()) <= _FLOAT_MAX[target]:
        return None
    return wide if target == wide.dtype else wide.astype(target)


def encode(name: str, array: np.ndarray[Any, Any], *, binary: bool = False) -> dict[str, Any]:
    """One numpy array as an OIP tensor dict whose ``data`` orjson serialises natively.

    BYTES elements are written as UTF-8 text; if any element is not valid UTF-8, all of
    them are written as base64 and the tensor's parameters say ``content_type=base64``.
    With ``binary``, a numeric array's data is one base64 string of its row-major
    little-endian buffer (``content_type=base64`` too): for a float32 embedding, half
    the bytes of its JSON numbers, and no number formatting or parsing either side.
    """
    datatype = datatype_of(array)
    data: Any
    parameters: dict[str, Any] | None = None
    if datatype == "BYTES":
        items = array.reshape(-1).tolist()
        try:
            data = [_bytes_to_str(x) for x in items]
        except UnicodeDecodeError:
            data = [base64.b64encode(_as_bytes(x)).decode("ascii") for x in items]
            parameters = {CONTENT_TYPE: BASE64}
    elif binary:
        # tobytes() is row-major whatever the array's memory order.
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        data = [base64.b64encode(little.tobytes()).decode("ascii")]
        parameters = {CONTENT_TYPE: BASE64}
    else:
        data = np.ascontiguousarray(array).reshape(-1)
    tensor = {"name": name, "shape": list(array.shape), "datatype": datatype, "data": data}
    if parameters is not None:
        tensor["parameters"] = parameters
    return tensor


def encode_list(name: str, array: np.ndarray[Any, Any]) -> dict[str, Any]:
    """Like :func:`encode`, with plain Python lists (for the stdlib json module)."""
    tensor = encode(name, array)
    if isinstance(tensor["data"], np.ndarray):
        tensor["data"] = tensor["data"].tolist()
    return tensor


def _bytes_to_str(item: Any) -> str:
    """UTF-8 text of one BYTES element; raises UnicodeDecodeError for other bytes."""
    if isinstance(item, bytes | bytearray):
        return bytes(item).decode("utf-8")
    return str(item)


def _as_bytes(item: Any) -> bytes:
    if isinstance(item, bytes | bytearray):
        return bytes(item)
    return str(item).encode("utf-8")


def to_numpy(tensor: Mapping[str, Any] | Tensor) -> np.ndarray[Any, Any]:
    """Decode a tensor given as a mapping or a :class:`~schemas.Tensor` (a response
    output, for instance).

    Either encoding of :func:`encode` is read; base64 data may hold NaN or infinity,
    as a model's output may.
    """
    if isinstance(tensor, Tensor):
        # Its fields as they are: model_dump would copy the data.
        return decode(tensor.name, tensor.datatype, tensor.shape, tensor.data,
                      tensor.parameters, finite_only=False)
    return decode(
        tensor["name"],
        tensor["datatype"],
        tensor["shape"],
        tensor["data"],
        tensor.get("parameters"),
        finite_only=False,
    )
