"""Error answers shared by the router and the workers: a response and a DLQ record."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from agents.runtime import Runtime
from pipeline.errors import InferlineError
from pipeline.outbox import Outbox
from pipeline.responses import STATUS_FOR_CODE, dlq_headers, error_response
from pipeline.rollout import COPY_TO_HEADER
from pipeline.validation import recover_reply

log = logging.getLogger("inferline.replies")

TRACE_HEADER = "traceparent"


def trace_headers(headers: Sequence[tuple[str, bytes]] | None) -> list[tuple[str, bytes]] | None:
    """The headers a response carries over from its request (W3C trace context)."""
    if not headers:
        return None
    kept = [(k, v) for k, v in headers if k in (TRACE_HEADER, "tracestate")]
    return kept or None


def reject(
    rt: Runtime,
    outbox: Outbox,
    *,
    raw: bytes | None,
    key: bytes | None,
    headers: Sequence[tuple[str, bytes]] | None,
    source_topic: str,
    error: InferlineError,
    request_id: str | None = None,
    reply_to: str | None = None,
    model: str = "",
    version: str | None = None,
    priority: str = "normal",
    dead_letter: bool = True,
) -> None:
    """Queue the answers to a request that cannot be served on ``outbox``.

    The response goes out when an id is known (given, or recovered from the raw
    record); the DLQ record always does when ``dead_letter`` is set, so that
    nothing is lost even when the sender cannot be told.
    """
    s = rt.settings
    if request_id is None and raw is not None:
        request_id, reply_to = recover_reply(raw, s.topic("responses"))
    if request_id is not None:
        value = error_response(
            request_id=request_id,
            model=model,
            version=version,
            error=error,
            worker=rt.worker_id,
        )
        outbox.add(
            reply_to or s.topic("responses"),
            request_id.encode(),
            value,
            headers=trace_headers(headers) or (),
        )
        # The router asked for a copy of the answer (canary comparison): errors count too.
        copy_to = next((v.decode() for k, v in headers or () if k == COPY_TO_HEADER), None)
        if copy_to:
            outbox.add(copy_to, request_id.encode(), value)
    if dead_letter:
        rt.metrics.dlq.labels(error.code, source_topic).inc()
        outbox.add(
            s.topic("dlq"),
            key,
            raw if raw is not None else b"",
            headers=dlq_headers(error, source_topic, list(headers or ())),
        )
    status = STATUS_FOR_CODE.get(error.code, "error")
    rt.metrics.request_child(model or "unknown", version or "", priority, status).inc()
    rt.metrics.errors.labels(model or "unknown", version or "", error.code).inc()
    log.debug("rejected %s from %s: %s", request_id, source_topic, error)
