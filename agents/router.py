"""The router agent: validates each request and forwards it to its model's lane.

The lane record keeps the request's bytes as they came (no re-serialisation),
its key, its headers plus the resolved version, and its timestamp, so that the
deadline and the end-to-end latency still count from the producer's send.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import faust
from mode import Service

from agents.replies import reject
from agents.runtime import Runtime
from pipeline.consumer import BatchConsumer
from pipeline.errors import DeadlineExceeded, as_inferline_error
from pipeline.validation import decode_request, parse_request

VERSION_HEADER = "inferline-version"

log = logging.getLogger("inferline.router")


class Router:
    """Routing logic over batches of request records."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.requests_topic = rt.settings.topic("requests")
        self.producer = rt.producer()
        self.consumer = BatchConsumer(
            rt.settings,
            rt.bootstrap_servers,
            topics=[self.requests_topic],
            group_id=rt.settings.group_id("router"),
            handler=self.handle,
            name="router",
        )

    async def start(self) -> None:
        """Start the producer and join the router group (idempotent)."""
        await self.producer.start()
        await self.consumer.start()

    async def stop(self) -> None:
        """Finish the batch in hand, commit, leave the group (idempotent)."""
        await self.consumer.stop()
        await self.producer.stop()

    async def handle(self, records: Sequence[Any]) -> None:
        """Route one batch of request records; returns once every write is acknowledged."""
        rt = self.rt
        s = rt.settings
        outbox = self.producer.outbox()
        now_ms = time.time() * 1000
        routed = rt.metrics.routed
        for msg in records:
            raw: bytes = msg.value or b""
            headers = list(msg.headers or ())
            req = None
            try:
                req = parse_request(raw, max_request_bytes=s.max_request_bytes)
                spec = decode_request(req, rt.registry).spec
                if req.timeout_ms is not None and now_ms - msg.timestamp > req.timeout_ms:
                    raise DeadlineExceeded(req.id, req.timeout_ms, now_ms - msg.timestamp)
            except Exception as exc:
                error = as_inferline_error(exc, "routing the record")
                if error is not exc:
                    log.exception("record %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset,
                                  error)
                reject(
                    rt,
                    outbox,
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
            # Only the router says which version serves: a sender's own header of that
            # name would otherwise reach the worker first.
            headers = [h for h in headers if h[0] != VERSION_HEADER]
            headers.append((VERSION_HEADER, spec.version.encode()))
            outbox.add(
                s.lane_topic(spec.name, req.priority),
                msg.key or req.id.encode(),
                raw,
                timestamp_ms=msg.timestamp,
                headers=headers,
            )
            routed.labels(spec.name, req.priority).inc()
        await outbox.flush()


def install(app: faust.App, rt: Runtime) -> Router:
    """Run a router as a service of ``app``: started and stopped with the Faust worker."""
    router = Router(rt)

    @app.service
    class RouterService(Service):
        async def on_start(self) -> None:
            await router.start()

        async def on_stop(self) -> None:
            await router.stop()

    return router
