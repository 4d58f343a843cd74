"""Building response and DLQ records fast: plain dicts serialised by orjson.

The pydantic models in ``schemas`` are the contract; these builders write the
same fields without a model round-trip on the hot path. Tests validate what
they produce against the models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from pipeline.errors import InferlineError

_OPTS = orjson.OPT_SERIALIZE_NUMPY

STATUS_FOR_CODE = {"DEADLINE_EXCEEDED": "expired", "OVERLOADED": "rejected"}

DLQ_CODE = "inferline-error-code"
DLQ_MESSAGE = "inferline-error-message"
DLQ_SOURCE = "inferline-source-topic"


def ok_response(
    *,
    request_id: str,
    model: str,
    version: str,
    outputs: Sequence[dict[str, Any]],
    queue_ms: float,
    batch_wait_ms: float,
    compute_ms: float,
    total_ms: float,
    batch_size: int,
    cost_usd: float,
    worker: str,
    execution_provider: str,
) -> bytes:
    """A successful response record value."""
    return orjson.dumps(
        {
            "id": request_id,
            "model": model,
            "version": version,
            "status": "ok",
            "outputs": outputs,
            "error": None,
            "timing": {
                "queue_ms": round(queue_ms, 3),
                "batch_wait_ms": round(batch_wait_ms, 3),
                "compute_ms": round(compute_ms, 3),
                "total_ms": round(total_ms, 3),
            },
            "batch_size": batch_size,
            "cost_usd": cost_usd,
            "worker": worker,
            "execution_provider": execution_provider,
        },
        option=_OPTS,
    )


def error_response(
    *,
    request_id: str,
    model: str,
    version: str | None,
    error: InferlineError,
    worker: str,
    timing: dict[str, float] | None = None,
    execution_provider: str | None = None,
) -> bytes:
    """An error, expired or rejected response record value, by the error's code."""
    return orjson.dumps(
        {
            "id": request_id,
            "model": model,
            "version": version,
            "status": STATUS_FOR_CODE.get(error.code, "error"),
            "outputs": [],
            "error": {"code": error.code, "message": error.message},
            "timing": timing,
            "batch_size": 0,
            "cost_usd": 0.0,
            "worker": worker,
            "execution_provider": execution_provider,
        }
    )


def dlq_headers(
    error: InferlineError, source_topic: str, original: Sequence[tuple[str, bytes]] = ()
) -> list[tuple[str, bytes]]:
    """Headers of a DLQ record: the original ones plus the error's code, message and source."""
    message = error.message if len(error.message) <= 1000 else error.message[:997] + "..."
    return [
        *original,
        (DLQ_CODE, error.code.encode()),
        (DLQ_MESSAGE, message.encode("utf-8", "replace")),
        (DLQ_SOURCE, source_topic.encode()),
    ]
