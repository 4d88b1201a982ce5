"""The app factory every service uses: errors, health, metrics, and the lifespan that runs
the database, the bus connection, the outbox relay and the service's listener."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Annotated, Protocol

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.types import ASGIApp, Receive, Scope, Send

from ticketing.common.auth import install_session_first
from ticketing.common.body_limit import BodyLimit
from ticketing.common.db import Database
from ticketing.common.errors import install_error_handlers
from ticketing.common.head import HeadAsGet
from ticketing.common.messaging import Bus, Listener, Publisher
from ticketing.common.metrics import ServiceMetrics, install_http_metrics
from ticketing.common.migrate import SchemaAtHead
from ticketing.common.openapi import install_contract_openapi
from ticketing.common.outbox import OutboxRelay
from ticketing.common.settings import Settings

log = logging.getLogger(__name__)

SCHEMA_POLL_SECONDS = 2.0  # how often a listener waiting for its migrations looks again


class Runtime:
    """The moving parts of one running service, built from its settings."""

    def __init__(self, name: str, settings: Settings, metadata: Sequence[MetaData]) -> None:
        self.name = name
        self.settings = settings
        self.metrics = ServiceMetrics(name)
        self.db = Database(
            settings.service_database_url(name), metadata=metadata, pool_size=settings.db_pool_size
        )
        self.bus = Bus(settings)
        self.publisher = Publisher(self.bus)
        self.relay = OutboxRelay(
            self.db,
            self.publisher,
            metrics=self.metrics,
            sweep_seconds=settings.outbox_sweep_seconds,
            retention_seconds=settings.outbox_retention_hours * 3600,
        )
        self.listener = Listener(
            service=name,
            db=self.db,
            bus=self.bus,
            metrics=self.metrics,
            max_deliver=settings.listener_max_deliver,
            ack_wait=settings.listener_ack_wait_seconds,
            lanes=settings.listener_lanes,
            fetch_window=settings.listener_fetch_window_seconds,
            gather=settings.listener_gather_seconds,
        )
        # Raises while the schema is behind the service's migrations (production only).
        self.schema_check: Callable[[], Awaitable[object]] | None = None
        self._waiting: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # On a laptop the tables are made on start; production runs `ticketing migrate`
        # (the Kubernetes Job) so that schema changes are reviewed, versioned steps.
        if self.settings.is_dev:
            await self.db.create_all()
        await self.bus.connect()
        # Every process publishes what its own commits wrote, at once; those that listen also
        # sweep for rows left pending (a publish that failed, a process that died meanwhile).
        self.relay.start(sweep=self.settings.run_listeners)

    @property
    def listens(self) -> bool:
        return bool(self.listener.event_types) and self.settings.run_listeners

    async def listen(self) -> None:
        """Start consuming; last, once everything the handlers use is up."""
        if self.listens and self.schema_check is None:
            await self.listener.start()
        elif self.listens:
            # In the background: the process serves its probes (not ready) meanwhile.
            self._waiting = asyncio.create_task(self._listen_once_migrated())
        log.info("%s started", self.name)

    async def _listen_once_migrated(self) -> None:
        """Events handled on tables still missing or old would fail until dead-lettered: the
        listener starts once the migrate Job has brought the schema level."""
        assert self.schema_check is not None
        while True:
            try:
                await self.schema_check()
                await self.listener.start()  # NATS may be away at that moment: again later
                return
            except Exception as exc:
                log.warning("%s waits for its migrations to listen: %r", self.name, exc)
            await asyncio.sleep(SCHEMA_POLL_SECONDS)

    async def stop_listening(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
        await self.listener.stop()

    async def stop(self) -> None:
        await self.stop_listening()
        await self.relay.stop()
        await self.bus.close()
        await self.db.dispose()


def create_service_app(
    name: str,
    settings: Settings,
    *,
    routers: Sequence[APIRouter],
    metadata: Sequence[MetaData] = (),
    register_listeners: Callable[[Listener], None] | None = None,
    extra_lifespan: Callable[[Runtime], AbstractAsyncContextManager[None]] | None = None,
    hot_path: type[HotPath] | None = None,
    ready_checks: Mapping[str, Callable[[], Awaitable[object]]] | None = None,
    migrations: Path | None = None,
) -> FastAPI:
    """A service's FastAPI app; nothing connects until its lifespan starts.

    `extra_lifespan` runs service-specific parts the listeners use (e.g. a job worker) inside
    the common ones, in the processes that listen. `hot_path` is an ASGI middleware, made with
    the app it wraps and the service's app, that answers some requests itself: inside the
    handling of unexpected errors (a 500 in the contract's shape) and the metrics, in front of
    the routes and of the handlers of domain errors (it renders those itself).
    `ready_checks` are more parts /readyz reports on (each raises when its part is down), in
    the processes that listen, where the extra parts run. With `migrations` (the service's
    Alembic versions), outside dev /readyz also says whether the schema is at their head.
    """
    runtime = Runtime(name, settings, metadata)
    if register_listeners is not None:
        register_listeners(runtime.listener)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            async with AsyncExitStack() as stack:
                if extra_lifespan is not None and settings.run_listeners:
                    await stack.enter_async_context(extra_lifespan(runtime))
                await runtime.listen()
                yield
                await runtime.stop_listening()  # before the extra parts its handlers use go
        finally:
            await runtime.stop()

    # FastAPI's own OpenTelemetry layer looks up the global providers on every request (about
    # 1% of a rush's request CPU); the platform reports through its Prometheus metrics and logs.
    app = FastAPI(
        title=f"ticketing {name}",
        lifespan=lifespan,
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.runtime = runtime
    app.state.metrics = runtime.metrics  # read by `ticketing up`'s root /metrics
    install_error_handlers(app)
    install_session_first(app)
    install_contract_openapi(app)
    app.add_middleware(HeadAsGet)  # innermost: the metrics count a HEAD as one
    if hot_path is not None:
        app.add_middleware(hot_path, owner=app)  # the metrics wrap it
    app.add_middleware(BodyLimit)  # before anything reads a body; inside the metrics (a 413 counts)
    install_http_metrics(app, runtime.metrics)
    checks = dict(ready_checks or {}) if settings.run_listeners else {}
    if migrations is not None and not settings.is_dev:  # dev makes its tables on start
        checks["schema"] = runtime.schema_check = SchemaAtHead(runtime.db, name, migrations)
    ops = _ops_router(runtime, checks)
    app.include_router(ops)
    # Also under the service's prefix (before its routes, whose ids these could look like):
    # through the ingress or the gateway, which route by path, that is where they are found.
    for prefix in {router.prefix for router in routers if router.prefix}:
        app.include_router(ops, prefix=prefix)
        app.include_router(_documents_router(app, prefix))
    for router in routers:
        app.include_router(router)
    return app


class HotPath(Protocol):
    def __init__(self, app: ASGIApp, owner: FastAPI) -> None: ...

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None: ...


READY_CHECK_SECONDS = 2.0  # a part that does not answer in time is down, not a hung probe


def _ops_router(
    runtime: Runtime, extra_checks: Mapping[str, Callable[[], Awaitable[object]]]
) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz() -> JSONResponse:
        # At once: a probe has a deadline (3 s on Kubernetes), each check a bound of its own.
        database, *extra = await asyncio.gather(
            _answers(runtime.db.ping), *(_answers(check) for check in extra_checks.values())
        )
        checks = {"database": database, "nats": "ok" if runtime.bus.is_connected else "down"}
        if runtime.listens:
            checks["listener"] = "ok" if runtime.listener.is_running else "down"
        checks.update(zip(extra_checks, extra, strict=True))
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if ready else "unavailable", **checks},
                            status_code=200 if ready else 503)  # fmt: skip

    @router.get("/metrics")
    async def metrics() -> Response:
        return runtime.metrics.render()

    return router


def _documents_router(app: FastAPI, prefix: str) -> APIRouter:
    """The app's OpenAPI document and its docs page under `prefix`, as at the root."""
    router = APIRouter(prefix=prefix, include_in_schema=False)

    @router.get("/openapi.json")
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @router.get("/docs")
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=f"{prefix}/openapi.json", title=app.title)

    return router


async def _answers(check: Callable[[], Awaitable[object]]) -> str:
    try:
        await asyncio.wait_for(check(), READY_CHECK_SECONDS)
    except Exception:  # whatever the part's client raises, the part is down
        return "down"
    return "ok"


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def _session(request: Request) -> AsyncIterator[AsyncSession]:
    # Route handlers are the entrypoint that commits; "function" scope commits before the
    # response is sent, so a failed commit is still reported to the client.
    async with runtime_of(request).db.transaction() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(_session, scope="function")]


async def _runtime(request: Request) -> Runtime:
    # async: FastAPI runs a plain-def dependency in a worker thread, a costly hop per request.
    return runtime_of(request)


RuntimeDep = Annotated[Runtime, Depends(_runtime)]
