"""Fuzzing the running pipeline: thousands of malformed records mixed with valid ones.

Hypothesis draws the records (derandomized, generate phase only, no example
database: the same records on every run). They all go to the requests topic the
same way, as raw bytes with a key of their own, and every one must be accounted
for: a valid request gets an ``ok`` response with the model's answer; a malformed
one gets an error response with the right code (when an id and a reply topic can
be recovered from it) and always a DLQ record with the original bytes. Nothing
may kill the router or the worker, and their memory must stay bounded.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from pipeline.client import InferenceClient
from pipeline.registry import Registry
from pipeline.responses import DLQ_CODE, DLQ_MESSAGE, DLQ_SOURCE
from pipeline.session import ModelSession
from schemas import InferenceResponse
from tests.integration.conftest import Pipeline

# Placeholders the drafts carry until the test gives each record its id and reply topic.
ID = "@@ID@@"
REPLY = "@@REPLY@@"
MIN_CASES = 2_000
EXAMPLES = 2_200
# For all responses of each phase together: the thousands, then the few sent later.
PHASE_TIMEOUTS_S = (90, 30, 20)
DLQ_TIMEOUT_S = 30  # for the DLQ records once the responses are in (or given up on)
RSS_GROWTH_LIMIT_KB = 150 * 1024

# What a record must produce: an ok response, or an error with this code.
OK = "ok"
INVALID_REQUEST = "INVALID_REQUEST"
INVALID_INPUT = "INVALID_INPUT"
UNKNOWN_MODEL = "UNKNOWN_MODEL"
# Where its response goes: the client's reply topic, the default one, or nowhere.
OWN, DEFAULT, NONE = "own", "default", "none"


@dataclass(frozen=True)
class Draft:
    """One record to send, before it gets its id, reply topic and key."""

    kind: str
    expect: str
    reply: str
    body: Any = None  # a JSON value, rendered with orjson ...
    raw: bytes | None = None  # ... or the record value as it is (``body`` unset)
    tombstone: bool = False  # a record with no value at all
    tokens: tuple[tuple[str, bytes], ...] = ()  # "@@Tn@@" strings -> raw JSON text
    finish: Callable[[bytes], bytes] | None = None  # last step (truncate, corrupt)
    id_tail: str = ""  # the id is the test's unique id plus this
    rows: Any = None  # valid requests: their rows, for the in-process prediction
    headers: tuple[tuple[str, bytes], ...] = ()
    # Records in phase n are sent once those of the phases before have been answered:
    # the few that stall a consumer go last, so that they cannot hide other results.
    phase: int = 0


@dataclass
class Case:
    """A draft made concrete: the bytes on the wire and what must come back."""

    n: int
    draft: Draft
    key: bytes
    rid: str | None  # the id a response must carry (None: no response expected)
    value: bytes | None


def _render(d: Draft, rid: str, reply: str) -> bytes | None:
    if d.tombstone:
        return None
    if d.body is None:
        assert d.raw is not None
        out = d.raw
    else:
        out = orjson.dumps(d.body)
    out = out.replace(ID.encode(), orjson.dumps(rid)[1:-1])
    out = out.replace(REPLY.encode(), orjson.dumps(reply)[1:-1])
    for name, text in d.tokens:
        out = out.replace(orjson.dumps(name), text)
    return d.finish(out) if d.finish is not None else out


# ---------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------

REQUEST_FIELDS = {"id", "model", "version", "priority", "timeout_ms", "reply_to", "inputs",
                  "parameters"}
TENSOR_FIELDS = {"name", "shape", "datatype", "data", "parameters"}

json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=6,
)
id_tails = st.text(max_size=10)


def _tensor(data: Any, shape: Any, datatype: Any = "FP32", name: Any = "input",
            **extra: Any) -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data, **extra}


def _request(tensors: list[Any], **fields: Any) -> dict[str, Any]:
    return {"id": ID, "model": "digits", "reply_to": REPLY, "inputs": tensors, **fields}


@st.composite
def rows_st(draw: Any, x: np.ndarray[Any, Any], max_rows: int = 4) -> np.ndarray[Any, Any]:
    """Real held-out digits, or arbitrary finite pixels."""
    if draw(st.booleans()):
        idx = draw(st.lists(st.integers(0, len(x) - 1), min_size=1, max_size=max_rows))
        return np.asarray(x[idx], dtype=np.float32)
    # Arbitrary pixels: the bulk from a generator hypothesis seeds (drawing hundreds of
    # floats one by one is slow), a few of hypothesis's own floats (subnormals, -0.0,
    # the bounds) dropped in at places it picks.
    r = draw(st.integers(1, min(3, max_rows)))
    scale = draw(st.sampled_from([1.0, 16.0, 1000.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows = rng.uniform(-scale, scale, size=(r, 64)).astype(np.float32)
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, r * 64 - 1))
        rows.flat[at] = draw(st.floats(-1000, 1000, width=32))
    return rows


@st.composite
def data_st(draw: Any, rows: np.ndarray[Any, Any]) -> list[Any]:
    """The rows as JSON data: flat or nested, integral values as JSON ints or floats."""
    as_float = rows.astype(np.float64)
    form = draw(st.sampled_from(["flat", "nested", "ints"]))
    if form == "nested":
        return as_float.tolist()
    flat: list[Any] = as_float.ravel().tolist()
    if form == "ints":
        flat = [int(v) if v.is_integer() else v for v in flat]
    return flat


def _good_tensor(draw: Any, rows: np.ndarray[Any, Any]) -> dict[str, Any]:
    tensor = _tensor(draw(data_st(rows)), list(rows.shape))
    if draw(st.booleans()):
        tensor["parameters"] = draw(st.dictionaries(st.text(max_size=5), json_scalars,
                                                    max_size=2))
    return tensor


valid_fields = st.fixed_dictionaries(
    {},
    optional={
        "priority": st.sampled_from(["high", "normal", "batch"]),
        "version": st.sampled_from(["1", None]),
        # Generous: a deadline must not expire while the fuzz backlog drains.
        "timeout_ms": st.none() | st.integers(600_000, 86_400_000),
        "parameters": st.none() | st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    },
)


@st.composite
def valid(draw: Any, x: np.ndarray[Any, Any]) -> Draft:
    rows = draw(rows_st(x))
    body = _request([_good_tensor(draw, rows)], **draw(valid_fields))
    if draw(st.sampled_from([*[False] * 7, True])):
        del body["reply_to"]  # answered on the default reply topic
        return Draft("valid-default-reply", OK, DEFAULT, body, id_tail=draw(id_tails), rows=rows)
    return Draft("valid", OK, OWN, body, id_tail=draw(id_tails), rows=rows)


# Schema violations: the request is JSON with a usable id, so it is answered.
BAD_TOP = {
    "model": [5, None, [], {}, "", "a b", "x" * 65, "dig/its", "d\u00edgits", True],
    "inputs": [{}, "x", 5, None, [], [5], [None], [[]], "TENSORS*65"],
    "priority": ["urgent", "HIGH", "", 1, None, ["high"], {"p": 1}],
    "timeout_ms": ["NEG", 0, "HUGE", 1.5, "abc", [], {}],
    "version": [1, 1.5, "x" * 65, [], {}, False],
    "parameters": [5, "x", [], True, 1.5],
}
BAD_TENSOR = {
    "name": [5, "", None, "x" * 257, []],
    "shape": ["x", 5, None, [-1, 64], [1.5, 64], ["a", 64], [[1], 64], [1] * 17, {}],
    "datatype": ["FLOAT32", "fp32", "", 5, None, "STRING", []],
    "data": ["abc", 5, None, {}, True],
    "parameters": [5, "x", [], False],
}


@st.composite
def bad_field(draw: Any, x: np.ndarray[Any, Any]) -> Draft:
    rows = draw(rows_st(x, max_rows=2))
    tensor = _good_tensor(draw, rows)
    body = _request([tensor], **draw(valid_fields))
    where = draw(st.sampled_from(["top", "top-missing", "top-extra", "tensor",
                                  "tensor-missing", "tensor-extra"]))
    if where == "top":
        field = draw(st.sampled_from(sorted(BAD_TOP)))
        value = draw(st.sampled_from(BAD_TOP[field]))
        if value == "NEG":
            value = draw(st.integers(-(2**63), 0))
        elif value == "HUGE":
            value = draw(st.integers(86_400_001, 2**63 - 1))
        elif value == "TENSORS*65":
            value = [tensor] * 65
        body[field] = value
        kind = f"bad-{field}"
    elif where == "top-missing":
        field = draw(st.sampled_from(["model", "inputs"]))
        del body[field]
        kind = f"missing-{field}"
    elif where == "top-extra":
        name = draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in REQUEST_FIELDS))
        body[name] = draw(json_values)
        kind = "extra-field"
    elif where == "tensor":
        field = draw(st.sampled_from(sorted(BAD_TENSOR)))
        tensor[field] = draw(st.sampled_from(BAD_TENSOR[field]))
        kind = f"bad-tensor-{field}"
    elif where == "tensor-missing":
        field = draw(st.sampled_from(["name", "shape", "datatype", "data"]))
        del tensor[field]
        kind = f"missing-tensor-{field}"
    else:
        name = draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in TENSOR_FIELDS))
        tensor[name] = draw(json_values)
        kind = "extra-tensor-field"
    return Draft(kind, INVALID_REQUEST, OWN, body, id_tail=draw(id_tails))


@st.composite
def deep_data_recoverable(draw: Any) -> Draft:
    """Nesting the request parser refuses (its recursion limit) but the id is readable."""
    depth = draw(st.integers(250, 900))
    body = _request([_tensor("@@T0@@", [1, 64])])
    token = b"[" * depth + b"1.0" + b"]" * depth
    return Draft(f"deep-data-{depth}", INVALID_REQUEST, OWN, body, tokens=(("@@T0@@", token),),
                 id_tail=draw(id_tails))


@st.composite
def bad_id(draw: Any, x: np.ndarray[Any, Any]) -> Draft:
    """Requests whose id cannot be used: only the DLQ can hold them."""
    rows = draw(rows_st(x, max_rows=1))
    body = _request([_good_tensor(draw, rows)])
    choice = draw(st.sampled_from(["missing", "null", "int", "empty", "list", "object",
                                   "float", "bool", "long"]))
    if choice == "missing":
        del body["id"]
    elif choice == "long":  # over the 256-character limit
        body["id"] = ID + "x" * draw(st.integers(260, 600))
    else:
        body["id"] = {"null": None, "int": 5, "empty": "", "list": [ID], "object": {"id": ID},
                      "float": 1.5, "bool": True}[choice]
    return Draft(f"id-{choice}", INVALID_REQUEST, NONE, body)


@st.composite
def bad_reply(draw: Any, x: np.ndarray[Any, Any]) -> Draft:
    """A reply topic that is not one: the error goes to the default reply topic."""
    rows = draw(rows_st(x, max_rows=1))
    body = _request([_good_tensor(draw, rows)])
    body["reply_to"] = draw(st.sampled_from(
        [5, "", "bad topic", "x" * 250, "a/b", "r\u00e9ponses", [], {"t": 1}, True]))
    return Draft("bad-reply_to", INVALID_REQUEST, DEFAULT, body, id_tail=draw(id_tails))


BAD_ELEMENT_TOKENS = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1e39",
                      b"-5e38", b"1e300", b"1.7976931348623157e308"]


@st.composite
def bad_input(draw: Any, x: np.ndarray[Any, Any]) -> Draft:
    """Schema-valid requests whose tensors do not fit the model: INVALID_INPUT."""
    rows = draw(rows_st(x, max_rows=3))
    r = rows.shape[0]
    flat: list[Any] = rows.astype(np.float64).ravel().tolist()
    tokens: tuple[tuple[str, bytes], ...] = ()
    what = draw(st.sampled_from([
        "shape", "length", "ragged", "too-deep", "deep-nesting", "zero-rows", "too-many-rows",
        "datatype", "bytes-for-fp32", "element", "raw-token", "big-int", "input-name",
        "extra-input", "duplicate-input",
    ]))
    tensors: list[Any]
    if what == "shape":
        options = [([r, 63], flat[: r * 63]), ([r * 64], flat), ([r, 64, 1], flat),
                   ([r, 8, 8], flat), ([], flat[:1]), ([r, 65], flat + [0.0] * r)]
        if r > 1:
            options.append(([1, r * 64], flat))
        shape, data = draw(st.sampled_from(options))
        tensors = [_tensor(data, shape)]
    elif what == "length":
        delta = draw(st.integers(-r * 64, 64).filter(lambda d: d != 0))
        data = flat[: r * 64 + delta] if delta < 0 else flat + [1.0] * delta
        tensors = [_tensor(data, [r, 64])]
    elif what == "ragged":
        nested = rows.astype(np.float64).tolist()
        i = draw(st.integers(0, r - 1))
        nested[i] = nested[i][:-1] if draw(st.booleans()) else [*nested[i], 0.0]
        tensors = [_tensor(nested, [r, 64])]
    elif what == "too-deep":
        tensors = [_tensor([[[v] for v in row] for row in rows.tolist()], [r, 64])]
    elif what == "deep-nesting":  # deep, but within what the JSON parser accepts
        depth = draw(st.integers(3, 150))
        tensors = [_tensor("@@T0@@", [r, 64])]
        tokens = (("@@T0@@", b"[" * depth + b"1.0" + b"]" * depth),)
    elif what == "zero-rows":
        tensors = [_tensor([], [0, 64])]
    elif what == "too-many-rows":  # over the registry's max_batch_size of 64
        n = draw(st.integers(65, 70))
        tensors = [_tensor([0] * (n * 64), [n, 64])]
    elif what == "datatype":
        dt = draw(st.sampled_from(["INT64", "INT32", "UINT8", "FP64", "FP16", "BOOL"]))
        data = ([bool(v) for v in flat] if dt == "BOOL"
                else [int(v) for v in flat] if dt.startswith(("INT", "UINT")) else flat)
        tensors = [_tensor(data, [r, 64], datatype=dt)]
    elif what == "bytes-for-fp32":
        text = draw(st.text(max_size=4))
        tensors = [_tensor([f"{text}{i}" for i in range(r * 64)], [r, 64], datatype="BYTES")]
    elif what == "element":  # a non-number among the FP32 values
        bad = draw(st.sampled_from(["text", None, True, False, {}, "list"]))
        i = draw(st.integers(1, r * 64 - 1))
        data = list(flat)
        data[i] = draw(st.text(max_size=5)) if bad == "text" else [1.0] if bad == "list" else bad
        tensors = [_tensor(data, [r, 64])]
    elif what == "raw-token":  # NaN, infinities, values beyond FP32 as JSON text
        i = draw(st.integers(0, r * 64 - 1))
        data = list(flat)
        data[i] = "@@T0@@"
        tokens = (("@@T0@@", draw(st.sampled_from(BAD_ELEMENT_TOKENS))),)
        tensors = [_tensor(data, [r, 64])]
    elif what == "big-int":  # an integer far beyond the FP32 range (>= 10**39)
        digits = draw(st.integers(40, 4000))
        i = draw(st.integers(0, r * 64 - 1))
        data = list(flat)
        data[i] = "@@T0@@"
        sign = b"-" if draw(st.booleans()) else b""
        tokens = (("@@T0@@", sign + b"9" * digits),)
        tensors = [_tensor(data, [r, 64])]
    elif what == "input-name":
        name = draw(st.text(min_size=1, max_size=12).filter(lambda s: s != "input"))
        tensors = [_tensor(flat, [r, 64], name=name)]
    elif what == "extra-input":
        other = draw(st.text(min_size=1, max_size=12).filter(lambda s: s != "input"))
        tensors = [_tensor(flat, [r, 64]), _tensor(flat, [r, 64], name=other)]
    else:
        tensors = [_tensor(flat, [r, 64]), _tensor(flat, [r, 64])]
    body = _request(tensors, **draw(valid_fields))
    return Draft(f"input-{what}", INVALID_INPUT, OWN, body, tokens=tokens,
                 id_tail=draw(id_tails))


@st.composite
def unknown_model(draw: Any, x: np.ndarray[Any, Any]) -> Draft:
    rows = draw(rows_st(x, max_rows=2))
    body = _request([_good_tensor(draw, rows)])
    if draw(st.booleans()):
        body["model"] = draw(st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
                             .filter(lambda m: m != "digits"))
        kind = "unknown-model"
    else:
        # "" and absent both mean the default version.
        body["version"] = draw(st.text(min_size=1, max_size=64).filter(lambda v: v != "1"))
        kind = "unknown-version"
    if draw(st.booleans()):  # the model is judged before its inputs
        body["inputs"][0]["shape"] = [rows.shape[0], 63]
    return Draft(kind, UNKNOWN_MODEL, OWN, body, id_tail=draw(id_tails))


INVALID_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\x80",
                b"\xf8\x88\x80\x80\x80"]


@st.composite
def unreadable(draw: Any, x: np.ndarray[Any, Any]) -> Draft:
    """Records with no recoverable id: not JSON, not UTF-8, not an object, too deep."""
    what = draw(st.sampled_from([
        "binary", "text", "json-not-object", "truncated", "trailing", "bad-utf8",
        "not-utf8", "utf16", "deep-array", "deep-object", "deep-data", "nan-in-int-field",
        "empty", "tombstone",
    ]))
    rows = draw(rows_st(x, max_rows=1))
    request = _request([_good_tensor(draw, rows)])
    if what == "binary":
        raw = draw(st.binary(max_size=300))
        return Draft("not-json-binary", INVALID_REQUEST, NONE, raw=raw)
    if what == "text":
        raw = draw(st.text(max_size=100)).encode()
        return Draft("not-json-text", INVALID_REQUEST, NONE, raw=raw)
    if what == "json-not-object":
        value = draw(json_scalars | st.lists(json_values, max_size=3) | st.just([request]))
        if value is None:
            return Draft("json-null", INVALID_REQUEST, NONE, raw=b"null")
        return Draft("json-not-object", INVALID_REQUEST, NONE, value)
    if what == "truncated":
        frac = draw(st.floats(0, 1, exclude_max=True))
        return Draft("truncated", INVALID_REQUEST, NONE, request,
                     finish=lambda b: b[: int(len(b) * frac)])
    if what == "trailing":
        junk = draw(st.sampled_from([b"x", b"}", b",", b"{}", b"\x00", b"]", b"\"", b"1"]))
        return Draft("trailing-garbage", INVALID_REQUEST, NONE, request,
                     finish=lambda b: b + junk)
    if what == "bad-utf8":
        junk = draw(st.sampled_from(INVALID_UTF8))
        frac = draw(st.floats(0, 1))
        return Draft("invalid-utf8-inside", INVALID_REQUEST, NONE, request,
                     finish=lambda b: b[: int(len(b) * frac)] + junk + b[int(len(b) * frac):])
    if what == "not-utf8":
        raw = draw(st.sampled_from(INVALID_UTF8)) + draw(st.binary(max_size=50))
        return Draft("invalid-utf8", INVALID_REQUEST, NONE, raw=raw)
    if what == "utf16":
        return Draft("utf16", INVALID_REQUEST, NONE, request,
                     finish=lambda b: b.decode().encode("utf-16"))
    if what == "deep-array":
        depth = draw(st.integers(1100, 6000))
        closed = draw(st.booleans())
        return Draft(f"deep-array-{depth}", INVALID_REQUEST, NONE,
                     raw=b"[" * depth + (b"]" * depth if closed else b""))
    if what == "deep-object":
        depth = draw(st.integers(1100, 6000))
        return Draft(f"deep-object-{depth}", INVALID_REQUEST, NONE,
                     raw=b'{"a":' * depth + b"1" + b"}" * depth)
    if what == "deep-data":  # deeper than any JSON parser here goes: no id either
        depth = draw(st.integers(1100, 6000))
        body = _request([_tensor("@@T0@@", [1, 64])])
        return Draft(f"deep-data-{depth}", INVALID_REQUEST, NONE, body,
                     tokens=(("@@T0@@", b"[" * depth + b"]" * depth),))
    if what == "nan-in-int-field":  # not JSON, and the field is an int anyway
        token = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity"]))
        return Draft("nan-timeout", INVALID_REQUEST, NONE, {**request, "timeout_ms": "@@T0@@"},
                     tokens=(("@@T0@@", token),))
    if what == "empty":
        return Draft("empty", INVALID_REQUEST, NONE, raw=b"")
    return Draft("tombstone", INVALID_REQUEST, NONE, tombstone=True)


def draft_st(x: np.ndarray[Any, Any]) -> st.SearchStrategy[Draft]:
    """About 40% valid requests, the rest malformed in every way the kinds above know."""
    kinds: list[st.SearchStrategy[Draft]] = [
        *[valid(x)] * 8,
        *[bad_field(x)] * 4,
        deep_data_recoverable(),
        bad_id(x),
        bad_reply(x),
        *[bad_input(x)] * 4,
        unknown_model(x),
        *[unreadable(x)] * 2,
    ]
    return st.integers(0, len(kinds) - 1).flatmap(lambda i: kinds[i])


def generate(x: np.ndarray[Any, Any]) -> list[Draft]:
    """The fuzz drafts: deterministic (derandomized) and generated once, no shrinking."""
    drafts: list[Draft] = []

    @hyp_settings(
        max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
        phases=[Phase.generate], suppress_health_check=list(HealthCheck),
    )
    @given(draft_st(x))
    def collect(draft: Draft) -> None:
        drafts.append(draft)

    collect()
    return drafts


def fixed_drafts(pipeline: Pipeline) -> list[Draft]:
    """Records the strategies do not draw: sizes at the limit, lane headers, odd topics."""
    limit = pipeline.settings.max_request_bytes
    rows = np.asarray(pipeline.x[:2], dtype=np.float32)
    base = _request([_tensor(rows.astype(np.float64).ravel().tolist(), [2, 64])])
    # The placeholders are replaced by the test's id and reply topic, whose lengths are
    # known only later: the padding is sized then, in build_cases().
    return [
        Draft("size-at-limit", OK, OWN, {**base, "parameters": {"pad": "@@PAD0@@"}}, rows=rows),
        Draft("size-over-limit", INVALID_REQUEST, OWN,
              {**base, "parameters": {"pad": "@@PAD1@@"}}),
        Draft("size-over-limit-garbage", INVALID_REQUEST, NONE, raw=b"x" * (limit + 1)),
        Draft("header-junk", OK, OWN, base, rows=rows,
              headers=(("x-junk", b"\x00\xff" * 50), ("traceparent", b"\xff"))),
        # A producer's own copy of the header the router adds for the worker must not
        # change which version serves the request, nor break the worker.
        Draft("header-version-unknown", OK, OWN, base, rows=rows, phase=1,
              headers=(("inferline-version", b"99"),)),
        Draft("header-version-not-utf8", OK, OWN, base, rows=rows, phase=2,
              headers=(("inferline-version", b"\xff\xfe"),)),
        # In the topic alphabet, but names Kafka refuses: no usable reply topic, so the
        # error goes to the default one, like any other unusable reply_to.
        Draft("reply_to-dot", INVALID_REQUEST, DEFAULT, {**base, "reply_to": "."}, phase=1),
        Draft("reply_to-dotdot", INVALID_REQUEST, DEFAULT, {**base, "reply_to": ".."},
              phase=1),
    ]


def build_cases(drafts: list[Draft], tag: str, reply_topic: str, limit: int) -> list[Case]:
    cases: list[Case] = []
    for n, d in enumerate(drafts):
        base = f"fz-{tag}-{n:05d}"
        rid = base + d.id_tail
        value = _render(d, rid, reply_topic)
        if value is not None and b"@@PAD" in value:
            # Pad to exactly the limit, or one byte over it.
            over = 1 if b"@@PAD1@@" in value else 0
            marker = b"@@PAD1@@" if over else b"@@PAD0@@"
            value = value.replace(marker, b"x" * (limit + over - len(value) + len(marker)))
            assert len(value) == limit + over
        cases.append(Case(n, d, key=base.encode(), rid=rid if d.reply != NONE else None,
                          value=value))
    return cases


# ---------------------------------------------------------------------------------
# Reading back
# ---------------------------------------------------------------------------------

def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def _pids(p: Pipeline) -> dict[str, int]:
    assert p.router.proc is not None and p.worker.proc is not None
    return {"router": p.router.proc.pid, "worker": p.worker.proc.pid}


async def _collect_keys(
    bootstrap: str, topic: str, keys: set[bytes], *, prefix: bytes, timeout_s: float
) -> dict[bytes, list[Any]]:
    """Records of ``topic`` whose key starts with ``prefix``, until every one of ``keys``
    has been seen (and the topic has then been idle a moment), or ``timeout_s`` passes."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                max_partition_fetch_bytes=8 << 20, fetch_max_bytes=64 << 20)
    await consumer.start()
    found: dict[bytes, list[Any]] = {}
    try:
        parts = await consumer._client.fetch_all_metadata()
        tps = [TopicPartition(topic, p) for p in sorted(parts.partitions_for_topic(topic) or ())]
        assert tps, f"no partitions for {topic}"
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        settled = 0
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=300)
            for recs in batch.values():
                for r in recs:
                    if r.key is not None and r.key.startswith(prefix):
                        found.setdefault(r.key, []).append(r)
            if keys <= found.keys():
                # Everything expected is here; one more quiet poll catches strays.
                settled = settled + 1 if not batch else 0
                if settled >= 2:
                    break
    finally:
        await consumer.stop()
    return found


