"""One port for every service, routed by path exactly as the Kubernetes ingress routes.

At the root the gateway also answers for the whole platform in its process: /healthz (it
serves), /readyz (every service's readiness, 503 if any is not ready) and /metrics (every
service's metrics, each sample labelled with its service). Each service's own are under its
prefix (/api/tickets/readyz, ...), as through the ingress."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping
from contextlib import AsyncExitStack
from typing import Any

import uvicorn
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


# How long a server keeps an idle keep-alive connection: longer than whatever sits in front
# keeps one (ingress-nginx an upstream connection 60 s, the benchmark's client as long), so
# that the server never closes a connection just as its client sends the next request on it,
# which fails that request (a POST is not sent again). uvicorn's own is 5 s.
KEEP_ALIVE_SECONDS = 75


def server_config(app: ASGIApp, log_level: str) -> uvicorn.Config:
    """The uvicorn configuration every process of `ticketing up` serves with."""
    return uvicorn.Config(app, log_level=log_level.lower(), timeout_keep_alive=KEEP_ALIVE_SECONDS)


# What the root answers for every service it serves (a HEAD as a GET: the server drops the body).
_ROOT_REPORTS = ("/readyz", "/metrics")


class Gateway:
    """Dispatches by path prefix and runs every app's lifespan as its own."""

    def __init__(
        self,
        routes: list[tuple[str | None, FastAPI]],
        services: Mapping[str, FastAPI] | None = None,
    ) -> None:
        """`routes` are (prefix, app); `services` (by name) are what /readyz and /metrics at
        the root report on."""
        # Longest prefix first, so a more specific route wins; apps without a prefix only run.
        routed = [(prefix, app) for prefix, app in routes if prefix is not None]
        self.routes = sorted(routed, key=lambda r: len(r[0]), reverse=True)
        self.apps = [app for _prefix, app in routes]
        self.services = dict(services or {})

    def _app_for(self, path: str) -> FastAPI | None:
        for prefix, app in self.routes:
            if prefix == "/" or path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return app
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        path = scope.get("path", "/")
        if path == "/healthz":
            await _json(send, 200, {"status": "ok"})
            return
        if self.services and scope.get("method") in ("GET", "HEAD") and path in _ROOT_REPORTS:
            await (self._readiness(send) if path == "/readyz" else self._metrics(send))
            return
        app = self._app_for(path)
        if app is None:
            await _json(send, 404, {"errors": [{"message": "Not found", "field": None}]})
            return
        await app(scope, receive, send)

    async def _ask_every_service(self, path: str) -> dict[str, tuple[int, bytes]]:
        names, apps = list(self.services), list(self.services.values())
        answers = await asyncio.gather(*(_get(app, path) for app in apps))
        return dict(zip(names, answers, strict=True))

    async def _readiness(self, send: Send) -> None:
        answers = await self._ask_every_service("/readyz")
        services = {name: _report(body) for name, (_, body) in answers.items()}
        ready = all(status == 200 for status, _ in answers.values())
        # Each part as the services see it: "ok" only where every service that checks it does.
        checks: dict[str, str] = {}
        for report in services.values():
            for part, state in report.items():
                if part != "status":
                    checks[part] = "ok" if checks.get(part, "ok") == state == "ok" else "down"
        body = {"status": "ok" if ready else "unavailable", **checks, "services": services}
        await _json(send, 200 if ready else 503, body)

    async def _metrics(self, send: Send) -> None:
        families: dict[str, Metric] = {}
        for service, app in self.services.items():
            for family in app.state.metrics.registry.collect():
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                merged.samples.extend(
                    sample._replace(labels={**sample.labels, "service": service})
                    for sample in family.samples
                )
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collected(families.values()))
        await _respond(send, 200, generate_latest(registry), CONTENT_TYPE_LATEST)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        stack = AsyncExitStack()
        await receive()  # lifespan.startup
        try:
            for app in self.apps:
                await stack.enter_async_context(app.router.lifespan_context(app))
        except Exception as exc:
            log.exception("a service failed to start")
            await stack.aclose()
            await send({"type": "lifespan.startup.failed", "message": repr(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        try:
            await stack.aclose()
        finally:
            await send({"type": "lifespan.shutdown.complete"})


def _report(body: bytes) -> dict[str, Any]:
    """A service's readiness report; one that is not one (an error page) says unavailable."""
    try:
        report = json.loads(body)
    except ValueError:
        return {"status": "unavailable"}
    return report if isinstance(report, dict) else {"status": "unavailable"}


class _Collected:
    """Metric families already collected, for a registry to render."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> list[Metric]:
        return self.families


async def _get(app: ASGIApp, path: str) -> tuple[int, bytes]:
    """An in-process GET of `path` from `app`: its status and body."""
    scope: Scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "headers": [], "client": None, "server": None,
    }  # fmt: skip
    status, body = 500, bytearray()

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    await app(scope, receive, send)
    return status, bytes(body)


async def _json(send: Send, status: int, body: dict[str, Any]) -> None:
    await _respond(send, status, json.dumps(body).encode(), "application/json")


async def _respond(send: Send, status: int, payload: bytes, content_type: str) -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(payload)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def until_started(server: uvicorn.Server, serving: asyncio.Task[None]) -> bool:
    """Whether `server` (serving in the task) started: True once it serves, False if it
    stopped first. uvicorn reports start-up only through its flag."""
    while not server.started and not serving.done():  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    return server.started
