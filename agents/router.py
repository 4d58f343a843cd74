"""The router agent: validates each request and forwards it to its model's lane.

The lane record keeps the request's bytes as they came (no re-serialisation),
its key, its headers plus the resolved version, and its timestamp, so that the
deadline and the end-to-end latency still count from the producer's send.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import faust

from agents.replies import reject
from agents.runtime import Runtime
from pipeline.errors import DeadlineExceeded, InferlineError
from pipeline.validation import decode_request, parse_request

VERSION_HEADER = "inferline-version"


class Router:
    """Routing logic; :func:`install` wires it to a Faust agent."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.requests_topic = rt.settings.topic("requests")

    async def handle(self, producer: Any, events: Sequence[faust.EventT]) -> None:
        """Route one chunk of request records and wait until every write is acknowledged."""
        rt = self.rt
        s = rt.settings
        pending: list[asyncio.Future[Any]] = []
        now_ms = time.time() * 1000
        for event in events:
            msg = event.message
            raw: bytes = msg.value
            headers = list(msg.headers or ())
            req = None
            try:
                req = parse_request(raw, max_request_bytes=s.max_request_bytes)
                decoded = decode_request(req, rt.registry)
                if req.timeout_ms is not None:
                    waited_ms = now_ms - msg.timestamp * 1000
                    if waited_ms > req.timeout_ms:
                        raise DeadlineExceeded(req.id, req.timeout_ms, waited_ms)
            except InferlineError as error:
                pending += await reject(
                    rt,
                    producer,
                    raw=raw,
                    key=msg.key,
                    headers=headers,
                    source_topic=msg.topic,
                    error=error,
                    request_id=req.id if req else None,
                    reply_to=(req.reply_to or s.topic("responses")) if req else None,
                    model=req.model if req else "",
                    version=req.version if req else None,
                    priority=req.priority if req else "normal",
                    dead_letter=not isinstance(error, DeadlineExceeded),
                )
                continue
            spec = decoded.spec
            headers.append((VERSION_HEADER, spec.version.encode()))
            pending.append(
                await producer.send(
                    s.lane_topic(spec.name, req.priority),
                    msg.key or req.id.encode(),
                    raw,
                    None,
                    msg.timestamp,
                    headers,
                )
            )
            rt.metrics.routed.labels(spec.name, req.priority).inc()
        if pending:
            await asyncio.gather(*pending)


def install(app: faust.App, rt: Runtime) -> Router:
    """Register the router agent on ``<prefix>.requests``."""
    router = Router(rt)
    s = rt.settings
    topic = app.topic(router.requests_topic, key_type=bytes, value_type=bytes)

    @app.agent(topic, name="inferline.router")  # type: ignore[misc]
    async def route(stream: faust.StreamT[bytes]) -> None:
        async for events in stream.take_events(s.take_max, within=s.take_within_ms / 1000):
            await router.handle(app.producer, events)

    return router
