"""pipeline.responses: response and DLQ records, checked against the schemas models."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from pipeline import codec
from pipeline.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InferlineError,
    InvalidInput,
    InvalidRequest,
    Overloaded,
    UnknownModel,
)
from pipeline.responses import (
    DLQ_CODE,
    DLQ_MESSAGE,
    DLQ_SOURCE,
    STATUS_FOR_CODE,
    dlq_headers,
    error_response,
    ok_response,
)
from schemas import InferenceResponse


def _ok(**overrides: object) -> bytes:
    kwargs: dict[str, object] = {
        "request_id": "req-7",
        "model": "digits",
        "version": "1",
        "outputs": [
            codec.encode("label", np.array([3, 9], dtype=np.int64)),
            codec.encode("probabilities", np.full((2, 10), 0.1, dtype=np.float32)),
        ],
        "queue_ms": 1.23456,
        "batch_wait_ms": 2.0004,
        "compute_ms": 3.5,
        "total_ms": 7.89123,
        "batch_size": 5,
        "cost_usd": 1.5e-8,
        "worker": "w-1",
        "execution_provider": "CPUExecutionProvider",
    }
    kwargs.update(overrides)
    return ok_response(**kwargs)  # type: ignore[arg-type]


def test_ok_response_validates() -> None:
    resp = InferenceResponse.model_validate_json(_ok())
    assert resp.id == "req-7"
    assert resp.model == "digits"
    assert resp.version == "1"
    assert resp.status == "ok"
    assert resp.error is None
    assert resp.batch_size == 5
    assert resp.cost_usd == pytest.approx(1.5e-8)
    assert resp.worker == "w-1"
    assert resp.execution_provider == "CPUExecutionProvider"
    assert resp.timing is not None
    assert resp.timing.queue_ms == 1.235
    assert resp.timing.batch_wait_ms == 2.0
    assert resp.timing.compute_ms == 3.5
    assert resp.timing.total_ms == 7.891


def test_ok_response_outputs_decode_back() -> None:
    resp = InferenceResponse.model_validate_json(_ok())
    assert [o.name for o in resp.outputs] == ["label", "probabilities"]
    label = codec.to_numpy(resp.outputs[0].model_dump())
    np.testing.assert_array_equal(label, np.array([3, 9], dtype=np.int64))
    probs = codec.to_numpy(resp.outputs[1].model_dump())
    assert probs.dtype == np.float32
    assert probs.shape == (2, 10)
    np.testing.assert_allclose(probs, 0.1)


def test_ok_response_with_plain_list_outputs() -> None:
    raw = _ok(outputs=[codec.encode_list("embedding", np.zeros((1, 3), dtype=np.float32))])
    resp = InferenceResponse.model_validate_json(raw)
    assert resp.outputs[0].shape == [1, 3]
    assert resp.outputs[0].data == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (DeadlineExceeded("req-7", 100, 250.0), "expired"),
        (Overloaded("queue full: 5000 requests, limit 5000"), "rejected"),
        (InvalidRequest("field 'id': missing"), "error"),
        (InvalidInput("input 'x' is bad", name="x"), "error"),
        (UnknownModel("nope", None, ["digits"]), "error"),
        (InferenceFailed("digits", "1", 4, RuntimeError("boom")), "error"),
        (InferlineError("something odd"), "error"),
    ],
)
def test_error_response_status_by_code(error: InferlineError, status: str) -> None:
    raw = error_response(
        request_id="req-7", model="digits", version=None, error=error, worker="router-1"
    )
    resp = InferenceResponse.model_validate_json(raw)
    assert resp.status == status
    assert resp.error is not None
    assert resp.error.code == error.code
    assert resp.error.message == error.message
    assert resp.outputs == []
    assert resp.batch_size == 0
    assert resp.cost_usd == 0.0
    assert resp.timing is None
    assert resp.version is None
    assert resp.worker == "router-1"
    assert resp.execution_provider is None


def test_status_map() -> None:
    assert STATUS_FOR_CODE == {"DEADLINE_EXCEEDED": "expired", "OVERLOADED": "rejected"}


def test_error_response_with_timing_and_provider() -> None:
    timing = {"queue_ms": 120.0, "batch_wait_ms": 0.0, "compute_ms": 0.0, "total_ms": 121.5}
    raw = error_response(
        request_id="r",
        model="digits",
        version="2",
        error=DeadlineExceeded("r", 100, 120.0),
        worker="w",
        timing=timing,
        execution_provider="CUDAExecutionProvider",
    )
    resp = InferenceResponse.model_validate_json(raw)
    assert resp.status == "expired"
    assert resp.version == "2"
    assert resp.timing is not None
    assert resp.timing.total_ms == 121.5
    assert resp.execution_provider == "CUDAExecutionProvider"
    assert resp.error is not None
    assert "timeout_ms=100" in resp.error.message


def test_error_response_for_an_unreadable_request() -> None:
    raw = error_response(
        request_id="x", model="", version=None, error=InvalidRequest("bad"), worker="router"
    )
    body = orjson.loads(raw)
    assert body["model"] == ""
    error = InferenceResponse.model_validate_json(raw).error
    assert error is not None
    assert error.code == "INVALID_REQUEST"


def test_dlq_headers() -> None:
    error = InvalidInput("input 'x' value 300 is outside the UINT8 range [0, 255]", name="x")
    original = [("traceparent", b"00-abc-def-01"), ("source", b"svc")]
    headers = dlq_headers(error, "inferline.requests", original)
    assert headers[:2] == original
    as_dict = dict(headers)
    assert as_dict[DLQ_CODE] == b"INVALID_INPUT"
    assert as_dict[DLQ_MESSAGE] == error.message.encode()
    assert as_dict[DLQ_SOURCE] == b"inferline.requests"
    assert len(headers) == 5
    assert {DLQ_CODE, DLQ_MESSAGE, DLQ_SOURCE} == {
        "inferline-error-code",
        "inferline-error-message",
        "inferline-source-topic",
    }


def test_dlq_headers_without_originals() -> None:
    headers = dlq_headers(InvalidRequest("nope"), "t")
    assert [k for k, _ in headers] == [DLQ_CODE, DLQ_MESSAGE, DLQ_SOURCE]


def test_dlq_long_message_is_truncated() -> None:
    error = InvalidRequest("m" * 5000)
    message = dict(dlq_headers(error, "t"))[DLQ_MESSAGE]
    assert len(message) == 1000
    assert message.endswith(b"...")
    assert message.startswith(b"m" * 997)
    # A message at the limit is kept whole.
    exact = InvalidRequest("k" * 1000)
    assert dict(dlq_headers(exact, "t"))[DLQ_MESSAGE] == b"k" * 1000


def test_dlq_message_is_utf8() -> None:
    error = InvalidInput("input 'caf\u00e9' is bad", name="caf\u00e9")
    message = dict(dlq_headers(error, "t"))[DLQ_MESSAGE]
    assert message.decode("utf-8") == "input 'caf\u00e9' is bad"
