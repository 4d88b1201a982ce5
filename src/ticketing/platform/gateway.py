"""One port for every service, routed by path exactly as the Kubernetes ingress routes."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import AsyncExitStack
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)


class Gateway:
    """Dispatches by path prefix and runs every app's lifespan as its own."""

    def __init__(self, routes: list[tuple[str | None, FastAPI]]) -> None:
        # Longest prefix first, so a more specific route wins; apps without a prefix only run.
        routed = [(prefix, app) for prefix, app in routes if prefix is not None]
        self.routes = sorted(routed, key=lambda r: len(r[0]), reverse=True)
        self.apps = [app for _prefix, app in routes]

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
        app = self._app_for(path)
        if app is None:
            await _json(send, 404, {"errors": [{"message": "Not found", "field": None}]})
            return
        await app(scope, receive, send)

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


async def _json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
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
