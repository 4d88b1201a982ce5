"""Prometheus metrics, one registry per service app so that several apps share a process."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


def _route_template(app: Any, scope: Scope) -> str:
    # Label by route template, not raw path, so ids do not explode the label space.
    route = scope.get("route")
    if route is None:
        for candidate in app.router.routes:
            match, _ = candidate.matches(scope)
            if match == Match.FULL:
                route = candidate
                break
    return str(getattr(route, "path", "unmatched"))


class _HttpMetrics:
    """Latency and count per route and status, and the correlation id of each request.

    Plain ASGI rather than @app.middleware("http"): that one runs every request through an
    extra task and memory streams, a large share of a short request's cost.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, owner: FastAPI) -> None:
        self.app = app
        self.metrics = metrics
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        given = next((v for k, v in scope["headers"] if k == _CORRELATION_KEY), b"")
        cid = given.decode("latin-1")[:64] or uuid.uuid4().hex
        token = correlation_id.set(cid)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", ()), (_CORRELATION_KEY, cid.encode("latin-1"))]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            correlation_id.reset(token)
            route = _route_template(self.owner, scope)
            method = scope["method"]
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - start)
            self.metrics.requests.labels(method, route, str(status)).inc()


_CORRELATION_KEY = CORRELATION_HEADER.lower().encode()


def install_http_metrics(app: FastAPI, metrics: ServiceMetrics) -> None:
    app.add_middleware(_HttpMetrics, metrics=metrics, owner=app)
