"""The router agent: validates each request and forwards it to its model's lane.

The lane record keeps the request's bytes as they came (no re-serialisation),
its key, its headers plus the resolved version, and its timestamp, so that the
deadline and the end-to-end latency still count from the producer's send.

Which version serves a request that names none comes from the routing table
(:mod:`pipeline.gating`): the stable version, or during a rollout the candidate
for its share of request ids; a version no warm worker serves is held in its
lane or avoided per ``INFERLINE_COLD_POLICY``. During a rollout the router also
marks a sample of both arms for the worker to copy their responses to
``<prefix>.rollout``, and mirrors a share of stable requests to the candidate
with that topic as their reply topic (shadow traffic, never seen by clients).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import faust
import orjson
from mode import Service

from agents.replies import reject
from agents.runtime import Runtime
from pipeline.consumer import BatchConsumer
from pipeline.control import ControlView
from pipeline.errors import DeadlineExceeded, as_inferline_error
from pipeline.gating import RoutingTable
from pipeline.rollout import COPY_TO_HEADER, SHADOW_HEADER, Route
from pipeline.tracing import Tracing
from pipeline.validation import parse_request

VERSION_HEADER = "inferline-version"
# Headers only the router may set: a sender's own would otherwise reach the worker.
_ROUTER_HEADERS = frozenset((VERSION_HEADER, COPY_TO_HEADER, SHADOW_HEADER))

log = logging.getLogger("inferline.router")


class Router:
    """Routing logic over batches of request records."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.requests_topic = rt.settings.topic("requests")
        self.producer = rt.producer()
        self.tracing = Tracing.from_settings(rt.settings, "router")
        self.consumer = BatchConsumer(
            rt.settings,
            rt.bootstrap_servers,
            topics=[self.requests_topic],
            group_id=rt.settings.group_id("router"),
            handler=self.handle,
            name="router",
            idle_backoff=True,
        )
        self.rollout_topic = rt.settings.topic("rollout")
        self.control = ControlView(rt.settings, rt.bootstrap_servers)
        self.table = RoutingTable(rt.settings, rt.registry, self.control, rt.metrics)

    async def start(self) -> None:
        """Read the control topic, start the producer, join the router group (idempotent)."""
        # Deployments and readiness first: routing before them would send a canary's
        # share to the stable version, or gate nothing.
        await self.control.start()
        await self.table.start()
        await self.producer.start()
        if self.tracing is not None:
            await self.tracing.start()
        await self.consumer.start()

    async def stop(self) -> None:
        """Finish the batch in hand, commit, leave the group (idempotent)."""
        await self.consumer.stop()
        await self.producer.stop()
        if self.tracing is not None:
            await self.tracing.stop()
        await self.table.stop()
        await self.control.stop()

    async def handle(self, records: Sequence[Any]) -> None:
        """Route one batch of request records; returns once every write is acknowledged."""
        rt = self.rt
        s = rt.settings
        outbox = self.producer.outbox()
        now_ms = time.time() * 1000
        routed = rt.metrics.routed_child
        table = self.table
        table.refresh()
        plans = table.plans
        for msg in records:
            raw: bytes = msg.value or b""
            # Only the router says which version serves and what is copied or mirrored:
            # a sender's own headers of those names would otherwise reach the worker.
            headers = [h for h in msg.headers or () if h[0] not in _ROUTER_HEADERS]
            req = None
            route: Route | None = None
            try:
                req = parse_request(raw, max_request_bytes=s.max_request_bytes)
                plan = plans.get(req.model)
                if plan is not None:
                    route = plan.route(req.id) if req.version is None else plan.explicit(
                        req.version
                    )
                spec = rt.registry.resolve(req.model, route.version if route else req.version)
                # Tensor contents are checked once, by the worker that decodes them: the
                # router stays several times cheaper per request than a worker, so under
                # overload its one FIFO never becomes the queue that priorities cannot reach.
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
            headers.append((VERSION_HEADER, spec.version.encode()))
            lane = s.lane_topic(spec.name, req.priority)
            key = msg.key or req.id.encode()
            if route is not None:
                if route.copy:
                    headers.append((COPY_TO_HEADER, self.rollout_topic.encode()))
                if route.shadow is not None:
                    self._mirror(outbox, lane, key, raw, msg.timestamp, route.shadow)
                table.count(spec.name, route)
            outbox.add(lane, key, raw, timestamp_ms=msg.timestamp, headers=headers)
            routed(spec.name, req.priority).inc()
            if self.tracing is not None:
                self.tracing.route_span(headers, msg.timestamp, time.time() * 1000,
                                        request_id=req.id, model=spec.name,
                                        priority=req.priority)
        await outbox.flush()

    def _mirror(
        self, outbox: Any, lane: str, key: bytes, raw: bytes, timestamp_ms: int, version: str
    ) -> None:
        """Queue a shadow copy of a request for ``version``, answered on the rollout topic."""
        body = orjson.loads(raw)
        body["reply_to"] = self.rollout_topic
        body.pop("version", None)
        outbox.add(
            lane, key, orjson.dumps(body), timestamp_ms=timestamp_ms,
            headers=[(VERSION_HEADER, version.encode()), (SHADOW_HEADER, b"1")],
        )


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
