"""Turning request records into validated requests and decoded input arrays.

The router and the workers share this, so a record is judged the same way
wherever it is read. Every failure is an :class:`~pipeline.errors.InferlineError`
whose message names the field, the value and the limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import ValidationError

from pipeline import codec
from pipeline.errors import InvalidInput, InvalidRequest
from pipeline.registry import ModelVersion, Registry, TensorSpec
from pipeline.text import check_utf8
from schemas import InferenceRequest, Tensor

_MAX_ID_CHARS = 256
_TOPIC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass(slots=True)
class Decoded:
    """A request whose inputs have been checked against its model version and decoded."""

    request: InferenceRequest
    spec: ModelVersion
    inputs: dict[str, np.ndarray[Any, Any]]
    rows: int


def parse_request(raw: bytes, *, max_request_bytes: int) -> InferenceRequest:
    """Validate a record value as an InferenceRequest; raises InvalidRequest."""
    if len(raw) > max_request_bytes:
        raise InvalidRequest(
            f"request is {len(raw)} bytes, over the max_request_bytes limit of {max_request_bytes}"
        )
    try:
        return InferenceRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(record)"
    value = repr(first.get("input"))
    if len(value) > 80:
        value = value[:77] + "..."
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if first["type"].startswith("json"):
        return f"record is not valid JSON: {first['msg']}"
    return f"field {loc!r}: {first['msg']}; got {value}{more}"


def recover_reply(raw: bytes, default_topic: str) -> tuple[str | None, str]:
    """Best-effort id and reply topic of a record that failed validation.

    A response can only be sent when an id is recoverable; the reply topic falls
    back to the default one when the record's own is missing or unusable.
    """
    try:
        body = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError):
        return None, default_topic
    if not isinstance(body, dict):
        return None, default_topic
    rid = body.get("id")
    if not isinstance(rid, str) or not 0 < len(rid) <= _MAX_ID_CHARS:
        rid = None
    reply = body.get("reply_to")
    if not (
        isinstance(reply, str)
        and 0 < len(reply) <= 249
        and set(reply) <= _TOPIC_CHARS
        and reply not in (".", "..")
    ):
        reply = default_topic
    return rid, reply


def _pair_inputs(request: InferenceRequest, spec: ModelVersion) -> list[tuple[TensorSpec, Tensor]]:
    if [t.name for t in request.inputs] == [s.name for s in spec.inputs]:
        return list(zip(spec.inputs, request.inputs, strict=True))
    given = {t.name: t for t in request.inputs}
    if len(given) != len(request.inputs):
        raise InvalidInput("request names the same input more than once")
    expected = {s.name for s in spec.inputs}
    missing = expected - given.keys()
    if missing:
        raise InvalidInput(
            f"model {spec.key} needs input(s) {sorted(missing)}; got {sorted(given)}",
            name=sorted(missing)[0],
        )
    extra = given.keys() - expected
    if extra:
        raise InvalidInput(
            f"model {spec.key} has no input(s) {sorted(extra)}; it takes {sorted(expected)}",
            name=sorted(extra)[0],
        )
    return [(s, given[s.name]) for s in spec.inputs]


def decode_inputs(request: InferenceRequest, spec: ModelVersion) -> tuple[dict[str, Any], int]:
    """Check inputs against the model's spec and decode them; returns arrays and row count."""
    arrays: dict[str, Any] = {}
    rows = -1
    for s, t in _pair_inputs(request, spec):
        if t.datatype != s.datatype:
            raise InvalidInput(
                f"input {s.name!r} of model {spec.key} must be {s.datatype}, got {t.datatype}",
                name=s.name,
            )
        if len(t.shape) != len(s.shape) or any(
            want != got and want != -1 for want, got in zip(s.shape, t.shape, strict=True)
        ):
            raise InvalidInput(
                f"input {s.name!r} of model {spec.key} must have shape {list(s.shape)} "
                f"(-1 = any), got {t.shape}",
                name=s.name,
            )
        n = t.shape[0] if t.shape else 1
        if rows not in (-1, n):
            raise InvalidInput(
                f"input {s.name!r} has {n} rows but other inputs have {rows}", name=s.name
            )
        rows = n
        arrays[s.name] = codec.decode(t.name, t.datatype, t.shape, t.data, t.parameters)
        if spec.preprocess == "tokenize":  # a text model: refused here, not in its batch
            check_utf8(s.name, arrays[s.name])
    if rows < 1:
        raise InvalidInput(f"request for model {spec.key} has no rows (batch dimension 0)")
    if rows > spec.max_batch_size:
        raise InvalidInput(
            f"request has {rows} rows, over model {spec.key}'s max_batch_size of "
            f"{spec.max_batch_size}"
        )
    return arrays, rows


def decode_request(request: InferenceRequest, registry: Registry) -> Decoded:
    """Resolve the model version and decode the inputs; raises UnknownModel or InvalidInput."""
    spec = registry.resolve(request.model, request.version)
    arrays, rows = decode_inputs(request, spec)
    return Decoded(request, spec, arrays, rows)


def deadline_left_ms(timeout_ms: int | None, record_ts_ms: float, now_ms: float) -> float:
    """Milliseconds until a request's deadline; +inf when it has none."""
    if timeout_ms is None:
        return math.inf
    return record_ts_ms + timeout_ms - now_ms