def _predict(p: Pipeline, rows: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], Any]:
    spec = Registry.load(p.settings.registry_path).resolve("digits")
    labels, probs = [], []
    with ModelSession(spec, provider="cpu") as session:
        session.load()
        for i in range(0, len(rows), 64):
            out = session.run({"input": rows[i: i + 64]})
            labels.append(out["label"])
            probs.append(out["probabilities"])
    return np.concatenate(labels), np.concatenate(probs)


def _describe(c: Case) -> str:
    v = c.value
    shown = "None" if v is None else repr(v[:160]) + (f"... ({len(v)} bytes)" if len(v) > 160
                                                       else "")
    return f"#{c.n} {c.draft.kind} key={c.key.decode()} value={shown}"


# ---------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------

# The waits above are bounded (about 200 s at worst); the session's pipeline may start
# inside this test when it runs first, hence more than the suite's 180 s.
@pytest.mark.timeout(400)
async def test_fuzzed_records_are_all_accounted_for(
    pipeline: Pipeline, client: InferenceClient
) -> None:
    s = pipeline.settings
    limit = s.max_request_bytes
    tag = uuid.uuid4().hex[:8]
    drafts = generate(pipeline.x) + fixed_drafts(pipeline)
    cases = build_cases(drafts, tag, client.reply_topic, limit)
    kinds = Counter(c.draft.kind for c in cases)
    assert len(cases) >= MIN_CASES, f"only {len(cases)} cases: {kinds}"
    valid_share = sum(c.draft.expect == OK for c in cases) / len(cases)
    assert 0.25 < valid_share < 0.6, valid_share

    pids = _pids(pipeline)
    rss_before = {role: _rss_kb(pid) for role, pid in pids.items()}
    invalid_before, unmatched_before = client.invalid, client.unmatched

    # The oversized records go through a plain producer: the client's refuses records
    # over max_request_bytes (it is built for requests the pipeline accepts).
    producer = AIOKafkaProducer(bootstrap_servers=pipeline.bootstrap, acks="all",
                                max_request_size=4 * limit)
    await producer.start()
    futures: dict[int, asyncio.Future[InferenceResponse]] = {}
    missing: list[Case] = []
    try:
        for phase, timeout_s in enumerate(PHASE_TIMEOUTS_S):
            batch = [c for c in cases if c.draft.phase == phase]
            # Every waiter is registered before anything is sent.
            waiting = {c.n: client.expect(c.rid) for c in batch
                       if c.draft.reply == OWN and c.rid is not None}
            futures.update(waiting)
            small = [c for c in batch if c.value is None or len(c.value) < limit - 4096]
            for i in range(0, len(small), 256):
                await asyncio.gather(*(
                    client.send_raw(c.value, key=c.key,  # type: ignore[arg-type]
                                    headers=list(c.draft.headers) or None)
                    for c in small[i: i + 256]
                ))
            for c in batch:
                if c not in small:
                    await producer.send_and_wait(s.topic("requests"), c.value, key=c.key,
                                                 headers=list(c.draft.headers) or None)
            # 1. Responses on the client's reply topic.
            if waiting:
                _, not_done = await asyncio.wait(waiting.values(), timeout=timeout_s)
                missing += [c for c in batch if c.n in waiting and waiting[c.n] in not_done]
                for f in not_done:
                    f.cancel()
    finally:
        await producer.stop()
    # No process died: checked first, as it would explain everything missing below.
    assert pipeline.router.returncode is None, pipeline.router.tail()
    assert pipeline.worker.returncode is None, pipeline.worker.tail()
    problems: list[str] = [f"no response: {_describe(c)}" for c in missing[:20]]
    if len(missing) > 20:
        problems.append(f"... and {len(missing) - 20} more without a response")

    # 2. DLQ records (every malformed record) and default-topic responses.
    prefix = f"fz-{tag}-".encode()
    dlq_keys = {c.key for c in cases if c.draft.expect != OK}
    dlq = await _collect_keys(pipeline.bootstrap, s.topic("dlq"), dlq_keys, prefix=prefix,
                              timeout_s=DLQ_TIMEOUT_S)
    default_ids = {c.rid.encode() for c in cases if c.draft.reply == DEFAULT and c.rid}
    default_replies = await _collect_keys(
        pipeline.bootstrap, s.topic("responses"), default_ids, prefix=prefix,
        timeout_s=DLQ_TIMEOUT_S)

    # 3. Check each record's outcome.
    valid_cases = [c for c in cases if c.draft.expect == OK]
    rows = np.concatenate([np.asarray(c.draft.rows, np.float32) for c in valid_cases])
    want_labels, want_probs = _predict(pipeline, rows)
    top2 = np.sort(want_probs, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-3  # argmax ties may break either way
    offsets = np.cumsum([0] + [len(c.draft.rows) for c in valid_cases])
    where = {c.n: (offsets[i], offsets[i + 1]) for i, c in enumerate(valid_cases)}
    outcome: Counter[str] = Counter()
    labels_checked = 0

    for c in cases:
        d = c.draft
        resp: InferenceResponse | None = None
        if d.reply == OWN:
            f = futures[c.n]
            if f.done() and not f.cancelled():
                resp = f.result()
        elif d.reply == DEFAULT and c.rid is not None:
            recs = default_replies.get(c.rid.encode(), [])
            if recs:
                resp = InferenceResponse.model_validate_json(recs[0].value)
            else:
                problems.append(f"no response on the default reply topic: {_describe(c)}")
        dead = dlq.get(c.key, [])

        if d.expect == OK:
            if dead:
                problems.append(f"valid request in the DLQ "
                                f"({dict(dead[0].headers).get(DLQ_CODE)!r}): {_describe(c)}")
            if resp is None:
                continue
            if resp.status != "ok" or resp.id != c.rid:
                problems.append(f"expected ok, got {resp.status} {resp.error}: {_describe(c)}")
                continue
            r = len(d.rows)
            out = {o.name: o for o in resp.outputs}
            if (out.keys() != {"label", "probabilities"} or out["label"].shape != [r]
                    or out["probabilities"].shape != [r, 10] or len(out["label"].data) != r
                    or len(out["probabilities"].data) != r * 10
                    or (resp.model, resp.version) != ("digits", "1")):
                problems.append(f"wrong outputs {[(o.name, o.shape) for o in resp.outputs]} "
                                f"{resp.model}/{resp.version}: {_describe(c)}")
                continue
            lo, hi = where[c.n]
            got = np.asarray(out["label"].data, dtype=np.int64)
            sure = clear[lo:hi]
            if not np.array_equal(got[sure], want_labels[lo:hi][sure]):
                problems.append(f"labels {got.tolist()} != in-process "
                                f"{want_labels[lo:hi].tolist()}: {_describe(c)}")
            labels_checked += int(sure.sum())
            outcome["ok"] += 1
            continue

        # Malformed: a DLQ record always, with the code, the source and the original bytes.
        if not dead:
            problems.append(f"no DLQ record (want {d.expect}): {_describe(c)}")
        else:
            h = dict(dead[0].headers)
            if h.get(DLQ_CODE) != d.expect.encode():
                problems.append(f"DLQ code {h.get(DLQ_CODE)!r}, want {d.expect}: "
                                f"{_describe(c)}")
            # The envelope is checked by the router, tensor contents by the worker.
            sources = {s.topic("requests").encode()}
            if d.expect == "INVALID_INPUT":
                sources |= {s.lane_topic(m, p).encode() for m in ("digits", "minilm")
                            for p in ("high", "normal", "batch")}
            if not h.get(DLQ_MESSAGE) or h.get(DLQ_SOURCE) not in sources:
                problems.append(f"DLQ headers {h}: {_describe(c)}")
            if dead[0].value != (c.value if c.value is not None else b""):
                problems.append(f"DLQ value is not the original record: {_describe(c)}")
        if d.reply == NONE:
            outcome["dlq-only"] += 1 if dead else 0
            continue
        if resp is None:
            continue
        if (resp.status != "error" or resp.error is None or resp.error.code != d.expect
                or not resp.error.message or resp.outputs or resp.id != c.rid):
            problems.append(f"want error {d.expect}, got {resp.status} {resp.error}: "
                            f"{_describe(c)}")
            continue
        outcome["error+dlq"] += 1 if dead else 0

    # Nothing is lost: every record ended up in exactly one of the outcomes.
    accounted = sum(outcome.values())
    assert not problems, (
        f"{len(problems)} problems in {len(cases)} fuzz records "
        f"(accounted for {accounted}):\n" + "\n".join(problems[:60])
    )
    assert accounted == len(cases), (accounted, len(cases), outcome)
    assert labels_checked >= 0.9 * len(rows), (labels_checked, len(rows))
    # Every answer was a valid InferenceResponse, and none was for an id nobody sent.
    assert client.invalid == invalid_before
    assert client.unmatched == unmatched_before

    # Still no process died, and the pipeline still serves.
    assert pipeline.router.returncode is None, pipeline.router.tail()
    assert pipeline.worker.returncode is None, pipeline.worker.tail()
    resp = await client.infer("digits", {"input": pipeline.x[:3]})
    assert resp.status == "ok"
    assert {o.name: o.shape for o in resp.outputs} == {"label": [3], "probabilities": [3, 10]}

    # Memory stays bounded (a generous bound: allocator and broker-client buffers grow).
    rss_after = {role: _rss_kb(pid) for role, pid in pids.items()}
    growth = {role: rss_after[role] - rss_before[role] for role in pids}
    assert all(g < RSS_GROWTH_LIMIT_KB for g in growth.values()), (rss_before, rss_after)
    expected = Counter(c.draft.expect for c in cases)
    print(f"\nfuzz: {len(cases)} records of {len(kinds)} kinds, expected {dict(expected)}, "
          f"outcomes {dict(outcome)}, {labels_checked} labels checked, RSS growth kB {growth}")

