"""Prometheus metrics, one registry per service app so that several apps share a process."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.routing import Match

from ticketing.common.logs import CORRELATION_HEADER, correlation_id


class ServiceMetrics:
    """The counters and histograms of one service."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        self.requests = self._counter(
            "http_requests_total", "HTTP requests", ["method", "route", "status"]
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            namespace="ticketing",
            registry=self.registry,
        )
        self.events_published = self._counter(
            "events_published_total", "Events published from the outbox", ["type"]
        )
        self.events_handled = self._counter(
            "events_handled_total", "Events consumed, by outcome", ["type", "outcome"]
        )
        self.outbox_backlog = self._gauge("outbox_backlog", "Outbox rows not yet published")
        self.outbox_oldest_age = self._gauge(
            "outbox_oldest_age_seconds", "Age of the oldest unpublished outbox row"
        )
        self.listener_lag = Gauge(
            "listener_lag_seconds",
            "From an event's time to its handling, last seen per type",
            ["type"],
            namespace="ticketing",
            registry=self.registry,
        )

    def _gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(name, doc, namespace="ticketing", registry=self.registry)

    def _counter(self, name: str, doc: str, labels: list[str]) -> Counter:
        return Counter(name, doc, labels, namespace="ticketing", registry=self.registry)

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def _route_template(request: Request) -> str:
    # Label by route template, not raw path, so ids do not explode the label space.
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match == Match.FULL:
            return str(getattr(route, "path", request.url.path))
    return "unmatched"


def install_http_metrics(app: FastAPI, metrics: ServiceMetrics) -> None:
    @app.middleware("http")
    async def _measure(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        start = time.perf_counter()
        status = 500
        cid = request.headers.get(CORRELATION_HEADER) or uuid.uuid4().hex
        token = correlation_id.set(cid[:64])
        try:
            response = await call_next(request)
            status = response.status_code
            response.headers[CORRELATION_HEADER] = cid[:64]
            return response
        finally:
            correlation_id.reset(token)
            route = _route_template(request)
            metrics.latency.labels(request.method, route).observe(time.perf_counter() - start)
            metrics.requests.labels(request.method, route, str(status)).inc()
